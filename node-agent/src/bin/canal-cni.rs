use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "canal-cni: the canal CNI plugin (CNI spec 1.0.0).\n\nRun by the container runtime with CNI_COMMAND and the network configuration on stdin."
        );
        return ExitCode::SUCCESS;
    }
    let command = std::env::var("CNI_COMMAND").ok();
    let code = canal_agent::cni::main_with(command.as_deref(), &mut std::io::stdout());
    ExitCode::from(code as u8)
}
