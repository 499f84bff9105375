use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use canal_agent::cni::{self, install::InstallOptions};
use clap::Parser;

/// canal-cni: the canal CNI plugin (CNI spec 1.0.0; STATUS and GC of 1.1.0).
///
/// Run by the container runtime with CNI_COMMAND set and the network
/// configuration on stdin. `canal-cni install` installs the plugin.
#[derive(Parser, Debug)]
#[command(name = "canal-cni", version, about)]
enum Cli {
    /// Copy this binary into the CNI bin directory and write the conflist
    /// (canal-cni chained with portmap).
    Install {
        /// CNI plugin directory on the host.
        #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// CNI configuration directory on the host.
        #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// canal-agent's run directory (network.json).
        #[arg(long, env = "CANAL_RUN_DIR", default_value = "/run/canal")]
        run_dir: PathBuf,
        /// Where pod address allocations are recorded.
        #[arg(long, env = "CANAL_CNI_DATA_DIR", default_value = "/var/lib/cni/canal")]
        data_dir: PathBuf,
        /// File name of the conflist.
        #[arg(long, env = "CNI_CONF_NAME", default_value = "10-canal.conflist")]
        conflist_name: String,
        /// Pod MTU; 0 uses canal-agent's.
        #[arg(long, env = "CNI_MTU", default_value_t = 0)]
        mtu: u32,
        /// Another plugin binary the conflist chains (portmap), copied into
        /// the bin directory when the host has none of that name. Repeatable.
        #[arg(long = "extra-plugin", value_name = "PATH")]
        extra_plugins: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        let env = cni::config::CniEnv::from_process();
        let mut stdin = Vec::new();
        if env.command != "VERSION" {
            let _ = std::io::stdin().read_to_end(&mut stdin);
        }
        let code = cni::main_with(&env, &stdin, &mut std::io::stdout());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let Cli::Install {
        cni_bin_dir,
        cni_conf_dir,
        run_dir,
        data_dir,
        conflist_name,
        mtu,
        extra_plugins,
    } = Cli::parse();
    let opts = InstallOptions {
        cni_bin_dir,
        cni_conf_dir,
        run_dir,
        data_dir,
        conflist_name,
        mtu,
        extra_plugins,
    };
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("canal-cni install: locating this binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cni::install::install(&opts, &me) {
        Ok((bin, conf)) => {
            println!("installed {} and {}", bin.display(), conf.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("canal-cni install: {e}");
            ExitCode::FAILURE
        }
    }
}
