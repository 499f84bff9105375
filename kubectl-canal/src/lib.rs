//! `kubectl canal`: answers "why can (or can't) pod A reach B?" from the
//! very objects each node's agent programs, and shows per-node status.
//!
//! - [`snapshot`]: one read of the objects (Pods, Nodes, NodePolicySets,
//!   PolicyGroups, PeerSets, CanalNetwork); the only I/O besides [`cli`]
//!   and [`verify`]'s requests.
//! - [`explain`]: pure: a snapshot and a connection -> an [`explain::Explanation`],
//!   built with the agent's own model builder and evaluator
//!   (`canal_agent::policy::model::build`, `canal_agent::policy::eval`).
//! - [`format`]: pure text rendering of explanations and status tables.
//! - [`status`]: pure per-node summary of a snapshot.
//! - [`cli`]: the command line (clap), kubeconfig handling, exit codes.

pub mod cli;
pub mod explain;
#[cfg(test)]
mod explain_tests;
pub mod format;
pub mod snapshot;
pub mod status;
pub mod target;
pub mod verify;

pub use explain::{Explanation, explain};
pub use snapshot::Snapshot;
pub use target::{Target, parse_target};

/// What can go wrong; every variant reaches the user as one line on
/// stderr and exit code 2 ([`cli::EXIT_ERROR`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// An API request failed.
    #[error("reading {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// The command line names something malformed.
    #[error("{0}")]
    Usage(String),
    /// A pod that does not exist.
    #[error("pod {0} not found")]
    UnknownPod(String),
    /// A pod without an address (not running yet, or hostNetwork).
    #[error("pod {pod} has no {family} address yet (phase {phase})")]
    NoPodIp {
        pod: String,
        family: &'static str,
        phase: String,
    },
    /// A pod not scheduled yet.
    #[error("pod {0} is not scheduled on a node yet")]
    Unscheduled(String),
    /// A pod of the host's network (policy does not apply to it).
    #[error(
        "pod {0} uses the host's network: NetworkPolicy does not select it, canal does not police it"
    )]
    HostNetwork(String),
    /// A node without a NodePolicySet.
    #[error(
        "node {0} has no NodePolicySet (canal-controller has not compiled policy for it, or policy is disabled)"
    )]
    NoNodePolicySet(String),
    /// The node's objects are not consistent yet (an update in flight).
    #[error("node {node}'s NodePolicySet is not consistent yet: {gaps}")]
    Inconsistent { node: String, gaps: String },
    /// No CanalNetwork `default`.
    #[error("CanalNetwork default not found (is canal installed?)")]
    NoNetwork,
    /// CanalNetwork `default` is invalid.
    #[error("CanalNetwork default is invalid: {0}")]
    InvalidNetwork(String),
}
