use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = canal_controller::cli::Args::parse();
    canal_runtime::logging::init(args.log_format, &args.log_level);
    match canal_controller::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canal-controller: {e}");
            ExitCode::FAILURE
        }
    }
}
