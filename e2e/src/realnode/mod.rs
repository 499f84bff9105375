//! The real-kubelet lab (`canal-lab up --kubelet`): the lab's namespaces
//! with a real Kubernetes on them, and canal installed the way users
//! install it.
//!
//! - The control plane (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler) runs in the underlay namespace, on the bridge address
//!   [`control_plane_address`]; the API server advertises that address, so
//!   the `kubernetes` Service leads somewhere routable from every node and
//!   pod. A forwarder ([`forward`]) makes it reachable from the root
//!   namespace's loopback for people, kubectl, helm and the tests.
//! - Every node is one network namespace holding a real kubelet, containerd
//!   (runc) and kube-proxy, in a private mount namespace ([`fsview`]) pinned by
//!   a small holder process, in a cgroup subtree below the harness's own
//!   ([`cgroups`]). Images are imported into each node's containerd
//!   ([`images`]); no registry is involved.
//! - canal is installed with `helm install` of `charts/canal` on nodes that
//!   have no CNI configuration ([`canal`]).
//!
//! Everything stays in namespaces and cgroups the lab made; `down` (the
//! stand-in lab's, with [`teardown::down`] hooked in first) removes it all,
//! also after a crash.

pub mod bins;
pub mod canal;
pub mod cgroups;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod enter;
pub mod forward;
pub mod fsview;
pub mod holder;
pub mod images;
pub mod node;
pub mod pki;
pub mod suite;
pub mod teardown;
pub mod up;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::lab::names::LabNames;
use crate::lab::state::StateDir;

pub use cluster::RealLab;
pub use up::{RealUpOptions, up};

/// The API server's port inside the control-plane namespace.
pub const API_PORT: u16 = 6443;
/// The pod network the chart's default CanalNetwork uses.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// The control plane's address on the underlay bridge (`.2`; `.1` is the
/// internet gateway, nodes start at `.11`).
pub fn control_plane_address(names: &LabNames) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(names.underlay().network()) + 2)
}

/// Paths of the real-kubelet lab inside a state directory:
///
/// ```text
/// DIR/realnode/record.json      what `up --kubelet` made (RealRecord)
/// DIR/realnode/cgroups.json     the cgroup subtree (written before it exists)
/// DIR/realnode/bin/             links to every binary the lab runs
/// DIR/realnode/pki/             CA and every component's certificate
/// DIR/realnode/control/         etcd data, control-plane logs and pid files
/// DIR/nodes/<node>/node.json    the node (as the stand-in lab records it)
/// DIR/nodes/<node>/real/        holder, containerd, kubelet, kube-proxy:
///                               configs, logs, pid files, the node's own
///                               directories (root/) and overlay uppers (fs/)
/// ```
#[derive(Debug, Clone)]
pub struct RealPaths {
    /// `DIR/realnode`.
    pub dir: PathBuf,
    state: StateDir,
}

impl RealPaths {
    /// The paths of the lab in `state`.
    pub fn new(state: &StateDir) -> RealPaths {
        RealPaths {
            dir: state.dir.join("realnode"),
            state: state.clone(),
        }
    }
    /// The record.
    pub fn record(&self) -> PathBuf {
        self.dir.join("record.json")
    }
    /// The cgroup plan.
    pub fn cgroups(&self) -> PathBuf {
        self.dir.join("cgroups.json")
    }
    /// Linked binaries.
    pub fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }
    /// Certificates.
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    /// Control-plane files.
    pub fn control(&self) -> PathBuf {
        self.dir.join("control")
    }
    /// The kubeconfig used inside the control-plane namespace
    /// (`https://127.0.0.1:6443`, admin).
    pub fn inner_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig-inner")
    }
    /// A node's files.
    pub fn node(&self, name: &str) -> NodeFiles {
        NodeFiles {
            dir: self.state.node(name).dir.join("real"),
        }
    }
}

/// One real node's files.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    /// `DIR/nodes/<node>/real`.
    pub dir: PathBuf,
}

impl NodeFiles {
    /// A log file.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
    /// A pid file.
    pub fn pid(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }
    /// A config file.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// What `up --kubelet` recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RealRecord {
    /// The control plane's underlay address.
    pub control_plane: Ipv4Addr,
    /// The forwarder's port on the root namespace's loopback.
    pub api_port: u16,
    /// Image references imported into every node.
    pub images: Vec<String>,
    /// The canal image the chart runs (`repository:tag`).
    pub canal_image: String,
    /// The helm release of canal (empty when not installed).
    pub release: String,
    /// Seconds `up` took.
    pub up_seconds: f64,
}

/// Whether the lab in `state` is a real-kubelet lab.
pub fn is_real(state: &StateDir) -> bool {
    RealPaths::new(state).dir.exists()
}
