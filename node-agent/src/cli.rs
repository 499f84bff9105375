//! Command-line flags of canal-agent. Every flag also reads an environment
//! variable (`CANAL_<FLAG>`, and `NODE_NAME` for the node), for the DaemonSet.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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

    /// Period of the full resync that repairs drift in routes, neighbours,
    /// FDB entries and iptables rules (e.g. 10s, 500ms, 1m).
    #[arg(long, env = "CANAL_RESYNC_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Set the Node's NetworkUnavailable condition to False (reason
    /// CanalIsUp) once the overlay is programmed, as flannel does.
    #[arg(long, env = "CANAL_SET_NETWORK_UNAVAILABLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub set_network_unavailable: bool,

    /// Period of the NetworkPolicy drift check: re-read the canal chains and
    /// ipsets from the kernel and repair what someone else changed (policy
    /// changes themselves apply at once, not on this timer).
    #[arg(long, env = "CANAL_POLICY_RESYNC_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub policy_resync_interval: Duration,
}

/// Parses `10s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 10s, 500ms or 1m"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("{text:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
