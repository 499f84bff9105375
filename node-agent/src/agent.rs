//! canal-agent's connectivity loop: watches feed the pure node index, and a
//! single level-triggered sync (on any relevant watch event, and every
//! resync interval) recomputes the whole desired overlay, diffs it against
//! the kernel and applies the difference, then checks the iptables rules and
//! the run-dir file. Nothing here decides what the kernel should hold; it
//! only gathers inputs, calls the pure modules and records what happened.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use canal_crds::{CanalNetwork, NetworkConfig};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::component::NodeNetwork;
use crate::masq::{Masquerade, RulesConfig};
use crate::metrics::Metrics;
use crate::nodes::{self, NodeFacts, NodeIndex};
use crate::overlay::desired::{Desired, LocalNode, Peer, Skipped};
use crate::overlay::netlink::{Category, Netlink};
use crate::overlay::{self, SyncError};
use crate::runfiles::{NetworkFile, RunDir};

/// Field manager of the agent's writes.
pub const FIELD_MANAGER: &str = "canal-agent";

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
    let active = network
        .status
        .as_ref()
        .and_then(|s| s.active_cluster_cidr.as_deref());
    if let Some(active) = active {
        match canal_crds::validate::parse_ipv4_cidr(active) {
            Ok(cidr) => config.cluster_cidr = cidr,
            Err(e) => return Err(format!("status.activeClusterCIDR: {e}")),
        }
    }
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
}

/// What one sync programs.
#[derive(Debug, Clone)]
struct Inputs {
    local: LocalNode,
    uid: Option<String>,
    internal_ip: Option<Ipv4Addr>,
    public_ip: Option<Ipv4Addr>,
    canal_is_up: bool,
    peers: Vec<Peer>,
    config: NetworkConfig,
}

/// The agent's connectivity half.
pub struct Agent {
    node_name: String,
    run_dir: RunDir,
    client: kube::Client,
    recorder: Recorder,
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
    last_desired: Option<Desired>,
    last_clean: bool,
    last_skipped: Vec<Skipped>,
    waiting: Option<String>,
    config_note: Option<String>,
    mismatch: Option<String>,
    condition_patched: Option<Instant>,
    /// The first full sync is done (the overlay's part of readiness).
    ready: bool,
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

impl Agent {
    /// Builds the agent.
    pub fn new(parts: AgentParts) -> Agent {
        Agent {
            node_name: parts.node_name.clone(),
            run_dir: parts.run_dir,
            recorder: Recorder::new(
                parts.client.clone(),
                Reporter {
                    controller: FIELD_MANAGER.into(),
                    instance: Some(parts.node_name.clone()),
                },
            ),
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
            last_desired: None,
            last_clean: false,
            last_skipped: Vec::new(),
            waiting: None,
            config_note: None,
            mismatch: None,
            condition_patched: None,
            ready: false,
        }
    }

