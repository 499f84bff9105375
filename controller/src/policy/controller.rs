//! The policy controller's I/O shell: watches NetworkPolicies, Pods,
//! Namespaces, Nodes, NodePolicySets, PeerSets and the CanalNetwork,
//! feeds the pure [`PolicyIndex`], and writes what changed.
//!
//! One task owns the index. Watch tasks convert each object to the small
//! input the index needs (dropping the object at once) and send it over a
//! channel. The owner applies everything that arrived within a short batch
//! window (bursts coalesce), flushes, and writes: PeerSets first, then
//! NodePolicySets, then deletions of NodePolicySets, then of PeerSets, so an
//! agent never sees a reference to a set that does not exist yet. Objects
//! are rendered one at a time as the writes go out. Nothing is written
//! until every watch has listed once, so a restart never publishes a
//! NodePolicySet built from half the policies.
//!
//! Every NodePolicySet and PeerSet is owned by the CanalNetwork `default`
//! (an ownerReference), so deleting it (`helm uninstall`) lets Kubernetes
//! garbage-collect every generated object, PeerSets included, which no Node
//! could own. Nothing is written while that CanalNetwork does not exist, and
//! an object whose owner is not the current CanalNetwork (written by an older
//! release, or for a CanalNetwork since re-created) is rewritten. A Node's
//! NodePolicySet is deleted by the controller when the Node goes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use canal_crds::{CanalNetwork, MANAGED_BY_LABEL, NodePolicySet, PeerSet};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, ObjectReference, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use prometheus::Registry;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::fingerprint::{self, Fingerprint};
use super::index::{
    Change, PodIpReport, PolicyIndex, PolicyReport, RenderedNodePolicySet, RenderedPeerSet,
};
use super::input::{NamespaceInfo, NodeInfo, PodInfo};
use super::metrics::Metrics;
use super::summary::{self, NodeStatus, PolicySummary};

/// Minimum time between two publishes of the index size gauges.
const SIZES_INTERVAL: Duration = Duration::from_secs(1);

/// Field manager of everything the policy controller writes.
pub const FIELD_MANAGER: &str = "canal-controller-policy";

/// Value of the managed-by label on NodePolicySets and PeerSets.
pub const MANAGED_BY: &str = "canal-controller";

/// Tuning of the controller loop.
#[derive(Clone, Debug)]
pub struct Options {
    /// After the first event of a burst, how long to keep collecting events
    /// before compiling (bursts coalesce into one flush).
    pub batch_window: Duration,
    /// API requests in flight at once while writing a batch.
    pub write_concurrency: usize,
    /// First retry delay after a failed write (doubles up to 30 s).
    pub retry_backoff: Duration,
    /// Minimum time between two writes of the CanalNetwork summary.
    pub summary_interval: Duration,
    /// Objects larger than this (serialized) are reported (a warning and
    /// `canal_policy_errors_total{category="object_too_large"}`) before the
    /// write is tried; etcd refuses requests over 1.5 MiB by default.
    pub warn_object_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch_window: Duration::from_millis(10),
            write_concurrency: 8,
            retry_backoff: Duration::from_millis(500),
            summary_interval: Duration::from_millis(500),
            warn_object_bytes: 1_572_864,
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
    let (tx, rx) = mpsc::channel::<Input>(1024);
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
        |g: &DeserializeGuard<NodePolicySet>| Some(ObservedNps::from_guard(g)),
    );
    watches.spawn(
        Resource::PeerSets,
        all(),
        |g: &DeserializeGuard<PeerSet>| Some(ObservedPs::from_guard(g)),
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
        index: PolicyIndex::new(),
        metrics,
        options,
        recorder,
        synced: [false; Resource::COUNT],
        first_sync_done: false,
        node_status: HashMap::new(),
        network: None,
        summary_written_at: None,
        retry_at: None,
        retry_delay: Duration::ZERO,
        busy: Duration::ZERO,
        last_sizes: None,
        sizes_due: None,
        nps_owners: HashMap::new(),
        ps_owners: HashMap::new(),
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
    PeerSets,
    CanalNetwork,
}

impl Resource {
    const COUNT: usize = 7;

