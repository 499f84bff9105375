//! NetworkPolicy compilation: NetworkPolicies, Pods, Namespaces and Nodes
//! in; one NodePolicySet per node, one PolicyGroup per distinct policy pod
//! selector and one PeerSet per distinct peer out, each large one split
//! into a head and slices of bounded size ([`shard`], [`objects`]).
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
pub mod objects;
pub mod problems;
pub mod selector;
pub mod shard;
pub mod slab;
pub mod summary;

pub use controller::{Error, Options, run};

#[cfg(test)]
mod tests;
