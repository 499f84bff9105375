//! The network controller: CanalNetwork `default`, Node pod-CIDR allocation
//! and VTEP annotations.
//!
//! Shape: two watches (Nodes, CanalNetworks) feed the pure [`state::State`];
//! after every batch of events one level-triggered pass plans the writes,
//! which run concurrently (bounded) and feed their results back. Why not a
//! kube-runtime `Controller` per Node: allocation is a global decision (no
//! double allocation, waiting Nodes served oldest first, overlaps between
//! Nodes, one status aggregated over all Nodes). A single owner of the
//! allocator needs no locks, decides deterministically, and can refuse to
//! allocate before the complete Node list is known; writes still go out in
//! parallel. Everything here is a future owned by the caller, nothing is
//! spawned: dropping it (a lost Lease) stops every write at once.

pub mod addresses;
pub mod addresses6;
pub mod families;
pub mod programmed;
pub mod state;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canal_crds::CanalNetwork;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event, EventType};
use kube::runtime::watcher::{self, watcher};
use serde_json::json;
use tokio::sync::mpsc;

use crate::context::{Context, FIELD_MANAGER};
use crate::metrics::kind;
use crate::node_view::NodeView;
use state::{NetworkObject, Notice, State, Subject, WriteKind};

/// Everything is looked at again this often, to heal what no event reports.
const RESYNC: Duration = Duration::from_secs(300);
/// Events waiting to be published; more are dropped (and counted).
const EVENT_QUEUE: usize = 1024;
/// Watch events handled before a planning pass runs.
const BATCH: usize = 512;

/// The network controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A watch stream ended, which a watcher with backoff never does.
    #[error("the {0} watch ended unexpectedly")]
    WatchEnded(&'static str),
}

/// A write in flight, with what it was for.
enum Done {
    Node {
        write: state::NodeWrite,
        result: Result<Box<Node>, kube::Error>,
        elapsed: Duration,
    },
    Status {
        name: String,
        status: canal_crds::CanalNetworkStatus,
        result: Result<(), kube::Error>,
        elapsed: Duration,
    },
}

type Write = Pin<Box<dyn Future<Output = Done> + Send>>;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Target {
    Node(String),
    Status(String),
}

/// Runs the network controller until dropped.
pub async fn run(ctx: Arc<Context>) -> Result<(), Error> {
    let nodes: Api<DeserializeGuard<Node>> = Api::all(ctx.client.clone());
    let networks: Api<DeserializeGuard<CanalNetwork>> = Api::all(ctx.client.clone());
    let node_events = watcher(nodes, watcher::Config::default())
        .default_backoff()
        .boxed();
    let network_events = watcher(networks, watcher::Config::default())
        .default_backoff()
        .boxed();
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let shell = Shell {
        ctx: ctx.clone(),
        state: State::new(),
        busy: HashSet::new(),
        busy_status: HashSet::new(),
        retries: BTreeSet::new(),
        attempts: HashMap::new(),
        node_buffer: None,
        network_buffer: None,
        nodes_synced: false,
        networks_synced: false,
        events: events_tx,
    };
    let (result, ()) = tokio::join!(
        shell.run(node_events, network_events),
        publish_events(ctx, events_rx)
    );
    result
}

struct Shell {
    ctx: Arc<Context>,
    state: State,
    /// Nodes with a write in flight or waiting for a retry.
    busy: HashSet<String>,
    /// CanalNetworks with a status write in flight or waiting for a retry.
    busy_status: HashSet<String>,
    retries: BTreeSet<(Instant, Target)>,
    attempts: HashMap<Target, u32>,
    node_buffer: Option<Vec<NodeView>>,
    network_buffer: Option<Vec<NetworkObject>>,
    nodes_synced: bool,
    networks_synced: bool,
    events: mpsc::Sender<Notice>,
}

type Events<K> =
    Pin<Box<dyn Stream<Item = Result<watcher::Event<DeserializeGuard<K>>, watcher::Error>> + Send>>;