    fn label(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods",
            Resource::Nodes => "nodes",
            Resource::NetworkPolicies => "networkpolicies",
            Resource::NodePolicySets => "nodepolicysets",
            Resource::PeerSets => "peersets",
            Resource::CanalNetwork => "canalnetwork",
        }
    }

    /// The index may be flushed only when these have listed once.
    fn needed_for_sync(self) -> bool {
        self != Resource::CanalNetwork
    }
}

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

/// A NodePolicySet as the cluster holds it.
struct ObservedNps {
    name: String,
    fingerprint: Option<Fingerprint>,
    status: NodeStatus,
    /// UID of its CanalNetwork ownerReference.
    owner: Option<String>,
}

/// The UID the object's CanalNetwork ownerReference names, if any.
fn canal_network_owner(meta: &ObjectMeta) -> Option<String> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "CanalNetwork" && o.name == canal_crds::DEFAULT_NETWORK_NAME)
        .map(|o| o.uid.clone())
}

impl ObservedNps {
    fn from_guard(g: &DeserializeGuard<NodePolicySet>) -> ObservedNps {
        match &g.0 {
            Ok(nps) => ObservedNps {
                name: nps.name_any(),
                fingerprint: fingerprint::observed(
                    nps.annotations()
                        .get(fingerprint::ANNOTATION)
                        .map(String::as_str),
                    fingerprint::content(&nps.spec),
                ),
                status: NodeStatus::from_object(nps),
                owner: canal_network_owner(&nps.metadata),
            },
            Err(bad) => ObservedNps {
                name: bad.metadata.name.clone().unwrap_or_default(),
                fingerprint: None,
                status: NodeStatus::default(),
                owner: None,
            },
        }
    }
}

/// A PeerSet as the cluster holds it.
struct ObservedPs {
    name: String,
    fingerprint: Option<Fingerprint>,
    /// UID of its CanalNetwork ownerReference.
    owner: Option<String>,
}

impl ObservedPs {
    fn from_guard(g: &DeserializeGuard<PeerSet>) -> ObservedPs {
        match &g.0 {
            Ok(ps) => ObservedPs {
                name: ps.name_any(),
                fingerprint: fingerprint::observed(
                    ps.annotations()
                        .get(fingerprint::ANNOTATION)
                        .map(String::as_str),
                    fingerprint::content(&ps.spec),
                ),
                owner: canal_network_owner(&ps.metadata),
            },
            Err(bad) => ObservedPs {
                name: bad.metadata.name.clone().unwrap_or_default(),
                fingerprint: None,
                owner: None,
            },
        }
    }
}

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
}

impl NetworkView {
    fn from_guard(g: &DeserializeGuard<CanalNetwork>) -> NetworkView {
        match &g.0 {
            Ok(cn) => NetworkView {
                uid: cn.metadata.uid.clone(),
                policy_enabled: cn.spec.policy.enabled,
                summary: cn.status.as_ref().and_then(PolicySummary::from_status),
                cluster_cidrs: Some(cn.pod_ranges()).filter(|r| !r.is_empty()),
            },
            // Unreadable spec: keep summarizing (as if enabled).
            Err(bad) => NetworkView {
                uid: bad.metadata.uid.clone(),
                policy_enabled: true,
                summary: None,
                cluster_cidrs: None,
            },
        }
    }
}

enum Update<T> {
    Apply(T),
    Delete(T),
    Reset(Vec<T>),
}

