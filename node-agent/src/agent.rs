//! canal-agent's connectivity loop: watches feed the pure node index, and a
//! single level-triggered sync (on any relevant watch event, every resync
//! interval, and soon after a failed sync) recomputes the whole desired
//! overlay, diffs it against the kernel and applies the difference, then
//! checks the iptables rules and the run-dir file. Nothing here decides what
//! the kernel should hold; it only gathers inputs, calls the pure modules
//! and records what happened.
//!
//! Every step of a sync runs even when an earlier one failed (a refused MTU
//! does not keep a new peer's route out; a missing iptables does not keep
//! the overlay from being programmed). The failures are collected in a
//! [`SyncReport`] that [`crate::report::Tracker`] turns into what the user
//! sees: `/readyz`, the Node condition `CanalNetworkProgrammed`, and an
//! Event on the Node when that changes.

pub mod ipv6_gate;
mod node_status;
mod program;
mod watches;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use canal_crds::{CanalNetwork, NetworkConfig};
use kube::runtime::events::EventType;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::component::NodeNetwork;
use crate::masq::Masquerade;
use crate::metrics::Metrics;
use crate::nodes::{NodeIndex, NotProgrammable, ProgrammedCondition};
use crate::overlay::SyncError;
use crate::overlay::desired::{Desired, LocalNode, Peer, Skipped};
use crate::overlay::family::Family;
use crate::overlay::netlink::{Category, Netlink, NetlinkError};
use crate::report::{Step, Tracker, Verdict};
use crate::runfiles::RunDir;
use ipnet::IpNet;
use node_status::NodeStatus;

/// Field manager of the agent's writes.
pub const FIELD_MANAGER: &str = "canal-agent";

/// A condition the agent wrote is written again after this long if the
/// Node still does not show it (the watch lost it, or someone removed it).
const CONDITION_REWRITE: Duration = Duration::from_secs(60);

/// The CanalNetwork `default` as the agent last saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum NetworkState {
    /// Not listed yet.
    #[default]
    NotListed,
    /// It does not exist.
    Missing,
    /// It exists but cannot be applied.
    Invalid(String),
    /// The configuration in effect.
    Valid(NetworkConfig),
}

/// The configuration in effect for a CanalNetwork: its validated spec, with
/// the clusterCIDR the controller reports as active (it refuses a change
/// that cannot be applied live, and nodes must keep using the old range).
pub fn effective_config(network: &CanalNetwork) -> Result<NetworkConfig, String> {
    let mut config = network.spec.validate().map_err(|e| e.to_string())?;
    let Some(status) = network.status.as_ref() else {
        return Ok(config);
    };
    // activeClusterCIDRs (every family, primary first), else the older
    // activeClusterCIDR (the primary range alone).
    let (field, active): (&str, Vec<&str>) = if status.active_cluster_cidrs.is_empty() {
        (
            "activeClusterCIDR",
            status.active_cluster_cidr.as_deref().into_iter().collect(),
        )
    } else {
        (
            "activeClusterCIDRs",
            status
                .active_cluster_cidrs
                .iter()
                .map(String::as_str)
                .collect(),
        )
    };
    if active.is_empty() {
        return Ok(config);
    }
    let mut ranges = Vec::new();
    for text in &active {
        let cidr =
            canal_crds::validate::parse_cidr(text).map_err(|e| format!("status.{field}: {e}"))?;
        let subnet_len = config
            .ranges
            .iter()
            .find(|r| Family::of_net(&r.cidr) == Family::of_net(&cidr))
            .map_or(cidr.max_prefix_len(), |r| r.subnet_len);
        ranges.push(canal_crds::validate::ClusterRange { cidr, subnet_len });
    }
    if field == "activeClusterCIDR" {
        // Only the primary is recorded: the other families stay as specified.
        let primary = Family::of_net(&ranges[0].cidr);
        ranges.extend(
            config
                .ranges
                .iter()
                .filter(|r| Family::of_net(&r.cidr) != primary)
                .copied(),
        );
    }
    config.ranges = ranges;
    Ok(config)
}