    /// Starts the watches and runs the sync loop forever.
    pub async fn run(mut self) {
        tokio::spawn(
            watch_nodes(
                self.client.clone(),
                self.node_name.clone(),
                self.shared.clone(),
                self.notify.clone(),
                self.metrics.clone(),
            )
            .instrument(tracing::info_span!("watch", resource = "nodes")),
        );
        tokio::spawn(
            watch_network(
                self.client.clone(),
                self.shared.clone(),
                self.notify.clone(),
                self.metrics.clone(),
            )
            .instrument(tracing::info_span!("watch", resource = "canalnetwork")),
        );
        let mut tick = tokio::time::interval(self.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                _ = self.notify.notified() => "watch",
                _ = tick.tick() => "resync",
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
        let local = facts
            .local()
            .map_err(|e| format!("waiting for Node {}: {e}", self.node_name))?;
        let inputs = Inputs {
            local,
            uid: facts.uid.clone(),
            internal_ip: facts.internal_ip,
            public_ip: facts.public_ip,
            canal_is_up: facts.canal_is_up,
            peers: shared.nodes.peers(&self.node_name),
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
                    self.waiting = Some(reason);
                }
                return;
            }
        };
        self.waiting = None;
        let clean = self.program(&inputs, trigger).await;
        self.metrics
            .syncs
            .with_label_values(&[trigger, if clean { "success" } else { "error" }])
            .inc();
        self.metrics
            .sync_full_duration
            .observe(started.elapsed().as_secs_f64());
        if clean {
            let now = Instant::now();
            for observed in pending.values() {
                self.metrics
                    .programming_duration
                    .observe(now.duration_since(*observed).as_secs_f64());
            }
            self.metrics.last_success.set(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_default(),
            );
            if !self.ready {
                self.ready = true;
                tracing::info!(
                    peers = inputs.peers.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "first full overlay sync done"
                );
                self.health.set_ready(true);
            }
            if self.set_network_unavailable && !inputs.canal_is_up {
                self.patch_condition().await;
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
    }

    /// One pass over kernel, iptables and files. Returns whether everything
    /// was applied without error.
    async fn program(&mut self, inputs: &Inputs, trigger: &'static str) -> bool {
        let synced = match overlay::sync(
            &self.netlink,
            &inputs.local,
            &inputs.peers,
            &inputs.config,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                if let SyncError::Netlink(n) = &e {
                    self.count_netlink_error(n.category);
                }
                tracing::error!("overlay sync failed: {e}");
                self.last_clean = false;
                return false;
            }
        };
        let phase = &self.metrics.sync_phase_duration;
        phase
            .with_label_values(&["dump"])
            .observe(synced.dump.as_secs_f64());
        phase
            .with_label_values(&["compute"])
            .observe(synced.compute.as_secs_f64());
        phase
            .with_label_values(&["apply"])
            .observe(synced.apply.as_secs_f64());

        let plan = &synced.plan;
        let desired = &synced.desired;
        let drift = self.last_clean && self.last_desired.as_ref() == Some(desired);
        for (kind, n) in plan.counts() {
            self.metrics
                .kernel_changes
                .with_label_values(&[kind.as_str()])
                .inc_by(n as u64);
            if drift {
                self.metrics
                    .drift_repairs
                    .with_label_values(&[kind.as_str()])
                    .inc_by(n as u64);
            }
        }
        for op in &plan.links {
            if let crate::overlay::diff::LinkOp::Delete {
                name,
                reason: crate::overlay::diff::DeleteReason::Incompatible,
                ..
            } = op
            {
                self.event(
                    inputs,
                    EventType::Warning,
                    "VxlanDeviceRecreated",
                    format!("{name} had another VNI, port, local address, underlay or learning setting; recreated it"),
                )
                .await;
            }
        }
        if !plan.is_empty() {
            let counts: Vec<String> = plan
                .counts()
                .iter()
                .map(|(k, n)| format!("{}={n}", k.as_str()))
                .collect();
            if drift {
                tracing::warn!(
                    changes = plan.len(),
                    "repaired kernel state changed by someone else: {}",
                    counts.join(" ")
                );
                self.event(
                    inputs,
                    EventType::Normal,
                    "DriftRepaired",
                    format!(
                        "restored overlay state changed outside canal-agent: {}",
                        counts.join(" ")
                    ),
                )
                .await;
            } else {
                tracing::info!(
                    changes = plan.len(),
                    vxlan_peers = desired.vxlan_peers,
                    direct_peers = desired.direct_peers,
                    "overlay updated: {}",
                    counts.join(" ")
                );
            }
        }
        for e in &synced.errors {
            self.count_netlink_error(e.category);
        }
        for e in synced.errors.iter().take(5) {
            tracing::warn!("{e}");
        }
        if synced.errors.len() > 5 {
            tracing::warn!("... and {} more netlink errors", synced.errors.len() - 5);
        }
        self.metrics
            .remote_nodes
            .with_label_values(&["vxlan"])
            .set(desired.vxlan_peers as i64);
        self.metrics
            .remote_nodes
            .with_label_values(&["direct"])
            .set(desired.direct_peers as i64);
        for reason in crate::overlay::desired::SkipReason::ALL {
            let n = desired
                .skipped
                .iter()
                .filter(|s| s.reason == reason)
                .count();
            self.metrics
                .remote_nodes_skipped
                .with_label_values(&[reason.as_str()])
                .set(n as i64);
        }
        if desired.skipped != self.last_skipped {
            let new: Vec<Skipped> = desired
                .skipped
                .iter()
                .filter(|s| !self.last_skipped.contains(s))
                .cloned()
                .collect();
            for s in &new {
                tracing::warn!(peer = %s.peer, reason = s.reason.as_str(), "peer gets no route");
                self.event(
                    inputs,
                    EventType::Warning,
                    "PeerSkipped",
                    format!("no route to Node {}: {}", s.peer, s.reason.as_str()),
                )
                .await;
            }
            self.last_skipped = desired.skipped.clone();
        }
        if let Some(text) = self.report_mismatch(inputs, synced.underlay.ip) {
            self.event(inputs, EventType::Warning, "UnderlayAddressMismatch", text)
                .await;
        }

        let mut clean = synced.errors.is_empty();
        if let Err(e) = ensure_ip_forward() {
            tracing::error!("{e}");
            clean = false;
        }

        // iptables: read back on every periodic resync and whenever the
        // wanted rules change.
        let iptables_started = Instant::now();
        let rules = RulesConfig {
            cluster_cidr: inputs.config.cluster_cidr,
            node_subnet: inputs.local.subnet,
            masquerade: inputs.config.masquerade,
        };
        match self.masq.sync(&rules, trigger == "resync").await {
            Ok(outcome) => {
                if !outcome.rewritten.is_empty() {
                    tracing::info!(tables = ?outcome.rewritten, masquerade = rules.masquerade, "iptables rules written");
                    self.metrics
                        .kernel_changes
                        .with_label_values(&["iptables"])
                        .inc_by(outcome.rewritten.len() as u64);
                }
                if !outcome.repaired.is_empty() {
                    tracing::warn!(tables = ?outcome.repaired, "repaired iptables rules changed by someone else");
                    self.metrics
                        .drift_repairs
                        .with_label_values(&["iptables"])
                        .inc_by(outcome.repaired.len() as u64);
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                self.metrics
                    .iptables_errors
                    .with_label_values(&[e.step.as_str()])
                    .inc();
                clean = false;
            }
        }
        self.metrics
            .sync_phase_duration
            .with_label_values(&["iptables"])
            .observe(iptables_started.elapsed().as_secs_f64());

        let file = NetworkFile {
            cluster_cidr: inputs.config.cluster_cidr,
            node_subnet: inputs.local.subnet,
            mtu: desired.pod_mtu,
            node_name: self.node_name.clone(),
            node_ip: Some(synced.underlay.ip),
        };
        match self.run_dir.write_network(&file) {
            Ok(true) => tracing::info!(
                path = %self.run_dir.network_file().display(),
                subnet = %file.node_subnet,
                mtu = file.mtu,
                "wrote the network file for canal-cni"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::error!("{e}");
                clean = false;
            }
        }

        let published = Arc::new(NodeNetwork {
            node_name: self.node_name.clone(),
            node_subnet: inputs.local.subnet,
            config: inputs.config.clone(),
            pod_mtu: desired.pod_mtu,
            underlay_interface: synced.underlay.name.clone(),
            node_ip: synced.underlay.ip,
            vxlan_device: desired.device.as_ref().map(|d| d.name.clone()),
        });
        self.network_tx.send_if_modified(|current| {
            if current.as_deref() == Some(&*published) {
                false
            } else {
                *current = Some(published);
                true
            }
        });

        self.last_desired = Some(synced.desired);
        self.last_clean = clean;
        clean
    }

    fn count_netlink_error(&self, category: Category) {
        self.metrics
            .netlink_errors
            .with_label_values(&[category.as_str()])
            .inc();
    }

    /// Logs and gauges an underlay address that differs from the Node's;
    /// returns the text when it is new (for an Event).
    /// Logs and gauges an underlay address that differs from the Node's;
    /// returns the text when it is new (for an Event).
    fn report_mismatch(&mut self, inputs: &Inputs, underlay_ip: Ipv4Addr) -> Option<String> {
        let mut problems = Vec::new();
        if let Some(internal) = inputs.internal_ip.filter(|ip| *ip != underlay_ip) {
            problems.push(format!("the Node's InternalIP is {internal}"));
        }
        if let Some(public) = inputs.public_ip.filter(|ip| *ip != underlay_ip) {
            problems.push(format!(
                "its public-ip annotation (where peers send VXLAN traffic) is {public}"
            ));
        }
        let text = (!problems.is_empty()).then(|| {
            format!(
                "the underlay address {underlay_ip} differs from the Node's addresses: {}; set CanalNetwork spec.interface to the interface that carries the node address",
                problems.join(", ")
            )
        });
        self.metrics
            .underlay_mismatch
            .set(i64::from(text.is_some()));
        if text == self.mismatch {
            return None;
        }
        if let Some(t) = &text {
            tracing::warn!("{t}");
        }
        self.mismatch = text.clone();
        text
    }

    /// Publishes an Event about this Node (best effort: a failure is logged).
    async fn event(&self, inputs: &Inputs, type_: EventType, reason: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node_name.clone()),
            uid: inputs.uid.clone(),
            ..ObjectReference::default()
        };
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::debug!("publishing Event {reason}: {e}");
        }
    }

    /// Sets NetworkUnavailable=False (reason CanalIsUp) on our Node, at most
    /// once a minute while the watch does not show it yet.
    async fn patch_condition(&mut self) {
        if self
            .condition_patched
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = serde_json::json!({
            "status": {"conditions": [{
                "type": nodes::NETWORK_UNAVAILABLE,
                "status": "False",
                "reason": nodes::CANAL_IS_UP,
                "message": "canal-agent has programmed the pod network on this node",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]}
        });
        let api: Api<Node> = Api::all(self.client.clone());
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        match api
            .patch_status(&self.node_name, &pp, &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => {
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

/// Pods are routed through the node: IPv4 forwarding must be on (Kubernetes
/// requires it; the agent turns it on when something left it off).
fn ensure_ip_forward() -> Result<(), String> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(PATH).map_err(|e| format!("reading {PATH}: {e}"))?;
    if current.trim() != "1" {
        std::fs::write(PATH, "1").map_err(|e| format!("enabling IPv4 forwarding ({PATH}): {e}"))?;
        tracing::warn!("IPv4 forwarding was off; turned it on ({PATH}=1)");
    }
    Ok(())
}

/// Feeds Node watch events into the index and wakes the sync loop when
/// something the overlay uses changed.
async fn watch_nodes(
    client: kube::Client,
    local: String,
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    metrics: Metrics,
) {
    let api: Api<Node> = Api::all(client);
    // No debounce: every change of a peer matters.
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                metrics.watch_errors.with_label_values(&["node"]).inc();
                tracing::warn!("watching Nodes: {e} (retrying)");
                continue;
            }
        };
        metrics.watch_events.with_label_values(&["node"]).inc();
        // Keep only the projection; the Node object is dropped here, before
        // the lock is taken.
        enum Step {
            Apply(NodeFacts),
            Delete(String),
            Init,
            InitApply(NodeFacts),
            InitDone,
        }
        let step = match event {
            Event::Apply(node) => Step::Apply(NodeFacts::from_node(&node)),
            Event::Delete(node) => Step::Delete(node.metadata.name.unwrap_or_default()),
            Event::Init => Step::Init,
            Event::InitApply(node) => Step::InitApply(NodeFacts::from_node(&node)),
            Event::InitDone => Step::InitDone,
        };
        let mut shared = lock(&shared);
        let Shared { nodes, pending, .. } = &mut *shared;
        let wake = match step {
            Step::Apply(facts) => {
                let name = facts.name.clone();
                let problems = facts.problems.clone();
                let changed = nodes.apply(facts);
                if changed.any && !problems.is_empty() {
                    tracing::warn!(node = %name, "ignoring unreadable fields: {}", problems.join("; "));
                }
                if changed.peer && name != local {
                    pending.entry(name).or_insert(now);
                }
                changed.any && nodes.listed()
            }
            Step::Delete(name) => {
                let changed = nodes.delete(&name);
                if changed.peer && name != local {
                    pending.entry(name).or_insert(now);
                }
                changed.any && nodes.listed()
            }
            Step::Init => {
                nodes.relist_start();
                false
            }
            Step::InitApply(facts) => {
                nodes.relist_apply(facts);
                false
            }
            Step::InitDone => {
                let (changed, any) = nodes.relist_done();
                tracing::info!(nodes = nodes.len(), "listed Nodes");
                for name in changed.into_iter().filter(|n| *n != local) {
                    pending.entry(name).or_insert(now);
                }
                any
            }
        };
        drop(shared);
        if wake {
            notify.notify_one();
        }
    }
}

