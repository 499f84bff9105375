//! The agent's two watches: Nodes (into the pure node index, plus this
//! node's own `CanalNetworkProgrammed` condition) and the CanalNetwork
//! `default`. Each wakes the sync loop when something it uses changed.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use canal_crds::CanalNetwork;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::Notify;

use super::{NetworkState, Shared, effective_config, lock};
use crate::metrics::Metrics;
use crate::nodes::{self, NodeFacts};

/// Feeds Node watch events into the index and wakes the sync loop when
/// something the overlay uses changed.
pub(super) async fn watch_nodes(
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
        let own = |node: &Node| {
            (node.metadata.name.as_deref() == Some(local.as_str()))
                .then(|| nodes::programmed_condition(node))
        };
        let mut own_condition = None;
        let step = match event {
            Event::Apply(node) => {
                own_condition = own(&node);
                Step::Apply(NodeFacts::from_node(&node))
            }
            Event::Delete(node) => Step::Delete(node.metadata.name.unwrap_or_default()),
            Event::Init => Step::Init,
            Event::InitApply(node) => {
                own_condition = own(&node);
                Step::InitApply(NodeFacts::from_node(&node))
            }
            Event::InitDone => Step::InitDone,
        };
        let mut shared = lock(&shared);
        if let Some(condition) = own_condition {
            // Only compared with what the agent wants to report; a change
            // of it alone needs no sync.
            shared.own_condition = condition;
        }
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
pub(super) async fn watch_network(
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