/// State shared between the watch tasks and the sync loop.
#[derive(Debug, Default)]
pub struct Shared {
    /// Every Node's facts.
    pub nodes: NodeIndex,
    /// The CanalNetwork.
    pub network: NetworkState,
    /// Peers whose change was observed but not yet programmed, with when.
    pub pending: HashMap<String, Instant>,
    /// This node's `CanalNetworkProgrammed` condition as last watched.
    pub own_condition: Option<ProgrammedCondition>,
}

/// The cluster's pod ranges in effect, in the CanalNetwork's order (one
/// per family).
pub fn cluster_families(config: &NetworkConfig) -> Vec<IpNet> {
    config.cluster_cidrs()
}

/// What one sync programs in one family of the cluster.
#[derive(Debug, Clone)]
struct FamilyInputs {
    family: Family,
    cluster_cidr: IpNet,
    /// This node in the family; None: it has no subnet of the family (its
    /// podCIDRs were set before the cluster had the family, and Kubernetes
    /// never lets them change), so the family is not programmed here.
    local: Option<LocalNode>,
    /// Why `local` is None.
    missing: Option<String>,
    internal_ip: Option<IpAddr>,
    public_ip: Option<IpAddr>,
    peers: Vec<Peer>,
}

/// What one sync programs.
#[derive(Debug, Clone)]
struct Inputs {
    uid: Option<String>,
    canal_is_up: bool,
    /// The cluster's families, in its order.
    families: Vec<FamilyInputs>,
    config: NetworkConfig,
}

impl Inputs {
    /// The family's inputs when this node programs it.
    fn programmed(&self, family: Family) -> Option<(&FamilyInputs, &LocalNode)> {
        self.families
            .iter()
            .find(|f| f.family == family)
            .and_then(|f| Some((f, f.local.as_ref()?)))
    }

    /// Peers of every programmed family (a dual-stack node counts once).
    fn peer_count(&self) -> usize {
        self.families
            .iter()
            .map(|f| f.peers.len())
            .max()
            .unwrap_or(0)
    }
}

/// The agent's connectivity half.
pub struct Agent {
    node_name: String,
    run_dir: RunDir,
    client: kube::Client,
    status: NodeStatus,
    metrics: Metrics,
    health: canal_runtime::Health,
    netlink: Netlink,
    masq: Masquerade,
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    resync: Duration,
    set_network_unavailable: bool,
    network_tx: watch::Sender<Option<Arc<NodeNetwork>>>,
    // Between syncs.
    last_config: Option<NetworkConfig>,
    last_desired: BTreeMap<Family, Desired>,
    last_clean: bool,
    last_skipped: BTreeMap<Family, Vec<Skipped>>,
    /// ifindex of the underlay each family was last programmed on (kept
    /// when the configured interface disappears).
    last_underlay: BTreeMap<Family, u32>,
    /// The families in the network file, as last written (a family whose
    /// sync fails keeps its entry, like the file as a whole).
    last_files: BTreeMap<Family, crate::runfiles::FamilyNetwork>,
    waiting: Option<String>,
    config_note: Option<String>,
    /// Per family, the underlay address mismatch last reported.
    mismatch: BTreeMap<Family, String>,
    condition_patched: Option<Instant>,
    /// Readiness, the node's verdict and its Events.
    tracker: Tracker,
    /// The verdict last written to the Node, and when.
    verdict_written: Option<(Verdict, Instant)>,
    /// When to sync again after a failure (before the next resync).
    retry_at: Option<Instant>,
    /// The first full sync is done (for the log line).
    synced_once: bool,
}

