//! Consistency of sharded objects end to end: a real kube-apiserver, the
//! real policy controller (with tiny slice budgets, so a set of a dozen
//! pods is a head and several slices), and the agent's real watch pipeline
//! feeding its store, while pods churn as fast as the API takes them.
//!
//! Every version of the PeerSet the store programs must be a membership the
//! cluster actually had (a prefix of the churn history); a reader that
//! ignored the heads' hashes (the naive union of whatever slices it holds)
//! is counted alongside, to show that torn intermediate states did occur
//! in the watch streams the store was fed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use canal_agent::policy::PolicyMetrics;
use canal_agent::policy::component::{Input, apply_input, spawn_watches};
use canal_agent::policy::store::{Fetched, PolicyStore, Shared, Step};
use canal_crds::{CanalNetworkSpec, PeerSet, PeerSetObjectSpec, PolicyGroup};
use canal_e2e::{ControlPlane, install};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::Event;
use serde_json::json;
use tokio::sync::mpsc;

async fn create_pod(client: &kube::Client, name: &str, app: &str, ip: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "x");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "registry.invalid/x"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})),
    )
    .await
    .unwrap();
}

/// The IP of churn pod `i` of `round`: distinct, inside n1's podCIDR.
fn churn_ip(round: usize, i: usize) -> String {
    format!("10.244.1.{}", 2 + round * 24 + i)
}

