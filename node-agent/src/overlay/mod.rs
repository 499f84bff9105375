//! The VXLAN overlay: pure desired state and diff over plain data
//! ([`model`], [`desired`], [`diff`], [`snapshot`]) and the thin rtnetlink
//! shell that dumps the kernel and applies the diff ([`netlink`]).

pub mod desired;
pub mod diff;
pub mod model;
pub mod netlink;
pub mod snapshot;

use std::time::{Duration, Instant};

use canal_crds::NetworkConfig;

use desired::{Desired, DesiredError, LocalNode, Peer};
use diff::Plan;
use model::Underlay;
use netlink::{Netlink, NetlinkError};
use snapshot::UnderlayError;

/// One overlay sync could not run.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Dumping or changing the VXLAN device failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// No underlay interface.
    #[error(transparent)]
    Underlay(#[from] UnderlayError),
    /// This node cannot be programmed.
    #[error(transparent)]
    Desired(#[from] DesiredError),
}

/// What one sync found and did.
#[derive(Debug)]
pub struct Synced {
    /// The underlay in use.
    pub underlay: Underlay,
    /// The state programmed.
    pub desired: Desired,
    /// The changes that were needed.
    pub plan: Plan,
    /// Changes that failed (retried by the next sync).
    pub errors: Vec<NetlinkError>,
    /// Time spent dumping the kernel.
    pub dump: Duration,
    /// Time spent computing the desired state and the diff.
    pub compute: Duration,
    /// Time spent applying the diff.
    pub apply: Duration,
}

/// Dumps the kernel, computes the desired overlay and the diff, and applies
/// it: one level-triggered pass.
pub async fn sync(
    nl: &Netlink,
    local: &LocalNode,
    peers: &[Peer],
    config: &NetworkConfig,
) -> Result<Synced, SyncError> {
    let started = Instant::now();
    let snapshot = nl.snapshot().await?;
    let dumped = Instant::now();
    let underlay = snapshot.underlay(config.interface.as_deref())?;
    let desired = desired::compute(local, peers, config, &underlay)?;
    let device = desired.device.as_ref().map(|d| d.name.clone());
    let observed = snapshot.observe(device.as_deref(), underlay.index);
    let plan = diff::plan(&desired, &observed);
    let computed = Instant::now();
    let errors = if plan.is_empty() {
        Vec::new()
    } else {
        nl.apply(&plan, device.as_deref(), underlay.index)
            .await?
            .errors
    };
    Ok(Synced {
        underlay,
        desired,
        plan,
        errors,
        dump: dumped - started,
        compute: computed - dumped,
        apply: computed.elapsed(),
    })
}