enum Input {
    Namespace(Update<NamespaceInfo>),
    Pod(Update<PodInfo>),
    Node(Update<NodeInfo>),
    Policy(Update<PolicyInput>),
    NodePolicySet(Update<ObservedNps>),
    PeerSet(Update<ObservedPs>),
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
into_input!(ObservedNps, NodePolicySet);
into_input!(ObservedPs, PeerSet);
into_input!(NetworkView, Network);

/// Watches one resource, converting objects as they arrive. Initial lists
/// are buffered and sent as one `Reset`.
/// Spawns the watch tasks, each feeding the controller's channel.
struct Watches<'a> {
    client: &'a Client,
    tx: &'a mpsc::Sender<Input>,
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

async fn watch<K, T>(
    api: Api<K>,
    config: watcher::Config,
    tx: mpsc::Sender<Input>,
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
        if tx.send(T::wrap(input)).await.is_err() {
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
    /// None: no CanalNetwork `default` (nothing to summarize into).
    network: Option<NetworkView>,
    summary_written_at: Option<Instant>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
    /// Time spent applying events of the current batch.
    busy: Duration,
    last_sizes: Option<Instant>,
    /// When the size gauges are to be published after a skipped publish.
    sizes_due: Option<Instant>,
    /// CanalNetwork ownerReference UID of every NodePolicySet / PeerSet
    /// the cluster holds, so a new CanalNetwork UID finds the objects to rewrite.
    nps_owners: HashMap<String, Option<String>>,
    ps_owners: HashMap<String, Option<String>>,
    /// "Waiting for the CanalNetwork" was logged.
    waiting_for_network: bool,
}

impl Controller {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>) -> Result<(), Error> {
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
            if let Some(input) = first {
                self.handle(input);
                let until = Instant::now() + self.options.batch_window;
                while let Ok(next) = tokio::time::timeout_at(until, rx.recv()).await {
                    self.handle(next.ok_or(Error::WatchesEnded)?);
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
            Input::NodePolicySet(u) => match u {
                Update::Apply(o) => {
                    let fp = self.if_owned(o.owner.as_deref(), o.fingerprint);
                    self.index.observe_node_policy_set(&o.name, fp);
                    self.node_status.insert(o.name.clone(), o.status);
                    self.nps_owners.insert(o.name, o.owner);
                }
                Update::Delete(o) => {
                    self.index.observe_node_policy_set_deleted(&o.name);
                    self.node_status.remove(&o.name);
                    self.nps_owners.remove(&o.name);
                }
                Update::Reset(all) => {
                    self.node_status = all.iter().map(|o| (o.name.clone(), o.status)).collect();
                    let observed = all
                        .iter()
                        .map(|o| {
                            let fp = self.if_owned(o.owner.as_deref(), o.fingerprint);
                            (o.name.clone(), fp)
                        })
                        .collect();
                    self.index.reset_observed_node_policy_sets(observed);
                    self.nps_owners = all.into_iter().map(|o| (o.name, o.owner)).collect();
                    self.mark_synced(Resource::NodePolicySets);
                }
            },
            Input::PeerSet(u) => match u {
                Update::Apply(o) => {
                    let fp = self.if_owned(o.owner.as_deref(), o.fingerprint);
                    self.index.observe_peer_set(&o.name, fp);
                    self.ps_owners.insert(o.name, o.owner);
                }
                Update::Delete(o) => {
                    self.index.observe_peer_set_deleted(&o.name);
                    self.ps_owners.remove(&o.name);
                }
                Update::Reset(all) => {
                    let observed = all
                        .iter()
                        .map(|o| {
                            let fp = self.if_owned(o.owner.as_deref(), o.fingerprint);
                            (o.name.clone(), fp)
                        })
                        .collect();
                    self.index.reset_observed_peer_sets(observed);
                    self.ps_owners = all.into_iter().map(|o| (o.name, o.owner)).collect();
                    self.mark_synced(Resource::PeerSets);
                }
            },
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
        let stale = |owners: &HashMap<String, Option<String>>| -> Vec<String> {
            owners
                .iter()
                .filter(|(_, o)| **o != uid)
                .map(|(n, _)| n.clone())
                .collect()
        };
        let (nps, ps) = (stale(&self.nps_owners), stale(&self.ps_owners));
        if !nps.is_empty() || !ps.is_empty() {
            info!(
                node_policy_sets = nps.len(),
                peer_sets = ps.len(),
                "taking over objects not owned by CanalNetwork {}",
                canal_crds::DEFAULT_NETWORK_NAME
            );
        }
        for name in nps {
            self.index.observe_node_policy_set(&name, None);
        }
        for name in ps {
            self.index.observe_peer_set(&name, None);
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
                    "waiting for CanalNetwork {} (it owns every NodePolicySet and PeerSet)",
                    canal_crds::DEFAULT_NETWORK_NAME
                );
                self.waiting_for_network = true;
            }
            return;
        }
        self.waiting_for_network = false;
        let started = std::time::Instant::now();
        let changes = self.index.flush();
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
                peer_sets_to_write = changes.peer_sets.len(),
                "policy index synced"
            );
        }
        self.publish_sizes();
        if !changes.peer_sets.is_empty() || !changes.node_policy_sets.is_empty() {
            let t = std::time::Instant::now();
            let ok = self
                .write(&changes.peer_sets, &changes.node_policy_sets)
                .await;
            self.metrics.sync_seconds.observe(t.elapsed().as_secs_f64());
            debug!(
                peer_sets = changes.peer_sets.len(),
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
        for report in changes.reports {
            self.publish_event(report).await;
        }
        for report in changes.pod_reports {
            self.publish_pod_event(report).await;
        }
        self.write_summary().await;
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

    /// Writes in the order that never leaves a dangling reference. Returns
    /// false when some write failed (it will be retried).
    async fn write(&mut self, peer_sets: &[Change], node_policy_sets: &[Change]) -> bool {
        let applies = |c: &[Change]| -> Vec<Arc<str>> {
            c.iter()
                .filter_map(|c| match c {
                    Change::Apply(n) => Some(n.clone()),
                    Change::Delete(_) => None,
                })
                .collect()
        };
        let deletes = |c: &[Change]| -> Vec<Arc<str>> {
            c.iter()
                .filter_map(|c| match c {
                    Change::Delete(n) => Some(n.clone()),
                    Change::Apply(_) => None,
                })
                .collect()
        };
        let mut ok = true;
        ok &= self.apply_peer_sets(applies(peer_sets)).await;
        ok &= self.apply_node_policy_sets(applies(node_policy_sets)).await;
        ok &= self
            .delete::<NodePolicySet>(deletes(node_policy_sets))
            .await;
        ok &= self.delete::<PeerSet>(deletes(peer_sets)).await;
        ok
    }

    async fn apply_peer_sets(&mut self, names: Vec<Arc<str>>) -> bool {
        self.apply_objects::<PeerSet>(
            names,
            |index, name, owner| {
                index
                    .render_peer_set(name)
                    .map(|r| encode_peer_set(name, r, owner))
            },
            PolicyIndex::mark_peer_set_written,
            PolicyIndex::retry_peer_set,
        )
        .await
    }

    async fn apply_node_policy_sets(&mut self, names: Vec<Arc<str>>) -> bool {
        self.apply_objects::<NodePolicySet>(
            names,
            |index, name, owner| {
                index
                    .render_node_policy_set(name)
                    .map(|r| encode_node_policy_set(name, r, owner))
            },
            PolicyIndex::mark_node_policy_set_written,
            PolicyIndex::retry_node_policy_set,
        )
        .await
    }

    /// Server-side applies the named objects, `write_concurrency` at a time.
    /// Each is rendered and encoded just before its request, so at most that
    /// many exist at once however large the batch.
    async fn apply_objects<K>(
        &mut self,
        names: Vec<Arc<str>>,
        render: fn(
            &PolicyIndex,
            &str,
            &OwnerReference,
        ) -> Option<Result<Outgoing, serde_json::Error>>,
        mark_written: fn(&mut PolicyIndex, &str, Option<Fingerprint>),
        retry: fn(&mut PolicyIndex, &str),
    ) -> bool
    where
        K: kube::Resource<Scope = kube::core::ClusterResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let kind = K::kind(&K::DynamicType::default()).to_string();
        let Some(uid) = self.owner_uid().map(str::to_string) else {
            // `sync` checked; a batch without an owner waits for the next.
            for name in &names {
                retry(&mut self.index, name);
            }
            return false;
        };
        let owner = owner_reference(&uid);
        let api: Api<K> = Api::all(self.client.clone());
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let index = &self.index;
        let (metrics, limit) = (&self.metrics, self.options.warn_object_bytes);
        let results: Vec<WriteResult> = futures::stream::iter(names)
            .map(|name| {
                let outgoing = render(index, &name, &owner);
                if let Some(Ok(o)) = &outgoing
                    && o.body.get().len() > limit
                {
                    warn!(
                        kind = %kind,
                        name = %name,
                        bytes = o.body.get().len(),
                        limit,
                        "object is larger than etcd accepts by default (1.5 MiB); the write will likely fail"
                    );
                    metrics.errors.with_label_values(&["object_too_large"]).inc();
                }
                let (api, pp) = (api.clone(), pp.clone());
                async move {
                    let result = match outgoing {
                        None => Ok(None),
                        Some(Err(e)) => Err(WriteError::Encode(e)),
                        Some(Ok(o)) => api
                            .patch(&name, &pp, &Patch::Apply(&*o.body))
                            .await
                            .map(|_| Some(o.fingerprint))
                            .map_err(WriteError::Api),
                    };
                    (name, result)
                }
            })
            .buffer_unordered(self.options.write_concurrency.max(1))
            .collect()
            .await;
        let mut ok = true;
        for (name, result) in results {
            match result {
                Ok(Some(fp)) => {
                    mark_written(&mut self.index, &name, Some(fp));
                    let owners = if kind == "NodePolicySet" {
                        &mut self.nps_owners
                    } else {
                        &mut self.ps_owners
                    };
                    owners.insert(name.to_string(), Some(uid.clone()));
                    self.metrics
                        .objects_written
                        .with_label_values(&[kind.as_str(), "apply"])
                        .inc();
                }
                Ok(None) => {}
                Err(e) => {
                    ok = false;
                    warn!(kind = %kind, name = %name, error = %e, "applying failed; will retry");
                    self.metrics.errors.with_label_values(&["apply"]).inc();
                    retry(&mut self.index, &name);
                }
            }
        }
        ok
    }

    async fn delete<K>(&mut self, names: Vec<Arc<str>>) -> bool
    where
        K: kube::Resource<Scope = kube::core::ClusterResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let kind = K::kind(&K::DynamicType::default()).to_string();
        let api: Api<K> = Api::all(self.client.clone());
        let results: Vec<(Arc<str>, Result<(), kube::Error>)> = futures::stream::iter(names)
            .map(|name| {
                let api = api.clone();
                async move {
                    let r = match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => Ok(()),
                        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                        Err(e) => Err(e),
                    };
                    (name, r)
                }
            })
            .buffer_unordered(self.options.write_concurrency.max(1))
            .collect()
            .await;
        let mut ok = true;
        for (name, result) in results {
            let is_nps = kind == "NodePolicySet";
            match result {
                Ok(()) => {
                    if is_nps {
                        self.index.mark_node_policy_set_written(&name, None);
                    } else {
                        self.index.mark_peer_set_written(&name, None);
                    }
                    self.metrics
                        .objects_written
                        .with_label_values(&[kind.as_str(), "delete"])
                        .inc();
                }
                Err(e) => {
                    ok = false;
                    warn!(kind = %kind, name = %name, error = %e, "deleting failed; will retry");
                    self.metrics.errors.with_label_values(&["delete"]).inc();
                    if is_nps {
                        self.index.retry_node_policy_set(&name);
                    } else {
                        self.index.retry_peer_set(&name);
                    }
                }
            }
        }
        ok
    }

    async fn publish_event(&mut self, report: PolicyReport) {
        let reference = ObjectReference {
            api_version: Some("networking.k8s.io/v1".into()),
            kind: Some("NetworkPolicy".into()),
            namespace: Some(report.namespace.clone()),
            name: Some(report.name.clone()),
            uid: report.uid.clone(),
            ..Default::default()
        };
        let event = match &report.problem {
            Some(problem) => {
                warn!(
                    namespace = %report.namespace,
                    name = %report.name,
                    kept_previous = report.kept_previous,
                    problem = %problem,
                    "invalid NetworkPolicy skipped"
                );
                self.metrics
                    .errors
                    .with_label_values(&["invalid_policy"])
                    .inc();
                let outcome = if report.kept_previous {
                    "the previous valid version stays in force"
                } else {
                    "it is not enforced"
                };
                KubeEvent {
                    type_: EventType::Warning,
                    reason: "InvalidNetworkPolicy".into(),
                    note: Some(truncate(
                        &format!(
                            "canal cannot compile this NetworkPolicy, so {outcome}: {problem}"
                        ),
                        1000,
                    )),
                    action: "Compile".into(),
                    secondary: None,
                }
            }
            None => KubeEvent {
                type_: EventType::Normal,
                reason: "NetworkPolicyCompiled".into(),
                note: Some("the NetworkPolicy is valid again and enforced".into()),
                action: "Compile".into(),
                secondary: None,
            },
        };
        match self.recorder.publish(&event, &reference).await {
            Ok(()) => self
                .metrics
                .objects_written
                .with_label_values(&["Event", "create"])
                .inc(),
            Err(e) => {
                warn!(namespace = %report.namespace, name = %report.name, error = %e, "publishing Event failed");
                self.metrics.errors.with_label_values(&["event"]).inc();
            }
        }
    }

    /// A pod some of whose IPs NetworkPolicy does not use (or uses again).
    async fn publish_pod_event(&mut self, report: PodIpReport) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(report.namespace.clone()),
            name: Some(report.name.clone()),
            uid: report.uid.clone(),
            ..Default::default()
        };
        let event = match &report.problem {
            Some(problem) => {
                warn!(namespace = %report.namespace, name = %report.name, problem = %problem, "pod IPs not used for NetworkPolicy");
                KubeEvent {
                    type_: EventType::Warning,
                    reason: "PodIPRefused".into(),
                    note: Some(truncate(problem, 1000)),
                    action: "Compile".into(),
                    secondary: None,
                }
            }
            None => KubeEvent {
                type_: EventType::Normal,
                reason: "PodIPAccepted".into(),
                note: Some(
                    "every IP of this pod is its own again and used for NetworkPolicy".into(),
                ),
                action: "Compile".into(),
                secondary: None,
            },
        };
        match self.recorder.publish(&event, &reference).await {
            Ok(()) => self
                .metrics
                .objects_written
                .with_label_values(&["Event", "create"])
                .inc(),
            Err(e) => {
                warn!(namespace = %report.namespace, name = %report.name, error = %e, "publishing Event failed");
                self.metrics.errors.with_label_values(&["event"]).inc();
            }
        }
    }

    /// Patches the CanalNetwork summary when it differs from what it shows.
    async fn write_summary(&mut self) {
        let Some(network) = &self.network else {
            return;
        };
        let desired = summary::summarize(
            self.index.node_names(),
            &self.node_status,
            network.policy_enabled,
        );
        if network.summary.as_ref() == Some(&desired) {
            return;
        }
        if let Some(at) = self.summary_written_at {
            let next = at + self.options.summary_interval;
            if Instant::now() < next {
                self.retry_at = Some(self.retry_at.map_or(next, |r| r.min(next)));
                return;
            }
        }
        let api: Api<CanalNetwork> = Api::all(self.client.clone());
        let body = desired.apply_body(canal_crds::DEFAULT_NETWORK_NAME);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.summary_written_at = Some(Instant::now());
        match api
            .patch_status(canal_crds::DEFAULT_NETWORK_NAME, &pp, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                self.metrics
                    .objects_written
                    .with_label_values(&["CanalNetworkStatus", "apply"])
                    .inc();
                if let Some(n) = &mut self.network {
                    n.summary = Some(desired);
                }
            }
            Err(e) => {
                warn!(error = %e, "writing the CanalNetwork policy summary failed; will retry");
                self.metrics.errors.with_label_values(&["status"]).inc();
                self.schedule_retry();
            }
        }
    }
}

