//! The seam where other node-side components (NetworkPolicy enforcement)
//! plug into canal-agent. The connectivity half publishes what it knows about
//! the node on a `watch` channel; a component receives the shared client,
//! registry and run directory, runs as its own task, and never reaches into
//! the overlay's internals (nor the overlay into it).
//!
//! [`crate::run`] runs the agent with NetworkPolicy enforcement
//! ([`crate::policy::component::PolicyComponent`]); `run_with` takes any set.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use canal_crds::NetworkConfig;
use ipnet::Ipv4Net;
use tokio::sync::watch;

/// What the connectivity half knows about this node once it has programmed
/// it; republished whenever any of it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNetwork {
    /// This node's name.
    pub node_name: String,
    /// This node's pod subnet.
    pub node_subnet: Ipv4Net,
    /// The validated CanalNetwork `default` in effect (clusterCIDR,
    /// `policy.enabled`, `defaultEndpointToHostAction`, ...).
    pub config: NetworkConfig,
    /// MTU of pod interfaces.
    pub pod_mtu: u32,
    /// The underlay interface.
    pub underlay_interface: String,
    /// This node's underlay address.
    pub node_ip: Ipv4Addr,
    /// The VXLAN device, if the backend uses one.
    pub vxlan_device: Option<String>,
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
