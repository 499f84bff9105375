//! NetworkPolicy enforcement on the node: the NodePolicySet and the PeerSets
//! it references become, through one dataplane-neutral model, either
//! iptables chains and ipsets (Calico's layout with canal's names,
//! CONTRACTS.md) or canal's own nftables table, per family.
//!
//! - [`model`]: the dataplane-neutral model every sync builds once; [`eval`]
//!   its pure evaluator (what a node decides for a connection, and why).
//! - [`nft`]: the nftables dataplane (canal's own table, one transaction per sync).
//! - [`iptables`]: the iptables dataplane's applier (per family, the node's backend).
//! - [`render`]: pure iptables renderer, model -> [`Ruleset`]; with [`antispoof`]
//!   (the dataplane-neutral source map and its raw-table rules) and
//!   [`frame`] (dispatch chains, verdict marks, the fail-closed guard).
//! - [`state`] / [`plan`]: pure kernel-state parsing and diff -> restore batches.
//! - [`enforcer`]: [`PolicyEnforcer`], the applier the agent's sync loop owns.
//! - [`handshake`]: the run-dir files canal-cni waits on.
//! - [`status`]: the NodePolicySet status after a sync.
//! - [`store`]: pure state of the watched NodePolicySet and PeerSets -> [`PolicyInputs`].
//! - [`component`]: the agent's policy task (watches, level-triggered sync,
//!   drift checks, status writes), plugged in as a `NodeComponent`.
//! - [`watch`] / [`nfnl`]: noticing foreign firewall changes at once
//!   (nf_tables notifications, ipset headers, legacy table sizes).
//!
//! The agent's loop:
//!
//! ```no_run
//! # async fn example(inputs: canal_agent::policy::PolicyInputs) -> Result<(), Box<dyn std::error::Error>> {
//! use canal_agent::policy::{PolicyEnforcer, PolicyMetrics};
//! let registry = prometheus::Registry::new();
//! let mut enforcer = PolicyEnforcer::new("/run/canal".as_ref(), PolicyMetrics::register(&registry)?);
//! enforcer.adopt_kernel_state().await?;            // once, on start (no flush)
//! let stats = enforcer.sync(&inputs).await?;       // on every input change
//! let _repaired = enforcer.check_drift().await?;   // periodically
//! # let _ = stats; Ok(()) }
//! ```

pub mod antispoof;
pub mod component;
pub mod conntrack;
pub mod ctnetlink;
pub mod denied;
pub mod enforcer;
pub mod eval;
pub mod exec;
pub mod firewall;
pub mod flowlog;
pub mod frame;
pub mod handshake;
#[cfg(test)]
mod hardening_tests;
pub mod iptables;
pub mod metrics;
pub mod model;
pub mod names;
pub mod nfnl;
pub mod nft;
mod nlattr;
pub mod plan;
pub mod render;
pub mod ruleset;
#[cfg(test)]
mod semantics_tests;
#[cfg(test)]
mod sim;
pub mod state;
pub mod status;
pub mod store;
pub mod verify;
pub mod watch;

pub use antispoof::{SourceMap, Sources, SpoofReason};
pub use enforcer::{Error, NodeSupport, Plane, PolicyEnforcer, Retry, SyncStats, resolve};
pub use exec::{Exec, ExecError};
pub use iptables::Tools;
pub use metrics::PolicyMetrics;
pub use model::{DataplaneChoice, Families, Family, NodeModel};
pub use plan::{Plan, PlanStats, plan};
pub use render::{
    EnforcementConfig, PolicyInputs, RenderCache, Rendered, Warning, referenced_peer_sets, render,
    render_with,
};
pub use ruleset::{Chain, Hook, IpSet, Rule, Ruleset, SetType, Table};
pub use state::KernelState;
pub use status::{disabled_status, enforced_status};
