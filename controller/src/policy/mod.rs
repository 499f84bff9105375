//! NetworkPolicy compilation: NetworkPolicies, Pods, Namespaces and Nodes
//! in; one NodePolicySet per node and one PeerSet per distinct peer out.
//!
//! The pure core ([`index::PolicyIndex`], [`compile`], [`selector`]) has no
//! kube client in it; the controller shell ([`controller`]) watches the API,
//! feeds the index, and writes what changed.

pub mod claims;
pub mod compile;
pub mod controller;
pub mod fingerprint;
pub mod index;
pub mod input;
pub mod intern;
pub mod metrics;
pub mod selector;
pub mod slab;
pub mod summary;

pub use controller::{Error, Options, run};

#[cfg(test)]
mod tests;