const RESOURCES: [Resource; Resource::COUNT] = [
    Resource::Namespaces,
    Resource::Pods,
    Resource::Nodes,
    Resource::NetworkPolicies,
    Resource::NodePolicySets,
    Resource::PeerSets,
    Resource::CanalNetwork,
];

/// An object name and the outcome of applying it (the fingerprint written,
/// or None when there was nothing left to write).
type WriteResult = (Arc<str>, Result<Option<Fingerprint>, WriteError>);

/// Why one object could not be written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    /// Building the request body failed.
    #[error("encoding the object: {0}")]
    Encode(#[source] serde_json::Error),
    /// The API server refused or could not be reached.
    #[error(transparent)]
    Api(kube::Error),
}

/// A server-side apply body, serialized once, and the desired-state
/// fingerprint it carries.
struct Outgoing {
    body: Box<RawValue>,
    fingerprint: Fingerprint,
}

/// Serializes the spec once: its hash (for the annotation) and the request
/// body come from the same bytes.
fn encode<S: serde::Serialize>(
    kind: &str,
    mut metadata: ObjectMeta,
    spec: &S,
    fingerprint: Fingerprint,
) -> Result<Outgoing, serde_json::Error> {
    let spec_json = serde_json::to_string(spec)?;
    let content = fingerprint::of_bytes(spec_json.as_bytes());
    metadata.annotations = Some(BTreeMap::from([(
        fingerprint::ANNOTATION.to_string(),
        fingerprint::annotation_value(fingerprint, content),
    )]));
    let metadata = serde_json::to_string(&metadata)?;
    let body = format!(
        r#"{{"apiVersion":"{}/{}","kind":"{kind}","metadata":{metadata},"spec":{spec_json}}}"#,
        canal_crds::GROUP,
        canal_crds::VERSION,
    );
    Ok(Outgoing {
        body: RawValue::from_string(body)?,
        fingerprint,
    })
}

