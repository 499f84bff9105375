//! The policy controller's I/O shell: watches NetworkPolicies, Pods,
//! Namespaces, Nodes, NodePolicySets, PolicyGroups, PeerSets and the
//! CanalNetwork, feeds the pure [`PolicyIndex`], and writes what changed.
//!
//! One task owns the index. Watch tasks convert each object to the small
//! input the index needs (dropping the object at once) and send it over a
//! channel with its arrival time. The owner starts a pass as soon as an
//! event arrives when idle (no fixed wait: a single change is published at
//! once), applies everything else already queued, flushes, and writes
//! ([`write`]); events that arrive while a pass runs are queued and all go
//! into the next pass, so a burst costs a few passes, not one each. PeerSets,
//! then PolicyGroups, then NodePolicySets, each kind slices before heads,
//! then the deletions in the reverse order, so an agent never sees a
//! reference to an object (or a version of one) not written yet. A head is
//! written only once all its slices are, and a NodePolicySet only once the
//! PolicyGroups it names are current; whatever cannot be written (over the
//! size bound, or refused) is reported on the NodePolicySets of the nodes
//! that depend on it and on the CanalNetwork ([`publish`]), and those
//! nodes keep their consistent previous version. Nothing is written until
//! every watch has listed once, so a restart never publishes a
//! NodePolicySet built from half the policies.
//!
//! Every generated object is owned by the CanalNetwork `default` (an
//! ownerReference), so deleting it (`helm uninstall`) lets Kubernetes
//! garbage-collect every generated object, PeerSets included, which no Node
//! could own. Nothing is written while that CanalNetwork does not exist, and
//! an object whose owner is not the current CanalNetwork (written by an older
//! release, or for a CanalNetwork since re-created) is rewritten. A Node's
//! NodePolicySet is deleted by the controller when the Node goes.

mod publish;
mod write;

use std::collections::HashMap;
use std::time::Duration;

use canal_crds::{CanalNetwork, NodePolicySet, PeerSet, PolicyGroup};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::Client;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use prometheus::Registry;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use super::fingerprint::{self, Fingerprint};
use super::index::{Kind, PolicyIndex};
use super::input::{NamespaceInfo, NodeInfo, PodInfo};
use super::metrics::Metrics;
use super::objects::Limits;
pub use super::objects::MANAGED_BY;
use super::problems::{ConditionView, POLICY_PUBLISHED, PUBLISHED, Problems};
use super::summary::{NodeStatus, PolicySummary};

/// Minimum time between two publishes of the index size gauges.
const SIZES_INTERVAL: Duration = Duration::from_secs(1);

/// Field manager of everything the policy controller writes.
pub const FIELD_MANAGER: &str = "canal-controller-policy";

/// Tuning of the controller loop.
#[derive(Clone, Debug)]
pub struct Options {
    /// After the first event of an idle period, how long to keep collecting
    /// events before compiling. Zero (the default): start at once with
    /// whatever is queued; a burst still coalesces, because everything that
    /// arrives while a pass writes goes into the next pass.
    pub batch_window: Duration,
    /// API requests in flight at once while writing a batch.
    pub write_concurrency: usize,
    /// First retry delay after a failed write (doubles up to 30 s).
    pub retry_backoff: Duration,
    /// Minimum time between two writes of the CanalNetwork summary.
    pub summary_interval: Duration,
    /// How large objects may be and where they are split into slices.
    pub limits: Limits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch_window: Duration::ZERO,
            write_concurrency: 32,
            retry_backoff: Duration::from_millis(500),
            summary_interval: Duration::from_millis(500),
            limits: Limits::default(),
        }
    }
}

/// Why the policy controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics could not be registered (names already taken).
    #[error("registering the policy controller's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Every watch task ended (they only end when cancelled).
    #[error("the policy controller's watches stopped")]
    WatchesEnded,
}

