//! The VXLAN overlay, once per IP family ([`family`]): pure desired state
//! and diff over plain data ([`model`], [`desired`], [`diff`],
//! [`snapshot`]) and the thin rtnetlink shell that dumps the kernel and
//! applies the diff ([`netlink`]). One dump serves both families.

pub mod desired;
pub mod diff;
pub mod family;
pub mod model;
pub mod netlink;
pub mod snapshot;

use std::time::{Duration, Instant};

use desired::{Desired, DesiredError, LocalNode, OverlayConfig, Peer};
use diff::Plan;
use family::Family;
use model::Underlay;
use netlink::{Category, Netlink, NetlinkError};
use snapshot::{Snapshot, UnderlayError};

/// One family's overlay sync could not run.
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

/// What one family's overlay is to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FamilyPlan {
    /// Programmed: this node and its peers in that family.
    Program {
        /// The family's configuration.
        config: OverlayConfig,
        /// This node.
        local: LocalNode,
        /// Its peers of the family.
        peers: Vec<Peer>,
    },
    /// Not programmed (the cluster has no range of the family, or this
    /// node no subnet of it): its VXLAN devices and canal's routes of the
    /// family go.
    Remove,
}

/// The input of one family's sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyInput {
    /// The family.
    pub family: Family,
    /// What to do with it.
    pub plan: FamilyPlan,
    /// CanalNetwork `interface`.
    pub interface: Option<String>,
    /// ifindex of the underlay this family was last programmed on.
    pub previous_underlay: Option<u32>,
}

/// What one family's sync found and did.
#[derive(Debug)]
pub struct Synced {
    /// The family.
    pub family: Family,
    /// The underlay in use (None: a removed family with no underlay).
    pub underlay: Option<Underlay>,
    /// Why the configured underlay could not be used (the one in use is
    /// then the one the overlay already sat on).
    pub underlay_error: Option<UnderlayError>,
    /// Whether the family is programmed (not [`FamilyPlan::Remove`]).
    pub programmed: bool,
    /// The state programmed.
    pub desired: Desired,
    /// The changes that were needed.
    pub plan: Plan,
    /// Changes that failed (retried by the next sync); the others were
    /// applied.
    pub errors: Vec<NetlinkError>,
    /// The MTU pods should get as far as this family goes: the desired one,
    /// or, when the kernel refused it for the VXLAN device, the MTU the
    /// device really has.
    pub pod_mtu: u32,
    /// Time spent computing the desired state and the diff.
    pub compute: Duration,
    /// Time spent applying the diff.
    pub apply: Duration,
}

/// What one sync of every family did.
#[derive(Debug)]
pub struct SyncedAll {
    /// Time spent dumping the kernel (once for every family).
    pub dump: Duration,
    /// One result per input, in the same order.
    pub families: Vec<Result<Synced, SyncError>>,
}

/// Dumps the kernel once, then for each family computes the desired overlay
/// and the diff, and applies it: one level-triggered pass. Only a failed
/// dump fails it as a whole; a family that cannot be programmed (its own
/// subnet unusable, no underlay of the family) fails alone, and within a
/// family everything is applied object by object with the failures in
/// [`Synced::errors`]. An underlay interface that does not exist (a
/// CanalNetwork `interface` wrong for this node) keeps the underlay in use,
/// `previous_underlay` (an ifindex) or the existing device's.
pub async fn sync(nl: &Netlink, inputs: &[FamilyInput]) -> Result<SyncedAll, NetlinkError> {
    let started = Instant::now();
    let snapshot = nl.snapshot().await?;
    let dump = started.elapsed();
    let mut families = Vec::with_capacity(inputs.len());
    for input in inputs {
        families.push(sync_family(nl, &snapshot, input).await);
    }
    Ok(SyncedAll { dump, families })
}

async fn sync_family(
    nl: &Netlink,
    snapshot: &Snapshot,
    input: &FamilyInput,
) -> Result<Synced, SyncError> {
    let started = Instant::now();
    let family = input.family;
    let program = match &input.plan {
        FamilyPlan::Program {
            config,
            local,
            peers,
        } => Some((config, local, peers.as_slice())),
        FamilyPlan::Remove => None,
    };
    let device_name = program.map(|(config, _, _)| config.device_name());
    let (underlay, underlay_error) = match snapshot.underlay(input.interface.as_deref(), family) {
        Ok(u) => (Some(u), None),
        Err(e) => {
            match snapshot.fallback_underlay(
                input.previous_underlay,
                device_name.as_deref(),
                family,
            ) {
                Some(u) => (Some(u), Some(e)),
                // A family being removed needs no underlay: its devices go
                // all the same (canal's routes on an underlay that cannot
                // be found stay until it can).
                None if program.is_none() => (None, None),
                None => return Err(e.into()),
            }
        }
    };
    let desired = match (program, &underlay) {
        (Some((config, local, peers)), Some(u)) => desired::compute(local, peers, config, u)?,
        _ => Desired::default(),
    };
    let device = desired.device.as_ref().map(|d| d.name.clone());
    let underlay_index = underlay.as_ref().map_or(0, |u| u.index);
    let observed = snapshot.observe(device.as_deref(), underlay_index, family);
    let plan = diff::plan(&desired, &observed);
    let computed = Instant::now();
    let mut errors = if plan.is_empty() {
        Vec::new()
    } else {
        nl.apply(&plan, device.as_deref(), underlay_index)
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
        family,
        underlay,
        underlay_error: underlay_error.filter(|_| program.is_some()),
        programmed: program.is_some(),
        desired,
        plan,
        errors,
        pod_mtu,
        compute: computed - started,
        apply: computed.elapsed(),
    })
}
