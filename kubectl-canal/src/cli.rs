//! The command line: `kubectl canal explain|status`, kubeconfig handling as
//! kubectl's (`--kubeconfig`, `KUBECONFIG`, `~/.kube/config`, in-cluster;
//! `--context`), exit codes.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kube::config::{Config, KubeConfigOptions, Kubeconfig};

use crate::explain::Explainer;
use crate::snapshot::Snapshot;
use crate::{Error, format, status, target};

/// Exit code: the connection is allowed (and `status`/`--verify` found nothing wrong).
pub const EXIT_ALLOWED: u8 = 0;
/// Exit code: the connection is denied.
pub const EXIT_DENIED: u8 = 1;
/// Exit code: an error (bad arguments, unknown pod, API unreachable, ...).
pub const EXIT_ERROR: u8 = 2;
/// Exit code of `--verify`: a node's kernel did not hold what its agent
/// programmed when read, holds another generation, or its agent did not answer.
pub const EXIT_UNVERIFIED: u8 = 3;

/// `kubectl canal`: why a connection is allowed or denied, and what each
/// node's agent reports.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-canal",
    bin_name = "kubectl canal",
    version,
    after_help = "Exit codes: 0 allowed, 1 denied, 2 error, 3 --verify found a node's kernel not holding its programmed state (or no answer)."
)]
pub struct Cli {
    /// Path of the kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Whether FROM may open a connection to TO, and why: the source's
    /// egress on its node, the destination's ingress on its node, from the
    /// NodePolicySets and PeerSets those nodes program.
    Explain {
        /// The source pod, NAMESPACE/NAME.
        from: String,
        /// NAMESPACE/NAME[:PORT[/PROTO]] or IP[:PORT[/PROTO]] ([IPv6]:PORT);
        /// PORT a number or a container port name; PROTO TCP (default), UDP, SCTP.
        to: String,
        /// Also ask the agents of both nodes to compare their kernel with
        /// what they programmed (chains, rules, set members) and report it.
        #[arg(long)]
        verify: bool,
    },
    /// Per node: NodePolicySet generation and what the agent programmed,
    /// rule/set/endpoint counts, overlay peers, the last error.
    Status,
}

/// A client from the kubeconfig options, as kubectl finds it.
pub async fn client(
    kubeconfig: Option<&PathBuf>,
    context: Option<&str>,
) -> Result<kube::Client, Error> {
    let opts = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let err = |e: &dyn std::fmt::Display| Error::Kubeconfig(e.to_string());
    let config = match (kubeconfig, context) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| Error::Kubeconfig(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| err(&e))?
        }
        (None, Some(_)) => Config::from_kubeconfig(&opts).await.map_err(|e| err(&e))?,
        (None, None) => Config::infer().await.map_err(|e| err(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| err(&e))
}

/// Runs the command, printing to `out`; returns the exit code.
pub async fn run(cli: &Cli, out: &mut impl Write) -> Result<u8, Error> {
    // Arguments first: a typo should not wait for the API server.
    if let Command::Explain { from, to, .. } = &cli.command {
        target::parse_pod(from)?;
        target::parse_target(to)?;
    }
    let client = client(cli.kubeconfig.as_ref(), cli.context.as_deref()).await?;
    let snap = Snapshot::fetch(&client).await?;
    let (text, code) = match &cli.command {
        Command::Explain { from, to, verify } => {
            let to = target::parse_target(to)?;
            let e = Explainer::new(&snap)?.explain(from, &to)?;
            tracing::debug!(?e, "explained");
            let mut code = if e.allowed { EXIT_ALLOWED } else { EXIT_DENIED };
            let mut text = format::explanation(&e);
            if *verify {
                let list =
                    crate::verify::verify(&client, &e, crate::verify::ANSWER_TIMEOUT).await?;
                text.push_str(&crate::verify::text(&list, crate::verify::ANSWER_TIMEOUT));
                if !list.iter().all(crate::verify::NodeVerify::ok) {
                    code = EXIT_UNVERIFIED;
                }
            }
            (text, code)
        }
        Command::Status => {
            let rows = status::node_statuses(&snap);
            (
                format::status_table(&rows, &status::network_summary(&snap)),
                EXIT_ALLOWED,
            )
        }
    };
    out.write_all(text.as_bytes())
        .map_err(|e| Error::Usage(format!("writing the output: {e}")))?;
    Ok(code)
}