/// Runs the policy controller until cancelled (drop the future: the watch
/// tasks stop with it) or until it cannot go on.
pub async fn run(client: Client, registry: &Registry, options: Options) -> Result<(), Error> {
    let (metrics, _registration) = Metrics::register(registry)?;
    let (tx, rx) = mpsc::channel::<(std::time::Instant, Input)>(1024);
    let mut tasks = JoinSet::new();
    let mut watches = Watches {
        client: &client,
        tx: &tx,
        metrics: &metrics,
        tasks: &mut tasks,
    };
    let all = watcher::Config::default;
    watches.spawn(Resource::Namespaces, all(), |ns: &Namespace| {
        Some(NamespaceInfo::from_namespace(ns))
    });
    watches.spawn(Resource::Pods, all(), |p: &Pod| Some(PodInfo::from_pod(p)));
    watches.spawn(Resource::Nodes, all(), |n: &Node| {
        Some(NodeInfo::from_node(n))
    });
    watches.spawn(
        Resource::NetworkPolicies,
        all(),
        |g: &DeserializeGuard<NetworkPolicy>| Some(PolicyInput::from_guard(g)),
    );
    watches.spawn(
        Resource::NodePolicySets,
        all(),
        |g: &DeserializeGuard<NodePolicySet>| Some(ObservedNps(Observed::node_policy_set(g))),
    );
    watches.spawn(
        Resource::PolicyGroups,
        all(),
        |g: &DeserializeGuard<PolicyGroup>| {
            Some(ObservedPg(Observed::of(g, |o: &PolicyGroup| {
                fingerprint::content(&o.spec)
            })))
        },
    );
    watches.spawn(
        Resource::PeerSets,
        all(),
        |g: &DeserializeGuard<PeerSet>| {
            Some(ObservedPs(Observed::of(g, |o: &PeerSet| {
                fingerprint::content(&o.spec)
            })))
        },
    );
    watches.spawn(
        Resource::CanalNetwork,
        all().fields(&format!(
            "metadata.name={}",
            canal_crds::DEFAULT_NETWORK_NAME
        )),
        |g: &DeserializeGuard<CanalNetwork>| Some(NetworkView::from_guard(g)),
    );
    drop(tx);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGED_BY.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let controller = Controller {
        client,
        index: PolicyIndex::with_limits(options.limits.clone()),
        metrics,
        options,
        recorder,
        synced: [false; Resource::COUNT],
        first_sync_done: false,
        node_status: HashMap::new(),
        published: HashMap::new(),
        network: None,
        summary_written_at: None,
        retry_at: None,
        retry_delay: Duration::ZERO,
        busy: Duration::ZERO,
        oldest: None,
        last_sizes: None,
        sizes_due: None,
        owners: HashMap::new(),
        problems: Problems::default(),
        waiting_for_network: false,
    };
    // `tasks` lives until `run` returns or is dropped; dropping it aborts
    // the watches.
    let result = controller.run(rx).await;
    tasks.shutdown().await;
    result
}

// ----- inputs ------------------------------------------------------------

/// The watched resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Namespaces,
    Pods,
    Nodes,
    NetworkPolicies,
    NodePolicySets,
    PolicyGroups,
    PeerSets,
    CanalNetwork,
}

impl Resource {
    const COUNT: usize = 8;

    fn label(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods",
            Resource::Nodes => "nodes",
            Resource::NetworkPolicies => "networkpolicies",
            Resource::NodePolicySets => "nodepolicysets",
            Resource::PolicyGroups => "policygroups",
            Resource::PeerSets => "peersets",
            Resource::CanalNetwork => "canalnetwork",
        }
    }

    /// The index may be flushed only when these have listed once.
    fn needed_for_sync(self) -> bool {
        self != Resource::CanalNetwork
    }
}

const RESOURCES: [Resource; Resource::COUNT] = [
    Resource::Namespaces,
    Resource::Pods,
    Resource::Nodes,
    Resource::NetworkPolicies,
    Resource::NodePolicySets,
    Resource::PolicyGroups,
    Resource::PeerSets,
    Resource::CanalNetwork,
];

/// A NetworkPolicy, or the identity of one that does not even decode.
enum PolicyInput {
    Decoded(Box<NetworkPolicy>),
    Undecodable {
        namespace: String,
        name: String,
        uid: Option<String>,
        error: String,
    },
}

