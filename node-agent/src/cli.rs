//! Command-line flags of canal-agent. Every flag also reads an environment
//! variable (`CANAL_<FLAG>`, and `NODE_NAME` for the node), for the DaemonSet.

use std::net::SocketAddr;
use std::path::PathBuf;

use canal_runtime::logging::LogFormat;
use clap::Parser;

/// canal's node agent: programs the VXLAN overlay, masquerade and
/// NetworkPolicy of one node into its kernel.
#[derive(Parser, Debug, Clone)]
#[command(name = "canal-agent", version, about)]
pub struct Args {
    /// Name of the Node this agent runs on.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// kubeconfig to use; default: in-cluster config, then $KUBECONFIG / ~/.kube/config.
    #[arg(long, env = "CANAL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Directory for state shared with canal-cni (the node subnet and MTU).
    #[arg(long, env = "CANAL_RUN_DIR", default_value = "/run/canal")]
    pub run_dir: PathBuf,

    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "CANAL_METRICS_ADDR", default_value = "0.0.0.0:9091")]
    pub metrics_addr: SocketAddr,

    /// Log filter (RUST_LOG syntax; RUST_LOG overrides it).
    #[arg(long, env = "CANAL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "CANAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