impl Shell {
    async fn run(
        mut self,
        mut nodes: Events<Node>,
        mut networks: Events<CanalNetwork>,
    ) -> Result<(), Error> {
        let mut writes: FuturesUnordered<Write> = FuturesUnordered::new();
        let mut next_resync = Instant::now() + RESYNC;
        loop {
            let wake = self
                .retries
                .first()
                .map(|(t, _)| *t)
                .unwrap_or(next_resync)
                .min(next_resync);
            tokio::select! {
                ev = nodes.next() => self.on_node_event(ev.ok_or(Error::WatchEnded("Node"))?),
                ev = networks.next() => self.on_network_event(ev.ok_or(Error::WatchEnded("CanalNetwork"))?),
                Some(done) = writes.next(), if !writes.is_empty() => self.on_done(done),
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if now >= next_resync {
                        self.state.mark_all_dirty();
                        next_resync = now + RESYNC;
                    }
                    self.retry_due(now);
                }
            }
            // Take whatever else is ready, so a burst is planned once.
            for _ in 0..BATCH {
                if let Some(Some(ev)) = nodes.next().now_or_never() {
                    self.on_node_event(ev);
                } else if let Some(Some(ev)) = networks.next().now_or_never() {
                    self.on_network_event(ev);
                } else if let Some(Some(done)) = writes.next().now_or_never() {
                    self.on_done(done);
                } else {
                    break;
                }
            }
            if self.nodes_synced && self.networks_synced {
                self.pass(&mut writes);
            }
        }
    }

    fn on_node_event(
        &mut self,
        ev: Result<watcher::Event<DeserializeGuard<Node>>, watcher::Error>,
    ) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!("Node watch: {e}");
                self.ctx.metrics.error(kind::NODE, "watch");
                return;
            }
        };
        match ev {
            watcher::Event::Init => self.node_buffer = Some(Vec::new()),
            watcher::Event::InitApply(DeserializeGuard(obj)) => {
                if let Some(view) = self.node_view(obj) {
                    self.node_buffer.get_or_insert_with(Vec::new).push(view);
                }
            }
            watcher::Event::InitDone => {
                let views = self.node_buffer.take().unwrap_or_default();
                tracing::info!(nodes = views.len(), "Node list complete");
                self.state.reset_nodes(views);
                self.nodes_synced = true;
            }
            watcher::Event::Apply(DeserializeGuard(obj)) => {
                if let Some(view) = self.node_view(obj) {
                    self.state.apply_node(view);
                }
            }
            watcher::Event::Delete(DeserializeGuard(obj)) => {
                let name = match obj {
                    Ok(node) => node.metadata.name,
                    Err(invalid) => invalid.metadata.name,
                };
                if let Some(name) = name {
                    tracing::info!(node = %name, "Node deleted");
                    self.state.delete_node(&name);
                }
            }
        }
    }

    fn node_view(
        &self,
        obj: Result<Node, kube::core::error_boundary::InvalidObject>,
    ) -> Option<NodeView> {
        match obj {
            Ok(node) => Some(NodeView::from_node(&node)),
            Err(invalid) => {
                let name = invalid.metadata.name.clone().unwrap_or_default();
                tracing::warn!(node = %name, "skipping a Node that does not parse: {}", invalid.error);
                self.ctx.metrics.error(kind::NODE, "invalid_object");
                None
            }
        }
    }

    fn on_network_event(
        &mut self,
        ev: Result<watcher::Event<DeserializeGuard<CanalNetwork>>, watcher::Error>,
    ) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!("CanalNetwork watch: {e}");
                self.ctx.metrics.error(kind::NETWORK, "watch");
                return;
            }
        };
        match ev {
            watcher::Event::Init => self.network_buffer = Some(Vec::new()),
            watcher::Event::InitApply(obj) => {
                let o = self.network_object(obj);
                self.network_buffer.get_or_insert_with(Vec::new).push(o);
            }
            watcher::Event::InitDone => {
                let objects = self.network_buffer.take().unwrap_or_default();
                self.state.reset_networks(objects);
                self.networks_synced = true;
            }
            watcher::Event::Apply(obj) => {
                let o = self.network_object(obj);
                self.state.apply_network(o);
            }
            watcher::Event::Delete(obj) => {
                let o = self.network_object(obj);
                self.state.delete_network(&o.name);
            }
        }
    }

    fn network_object(
        &self,
        DeserializeGuard(obj): DeserializeGuard<CanalNetwork>,
    ) -> NetworkObject {
        match obj {
            Ok(n) => NetworkObject {
                name: n.metadata.name.clone().unwrap_or_default(),
                uid: n.metadata.uid.clone(),
                generation: n.metadata.generation,
                spec: Ok(n.spec),
                status: Some(n.status.unwrap_or_default()),
            },
            Err(invalid) => {
                let name = invalid.metadata.name.clone().unwrap_or_default();
                tracing::warn!(canalnetwork = %name, "CanalNetwork does not match the schema: {}", invalid.error);
                self.ctx.metrics.error(kind::NETWORK, "invalid_object");
                NetworkObject {
                    name,
                    uid: invalid.metadata.uid.clone(),
                    generation: invalid.metadata.generation,
                    spec: Err(invalid.error),
                    status: None,
                }
            }
        }
    }

    fn pass(&mut self, writes: &mut FuturesUnordered<Write>) {
        let budget = self
            .ctx
            .settings
            .max_concurrent_writes
            .saturating_sub(writes.len());
        let started = Instant::now();
        let plan = self.state.plan(Time(Timestamp::now()), budget, &self.busy);
        let m = &self.ctx.metrics;
        m.plan_duration.observe(started.elapsed().as_secs_f64());
        m.reconciles
            .with_label_values(&[kind::NODE])
            .inc_by(plan.nodes_reconciled as u64);
        for w in plan.node_writes {
            self.busy.insert(w.apply.name.clone());
            writes.push(node_write(self.ctx.clone(), w));
        }
        for s in plan.status_writes {
            m.reconciles.with_label_values(&[kind::NETWORK]).inc();
            if self.busy_status.insert(s.name.clone()) {
                writes.push(status_write(self.ctx.clone(), s));
            }
        }
        for n in plan.notices {
            self.notify(n);
        }
        self.ctx.publish_network_config(self.state.live_config());
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let m = &self.ctx.metrics;
        if !self.state.allocators().is_empty() {
            // A family dropped from the plan leaves no stale series.
            m.subnets_allocated.reset();
            m.subnets_free.reset();
            m.subnets_capacity.reset();
        }
        for a in self.state.allocators() {
            let family = [canal_crds::validate::family_name(&a.cluster())];
            m.subnets_allocated
                .with_label_values(&family)
                .set(a.allocated() as i64);
            m.subnets_free
                .with_label_values(&family)
                .set(a.free() as i64);
            m.subnets_capacity
                .with_label_values(&family)
                .set(a.total().min(i64::MAX as u64) as i64);
        }
        m.pending_nodes.set(self.state.waiting_count() as i64);
        m.conflicting_nodes.set(self.state.conflict_count() as i64);
        m.nodes.set(self.state.node_count() as i64);
    }

    fn notify(&self, n: Notice) {
        if self.events.try_send(n).is_err() {
            self.ctx
                .metrics
                .events
                .with_label_values(&["dropped"])
                .inc();
        }
    }

    fn on_done(&mut self, done: Done) {
        let m = self.ctx.metrics.clone();
        match done {
            Done::Node {
                write,
                result,
                elapsed,
            } => {
                let name = write.apply.name.clone();
                m.reconcile_duration
                    .with_label_values(&[kind::NODE])
                    .observe(elapsed.as_secs_f64());
                match result {
                    Ok(node) => {
                        m.api_writes.with_label_values(&["node"]).inc();
                        self.busy.remove(&name);
                        self.attempts.remove(&Target::Node(name.clone()));
                        let view = NodeView::from_node(&node);
                        let subject = Subject::Node {
                            name: name.clone(),
                            uid: view.uid.clone(),
                        };
                        self.state.node_written(write.based_on.as_deref(), view);
                        let list = |nets: &[ipnet::IpNet]| {
                            nets.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(",")
                        };
                        let cluster = list(
                            &self
                                .state
                                .allocators()
                                .iter()
                                .map(|a| a.cluster())
                                .collect::<Vec<_>>(),
                        );
                        match write.kind {
                            WriteKind::Allocate(subnets) => {
                                let subnet = list(&subnets);
                                tracing::info!(node = %name, %subnet, "allocated a pod subnet");
                                self.notify(Notice {
                                    subject,
                                    warning: false,
                                    reason: "SubnetAllocated",
                                    action: "AllocatePodCIDR",
                                    note: format!("podCIDR {subnet} allocated from clusterCIDR {cluster} and published to the overlay"),
                                });
                            }
                            WriteKind::Adopt(subnets) => {
                                let subnet = list(&subnets);
                                tracing::info!(node = %name, %subnet, "adopted the Node's pod subnet");
                                self.notify(Notice {
                                    subject,
                                    warning: false,
                                    reason: "SubnetAdopted",
                                    action: "AdoptPodCIDR",
                                    note: format!("the Node's existing podCIDR {subnet} lies in clusterCIDR {cluster}: adopted and published to the overlay"),
                                });
                            }
                            WriteKind::Update => {
                                tracing::debug!(node = %name, "updated the Node's overlay annotations");
                            }
                        }
                        for moved in write.moved.iter().chain(&write.moved_v6) {
                            tracing::warn!(node = %name, from = %moved.from, to = %moved.to, source = %moved.source, "the Node's overlay address moved");
                            self.notify(Notice {
                                subject: Subject::Node {
                                    name: name.clone(),
                                    uid: self.state.node(&name).and_then(|v| v.uid.clone()),
                                },
                                warning: true,
                                reason: "NodeAddressChanged",
                                action: "PublishNodeAddress",
                                note: addresses::move_note(moved),
                            });
                        }
                    }
                    Err(e) => {
                        let category = category(&e);
                        m.error(kind::NODE, category);
                        if category == "not_found" {
                            // Deleted meanwhile; the watch reports it.
                            self.busy.remove(&name);
                            return;
                        }
                        tracing::warn!(node = %name, "writing the Node: {e}");
                        self.schedule_retry(Target::Node(name));
                    }
                }
            }
            Done::Status {
                name,
                status,
                result,
                elapsed,
            } => {
                m.reconcile_duration
                    .with_label_values(&[kind::NETWORK])
                    .observe(elapsed.as_secs_f64());
                match result {
                    Ok(_) => {
                        m.api_writes
                            .with_label_values(&["canalnetwork_status"])
                            .inc();
                        self.busy_status.remove(&name);
                        self.attempts.remove(&Target::Status(name.clone()));
                        self.state.status_written(&name, status);
                    }
                    Err(e) => {
                        let category = category(&e);
                        m.error(kind::NETWORK, category);
                        if category == "not_found" {
                            self.busy_status.remove(&name);
                            return;
                        }
                        tracing::warn!(canalnetwork = %name, "writing the status: {e}");
                        self.schedule_retry(Target::Status(name));
                    }
                }
            }
        }
    }

    /// Exponential backoff per target: 0.5 s doubling up to 60 s.
    fn schedule_retry(&mut self, target: Target) {
        let n = self.attempts.entry(target.clone()).or_insert(0);
        *n += 1;
        let delay = Duration::from_millis(500)
            .saturating_mul(1u32 << (*n - 1).min(7))
            .min(Duration::from_secs(60));
        self.retries.insert((Instant::now() + delay, target));
    }

    fn retry_due(&mut self, now: Instant) {
        while let Some((at, _)) = self.retries.first() {
            if *at > now {
                break;
            }
            let Some((_, target)) = self.retries.pop_first() else {
                break;
            };
            match target {
                Target::Node(name) => {
                    self.busy.remove(&name);
                    self.state.mark_dirty(&name);
                }
                Target::Status(name) => {
                    self.busy_status.remove(&name);
                }
            }
        }
    }
}