impl PolicyInput {
    fn from_guard(g: &DeserializeGuard<NetworkPolicy>) -> PolicyInput {
        match &g.0 {
            Ok(np) => {
                let mut np = np.clone();
                np.metadata.managed_fields = None;
                np.metadata.annotations = None;
                PolicyInput::Decoded(Box::new(np))
            }
            Err(bad) => PolicyInput::Undecodable {
                namespace: bad.metadata.namespace.clone().unwrap_or_default(),
                name: bad.metadata.name.clone().unwrap_or_default(),
                uid: bad.metadata.uid.clone(),
                error: bad.error.clone(),
            },
        }
    }

    fn key(&self) -> (&str, &str) {
        match self {
            PolicyInput::Decoded(np) => (
                np.metadata.namespace.as_deref().unwrap_or_default(),
                np.metadata.name.as_deref().unwrap_or_default(),
            ),
            PolicyInput::Undecodable {
                namespace, name, ..
            } => (namespace, name),
        }
    }
}

/// The UID the object's CanalNetwork ownerReference names, if any.
fn canal_network_owner(meta: &ObjectMeta) -> Option<String> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "CanalNetwork" && o.name == canal_crds::DEFAULT_NETWORK_NAME)
        .map(|o| o.uid.clone())
}

/// A generated object as the cluster holds it.
struct Observed {
    name: String,
    fingerprint: Option<Fingerprint>,
    /// UID of its CanalNetwork ownerReference.
    owner: Option<String>,
    /// NodePolicySets: what the summary needs of the agent's status.
    status: NodeStatus,
    /// NodePolicySets: the controller's `Published` condition.
    published: Option<Condition>,
}

impl Observed {
    fn of<K: kube::Resource>(
        g: &DeserializeGuard<K>,
        content: impl Fn(&K) -> Fingerprint,
    ) -> Observed {
        match &g.0 {
            Ok(obj) => Observed {
                name: obj.meta().name.clone().unwrap_or_default(),
                fingerprint: fingerprint::observed(
                    obj.meta()
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(fingerprint::ANNOTATION))
                        .map(String::as_str),
                    content(obj),
                ),
                owner: canal_network_owner(obj.meta()),
                status: NodeStatus::default(),
                published: None,
            },
            Err(bad) => Observed {
                name: bad.metadata.name.clone().unwrap_or_default(),
                fingerprint: None,
                owner: None,
                status: NodeStatus::default(),
                published: None,
            },
        }
    }

    fn node_policy_set(g: &DeserializeGuard<NodePolicySet>) -> Observed {
        let mut o = Observed::of(g, |n: &NodePolicySet| fingerprint::content(&n.spec));
        if let Ok(nps) = &g.0 {
            o.status = NodeStatus::from_object(nps);
            o.published = nps
                .status
                .as_ref()
                .and_then(|s| canal_crds::condition::find(&s.conditions, PUBLISHED).cloned());
        }
        o
    }
}

struct ObservedNps(Observed);
struct ObservedPs(Observed);
struct ObservedPg(Observed);

/// What the controller needs of the CanalNetwork `default`.
#[derive(Clone, Debug)]
struct NetworkView {
    /// Owner of every generated object.
    uid: Option<String>,
    policy_enabled: bool,
    summary: Option<PolicySummary>,
    /// The pod ranges in force, every family ([`CanalNetwork::pod_ranges`]):
    /// pod IPs outside them are never a pod's identity.
    cluster_cidrs: Option<Vec<ipnet::IpNet>>,
    /// The `PolicyPublished` condition as stored (for its transition time).
    published: Option<Condition>,
}

impl NetworkView {
    fn from_guard(g: &DeserializeGuard<CanalNetwork>) -> NetworkView {
        match &g.0 {
            Ok(cn) => NetworkView {
                uid: cn.metadata.uid.clone(),
                policy_enabled: cn.spec.policy.enabled,
                summary: cn.status.as_ref().and_then(PolicySummary::from_status),
                cluster_cidrs: Some(cn.pod_ranges()).filter(|r| !r.is_empty()),
                published: cn.status.as_ref().and_then(|s| {
                    canal_crds::condition::find(&s.conditions, POLICY_PUBLISHED).cloned()
                }),
            },
            // Unreadable spec: keep summarizing (as if enabled).
            Err(bad) => NetworkView {
                uid: bad.metadata.uid.clone(),
                policy_enabled: true,
                summary: None,
                cluster_cidrs: None,
                published: None,
            },
        }
    }
}

