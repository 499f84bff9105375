//! The seam where other node-side components (NetworkPolicy enforcement)
//! plug into canal-agent. The connectivity half publishes what it knows about
//! the node on a `watch` channel; a component receives the shared client,
//! registry and run directory, runs as its own task, and never reaches into
//! the overlay's internals (nor the overlay into it).
//!
//! [`crate::run`] runs the agent with NetworkPolicy enforcement
//! ([`crate::policy::component::PolicyComponent`]); `run_with` takes any set.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use canal_crds::NetworkConfig;
use ipnet::IpNet;
use tokio::sync::watch;

pub use crate::overlay::family::Family;

/// One IP family of this node's pod network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFamily {
    /// The family.
    pub family: Family,
    /// The family's pod range (one of the CanalNetwork's clusterCIDRs).
    pub cluster_cidr: IpNet,
    /// This node's pod subnet of the family.
    pub node_subnet: IpNet,
    /// The underlay interface of the family.
    pub underlay_interface: String,
    /// This node's underlay address of the family.
    pub node_ip: IpAddr,
    /// The family's VXLAN device (`flannel.<VNI>` or `flannel-v6.<VNI>`),
    /// if the backend uses one.
    pub vxlan_device: Option<String>,
}

/// What the connectivity half knows about this node once it has programmed
/// it; republished whenever any of it changes.
///
/// `families` lists every family this node has a subnet of, in the
/// cluster's order; the single-valued fields are the first family's (the
/// IPv4 one when the node has one), as before families existed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNetwork {
    /// This node's name.
    pub node_name: String,
    /// This node's pod subnet (IPv4 when it has one, else IPv6).
    pub node_subnet: IpNet,
    /// The validated CanalNetwork `default` in effect (clusterCIDRs,
    /// `policy.enabled`, `defaultEndpointToHostAction`, ...).
    pub config: NetworkConfig,
    /// MTU of pod interfaces (what fits every family's overlay).
    pub pod_mtu: u32,
    /// The underlay interface (of the first family).
    pub underlay_interface: String,
    /// This node's underlay address (of the first family).
    pub node_ip: IpAddr,
    /// The VXLAN device of the first family, if the backend uses one.
    pub vxlan_device: Option<String>,
    /// Every family, in the cluster's order.
    pub families: Vec<NodeFamily>,
}

impl NodeNetwork {
    /// The family's entry, if this node has a subnet of it.
    pub fn family(&self, family: Family) -> Option<&NodeFamily> {
        self.families.iter().find(|f| f.family == family)
    }
}

/// Everything a component gets from the agent.
#[derive(Clone)]
pub struct ComponentContext {
    /// Kubernetes client (the agent's identity).
    pub client: kube::Client,
    /// This node's name.
    pub node_name: String,
    /// The run directory shared with canal-cni (`policy-enabled`,
    /// `endpoints/` live here).
    pub run_dir: PathBuf,
    /// The registry served on `/metrics`; register with a `canal_` prefix.
    pub registry: prometheus::Registry,
    /// The node's network facts: None until the first successful sync.
    pub network: watch::Receiver<Option<Arc<NodeNetwork>>>,
    /// The component's part of the agent's `/readyz`: closed until the
    /// component opens it (after its first full sync).
    pub readiness: canal_runtime::health::ReadinessGate,
}

/// A component's failure; it stops the agent (the DaemonSet restarts it).
pub type ComponentError = Box<dyn std::error::Error + Send + Sync>;

/// A future a component runs as.
pub type ComponentFuture = Pin<Box<dyn Future<Output = Result<(), ComponentError>> + Send>>;

/// A node-side component run by canal-agent next to the overlay.
pub trait NodeComponent: Send + 'static {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// Runs until the agent stops (the task is dropped on shutdown).
    /// Returning an error stops the agent.
    fn run(self: Box<Self>, ctx: ComponentContext) -> ComponentFuture;
}
