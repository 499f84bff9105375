//! Writes the CRD YAML generated from the Rust types into the Helm chart, or
//! checks that the committed files match (`--check`, used by CI).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Generate canal's CustomResourceDefinitions from the Rust API types.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory to write one YAML file per CRD into.
    #[arg(long, default_value = "charts/canal/crds")]
    out_dir: PathBuf,
    /// Compare instead of writing; exit 1 when a file differs or is missing.
    #[arg(long)]
    check: bool,
    /// Print every CRD to stdout as one multi-document YAML stream instead.
    #[arg(long)]
    stdout: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("crdgen: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, String> {
    let mut drift = false;
    for crd in canal_crds::crd::all() {
        let yaml = canal_crds::crd::to_yaml(&crd).map_err(|e| format!("serialising CRD: {e}"))?;
        if args.stdout {
            println!("---\n{yaml}");
            continue;
        }
        let path = args.out_dir.join(canal_crds::crd::file_name(&crd));
        if args.check {
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            if committed != yaml {
                eprintln!(
                    "crdgen: {} differs from the Rust types; run `cargo run -p canal-crds --bin crdgen`",
                    path.display()
                );
                drift = true;
            }
        } else {
            std::fs::create_dir_all(&args.out_dir)
                .map_err(|e| format!("creating {}: {e}", args.out_dir.display()))?;
            std::fs::write(&path, yaml).map_err(|e| format!("writing {}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(if drift {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