/// The naive reader: the members of every slice of `head` it holds,
/// whatever the head lists.
fn naive(raw: &BTreeMap<String, PeerSetObjectSpec>, head: &str) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = raw
        .get(head)
        .map(|h| h.ips.iter().cloned().collect())
        .unwrap_or_default();
    for s in raw.values().filter(|s| s.slice_of.as_deref() == Some(head)) {
        out.extend(s.ips.iter().cloned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watching_agent_never_assembles_a_torn_set_under_pod_churn() {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    install::install_crds(&client).await.expect("CRDs");
    install::apply_default_network(
        &client,
        CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16"),
    )
    .await
    .expect("CanalNetwork");
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            // Pod IPs count for NetworkPolicy only inside their node's
            // podCIDR (and the clusterCIDR).
            &serde_json::from_value(json!({"metadata": {"name": "n1"},
                "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap(),
        )
        .await
        .unwrap();
    // The subject pod on n1, isolated by a policy allowing app=churn.
    create_pod(&client, "subject", "subject", "10.244.1.1").await;
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "from-churn", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"app": "subject"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "churn"}}}]}]}
    }))
    .unwrap();
    Api::<NetworkPolicy>::namespaced(client.clone(), "x")
        .create(&PostParams::default(), &np)
        .await
        .unwrap();

    // The controller: slices of about four members.
    let registry = prometheus::Registry::new();
    let options = canal_controller::policy::Options {
        limits: canal_controller::policy::objects::Limits {
            peer_set_slice_bytes: 60,
            ..Default::default()
        },
        ..Default::default()
    };
    let ctl_client = client.clone();
    let controller =
        tokio::spawn(
            async move { canal_controller::policy::run(ctl_client, &registry, options).await },
        );

    // The agent's watches and store, in this task.
    let agent_registry = prometheus::Registry::new();
    let metrics = PolicyMetrics::register(&agent_registry).unwrap();
    let (tx, mut rx) = mpsc::channel::<(Instant, Input)>(4096);
    let watches = spawn_watches(&client, "n1", &tx, &metrics);
    let mut store = PolicyStore::new();
    store.set_config(
        Some(canal_agent::policy::EnforcementConfig::default()),
        Instant::now(),
    );

    // Churn: add pods one by one, delete some, add more. The history of
    // memberships, one state per API write that changes it.
    let mut churn = Some(tokio::spawn({
        let client = client.clone();
        async move {
            let mut members: BTreeSet<String> = BTreeSet::new();
            let mut history = vec![members.clone()];
            let pods: Api<Pod> = Api::namespaced(client.clone(), "x");
            for round in 0..3 {
                for i in 0..24 {
                    let ip = churn_ip(round, i);
                    create_pod(&client, &format!("c{round}-{i}"), "churn", &ip).await;
                    members.insert(ip);
                    history.push(members.clone());
                }
                for i in (0..24).step_by(3) {
                    // Grace period 0: no kubelet here to confirm a graceful one.
                    pods.delete(
                        &format!("c{round}-{i}"),
                        &DeleteParams::default().grace_period(0),
                    )
                    .await
                    .unwrap();
                    members.remove(&churn_ip(round, i));
                    history.push(members.clone());
                }
            }
            history
        }
    }));

    let mut raw: BTreeMap<String, PeerSetObjectSpec> = BTreeMap::new();
    let mut programmed: Vec<BTreeSet<String>> = Vec::new();
    let mut naive_views: Vec<BTreeSet<String>> = Vec::new();
    let mut history: Option<Vec<BTreeSet<String>>> = None;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut set_name: Option<String> = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "timed out; programmed {programmed:?}"
        );
        if churn.as_ref().is_some_and(|c| c.is_finished()) {
            history = Some(churn.take().unwrap().await.unwrap());
            continue;
        }
        let Ok(Some((at, input))) =
            tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
        else {
            if let Some(h) = &history
                && let Some(name) = &set_name
                && store
                    .inputs()
                    .peer_sets
                    .get(name)
                    .map(|s| s.ips.iter().cloned().collect::<BTreeSet<_>>())
                    == h.last().cloned()
            {
                break;
            }
            continue;
        };
        // The naive reader sees the same PeerSet events.
        if let Input::PeerSet(ev) = &input {
            match ev {
                Event::Apply((n, Some(s))) | Event::InitApply((n, Some(s))) => {
                    raw.insert(n.clone(), s.clone());
                }
                Event::Delete((n, _)) => {
                    raw.remove(n);
                }
                _ => {}
            }
        }
        apply_input(&mut store, at, input);
        for (kind, name) in store.take_fetches() {
            // As the agent does: a GET of what became needed after its
            // watch event went by.
            let result = match kind {
                Shared::PeerSet => Fetched::PeerSet(
                    name.clone(),
                    Api::<PeerSet>::all(client.clone())
                        .get_opt(&name)
                        .await
                        .map(|o| o.map(|o| o.spec))
                        .map_err(drop),
                ),
                Shared::PolicyGroup => Fetched::PolicyGroup(
                    name.clone(),
                    Api::<PolicyGroup>::all(client.clone())
                        .get_opt(&name)
                        .await
                        .map(|o| o.map(|o| o.spec))
                        .map_err(drop),
                ),
            };
            store.fetched(result, Instant::now());
        }
        if set_name.is_none() {
            set_name = store.inputs().peer_sets.keys().next().cloned();
        }
        if let Some(name) = &set_name {
            naive_views.push(naive(&raw, name));
            // Whatever the inputs hold whenever the agent would sync.
            if store.next_step() == Step::Sync
                && let Some(s) = store.inputs().peer_sets.get(name)
            {
                let now: BTreeSet<String> = s.ips.iter().cloned().collect();
                if programmed.last() != Some(&now) {
                    programmed.push(now);
                }
            }
        }
    }
    let history = history.unwrap();
    let states: BTreeSet<&BTreeSet<String>> = history.iter().collect();
    for (i, p) in programmed.iter().enumerate() {
        assert!(
            states.contains(p),
            "programmed version {i} is not a membership the cluster had: {p:?}"
        );
    }
    let torn = naive_views.iter().filter(|v| !states.contains(v)).count();
    println!(
        "{} PeerSet versions programmed, all consistent; a naive reader would have seen {torn} torn states in {} events",
        programmed.len(),
        naive_views.len()
    );
    assert!(
        programmed.len() > 3,
        "the churn reached the store: {}",
        programmed.len()
    );
    assert!(
        torn > 0,
        "the watch streams never carried a half-written version, so this run proved nothing"
    );
    let slices = raw
        .values()
        .filter(|s| s.slice_of.as_deref() == set_name.as_deref())
        .count();
    assert!(slices >= 4, "the set is sharded: {slices} slices");
    controller.abort();
    drop(watches);
    drop(cp);
}