/// Everything the agent is built from.
pub struct AgentParts {
    /// This node.
    pub node_name: String,
    /// The run directory.
    pub run_dir: RunDir,
    /// Kubernetes client.
    pub client: kube::Client,
    /// Metrics.
    pub metrics: Metrics,
    /// Readiness.
    pub health: canal_runtime::Health,
    /// netlink in the node's namespace.
    pub netlink: Netlink,
    /// The iptables keeper.
    pub masq: Masquerade,
    /// Resync period.
    pub resync: Duration,
    /// Whether to set the NetworkUnavailable condition.
    pub set_network_unavailable: bool,
    /// Where the node's network facts are published.
    pub network_tx: watch::Sender<Option<Arc<NodeNetwork>>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock cannot leave the index half-updated in
    // a way that matters (every update is a single insert/remove), so keep
    // going with the data rather than poisoning the agent.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// The step a netlink failure belongs to.
fn netlink_step(e: &NetlinkError) -> Step {
    use crate::overlay::diff::Kind;
    match e.category {
        Category::Dump => Step::Dump,
        Category::Mtu => Step::Mtu,
        Category::Change(Kind::Link) => Step::Device,
        Category::Change(Kind::Address) => Step::Address,
        Category::Change(Kind::Route) => Step::Route,
        Category::Change(Kind::Neighbour) => Step::Neighbour,
        Category::Change(Kind::Fdb) => Step::Fdb,
    }
}

/// The step a failed overlay sync belongs to.
fn sync_error_step(e: &SyncError) -> Step {
    match e {
        SyncError::Netlink(n) => netlink_step(n),
        SyncError::Underlay(_) => Step::Underlay,
        SyncError::Desired(_) => Step::LocalNode,
    }
}

/// Steps whose failure leaves some peer without its route, neighbour or
/// FDB entry.
const PEER_STEPS: [Step; 6] = [
    Step::Dump,
    Step::LocalNode,
    Step::Device,
    Step::Fdb,
    Step::Neighbour,
    Step::Route,
];

impl Agent {
    /// Builds the agent.
    pub fn new(parts: AgentParts) -> Agent {
        Agent {
            node_name: parts.node_name.clone(),
            run_dir: parts.run_dir,
            status: NodeStatus::new(parts.client.clone(), parts.node_name.clone()),
            client: parts.client,
            metrics: parts.metrics,
            health: parts.health,
            netlink: parts.netlink,
            masq: parts.masq,
            shared: Arc::new(Mutex::new(Shared::default())),
            notify: Arc::new(Notify::new()),
            resync: parts.resync,
            set_network_unavailable: parts.set_network_unavailable,
            network_tx: parts.network_tx,
            last_config: None,
            last_desired: BTreeMap::new(),
            last_clean: false,
            last_skipped: BTreeMap::new(),
            last_underlay: BTreeMap::new(),
            last_files: BTreeMap::new(),
            waiting: None,
            config_note: None,
            mismatch: BTreeMap::new(),
            condition_patched: None,
            tracker: Tracker::new(parts.resync),
            verdict_written: None,
            retry_at: None,
            synced_once: false,
        }
    }

    /// Starts the watches and runs the sync loop forever.
    pub async fn run(mut self) {
        tokio::spawn(
            watches::watch_nodes(
                self.client.clone(),
                self.node_name.clone(),
                self.shared.clone(),
                self.notify.clone(),
                self.metrics.clone(),
            )
            .instrument(tracing::info_span!("watch", resource = "nodes")),
        );
        tokio::spawn(
            watches::watch_network(
                self.client.clone(),
                self.shared.clone(),
                self.notify.clone(),
                self.metrics.clone(),
            )
            .instrument(tracing::info_span!("watch", resource = "canalnetwork")),
        );
        self.publish_readiness();
        let mut tick = tokio::time::interval(self.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            let retry = async move {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                _ = self.notify.notified() => "watch",
                _ = tick.tick() => "resync",
                _ = retry => "retry",
            };
            let span = tracing::debug_span!("sync", node = %self.node_name, trigger);
            self.sync(trigger).instrument(span).await;
        }
    }

