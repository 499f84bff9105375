//! canal-lab: the local lab (see DESIGN.md for the command contract).

use std::path::PathBuf;
use std::process::ExitCode;

use canal_e2e::lab::{self, StateDir, UpOptions};
use clap::{Parser, Subcommand};

/// canal's local lab: a real etcd + kube-apiserver, node network namespaces,
/// and canal's real binaries, on one machine.
#[derive(Parser, Debug)]
#[command(name = "canal-lab", version, about)]
struct Cli {
    /// Where the lab keeps its state (kubeconfig, logs, pid files).
    #[arg(long, global = true, default_value = lab::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the lab; returns when it is ready.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
    },
    /// Stop everything and remove what `up` made.
    Down,
    /// Show what is running.
    Status,
    /// Run kubectl with the lab's kubeconfig: `canal-lab kubectl -- get nodes`.
    Kubectl {
        /// Arguments for kubectl.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    canal_runtime_logging();
    let state = StateDir::new(&cli.state_dir);
    match run(cli.command, &state).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("canal-lab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn canal_runtime_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(command: Command, state: &StateDir) -> Result<ExitCode, canal_e2e::Error> {
    match command {
        Command::Up { nodes } => {
            let started = std::time::Instant::now();
            let lab = lab::up(state, &UpOptions { nodes }).await?;
            println!(
                "lab up in {:.1}s: API server {}\nkubeconfig: {}\ntry: canal-lab --state-dir {} kubectl -- get crd",
                started.elapsed().as_secs_f64(),
                lab.server,
                state.kubeconfig().display(),
                state.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Down => {
            let stopped = lab::down(state);
            if stopped.is_empty() {
                println!("nothing was running; {} removed", state.dir.display());
            } else {
                println!(
                    "stopped {}; {} removed",
                    stopped.join(", "),
                    state.dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let lab = state.load()?;
            let running = lab::control_plane_running(state);
            println!(
                "API server {} ({})\nkubeconfig: {}",
                lab.server,
                if running { "running" } else { "NOT running" },
                state.kubeconfig().display()
            );
            Ok(if running {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Kubectl { args } => {
            state.load()?;
            let status = lab::kubectl(state)?
                .args(&args)
                .status()
                .map_err(|e| canal_e2e::Error::Io("running kubectl".into(), e))?;
            Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
        }
    }
}
