//! Command-line flags of canal-controller. Every flag also reads an
//! environment variable (`CANAL_<FLAG>`, or the Downward API's `POD_NAME` /
//! `POD_NAMESPACE`), for the Helm chart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use canal_runtime::logging::LogFormat;
use clap::Parser;

use crate::leader::LeaseConfig;

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

    /// Elect one active replica through a coordination.k8s.io Lease
    /// (`--leader-elect=false` runs without one: only for a single replica).
    #[arg(
        long,
        env = "CANAL_LEADER_ELECT",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub leader_elect: bool,

    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,

    /// Name of the Lease.
    #[arg(long, env = "CANAL_LEASE_NAME", default_value = "canal-controller")]
    pub lease_name: String,

    /// This replica's identity in the Lease; default <hostname>-<pid>.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Seconds a Lease stays valid without renewal; a standby takes over
    /// that long (plus one retry period at most) after the leader dies.
    #[arg(long, env = "CANAL_LEASE_DURATION_SECONDS", default_value_t = 10)]
    pub lease_duration_seconds: u64,

    /// Seconds the leader keeps failing to renew before it stops writing
    /// and steps down; must be shorter than the lease duration.
    #[arg(long, env = "CANAL_LEASE_RENEW_DEADLINE_SECONDS", default_value_t = 7)]
    pub lease_renew_deadline_seconds: u64,

    /// Seconds between renewals (leader) and attempts (standby).
    #[arg(long, env = "CANAL_LEASE_RETRY_PERIOD_SECONDS", default_value_t = 2)]
    pub lease_retry_period_seconds: u64,

    /// Node writes in flight at once.
    #[arg(long, env = "CANAL_MAX_CONCURRENT_WRITES", default_value_t = 32)]
    pub max_concurrent_writes: usize,
}

impl Args {
    /// The election settings.
    pub fn lease(&self) -> LeaseConfig {
        LeaseConfig {
            namespace: self.lease_namespace.clone(),
            name: self.lease_name.clone(),
            identity: self.identity.clone().unwrap_or_else(default_identity),
            duration: Duration::from_secs(self.lease_duration_seconds),
            renew_deadline: Duration::from_secs(self.lease_renew_deadline_seconds),
            retry_period: Duration::from_secs(self.lease_retry_period_seconds),
        }
    }
}

/// `<hostname>-<pid>`: unique per process on a machine.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "canal-controller".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("canal-controller").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn leader_election_defaults_on_and_can_be_turned_off() {
        assert!(parse(&[]).leader_elect);
        assert!(parse(&["--leader-elect"]).leader_elect);
        assert!(!parse(&["--leader-elect=false"]).leader_elect);
        let lease = parse(&["--identity", "pod-1"]).lease();
        assert_eq!(lease.identity, "pod-1");
        assert_eq!(lease.name, "canal-controller");
        assert!(lease.validate().is_ok());
        assert!(
            parse(&[])
                .lease()
                .identity
                .ends_with(&format!("-{}", std::process::id()))
        );
    }
}