    fn inputs(&mut self) -> Result<(Inputs, HashMap<String, Instant>), String> {
        let mut shared = lock(&self.shared);
        if !shared.nodes.listed() {
            return Err("waiting for the first list of Nodes".into());
        }
        let config = match &shared.network {
            NetworkState::NotListed => return Err("waiting for the CanalNetwork list".into()),
            NetworkState::Valid(c) => {
                self.config_note = None;
                self.last_config = Some(c.clone());
                c.clone()
            }
            other => match &self.last_config {
                // Keep the network as it is: nothing is torn down because
                // the CanalNetwork went away or became invalid.
                Some(c) => {
                    let why = match other {
                        NetworkState::Invalid(e) => format!("is invalid ({e})"),
                        _ => "does not exist".into(),
                    };
                    let note = format!(
                        "CanalNetwork {} {why}; keeping the last valid configuration",
                        canal_crds::DEFAULT_NETWORK_NAME
                    );
                    if self.config_note.as_ref() != Some(&note) {
                        tracing::warn!("{note}");
                        self.config_note = Some(note);
                    }
                    c.clone()
                }
                None => {
                    return Err(match other {
                        NetworkState::Invalid(e) => format!(
                            "CanalNetwork {} is invalid: {e}",
                            canal_crds::DEFAULT_NETWORK_NAME
                        ),
                        _ => format!(
                            "waiting for CanalNetwork {}",
                            canal_crds::DEFAULT_NETWORK_NAME
                        ),
                    });
                }
            },
        };
        let facts = shared
            .nodes
            .get(&self.node_name)
            .ok_or_else(|| format!("waiting for Node {}", self.node_name))?;
        let waiting = |e: NotProgrammable| format!("waiting for Node {}: {e}", self.node_name);
        let mut families = Vec::new();
        let mut first_missing = None;
        for cluster_cidr in cluster_families(&config) {
            let family = Family::of_net(&cluster_cidr);
            // A family without its podCIDR or VTEP MAC is not programmed
            // here: the controller publishes none for a subnet in conflict
            // (and writes both families' annotations with the podCIDRs
            // otherwise). With no family at all, the node waits.
            let (local, missing) = match facts.local(family) {
                Ok(local) => (Some(local), None),
                Err(e) => {
                    first_missing.get_or_insert(e);
                    let why = match e {
                        NotProgrammable::NoPodCidr { .. } => format!(
                            "{e}; a Node whose podCIDRs were set before the CanalNetwork had {family} keeps them, as Kubernetes never lets them change: re-register it to give it one"
                        ),
                        NotProgrammable::NoVtepMac { .. } => e.to_string(),
                    };
                    (None, Some(why))
                }
            };
            let f = facts.family(family);
            families.push(FamilyInputs {
                family,
                cluster_cidr,
                local,
                missing,
                internal_ip: f.internal_ip,
                public_ip: f.public_ip,
                peers: shared.nodes.peers(&self.node_name, family),
            });
        }
        if families.iter().all(|f| f.local.is_none()) {
            return Err(waiting(
                first_missing.unwrap_or(NotProgrammable::NoPodCidr { family: Family::V4 }),
            ));
        }
        let inputs = Inputs {
            uid: facts.uid.clone(),
            canal_is_up: facts.canal_is_up,
            families,
            config,
        };
        let pending = std::mem::take(&mut shared.pending);
        Ok((inputs, pending))
    }

