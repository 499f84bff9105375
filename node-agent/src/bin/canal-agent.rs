use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = canal_agent::cli::Args::parse();
    canal_runtime::logging::init(args.log_format, &args.log_level);
    match canal_agent::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canal-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