enum Update<T> {
    Apply(T),
    Delete(T),
    Reset(Vec<T>),
}

impl<T> Update<T> {
    fn map<U>(self, f: impl Fn(T) -> U) -> Update<U> {
        match self {
            Update::Apply(t) => Update::Apply(f(t)),
            Update::Delete(t) => Update::Delete(f(t)),
            Update::Reset(all) => Update::Reset(all.into_iter().map(f).collect()),
        }
    }
}

enum Input {
    Namespace(Update<NamespaceInfo>),
    Pod(Update<PodInfo>),
    Node(Update<NodeInfo>),
    Policy(Update<PolicyInput>),
    Object(Kind, Update<Observed>),
    Network(Update<NetworkView>),
}

trait IntoInput: Sized {
    fn wrap(u: Update<Self>) -> Input;
}
macro_rules! into_input {
    ($t:ty, $v:ident) => {
        impl IntoInput for $t {
            fn wrap(u: Update<Self>) -> Input {
                Input::$v(u)
            }
        }
    };
}
into_input!(NamespaceInfo, Namespace);
into_input!(PodInfo, Pod);
into_input!(NodeInfo, Node);
into_input!(PolicyInput, Policy);
into_input!(NetworkView, Network);
macro_rules! into_object_input {
    ($t:ident, $kind:expr) => {
        impl IntoInput for $t {
            fn wrap(u: Update<Self>) -> Input {
                Input::Object($kind, u.map(|o| o.0))
            }
        }
    };
}
into_object_input!(ObservedNps, Kind::NodePolicySet);
into_object_input!(ObservedPs, Kind::PeerSet);
into_object_input!(ObservedPg, Kind::PolicyGroup);

/// Spawns the watch tasks, each feeding the controller's channel.
struct Watches<'a> {
    client: &'a Client,
    tx: &'a mpsc::Sender<(std::time::Instant, Input)>,
    metrics: &'a Metrics,
    tasks: &'a mut JoinSet<Resource>,
}

impl Watches<'_> {
    fn spawn<K, T>(
        &mut self,
        resource: Resource,
        config: watcher::Config,
        convert: fn(&K) -> Option<T>,
    ) where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
        T: IntoInput + Send + 'static,
    {
        self.tasks.spawn(watch(
            Api::<K>::all(self.client.clone()),
            config,
            self.tx.clone(),
            self.metrics.clone(),
            resource,
            convert,
        ));
    }
}

/// Watches one resource, converting objects as they arrive. Initial lists
/// are buffered and sent as one `Reset`.
async fn watch<K, T>(
    api: Api<K>,
    config: watcher::Config,
    tx: mpsc::Sender<(std::time::Instant, Input)>,
    metrics: Metrics,
    resource: Resource,
    convert: fn(&K) -> Option<T>,
) -> Resource
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    T: IntoInput,
{
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut buffer: Vec<T> = Vec::new();
    let events = metrics.watch_events.with_label_values(&[resource.label()]);
    loop {
        let next = match stream.try_next().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return resource,
            Err(e) => {
                warn!(resource = resource.label(), error = %e, "watch failed; retrying with backoff");
                metrics.errors.with_label_values(&["watch"]).inc();
                continue;
            }
        };
        events.inc();
        let input = match next {
            Event::Init => {
                buffer.clear();
                continue;
            }
            Event::InitApply(obj) => {
                buffer.extend(convert(&obj));
                continue;
            }
            Event::InitDone => Update::Reset(std::mem::take(&mut buffer)),
            Event::Apply(obj) => match convert(&obj) {
                Some(v) => Update::Apply(v),
                None => continue,
            },
            Event::Delete(obj) => match convert(&obj) {
                Some(v) => Update::Delete(v),
                None => continue,
            },
        };
        if tx
            .send((std::time::Instant::now(), T::wrap(input)))
            .await
            .is_err()
        {
            return resource;
        }
    }
}