    async fn sync(&mut self, trigger: &'static str) {
        let started = Instant::now();
        let (inputs, pending) = match self.inputs() {
            Ok(i) => i,
            Err(reason) => {
                if self.waiting.as_ref() != Some(&reason) {
                    tracing::info!("{reason}");
                    self.waiting = Some(reason.clone());
                }
                self.tracker.waiting(reason);
                self.retry_at = None;
                self.publish_readiness();
                return;
            }
        };
        self.waiting = None;
        let report = self.program(&inputs, trigger).await;
        let clean = report.is_clean();
        self.metrics
            .syncs
            .with_label_values(&[trigger, if clean { "success" } else { "error" }])
            .inc();
        self.metrics
            .sync_full_duration
            .observe(started.elapsed().as_secs_f64());
        for step in report.failed_steps() {
            self.metrics
                .sync_errors
                .with_label_values(&[step.as_str()])
                .inc();
        }
        let peers_programmed = !PEER_STEPS.iter().any(|s| report.failed(*s));
        if peers_programmed {
            let now = Instant::now();
            for observed in pending.values() {
                self.metrics
                    .programming_duration
                    .observe(now.duration_since(*observed).as_secs_f64());
            }
        } else {
            // Retried by the next sync; keep the earliest observation.
            let mut shared = lock(&self.shared);
            for (name, at) in pending {
                shared
                    .pending
                    .entry(name)
                    .and_modify(|t| *t = (*t).min(at))
                    .or_insert(at);
            }
        }
        if clean {
            self.metrics.last_success.set(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_default(),
            );
            if !self.synced_once {
                self.synced_once = true;
                tracing::info!(
                    peers = inputs.peer_count(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "first full overlay sync done"
                );
            }
        } else {
            tracing::warn!(
                failed_in_a_row = self.tracker.streak() + 1,
                "sync failed in some steps (the others were applied): {}",
                report.summary()
            );
        }

        let update = self.tracker.record(&report);
        self.retry_at = update.retry_after.map(|d| Instant::now() + d);
        self.publish_readiness();
        let observed = lock(&self.shared).own_condition.clone();
        if let Some(a) = update.announce {
            // After a restart the Node may already say exactly this; that
            // is no change to announce.
            let shown = self.tracker.verdict().is_some_and(|v| {
                observed
                    .as_ref()
                    .is_some_and(|o| o.says(v.programmed, v.reason, &v.message))
            });
            if !shown {
                let type_ = if a.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                };
                self.status
                    .event(inputs.uid.clone(), type_, a.reason, a.note)
                    .await;
            }
        }
        self.write_verdict(observed.as_ref()).await;
        // NetworkUnavailable is about pods reaching each other: set once the
        // overlay is in place, even if, say, masquerade still fails.
        if self.set_network_unavailable && !inputs.canal_is_up && peers_programmed {
            self.patch_network_unavailable().await;
        }
    }

    /// Readiness from the tracker: `/readyz` and the programmed gauge.
    fn publish_readiness(&self) {
        match self.tracker.readiness() {
            Ok(()) => self.health.set_ready(true),
            Err(reason) => self.health.set_not_ready(reason),
        }
        let programmed = self.tracker.verdict().is_some_and(|v| v.programmed);
        self.metrics.programmed.set(i64::from(programmed));
    }

    /// Writes the verdict as the Node condition when the Node does not show
    /// it yet (and it was not just written).
    async fn write_verdict(&mut self, observed: Option<&ProgrammedCondition>) {
        let Some(verdict) = self.tracker.verdict().cloned() else {
            return;
        };
        if observed.is_some_and(|o| o.says(verdict.programmed, verdict.reason, &verdict.message)) {
            return;
        }
        let recent = self
            .verdict_written
            .as_ref()
            .is_some_and(|(v, at)| *v == verdict && at.elapsed() < CONDITION_REWRITE);
        if recent {
            return;
        }
        match self.status.set_programmed(&verdict, observed).await {
            Ok(()) => {
                tracing::info!(
                    programmed = verdict.programmed,
                    reason = verdict.reason,
                    "set Node condition {}",
                    canal_crds::condition::NODE_PROGRAMMED
                );
                self.verdict_written = Some((verdict, Instant::now()));
            }
            Err(e) => tracing::warn!(
                "setting Node {} condition {}: {e} (retried by the next sync)",
                self.node_name,
                canal_crds::condition::NODE_PROGRAMMED
            ),
        }
    }

