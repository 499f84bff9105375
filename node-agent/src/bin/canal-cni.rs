use std::io::Read;
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
    Install(InstallOptions),
}

fn main() -> ExitCode {
    // A runtime runs the plugin with no arguments: without CNI_COMMAND that
    // is still a CNI call and gets a CNI error document. Arguments mean a
    // person (or the chart's init container): `install`, `--help`.
    if std::env::var_os("CNI_COMMAND").is_some() || std::env::args_os().len() <= 1 {
        let env = cni::config::CniEnv::from_process();
        let mut stdin = Vec::new();
        if env.command != "VERSION" {
            let _ = std::io::stdin().read_to_end(&mut stdin);
        }
        let code = cni::main_with(&env, &stdin, &mut std::io::stdout());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let Cli::Install(opts) = Cli::parse();
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
