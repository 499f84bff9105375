//! Command-line flags of canal-controller. Every flag also reads an
//! environment variable (`CANAL_<FLAG>`), for the Helm chart.

use std::net::SocketAddr;
use std::path::PathBuf;

use canal_runtime::logging::LogFormat;
use clap::Parser;

/// canal's cluster controller: reconciles the CanalNetwork, allocates pod
/// CIDRs to Nodes, writes their VTEP annotations and compiles NetworkPolicy.
#[derive(Parser, Debug, Clone)]
#[command(name = "canal-controller", version, about)]
pub struct Args {
    /// kubeconfig to use; default: in-cluster config, then $KUBECONFIG / ~/.kube/config.
    #[arg(long, env = "CANAL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "CANAL_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Log filter (RUST_LOG syntax; RUST_LOG overrides it).
    #[arg(long, env = "CANAL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "CANAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
