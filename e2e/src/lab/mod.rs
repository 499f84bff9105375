//! The lab: one machine, real parts (see DESIGN.md, "The lab").
//!
//! `up` builds, in this order: a control plane (etcd + kube-apiserver on the
//! root namespace's loopback, detached), the CRDs and the CanalNetwork
//! `default`; an underlay namespace holding a bridge; an "internet"
//! namespace on it (every node's default gateway, and the host
//! [`names::INTERNET_HOST`] outside the cluster, with an echo server); one
//! namespace per node with `eth0` on the bridge and a Node object registered
//! as a kubelet would; the API forwarder that makes the API server reachable
//! at `127.0.0.1:6443` inside every node namespace; canal-controller in the
//! root namespace; and per node `canal-cni install` and a canal-agent inside
//! the node's namespace. It returns when every node is programmed.
//!
//! Every command works from the state directory alone; [`Lab`] is the same
//! for tests, with `Drop` running `down`.

pub mod cleanup;
pub mod cni;
pub mod echo;
pub mod family;
pub mod forward;
mod harness;
pub mod kernel;
mod lifecycle;
pub mod matrix;
pub mod names;
pub mod netns;
pub mod nodes;
pub mod pods;
pub mod preflight;
pub mod probe;
pub mod prober;
pub mod protocol;
pub mod report;
pub mod spoof;
pub mod state;
mod status;
mod traffic;
pub mod udp_ports;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Client;

pub use cleanup::Removed;
pub use family::{Family, IpFamily};
pub use harness::Lab;
pub use lifecycle::{NodeAdded, add_node, del_node, down, up, wait_programmed};
pub use matrix::Matrix;
pub use names::LabNames;
pub use pods::PodOptions;
pub use probe::{DfOutcome, EchoStream, ProbeOutcome};
pub use protocol::Protocol;
pub use state::{DEFAULT_STATE_DIR, LabRecord, NodeRecord, PodPort, PodRecord, StateDir};
pub use status::status;
pub use traffic::{
    MatrixOptions, MatrixRun, Target, probe, probe_family, run_matrix, target_ip, target_ip_of,
};

use crate::Error;
use crate::binaries::Binaries;
use crate::control_plane;

/// Namespaces of the NetworkPolicy conformance model.
pub const CONFORMANCE_NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Pods in each conformance namespace.
pub const CONFORMANCE_PODS: [&str; 3] = ["a", "b", "c"];

/// The pod network the lab's CanalNetwork uses.
pub const LAB_CLUSTER_CIDR: &str = "10.244.0.0/16";
/// How long `up` and `node add` wait for the network to be programmed.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Default probe timeout.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(2000);

/// The current time as the API server writes it.
pub(crate) fn now() -> serde_json::Value {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap_or_default()
}

/// Where canal's binaries are: `$CANAL_BIN_DIR`, else the directory of the
/// running executable (its parent for a test binary in `target/*/deps`).
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CANAL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// What `up` builds.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Number of nodes (`node-1` ... `node-N`).
    pub nodes: u32,
    /// Run canal-agent and install canal-cni on every node.
    pub agents: bool,
    /// Run canal-controller.
    pub controller: bool,
    /// Where canal's binaries are (default: [`default_bin_dir`]).
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for every node to be programmed.
    pub ready_timeout: Duration,
    /// Remove a lab already in the state directory first (tests re-run
    /// after a crash); otherwise `up` refuses.
    pub replace: bool,
    /// Print each step with the time since `up` began (stderr).
    pub progress: bool,
    /// When `up` fails, leave every process and namespace running for
    /// inspection (otherwise they are stopped; the logs always stay).
    pub keep_on_failure: bool,
    /// The IP families of the underlay, the CanalNetwork and the pods.
    pub ip_family: IpFamily,
    /// The CanalNetwork's `policy.enabled`.
    pub policy: bool,
}

impl Default for UpOptions {
    fn default() -> UpOptions {
        UpOptions {
            nodes: 3,
            agents: true,
            controller: true,
            bin_dir: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            replace: false,
            progress: false,
            keep_on_failure: false,
            ip_family: IpFamily::Ipv4,
            policy: true,
        }
    }
}

/// A running lab: its record, names and an admin client.
#[derive(Clone)]
pub struct Context {
    /// The state directory.
    pub state: StateDir,
    /// What `up` recorded.
    pub lab: LabRecord,
    /// Names and addresses.
    pub names: LabNames,
    /// Admin client.
    pub client: Client,
}

impl Context {
    /// Opens the lab in `state`.
    pub async fn open(state: &StateDir) -> Result<Context, Error> {
        let lab = state.load()?;
        let client = control_plane::client_from_kubeconfig(&state.kubeconfig()).await?;
        Ok(Context {
            names: state.names(),
            state: state.clone(),
            lab,
            client,
        })
    }
}

/// `kubectl` with the lab's kubeconfig.
pub fn kubectl(state: &StateDir) -> Result<std::process::Command, Error> {
    let bins = Binaries::ensure()?;
    let mut cmd = std::process::Command::new(bins.kubectl);
    cmd.env("KUBECONFIG", state.kubeconfig());
    Ok(cmd)
}