/// Feeds the CanalNetwork `default` into the shared state.
async fn watch_network(
    client: kube::Client,
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    metrics: Metrics,
) {
    let api: Api<CanalNetwork> = Api::all(client);
    let config = watcher::Config::default().fields(&format!(
        "metadata.name={}",
        canal_crds::DEFAULT_NETWORK_NAME
    ));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut relisted: Option<NetworkState> = None;
    let state_of = |n: &CanalNetwork| match effective_config(n) {
        Ok(c) => NetworkState::Valid(c),
        Err(e) => NetworkState::Invalid(e),
    };
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                metrics
                    .watch_errors
                    .with_label_values(&["canalnetwork"])
                    .inc();
                tracing::warn!("watching CanalNetwork: {e} (retrying)");
                continue;
            }
        };
        metrics
            .watch_events
            .with_label_values(&["canalnetwork"])
            .inc();
        let next = match event {
            Event::Apply(n) => Some(state_of(&n)),
            Event::Delete(_) => Some(NetworkState::Missing),
            Event::Init => {
                relisted = Some(NetworkState::Missing);
                None
            }
            Event::InitApply(n) => {
                relisted = Some(state_of(&n));
                None
            }
            Event::InitDone => relisted.take(),
        };
        if let Some(next) = next {
            let mut s = lock(&shared);
            if s.network != next {
                if let NetworkState::Invalid(e) = &next {
                    tracing::error!(
                        "CanalNetwork {} cannot be applied: {e}",
                        canal_crds::DEFAULT_NETWORK_NAME
                    );
                }
                s.network = next;
                drop(s);
                notify.notify_one();
            }
        }
    }
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
            effective_config(&n).unwrap().cluster_cidr.to_string(),
            "10.99.0.0/16"
        );
        n.status = Some(CanalNetworkStatus {
            active_cluster_cidr: Some("10.244.0.0/16".into()),
            ..CanalNetworkStatus::default()
        });
        assert_eq!(
            effective_config(&n).unwrap().cluster_cidr.to_string(),
            "10.244.0.0/16"
        );
        n.spec.backend.vni = 0;
        assert!(effective_config(&n).unwrap_err().contains("vni"));
    }
}