    /// Sets NetworkUnavailable=False (reason CanalIsUp) on our Node, at most
    /// once a minute while the watch does not show it yet.
    async fn patch_network_unavailable(&mut self) {
        if self
            .condition_patched
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        match self.status.set_network_available().await {
            Ok(()) => {
                tracing::info!("set Node condition NetworkUnavailable=False (CanalIsUp)");
                self.condition_patched = Some(Instant::now());
            }
            Err(e) => tracing::warn!(
                "setting Node {} condition NetworkUnavailable: {e}",
                self.node_name
            ),
        }
    }
}

/// Pods are routed through the node: forwarding of the family must be on
/// (Kubernetes requires it; the agent turns it on when something left it
/// off). IPv6 forwarding is turned on only for a cluster with IPv6.
fn ensure_ip_forward(family: Family) -> Result<(), String> {
    let path = match family {
        Family::V4 => "/proc/sys/net/ipv4/ip_forward",
        Family::V6 => "/proc/sys/net/ipv6/conf/all/forwarding",
    };
    let current = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    if current.trim() != "1" {
        std::fs::write(path, "1")
            .map_err(|e| format!("enabling {family} forwarding ({path}): {e}"))?;
        tracing::warn!("{family} forwarding was off; turned it on ({path}=1)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_crds::{CanalNetworkSpec, CanalNetworkStatus};

    #[test]
    fn active_cluster_cidr_wins_over_a_refused_spec_change() {
        let mut n = CanalNetwork::new(
            "default",
            CanalNetworkSpec::with_cluster_cidr("10.99.0.0/16"),
        );
        assert_eq!(
            effective_config(&n).unwrap().ranges[0].cidr.to_string(),
            "10.99.0.0/16"
        );
        n.status = Some(CanalNetworkStatus {
            active_cluster_cidr: Some("10.244.0.0/16".into()),
            ..CanalNetworkStatus::default()
        });
        assert_eq!(
            effective_config(&n).unwrap().ranges[0].cidr.to_string(),
            "10.244.0.0/16"
        );
        n.spec.backend.vni = 0;
        assert!(effective_config(&n).unwrap_err().contains("vni"));
    }

    #[test]
    fn active_cluster_cidrs_give_every_family_in_force() {
        let mut n = CanalNetwork::new(
            "default",
            CanalNetworkSpec::with_cluster_cidrs(&["10.99.0.0/16", "fd00:99::/56"]),
        );
        let cidrs = |n: &CanalNetwork| {
            effective_config(n)
                .unwrap()
                .cluster_cidrs()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(cidrs(&n), ["10.99.0.0/16", "fd00:99::/56"]);
        // Only the primary recorded (a controller from before families).
        n.status = Some(CanalNetworkStatus {
            active_cluster_cidr: Some("10.244.0.0/16".into()),
            ..CanalNetworkStatus::default()
        });
        assert_eq!(cidrs(&n), ["10.244.0.0/16", "fd00:99::/56"]);
        // Every family recorded: the refused IPv6 change stays out, and a
        // family removed from the spec while allocated stays in force.
        n.status = Some(CanalNetworkStatus {
            active_cluster_cidr: Some("10.244.0.0/16".into()),
            active_cluster_cidrs: vec!["10.244.0.0/16".into(), "fd00:10:244::/56".into()],
            ..CanalNetworkStatus::default()
        });
        assert_eq!(cidrs(&n), ["10.244.0.0/16", "fd00:10:244::/56"]);
        n.spec.cluster_cidrs = vec!["10.99.0.0/16".into()];
        assert_eq!(cidrs(&n), ["10.244.0.0/16", "fd00:10:244::/56"]);
        n.status.as_mut().unwrap().active_cluster_cidrs[1] = "garbage".into();
        assert!(
            effective_config(&n)
                .unwrap_err()
                .contains("activeClusterCIDRs")
        );
    }
}
