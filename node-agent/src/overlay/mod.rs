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
use netlink::{Category, Netlink, NetlinkError};
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
    /// Why the configured underlay could not be used (the one in use is
    /// then the one the overlay already sat on).
    pub underlay_error: Option<UnderlayError>,
    /// The state programmed.
    pub desired: Desired,
    /// The changes that were needed.
    pub plan: Plan,
    /// Changes that failed (retried by the next sync); the others were
    /// applied.
    pub errors: Vec<NetlinkError>,
    /// The MTU pods should get: the desired one, or, when the kernel refused
    /// it for the VXLAN device, the MTU the device really has.
    pub pod_mtu: u32,
    /// Time spent dumping the kernel.
    pub dump: Duration,
    /// Time spent computing the desired state and the diff.
    pub compute: Duration,
    /// Time spent applying the diff.
    pub apply: Duration,
}

/// Dumps the kernel, computes the desired overlay and the diff, and applies
/// it: one level-triggered pass. Only what leaves nothing to program fails
/// it as a whole (no dump; this node's own subnet unusable; no underlay at
/// all); everything else is applied object by object and the failures are
/// returned in [`Synced::errors`]. An underlay interface that does not exist
/// (a CanalNetwork `interface` wrong for this node) keeps the underlay in
/// use, `previous_underlay` (an ifindex) or the existing device's.
pub async fn sync(
    nl: &Netlink,
    local: &LocalNode,
    peers: &[Peer],
    config: &NetworkConfig,
    previous_underlay: Option<u32>,
) -> Result<Synced, SyncError> {
    let started = Instant::now();
    let snapshot = nl.snapshot().await?;
    let dumped = Instant::now();
    let device_name = canal_crds::names::vxlan_device(config.vni);
    let (underlay, underlay_error) = match snapshot.underlay(config.interface.as_deref()) {
        Ok(u) => (u, None),
        Err(e) => match snapshot.fallback_underlay(previous_underlay, Some(&device_name)) {
            Some(u) => (u, Some(e)),
            None => return Err(e.into()),
        },
    };
    let desired = desired::compute(local, peers, config, &underlay)?;
    let device = desired.device.as_ref().map(|d| d.name.clone());
    let observed = snapshot.observe(device.as_deref(), underlay.index);
    let plan = diff::plan(&desired, &observed);
    let computed = Instant::now();
    let mut errors = if plan.is_empty() {
        Vec::new()
    } else {
        nl.apply(&plan, device.as_deref(), underlay.index)
            .await
            .errors
    };
    let mut pod_mtu = desired.pod_mtu;
    let mtu_refused = errors.iter().any(|e| e.category == Category::Mtu);
    if let (true, Some(name)) = (mtu_refused, device.as_deref()) {
        match nl.link_mtu(name).await {
            Ok(Some(mtu)) => pod_mtu = mtu,
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    Ok(Synced {
        underlay,
        underlay_error,
        desired,
        plan,
        errors,
        pod_mtu,
        dump: dumped - started,
        compute: computed - dumped,
        apply: computed.elapsed(),
    })
}