/// A bounded error category for metrics.
fn category(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 404 => "not_found",
        kube::Error::Api(s) if s.code == 409 => "conflict",
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => "invalid",
        kube::Error::Api(s) if s.code == 504 || s.code == 408 => "timeout",
        _ => "kube_api",
    }
}

fn node_write(ctx: Arc<Context>, write: state::NodeWrite) -> Write {
    Box::pin(async move {
        let api: Api<Node> = Api::all(ctx.client.clone());
        let started = Instant::now();
        let body = crate::vtep::apply_body(&write.apply);
        let result = api
            .patch(
                &write.apply.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(Box::new);
        Done::Node {
            write,
            result,
            elapsed: started.elapsed(),
        }
    })
}

fn status_write(ctx: Arc<Context>, write: state::StatusWrite) -> Write {
    Box::pin(async move {
        let api: Api<DeserializeGuard<CanalNetwork>> = Api::all(ctx.client.clone());
        let started = Instant::now();
        let body = json!({
            "apiVersion": format!("{}/{}", canal_crds::GROUP, canal_crds::VERSION),
            "kind": "CanalNetwork",
            "metadata": {"name": write.name},
            "status": write.status,
        });
        let result = api
            .patch_status(
                &write.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ());
        Done::Status {
            name: write.name,
            status: write.status,
            result,
            elapsed: started.elapsed(),
        }
    })
}

/// Publishes Events one at a time until the controller stops.
async fn publish_events(ctx: Arc<Context>, mut rx: mpsc::Receiver<Notice>) {
    while let Some(n) = rx.recv().await {
        let reference = match &n.subject {
            Subject::Node { name, uid } => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name.clone()),
                uid: uid.clone(),
                ..Default::default()
            },
            Subject::Network { name, uid } => ObjectReference {
                api_version: Some(format!("{}/{}", canal_crds::GROUP, canal_crds::VERSION)),
                kind: Some("CanalNetwork".into()),
                name: Some(name.clone()),
                uid: uid.clone(),
                ..Default::default()
            },
        };
        let event = Event {
            type_: if n.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: n.reason.into(),
            note: Some(truncate(&n.note, 1000)),
            action: n.action.into(),
            secondary: None,
        };
        match ctx.recorder.publish(&event, &reference).await {
            Ok(()) => ctx.metrics.events.with_label_values(&["published"]).inc(),
            Err(e) => {
                tracing::warn!("publishing Event {}: {e}", n.reason);
                ctx.metrics.events.with_label_values(&["failed"]).inc();
            }
        }
    }
}

/// At most `max` bytes, cut at a character boundary (Event notes are limited to 1 kB).
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    // Room for the ellipsis (3 bytes in UTF-8).
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
