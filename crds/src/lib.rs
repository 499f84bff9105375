//! The `canal.dev/v1alpha1` API: the types users and components exchange
//! through the Kubernetes API server, the stable names derived from them, and
//! the client-side half of the validation the API server enforces.
//!
//! Nothing in this crate talks to a cluster; it is shared by the controller,
//! the node agent, the CNI plugin and the lab.

// kube's `printcolumn(...)` attributes repeat keys by design; the lint misreads them.
#![allow(clippy::duplicated_attributes)]

pub mod annotations;
pub mod assemble;
pub mod canal_network;
pub mod condition;
pub mod crd;
pub mod names;
pub mod node_policy_set;
pub mod peer_set;
pub mod policy_group;
mod root;
pub mod sharding;
pub mod validate;

pub use canal_network::{
    Backend, BackendType, CanalNetwork, CanalNetworkSpec, CanalNetworkStatus, EndpointToHostAction,
    EstablishedFlows, PolicyConfig, PolicyDataplane,
};
pub use node_policy_set::{
    CompiledPolicy, DriftRepair, Endpoint, IpBlock, KernelCheck, NamedPort, NodeEndpoint,
    NodePolicySet, NodePolicySetObjectSpec, NodePolicySetSpec, NodePolicySetStatus, Peer,
    PortMatch, Protocol, Rule, VERIFY_REQUEST_ANNOTATION,
};
pub use peer_set::{
    NamedPortRef, PeerSelector, PeerSet, PeerSetObjectSpec, PeerSetSpec, PortMember,
};
pub use policy_group::{GroupPolicy, PolicyGroup, PolicyGroupSpec, PolicyType};
pub use sharding::{MAX_OBJECT_BYTES, VersionRef};
pub use validate::{NetworkConfig, SpecError};

/// The API group of every canal resource.
pub const GROUP: &str = "canal.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The one CanalNetwork the controller acts on.
pub const DEFAULT_NETWORK_NAME: &str = "default";
/// Label put on objects the controller owns, for `kubectl get -l`.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