// ----- the loop ------------------------------------------------------------

struct Controller {
    client: Client,
    index: PolicyIndex,
    metrics: Metrics,
    options: Options,
    recorder: Recorder,
    synced: [bool; Resource::COUNT],
    first_sync_done: bool,
    node_status: HashMap<String, NodeStatus>,
    /// The `Published` condition each NodePolicySet shows.
    published: HashMap<String, Condition>,
    /// None: no CanalNetwork `default` (nothing to summarize into).
    network: Option<NetworkView>,
    summary_written_at: Option<Instant>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
    /// Time spent applying events of the current batch.
    busy: Duration,
    /// When the oldest event of the current batch arrived from its watch.
    oldest: Option<std::time::Instant>,
    last_sizes: Option<Instant>,
    /// When the size gauges are to be published after a skipped publish.
    sizes_due: Option<Instant>,
    /// CanalNetwork ownerReference UID of every generated object the
    /// cluster holds, so a new CanalNetwork UID finds the objects to rewrite.
    owners: HashMap<(Kind, String), Option<String>>,
    /// Objects that cannot be written now.
    problems: Problems,
    /// "Waiting for the CanalNetwork" was logged.
    waiting_for_network: bool,
}

impl Controller {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<(std::time::Instant, Input)>,
    ) -> Result<(), Error> {
        loop {
            let wake = self.retry_at.into_iter().chain(self.sizes_due).min();
            let first = match wake {
                Some(at) => tokio::select! {
                    m = rx.recv() => Some(m.ok_or(Error::WatchesEnded)?),
                    _ = tokio::time::sleep_until(at) => None,
                },
                None => Some(rx.recv().await.ok_or(Error::WatchesEnded)?),
            };
            if first.is_none() {
                let now = Instant::now();
                if self.sizes_due.is_some_and(|t| t <= now) {
                    self.sizes_due = None;
                    self.publish_sizes();
                }
                if self.retry_at.is_none_or(|t| t > now) {
                    // Only the size gauges were due.
                    continue;
                }
                self.retry_at = None;
            }
            if let Some((at, input)) = first {
                self.received(at, input);
                if !self.options.batch_window.is_zero() {
                    let until = Instant::now() + self.options.batch_window;
                    while let Ok(next) = tokio::time::timeout_at(until, rx.recv()).await {
                        let (at, input) = next.ok_or(Error::WatchesEnded)?;
                        self.received(at, input);
                    }
                }
                // Idle: start now with what is queued. Whatever arrived
                // while the previous pass wrote is queued too, so a burst
                // goes into one pass.
                loop {
                    match rx.try_recv() {
                        Ok((at, input)) => self.received(at, input),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            return Err(Error::WatchesEnded);
                        }
                    }
                }
            }
            if !self
                .synced
                .iter()
                .enumerate()
                .all(|(i, s)| *s || !RESOURCES[i].needed_for_sync())
            {
                continue;
            }
            self.sync().await;
        }
    }

    /// An event that arrived from its watch at `at`.
    fn received(&mut self, at: std::time::Instant, input: Input) {
        self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
        self.handle(input);
    }

    fn handle(&mut self, input: Input) {
        let started = std::time::Instant::now();
        match input {
            Input::Namespace(u) => match u {
                Update::Apply(ns) => self.index.apply_namespace(ns),
                Update::Delete(ns) => self.index.delete_namespace(&ns.name),
                Update::Reset(all) => {
                    self.index.reset_namespaces(all);
                    self.mark_synced(Resource::Namespaces);
                }
            },
            Input::Pod(u) => match u {
                Update::Apply(p) => self.index.apply_pod(p),
                Update::Delete(p) => self.index.delete_pod(&p.namespace, &p.name),
                Update::Reset(all) => {
                    self.index.reset_pods(all);
                    self.mark_synced(Resource::Pods);
                }
            },
            Input::Node(u) => match u {
                Update::Apply(n) => self.index.apply_node(n),
                Update::Delete(n) => self.index.delete_node(&n.name),
                Update::Reset(all) => {
                    self.index.reset_nodes(all);
                    self.mark_synced(Resource::Nodes);
                }
            },
            Input::Policy(u) => match u {
                Update::Apply(p) => self.apply_policy(p),
                Update::Delete(p) => {
                    let (ns, name) = p.key();
                    self.index.delete_policy(ns, name);
                }
                Update::Reset(all) => {
                    let mut decoded = Vec::with_capacity(all.len());
                    let mut undecodable = Vec::new();
                    for p in all {
                        match p {
                            PolicyInput::Decoded(np) => decoded.push(*np),
                            other => undecodable.push(other),
                        }
                    }
                    // Undecodable ones first, so reset does not drop them.
                    self.index.reset_policies_keeping(
                        decoded,
                        undecodable
                            .iter()
                            .map(|p| {
                                let (ns, name) = p.key();
                                (ns.to_string(), name.to_string())
                            })
                            .collect(),
                    );
                    for p in undecodable {
                        self.apply_policy(p);
                    }
                    self.mark_synced(Resource::NetworkPolicies);
                }
            },
            Input::Object(kind, u) => self.observe(kind, u),
            Input::Network(u) => {
                let before = self.owner_uid().map(str::to_string);
                match u {
                    Update::Apply(n) => self.network = Some(n),
                    Update::Delete(_) => self.network = None,
                    Update::Reset(mut all) => self.network = all.pop(),
                }
                if self.owner_uid().is_some() && self.owner_uid() != before.as_deref() {
                    self.adopt_all();
                }
                // The last known range stays when the object goes (nothing
                // is written then anyway).
                if let Some(cidrs) = self.network.as_ref().and_then(|n| n.cluster_cidrs.clone()) {
                    self.index.set_cluster_cidrs(Some(cidrs));
                }
                self.mark_synced(Resource::CanalNetwork);
            }
        }
        self.busy += started.elapsed();
    }

    /// A generated object as watched.
    fn observe(&mut self, kind: Kind, u: Update<Observed>) {
        match u {
            Update::Apply(o) => {
                let fp = self.if_owned(o.owner.as_deref(), o.fingerprint);
                self.index.observe(kind, &o.name, fp);
                if kind == Kind::NodePolicySet {
                    self.node_status.insert(o.name.clone(), o.status);
                    match o.published {
                        Some(c) => self.published.insert(o.name.clone(), c),
                        None => self.published.remove(&o.name),
                    };
                }
                self.owners.insert((kind, o.name), o.owner);
            }
            Update::Delete(o) => {
                self.index.observe_deleted(kind, &o.name);
                if kind == Kind::NodePolicySet {
                    self.node_status.remove(&o.name);
                    self.published.remove(&o.name);
                }
                self.owners.remove(&(kind, o.name));
            }
            Update::Reset(all) => {
                let observed = all
                    .iter()
                    .map(|o| {
                        (
                            o.name.clone(),
                            self.if_owned(o.owner.as_deref(), o.fingerprint),
                        )
                    })
                    .collect();
                self.index.reset_observed(kind, observed);
                self.owners.retain(|(k, _), _| *k != kind);
                if kind == Kind::NodePolicySet {
                    self.node_status = all.iter().map(|o| (o.name.clone(), o.status)).collect();
                    self.published = all
                        .iter()
                        .filter_map(|o| o.published.clone().map(|c| (o.name.clone(), c)))
                        .collect();
                }
                for o in all {
                    self.owners.insert((kind, o.name), o.owner);
                }
                self.mark_synced(match kind {
                    Kind::NodePolicySet => Resource::NodePolicySets,
                    Kind::PolicyGroup => Resource::PolicyGroups,
                    Kind::PeerSet => Resource::PeerSets,
                });
            }
        }
    }

    /// The UID of the CanalNetwork that owns every generated object.
    fn owner_uid(&self) -> Option<&str> {
        self.network.as_ref().and_then(|n| n.uid.as_deref())
    }

    /// What the index should believe an observed object holds: its
    /// fingerprint when its owner is the current CanalNetwork (or that is
    /// not known yet), else unknown content, so it is rewritten.
    fn if_owned(&self, owner: Option<&str>, fp: Option<Fingerprint>) -> Option<Fingerprint> {
        match self.owner_uid() {
            Some(uid) if owner != Some(uid) => None,
            _ => fp,
        }
    }

    /// A (new) CanalNetwork UID: objects owned by anything else are rewritten.
    fn adopt_all(&mut self) {
        let uid = self.owner_uid().map(str::to_string);
        let stale: Vec<(Kind, String)> = self
            .owners
            .iter()
            .filter(|(_, o)| **o != uid)
            .map(|(k, _)| k.clone())
            .collect();
        if !stale.is_empty() {
            info!(
                objects = stale.len(),
                "taking over objects not owned by CanalNetwork {}",
                canal_crds::DEFAULT_NETWORK_NAME
            );
        }
        for (kind, name) in stale {
            self.index.observe(kind, &name, None);
        }
    }

    fn apply_policy(&mut self, p: PolicyInput) {
        match p {
            PolicyInput::Decoded(np) => self.index.apply_policy(&np),
            PolicyInput::Undecodable {
                namespace,
                name,
                uid,
                error,
            } => self.index.apply_invalid_policy(
                &namespace,
                &name,
                uid,
                format!(
                    "the object does not decode as a networking.k8s.io/v1 NetworkPolicy: {error}"
                ),
            ),
        }
    }

    fn mark_synced(&mut self, r: Resource) {
        if let Some(i) = RESOURCES.iter().position(|x| *x == r) {
            self.synced[i] = true;
        }
    }

    /// Flushes the index and writes everything that changed.
    async fn sync(&mut self) {
        // Generated objects are owned by the CanalNetwork: without it there
        // is nothing to own them (and, after `helm uninstall`, nothing to
        // recreate while the garbage collector removes them).
        if self.owner_uid().is_none() {
            if !self.waiting_for_network {
                info!(
                    "waiting for CanalNetwork {} (it owns every object the policy controller writes)",
                    canal_crds::DEFAULT_NETWORK_NAME
                );
                self.waiting_for_network = true;
            }
            return;
        }
        self.waiting_for_network = false;
        let started = std::time::Instant::now();
        let oldest = self.oldest.take();
        // The oldest event's wait for this pass, less the time spent
        // applying events to the index (that counts as compile).
        let queued = oldest.map(|o| {
            started
                .saturating_duration_since(o)
                .saturating_sub(self.busy)
        });
        let changes = {
            let _span = tracing::debug_span!("compile").entered();
            self.index.flush()
        };
        let compile = self.busy + started.elapsed();
        self.busy = Duration::ZERO;
        self.metrics.compile_seconds.observe(compile.as_secs_f64());
        if !self.first_sync_done {
            self.first_sync_done = true;
            let s = self.index.stats();
            info!(
                pods = s.pods,
                namespaces = s.namespaces,
                policies = s.policies,
                nodes = s.nodes,
                peer_sets = s.peer_sets,
                node_policy_sets_to_write = changes.node_policy_sets.len(),
                policy_groups_to_write = changes.policy_groups.len(),
                peer_sets_to_write = changes.peer_sets.len(),
                "policy index synced"
            );
        }
        self.publish_sizes();
        if changes.writes() > 0 {
            let stage = |s: &str| self.metrics.stage_seconds.with_label_values(&[s]);
            if let Some(q) = queued {
                stage("queue").observe(q.as_secs_f64());
            }
            stage("compile").observe(compile.as_secs_f64());
            let t = std::time::Instant::now();
            let ok = self
                .write(&changes)
                .instrument(tracing::debug_span!(
                    "write",
                    peer_sets = changes.peer_sets.len(),
                    policy_groups = changes.policy_groups.len(),
                    node_policy_sets = changes.node_policy_sets.len()
                ))
                .await;
            self.metrics.sync_seconds.observe(t.elapsed().as_secs_f64());
            if let Some(o) = oldest {
                self.metrics
                    .publish_seconds
                    .observe(o.elapsed().as_secs_f64());
            }
            debug!(
                peer_sets = changes.peer_sets.len(),
                policy_groups = changes.policy_groups.len(),
                node_policy_sets = changes.node_policy_sets.len(),
                ms = t.elapsed().as_millis() as u64,
                "policy objects written"
            );
            if ok {
                self.retry_delay = Duration::ZERO;
            } else {
                self.schedule_retry();
            }
        }
        let t = std::time::Instant::now();
        let wrote = changes.writes() > 0;
        async {
            for report in changes.reports {
                self.publish_event(report).await;
            }
            for report in changes.pod_reports {
                self.publish_pod_event(report).await;
            }
            let unpublished = self.publish_conditions().await;
            self.write_summary(&unpublished).await;
        }
        .instrument(tracing::debug_span!("status"))
        .await;
        if wrote {
            self.metrics
                .stage_seconds
                .with_label_values(&["status"])
                .observe(t.elapsed().as_secs_f64());
        }
        self.metrics.syncs.inc();
    }

    /// Publishes the index sizes at most once a second (counting them walks
    /// every node and policy, too much for every single event); a skipped
    /// publish is made up for when the second is over, so the gauges never
    /// stay behind an event.
    fn publish_sizes(&mut self) {
        let next = self.last_sizes.map(|t| t + SIZES_INTERVAL);
        match next {
            Some(at) if at > Instant::now() => {
                self.sizes_due.get_or_insert(at);
            }
            _ => {
                self.metrics.set_sizes(self.index.stats());
                self.last_sizes = Some(Instant::now());
                self.sizes_due = None;
            }
        }
    }

    fn schedule_retry(&mut self) {
        self.retry_delay = if self.retry_delay.is_zero() {
            self.options.retry_backoff
        } else {
            (self.retry_delay * 2).min(Duration::from_secs(30))
        };
        let at = Instant::now() + self.retry_delay;
        self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
    }
}