fn managed_metadata(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(BTreeMap::from([(
            MANAGED_BY_LABEL.to_string(),
            MANAGED_BY.to_string(),
        )])),
        ..ObjectMeta::default()
    }
}

/// The ownerReference every generated object carries: the CanalNetwork
/// `default` (no blockOwnerDeletion, which would need update rights on it).
fn owner_reference(uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: format!("{}/{}", canal_crds::GROUP, canal_crds::VERSION),
        kind: "CanalNetwork".into(),
        name: canal_crds::DEFAULT_NETWORK_NAME.into(),
        uid: uid.to_string(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

fn owned_metadata(name: &str, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        owner_references: Some(vec![owner.clone()]),
        ..managed_metadata(name)
    }
}

/// The PeerSet to apply.
fn encode_peer_set(
    name: &str,
    r: RenderedPeerSet,
    owner: &OwnerReference,
) -> Result<Outgoing, serde_json::Error> {
    encode(
        "PeerSet",
        owned_metadata(name, owner),
        &r.spec,
        r.fingerprint,
    )
}

/// The NodePolicySet to apply.
fn encode_node_policy_set(
    name: &str,
    r: RenderedNodePolicySet,
    owner: &OwnerReference,
) -> Result<Outgoing, serde_json::Error> {
    encode(
        "NodePolicySet",
        owned_metadata(name, owner),
        &r.spec,
        r.fingerprint,
    )
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
    use canal_crds::{Endpoint, NodePolicySetSpec};

    #[test]
    fn encoded_objects_read_back_as_what_was_written() {
        let spec = NodePolicySetSpec {
            endpoints: vec![Endpoint {
                namespace: "x".into(),
                pod: "a".into(),
                interface: "cali0123456789a".into(),
                ips: vec!["10.0.0.1".into()],
                ..Endpoint::default()
            }],
            policies: vec![],
        };
        let out = encode_node_policy_set(
            "n1",
            RenderedNodePolicySet {
                spec,
                fingerprint: 42,
            },
            &owner_reference("u1"),
        )
        .unwrap();
        let obj: NodePolicySet = serde_json::from_str(out.body.get()).unwrap();
        assert_eq!(obj.name_any(), "n1");
        assert_eq!(obj.labels()[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(obj.owner_references()[0].uid, "u1");
        assert_eq!(obj.owner_references()[0].kind, "CanalNetwork");
        assert_eq!(canal_network_owner(&obj.metadata).as_deref(), Some("u1"));
        let seen = ObservedNps::from_guard(&DeserializeGuard(Ok(obj.clone())));
        assert_eq!(
            seen.fingerprint,
            Some(42),
            "a watch reads back the fingerprint"
        );
        let mut edited = obj;
        edited.spec.endpoints.clear();
        let seen = ObservedNps::from_guard(&DeserializeGuard(Ok(edited)));
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