/// Whether a condition as stored says the same as a desired one.
fn same_condition(stored: Option<&Condition>, desired: &ConditionView) -> bool {
    stored.is_some_and(|c| {
        (c.status == "True") == desired.status
            && c.reason == desired.reason
            && c.message == desired.message
    })
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::index::RenderedNodePolicySet;
    use crate::policy::objects::{encode, object_metadata, owner_reference};
    use canal_crds::{MANAGED_BY_LABEL, NodeEndpoint, NodePolicySetObjectSpec};
    use kube::ResourceExt;

    #[test]
    fn encoded_objects_read_back_as_what_was_written() {
        let spec = NodePolicySetObjectSpec {
            endpoints: vec![NodeEndpoint {
                namespace: "x".into(),
                pod: "a".into(),
                interface: "cali0123456789a".into(),
                ips: vec!["10.0.0.1".into()],
                ..NodeEndpoint::default()
            }],
            ..NodePolicySetObjectSpec::default()
        };
        let r = RenderedNodePolicySet {
            spec,
            fingerprint: 42,
        };
        let out = encode(
            "NodePolicySet",
            object_metadata("n1", None, &owner_reference("u1")),
            &r.spec,
            r.fingerprint,
            canal_crds::MAX_OBJECT_BYTES,
        )
        .unwrap();
        let obj: NodePolicySet = serde_json::from_str(out.body.get()).unwrap();
        assert_eq!(obj.name_any(), "n1");
        assert_eq!(obj.labels()[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(obj.owner_references()[0].uid, "u1");
        assert_eq!(obj.owner_references()[0].kind, "CanalNetwork");
        assert_eq!(canal_network_owner(&obj.metadata).as_deref(), Some("u1"));
        let seen = Observed::node_policy_set(&DeserializeGuard(Ok(obj.clone())));
        assert_eq!(
            seen.fingerprint,
            Some(42),
            "a watch reads back the fingerprint"
        );
        let mut edited = obj;
        edited.spec.endpoints.clear();
        let seen = Observed::node_policy_set(&DeserializeGuard(Ok(edited)));
        assert_eq!(seen.fingerprint, None, "an edited spec is unknown content");
    }

    #[test]
    fn event_notes_are_cut_at_a_character_boundary() {
        let long = "é".repeat(800);
        let cut = truncate(&long, 1000);
        assert!(cut.len() <= 1003 && cut.ends_with("..."));
        assert_eq!(truncate("short", 1000), "short");
    }
}
