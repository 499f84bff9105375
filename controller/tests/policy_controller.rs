//! The policy controller against a real kube-apiserver: Nodes, Namespaces,
//! Pods (nodeName and status.podIP set by the test: there is no kubelet or
//! scheduler) and NetworkPolicies in; NodePolicySets, PolicyGroups,
//! PeerSets, Events and the CanalNetwork summary out (read back the way an
//! agent assembles them). Every wait has a deadline and prints what it last
//! saw.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use base64::Engine;
use canal_crds::assemble::{View, assemble_view};
use canal_crds::{
    CanalNetwork, CanalNetworkSpec, NodePolicySet, PeerSet, PeerSetObjectSpec, PeerSetSpec,
    PolicyGroup, PolicyGroupSpec,
};
use canal_e2e::ControlPlane;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use prometheus::Registry;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

/// Polls `f` until it returns Some, or panics after `WAIT` with the last
/// observation.
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(seen) if Instant::now() > deadline => {
                panic!("timed out waiting for {what}; last observed: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A running policy controller with its own metrics registry.
struct Running {
    task: tokio::task::JoinHandle<Result<(), canal_controller::policy::Error>>,
    registry: std::sync::Arc<Registry>,
}

impl Running {
    fn start(client: &Client) -> Running {
        let registry = std::sync::Arc::new(Registry::new());
        let (c, r) = (client.clone(), registry.clone());
        let task = tokio::spawn(async move {
            canal_controller::policy::run(c, &r, canal_controller::policy::Options::default()).await
        });
        Running { task, registry }
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for family in self.registry.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let ok = labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                });
                if ok {
                    total += m.get_counter().get_value() + m.get_gauge().get_value();
                }
            }
        }
        total
    }

    fn syncs(&self) -> f64 {
        self.metric("canal_policy_syncs_total", &[])
    }

    /// Waits until the controller has completed `n` more sync passes.
    async fn wait_syncs_after(&self, before: f64, n: f64) {
        wait_for("more policy sync passes", || async {
            let now = self.syncs();
            if now >= before + n {
                Ok(())
            } else {
                Err(format!("syncs {now}, waiting for {}", before + n))
            }
        })
        .await;
    }

    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

struct Cluster {
    cp: ControlPlane,
    client: Client,
}

async fn cluster() -> Cluster {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    canal_e2e::install::install_crds(&client)
        .await
        .expect("CRDs");
    canal_e2e::install::apply_default_network(
        &client,
        CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16"),
    )
    .await
    .expect("CanalNetwork");
    let nodes: Api<Node> = Api::all(client.clone());
    // Pod IPs count only inside their node's podCIDR.
    for (n, cidr) in [("n1", "10.244.1.0/24"), ("n2", "10.244.2.0/24")] {
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": n}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}),
                )
                .unwrap(),
            )
            .await
            .unwrap();
    }
    let nss: Api<Namespace> = Api::all(client.clone());
    for n in ["x", "y"] {
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": n, "labels": {"ns": n}}})).unwrap(),
        )
        .await
        .unwrap();
    }
    for (ns, pod, node, ip) in [
        ("x", "a", "n1", "10.244.1.2"),
        ("x", "b", "n1", "10.244.1.3"),
        ("y", "a", "n2", "10.244.2.2"),
        ("y", "b", "n2", "10.244.2.3"),
    ] {
        create_pod(&client, ns, pod, node, ip).await;
    }
    Cluster { cp, client }
}

async fn create_pod(client: &Client, ns: &str, name: &str, node: &str, ip: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"pod": name}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/echo",
            "ports": [{"name": "serve-80-tcp", "containerPort": 80}]}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    set_pod_ip(client, ns, name, ip).await;
}

async fn set_pod_ip(client: &Client, ns: &str, name: &str, ip: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})),
    )
    .await
    .unwrap();
}

async fn apply_policy(client: &Client, yaml: &str) {
    let np: NetworkPolicy = serde_yaml::from_str(yaml).unwrap();
    let api: Api<NetworkPolicy> =
        Api::namespaced(client.clone(), np.metadata.namespace.as_deref().unwrap());
    api.patch(
        &np.name_any(),
        &PatchParams::apply("test").force(),
        &Patch::Apply(&np),
    )
    .await
    .unwrap();
}

const ISOLATE_X_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: serve-80-tcp}]
"#;

const Y_FROM_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-x, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: x}}}]
  egress:
  - ports: [{port: serve-80-tcp}]
"#;

async fn nps(client: &Client, name: &str) -> Result<NodePolicySet, String> {
    Api::<NodePolicySet>::all(client.clone())
        .get(name)
        .await
        .map_err(|e| format!("NodePolicySet {name}: {e}"))
}

async fn peer_sets(client: &Client) -> Vec<PeerSet> {
    Api::<PeerSet>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

async fn policy_groups(client: &Client) -> Vec<PolicyGroup> {
    Api::<PolicyGroup>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

/// Every PeerSet head, assembled with its slices, with its name.
async fn assembled_sets(client: &Client) -> Result<Vec<(String, PeerSetSpec)>, String> {
    let all: BTreeMap<String, PeerSetObjectSpec> = peer_sets(client)
        .await
        .into_iter()
        .map(|p| (p.name_any(), p.spec))
        .collect();
    let mut out = Vec::new();
    for (name, head) in all.iter().filter(|(_, s)| s.slice_of.is_none()) {
        let spec = canal_crds::assemble::assemble_peer_set(name, head, |n| all.get(n))
            .map_err(|g| format!("PeerSet {name}: {g:?}"))?;
        out.push((name.clone(), spec));
    }
    Ok(out)
}

/// What a node's agent would program: its NodePolicySet assembled with the
/// PolicyGroups and PeerSets it needs.
async fn view(client: &Client, node: &str) -> Result<View, String> {
    let nps = nps(client, node).await?;
    let groups: BTreeMap<String, PolicyGroupSpec> = policy_groups(client)
        .await
        .into_iter()
        .map(|g| (g.name_any(), g.spec))
        .collect();
    let sets: BTreeMap<String, PeerSetObjectSpec> = peer_sets(client)
        .await
        .into_iter()
        .map(|p| (p.name_any(), p.spec))
        .collect();
    assemble_view(node, &nps.spec, &groups, &sets).map_err(|g| format!("{node}: {g:?}"))
}

/// name -> resourceVersion of every NodePolicySet, PolicyGroup and PeerSet.
async fn versions(client: &Client) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for g in policy_groups(client).await {
        out.insert(
            format!("PolicyGroup/{}", g.name_any()),
            g.resource_version().unwrap(),
        );
    }
    for n in Api::<NodePolicySet>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        out.insert(
            format!("NodePolicySet/{}", n.name_any()),
            n.resource_version().unwrap(),
        );
    }
    for p in peer_sets(client).await {
        out.insert(
            format!("PeerSet/{}", p.name_any()),
            p.resource_version().unwrap(),
        );
    }
    out
}

async fn network_uid(client: &Client) -> String {
    Api::<CanalNetwork>::all(client.clone())
        .get("default")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap()
}

/// Kind/name -> "kind/name/uid" of the ownerReferences of every
/// NodePolicySet and PeerSet.
async fn owners(client: &Client) -> BTreeMap<String, Vec<String>> {
    let refs = |meta: &kube::api::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .map(|o| format!("{}/{}/{}", o.kind, o.name, o.uid))
            .collect::<Vec<_>>()
    };
    let mut out = BTreeMap::new();
    for n in Api::<NodePolicySet>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        out.insert(format!("NodePolicySet/{}", n.name_any()), refs(&n.metadata));
    }
    for g in policy_groups(client).await {
        out.insert(format!("PolicyGroup/{}", g.name_any()), refs(&g.metadata));
    }
    for p in peer_sets(client).await {
        out.insert(format!("PeerSet/{}", p.name_any()), refs(&p.metadata));
    }
    out
}

/// What [`owners`] shows when the CanalNetwork `uid` owns every object.
async fn owned_by_all(client: &Client, uid: &str) -> BTreeMap<String, Vec<String>> {
    owners(client)
        .await
        .into_keys()
        .map(|k| (k, vec![format!("CanalNetwork/default/{uid}")]))
        .collect()
}

/// Waits for the compiled state of the two policies above.
async fn wait_compiled(client: &Client) {
    wait_for("NodePolicySets and PeerSets of the policies", || async {
        let n1 = view(client, "n1").await?.node;
        let n2 = view(client, "n2").await?.node;
        let xa = n1
            .endpoints
            .iter()
            .find(|e| e.namespace == "x" && e.pod == "a")
            .ok_or(format!("n1 endpoints {:?}", n1.endpoints))?;
        if xa.ingress_policies != ["x/allow-b"] || xa.ips != ["10.244.1.2"] {
            return Err(format!("x/a endpoint {xa:?}"));
        }
        if n2
            .policies
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            != ["y/from-x"]
        {
            return Err(format!("n2 policies {:?}", n2.policies));
        }
        let sets = assembled_sets(client).await?;
        let b = sets
            .iter()
            .find(|(_, s)| s.selector.namespace.as_deref() == Some("x"))
            .ok_or(format!("PeerSets {sets:?}"))?;
        if b.1.ips != ["10.244.1.3"] {
            return Err(format!("x pod=b set {:?}", b.1));
        }
        let named = sets
            .iter()
            .find(|(_, s)| s.selector.named_port.is_some())
            .ok_or("no named-port set")?;
        if named.1.member_count != 4 {
            return Err(format!("named-port set {:?}", named.1));
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiles_a_cluster_rewrites_minimally_and_a_restart_writes_nothing() {
    let c = cluster().await;
    apply_policy(&c.client, ISOLATE_X_A).await;
    apply_policy(&c.client, Y_FROM_X).await;
    let ctl = Running::start(&c.client);
    wait_compiled(&c.client).await;

    // Owned by the CanalNetwork (so deleting it garbage-collects every
    // generated object), labelled, annotated with the fingerprints.
    let first_uid = network_uid(&c.client).await;
    assert_eq!(
        owners(&c.client).await,
        owned_by_all(&c.client, &first_uid).await
    );
    let n1 = nps(&c.client, "n1").await.unwrap();
    assert!(n1.annotations().contains_key("canal.dev/fingerprint"));
    assert!(
        n1.managed_fields()
            .iter()
            .any(|m| m.manager.as_deref() == Some("canal-controller-policy"))
    );

    // A pod IP change rewrites the sets holding the pod and its node's
    // NodePolicySet, nothing else.
    let before = versions(&c.client).await;
    let synced = ctl.syncs();
    set_pod_ip(&c.client, "x", "b", "10.244.1.9").await;
    wait_for("x/b's new IP in its PeerSet and on n1", || async {
        let sets = assembled_sets(&c.client).await?;
        let b = sets
            .iter()
            .find(|(_, s)| s.selector.namespace.as_deref() == Some("x"))
            .ok_or("x set missing")?;
        let n1 = view(&c.client, "n1").await?.node;
        let ep = n1
            .endpoints
            .iter()
            .find(|e| e.pod == "b" && e.namespace == "x");
        if b.1.ips == ["10.244.1.9"] && ep.is_some_and(|e| e.ips == ["10.244.1.9"]) {
            Ok(())
        } else {
            Err(format!("set {:?}, endpoint {ep:?}", b.1.ips))
        }
    })
    .await;
    ctl.wait_syncs_after(synced, 2.0).await;
    let after = versions(&c.client).await;
    let changed: Vec<&String> = before
        .keys()
        .filter(|k| after.get(*k) != before.get(*k))
        .collect();
    let sets = assembled_sets(&c.client).await.unwrap();
    let mut expected: Vec<String> = sets
        .iter()
        .filter(|(_, s)| {
            s.ips.contains(&"10.244.1.9".to_string())
                || s.ports.iter().any(|p| p.ip == "10.244.1.9")
        })
        .map(|(n, _)| format!("PeerSet/{n}"))
        .collect();
    expected.push("NodePolicySet/n1".into());
    expected.sort();
    assert_eq!(
        changed.into_iter().cloned().collect::<Vec<_>>(),
        expected,
        "objects rewritten by one pod IP change"
    );
    assert_eq!(
        expected.len(),
        4,
        "x pod=b set, namespace x set of y/from-x, named-port set, n1"
    );

    // A restarted controller writes nothing.
    ctl.stop().await;
    let before = versions(&c.client).await;
    let ctl = Running::start(&c.client);
    ctl.wait_syncs_after(0.0, 1.0).await;
    let writes = ctl.metric("canal_policy_objects_written_total", &[]);
    assert_eq!(writes, 0.0, "a restart with nothing changed wrote objects");
    assert_eq!(versions(&c.client).await, before);

    // An object owned by something else (an older release owned each
    // NodePolicySet by its Node) is taken over, and only it is rewritten.
    ctl.stop().await;
    // Written the way that release wrote it: server-side apply by the same
    // field manager, so the takeover's apply drops the Node reference.
    let mut old = nps(&c.client, "n1").await.unwrap();
    old.metadata = kube::api::ObjectMeta {
        name: old.metadata.name.clone(),
        labels: old.metadata.labels.clone(),
        annotations: old.metadata.annotations.clone(),
        owner_references: Some(vec![
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node", "name": "n1",
                "uid": "0b5e6f1c-0000-4222-8333-944455556666",
            }))
            .unwrap(),
        ]),
        ..Default::default()
    };
    old.status = None;
    Api::<NodePolicySet>::all(c.client.clone())
        .patch(
            "n1",
            &PatchParams::apply("canal-controller-policy").force(),
            &Patch::Apply(&old),
        )
        .await
        .unwrap();
    let ctl = Running::start(&c.client);
    let want = owned_by_all(&c.client, &first_uid).await;
    wait_for("n1 owned by the CanalNetwork again", || async {
        let now = owners(&c.client).await;
        (now == want).then_some(()).ok_or(format!("{now:?}"))
    })
    .await;
    ctl.wait_syncs_after(0.0, 1.0).await;
    assert_eq!(
        ctl.metric("canal_policy_objects_written_total", &[]),
        1.0,
        "only the taken-over object is written"
    );

    // No CanalNetwork: nothing is written (after `helm uninstall` the
    // garbage collector removes what it owned; this control plane has no
    // garbage collector, so the objects stay). A new CanalNetwork takes
    // every object over.
    let networks: Api<CanalNetwork> = Api::all(c.client.clone());
    networks
        .delete("default", &DeleteParams::default())
        .await
        .unwrap();
    let pod_events = || ctl.metric("canal_policy_watch_events_total", &[("resource", "pods")]);
    let (events_before, before) = (pod_events(), versions(&c.client).await);
    set_pod_ip(&c.client, "x", "b", "10.244.1.10").await;
    wait_for("the pod change to reach the controller", || async {
        (pod_events() > events_before)
            .then_some(())
            .ok_or("no pod event yet".to_string())
    })
    .await;
    // Absence cannot be waited for: watch a window in which a write
    // (normally ~20 ms after the event) would have shown.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(
            versions(&c.client).await,
            before,
            "written without an owner"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    canal_e2e::install::apply_default_network(
        &c.client,
        CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16"),
    )
    .await
    .unwrap();
    let new_uid = network_uid(&c.client).await;
    assert_ne!(new_uid, first_uid);
    let want = owned_by_all(&c.client, &new_uid).await;
    wait_for("every object owned by the new CanalNetwork", || async {
        let now = owners(&c.client).await;
        (now == want).then_some(()).ok_or(format!("{now:?}"))
    })
    .await;
    let n1 = nps(&c.client, "n1").await.unwrap();
    assert!(
        n1.spec.endpoints.iter().any(|e| e.ips == ["10.244.1.10"]),
        "the change made while writes waited is in: {:?}",
        n1.spec.endpoints
    );
    assert!(view(&c.client, "n1").await.is_ok());

    // Deleting a Node deletes its NodePolicySet; deleting the policies
    // garbage-collects every PeerSet.
    Api::<Node>::all(c.client.clone())
        .delete("n2", &DeleteParams::default())
        .await
        .unwrap();
    for (ns, name) in [("x", "allow-b"), ("y", "from-x")] {
        Api::<NetworkPolicy>::namespaced(c.client.clone(), ns)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    wait_for(
        "n2's NodePolicySet, every PolicyGroup and PeerSet to go",
        || async {
            let v = versions(&c.client).await;
            if v.keys().collect::<Vec<_>>() == ["NodePolicySet/n1"] {
                Ok(())
            } else {
                Err(format!("{:?}", v.keys()))
            }
        },
    )
    .await;
    ctl.stop().await;
    drop(c.cp);
}

/// The etcd client URL of a control plane, read from its etcd process.
fn etcd_url(cp: &ControlPlane) -> String {
    let data_dir = format!("--data-dir={}", cp.layout.etcd_data().display());
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == &data_dir)
            && let Some(url) = args
                .iter()
                .find_map(|a| a.strip_prefix("--listen-client-urls="))
        {
            return url.to_string();
        }
    }
    panic!("no etcd process with {data_dir}");
}

/// Stores a NetworkPolicy straight into etcd, bypassing API validation, as
/// an object stored before validation tightened would be. The API server
/// decodes JSON from etcd and serves it like any other.
async fn put_unvalidated_policy(cp: &ControlPlane, ns: &str, name: &str, spec: serde_json::Value) {
    let object = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns,
            "uid": "0b5e6f1c-1111-4222-8333-944455556666",
            "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": spec
    });
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = json!({
        "key": b64.encode(format!("/registry/networkpolicies/{ns}/{name}")),
        "value": b64.encode(object.to_string()),
    })
    .to_string();
    let url = etcd_url(cp);
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /v3/kv/put HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "etcd put: {response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_gets_an_event_and_does_not_stop_the_others() {
    let c = cluster().await;
    let ctl = Running::start(&c.client);
    // The API server rejects all of these today; etcd still may hold them.
    put_unvalidated_policy(
        &c.cp,
        "x",
        "broken",
        json!({
            "podSelector": {"matchExpressions": [{"key": "pod", "operator": "Foo", "values": ["a"]}]},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1/33"}}],
                         "ports": [{"port": "serve-80-tcp", "endPort": 90}]}]
        }),
    )
    .await;
    wait_for(
        "the broken policy to be visible through the API",
        || async {
            Api::<NetworkPolicy>::namespaced(c.client.clone(), "x")
                .get("broken")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    apply_policy(&c.client, ISOLATE_X_A).await;
    apply_policy(&c.client, Y_FROM_X).await;
    wait_compiled(&c.client).await;

    let event = wait_for("an InvalidNetworkPolicy Event on x/broken", || async {
        let events = Api::<Event>::namespaced(c.client.clone(), "x")
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        events
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
                    && e.reason.as_deref() == Some("InvalidNetworkPolicy")
            })
            .ok_or("no such Event yet".to_string())
    })
    .await;
    let note = event.note.unwrap_or_default();
    for needle in [
        "operator \"Foo\"",
        "\"10.0.0.1/33\"",
        "endPort: not allowed with the named port",
    ] {
        assert!(note.contains(needle), "Event note lacks {needle:?}: {note}");
    }
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let regarding = event.regarding.unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("NetworkPolicy"));
    assert_eq!(
        regarding.uid.as_deref(),
        Some("0b5e6f1c-1111-4222-8333-944455556666")
    );
    // Skipped: no endpoint names it.
    let n1 = view(&c.client, "n1").await.unwrap().node;
    assert!(
        n1.endpoints
            .iter()
            .all(|e| !e.ingress_policies.contains(&"x/broken".to_string())),
        "{:?}",
        n1.endpoints
    );
    ctl.stop().await;
}

/// Writes a NodePolicySet status as the node's agent would.
async fn agent_reports(client: &Client, node: &str, enforced: bool) {
    let api: Api<NodePolicySet> = Api::all(client.clone());
    let current = api.get(node).await.unwrap();
    let generation = current.metadata.generation.unwrap();
    let body = json!({
        "apiVersion": "canal.dev/v1alpha1", "kind": "NodePolicySet",
        "metadata": {"name": node},
        "status": {
            "observedGeneration": generation,
            "conditions": [{"type": "Enforced", "status": if enforced {"True"} else {"False"},
                "reason": "Programmed", "message": "", "observedGeneration": generation,
                "lastTransitionTime": "2025-01-01T00:00:00Z"}]
        }
    });
    api.patch_status(
        node,
        &PatchParams::apply("canal-agent").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canal_network_summary_follows_agent_statuses_and_leaves_conditions_alone() {
    let c = cluster().await;
    // The network controller's condition, which the policy controller must not touch.
    let networks: Api<CanalNetwork> = Api::all(c.client.clone());
    networks
        .patch_status(
            "default",
            &PatchParams::apply("canal-controller").force(),
            &Patch::Apply(json!({
                "apiVersion": "canal.dev/v1alpha1", "kind": "CanalNetwork",
                "metadata": {"name": "default"},
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Applied",
                    "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
                    "allocatedSubnets": 2}
            })),
        )
        .await
        .unwrap();
    let ctl = Running::start(&c.client);
    let summary = |want: (&'static str, u32, u32)| {
        let networks = networks.clone();
        async move {
            wait_for(&format!("CanalNetwork summary {want:?}"), || async {
                let s = networks
                    .get("default")
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .unwrap_or_default();
                let got = (
                    s.policy_enforcement.clone().unwrap_or_default(),
                    s.policy_enforced_nodes.unwrap_or(99),
                    s.policy_nodes.unwrap_or(99),
                );
                if got == (want.0.to_string(), want.1, want.2) {
                    Ok(s)
                } else {
                    Err(format!("{got:?}"))
                }
            })
            .await
        }
    };
    summary(("0/2 nodes", 0, 2)).await;
    wait_for("both NodePolicySets", || async {
        nps(&c.client, "n1").await?;
        nps(&c.client, "n2").await.map(|_| ())
    })
    .await;
    agent_reports(&c.client, "n1", true).await;
    summary(("1/2 nodes", 1, 2)).await;
    agent_reports(&c.client, "n2", false).await;
    agent_reports(&c.client, "n2", true).await;
    let s = summary(("2/2 nodes", 2, 2)).await;
    assert_eq!(
        s.conditions.len(),
        1,
        "conditions untouched: {:?}",
        s.conditions
    );
    assert_eq!(s.allocated_subnets, Some(2));

    // A policy change bumps n1's generation: not enforced until the agent catches up.
    apply_policy(&c.client, ISOLATE_X_A).await;
    summary(("1/2 nodes", 1, 2)).await;
    agent_reports(&c.client, "n1", true).await;
    summary(("2/2 nodes", 2, 2)).await;

    // Field ownership: only the three policy fields are the policy controller's.
    let cn = networks.get("default").await.unwrap();
    let ours = cn
        .managed_fields()
        .iter()
        .find(|m| m.manager.as_deref() == Some("canal-controller-policy"))
        .expect("a managedFields entry of the policy controller");
    let fields = serde_json::to_string(&ours.fields_v1).unwrap();
    for f in ["policyEnforcement", "policyEnforcedNodes", "policyNodes"] {
        assert!(fields.contains(f), "{fields}");
    }
    assert!(!fields.contains("conditions"), "{fields}");

    // Disabled policy: the summary says so.
    networks
        .patch(
            "default",
            &PatchParams::apply("test").force(),
            &Patch::Apply(json!({
                "apiVersion": "canal.dev/v1alpha1", "kind": "CanalNetwork",
                "metadata": {"name": "default"},
                "spec": {"clusterCIDR": "10.244.0.0/16", "policy": {"enabled": false}}
            })),
        )
        .await
        .unwrap();
    summary(("disabled", 2, 2)).await;
    ctl.stop().await;
}

/// Waits for an Event with `reason` about Pod `ns`/`name`; returns its note.
async fn pod_event(client: &Client, ns: &str, name: &str, reason: &str) -> String {
    wait_for(&format!("a {reason} Event on pod {ns}/{name}"), || async {
        let events = Api::<Event>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        events
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Pod")
                    && e.reason.as_deref() == Some(reason)
            })
            .and_then(|e| e.note)
            .ok_or("no such Event yet".to_string())
    })
    .await
}

/// The IPs of a pod's endpoint in a node's assembled view.
fn endpoint_ips(v: &View, ns: &str, pod: &str) -> Option<Vec<String>> {
    v.node
        .endpoints
        .iter()
        .find(|e| e.namespace == ns && e.pod == pod)
        .map(|e| e.ips.clone())
}

/// Issue 10.6: a Pod reporting an IP another Pod holds, or one outside its
/// node's podCIDR or the cluster, gets a Warning Event and no access
/// through it; the IP is handed over when its holder goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contested_and_out_of_range_pod_ips_never_lend_access() {
    let c = cluster().await;
    apply_policy(&c.client, ISOLATE_X_A).await;
    apply_policy(&c.client, Y_FROM_X).await;
    let ctl = Running::start(&c.client);
    wait_compiled(&c.client).await;
    // Creation timestamps have one-second resolution: the newcomers are
    // younger than every pod of the cluster.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // x/evil (not allowed to x/a) reports x/b's IP: if its endpoint showed
    // it, the dataplane would let it send as x/b.
    create_pod(&c.client, "x", "evil", "n1", "10.244.1.3").await;
    // x/fake, labelled like x/b, reports y/a's IP on y/a's node: if that IP
    // joined the pod=b set, y/a would be admitted to x/a.
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "x");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "fake", "labels": {"pod": "b"}},
            "spec": {"nodeName": "n2", "containers": [{"name": "c", "image": "registry.invalid/echo"}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    set_pod_ip(&c.client, "x", "fake", "10.244.2.2").await;
    // An IP of n2's range reported on n1, and one outside the cluster.
    create_pod(&c.client, "x", "forged", "n1", "10.244.2.3").await;
    create_pod(&c.client, "x", "outside", "n1", "192.168.7.7").await;

    let note = pod_event(&c.client, "x", "evil", "PodIPRefused").await;
    assert!(
        note.contains("10.244.1.3 is already held by pod x/b"),
        "{note}"
    );
    let note = pod_event(&c.client, "x", "fake", "PodIPRefused").await;
    assert!(
        note.contains("10.244.2.2 is already held by pod y/a"),
        "{note}"
    );
    let note = pod_event(&c.client, "x", "forged", "PodIPRefused").await;
    assert!(
        note.contains("10.244.2.3 lies outside the podCIDR 10.244.1.0/24 of its node n1"),
        "{note}"
    );
    let note = pod_event(&c.client, "x", "outside", "PodIPRefused").await;
    assert!(
        note.contains("192.168.7.7 lies outside clusterCIDR 10.244.0.0/16"),
        "{note}"
    );
    wait_for("the contested IPs to stay with their holders", || async {
        let n1 = view(&c.client, "n1").await?;
        let n2 = view(&c.client, "n2").await?;
        let sets = assembled_sets(&c.client).await?;
        let (_, b) = sets
            .iter()
            .find(|(_, s)| s.selector.namespace.as_deref() == Some("x"))
            .ok_or("x set missing")?;
        let seen = (
            endpoint_ips(&n1, "x", "evil"),
            endpoint_ips(&n1, "x", "b"),
            endpoint_ips(&n2, "x", "fake"),
            endpoint_ips(&n1, "x", "forged"),
            endpoint_ips(&n1, "x", "outside"),
            b.ips.clone(),
        );
        let none = Some(Vec::<String>::new());
        if seen
            == (
                none.clone(),
                Some(vec!["10.244.1.3".to_string()]),
                none.clone(),
                none.clone(),
                none,
                vec!["10.244.1.3".to_string()],
            )
        {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;

    // x/b goes: x/evil holds 10.244.1.3 now, and the pod=b set no longer.
    pods.delete("b", &DeleteParams::default()).await.unwrap();
    wait_for("the IP handed over to x/evil", || async {
        let n1 = view(&c.client, "n1").await?;
        let sets = assembled_sets(&c.client).await?;
        let (_, b) = sets
            .iter()
            .find(|(_, s)| s.selector.namespace.as_deref() == Some("x"))
            .ok_or("x set missing")?;
        let seen = (endpoint_ips(&n1, "x", "evil"), b.ips.clone());
        if seen == (Some(vec!["10.244.1.3".to_string()]), vec![]) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    let note = pod_event(&c.client, "x", "evil", "PodIPAccepted").await;
    assert!(note.contains("its own again"), "{note}");

    // A PeerSet edited by someone else is put back.
    let sets = peer_sets(&c.client).await;
    let ns_x = sets
        .iter()
        .find(|s| {
            s.spec.slice_of.is_none()
                && s.spec.selector.namespace.is_none()
                && !s.spec.ips.is_empty()
        })
        .expect("the namespace x set of y/from-x")
        .clone();
    let api: Api<PeerSet> = Api::all(c.client.clone());
    api.patch(
        &ns_x.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ips": ["10.244.2.2", "203.0.113.66"]}})),
    )
    .await
    .unwrap();
    wait_for("the tampered PeerSet to be restored", || async {
        let now = api.get(&ns_x.name_any()).await.map_err(|e| e.to_string())?;
        if now.spec.ips == ns_x.spec.ips {
            Ok(())
        } else {
            Err(format!("{:?}", now.spec.ips))
        }
    })
    .await;
    ctl.stop().await;
}

/// The `type` condition of a status, as (status, reason, message).
fn condition_of(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_over_the_bound_is_reported_and_its_nodes_keep_a_consistent_version() {
    let c = cluster().await;
    let networks: Api<CanalNetwork> = Api::all(c.client.clone());
    // The network controller's condition, which must survive ours.
    networks
        .patch_status(
            "default",
            &PatchParams::apply("canal-controller").force(),
            &Patch::Apply(json!({
                "apiVersion": "canal.dev/v1alpha1", "kind": "CanalNetwork",
                "metadata": {"name": "default"},
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Applied",
                    "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}
            })),
        )
        .await
        .unwrap();
    apply_policy(&c.client, ISOLATE_X_A).await;
    apply_policy(&c.client, Y_FROM_X).await;
    let ctl = Running::start(&c.client);
    wait_compiled(&c.client).await;
    let n1_before = nps(&c.client, "n1").await.unwrap();
    let view_before = view(&c.client, "n1").await.unwrap();

    // A policy on x/a (the same selector, so the same PolicyGroup) whose one
    // ipBlock has 40,000 excepts: about 700 KB compiled, and one peer
    // cannot be split. The NetworkPolicy itself is stored fine.
    let excepts: Vec<String> = (0..40_000)
        .map(|i| format!("10.{}.{}.0/24", i / 256 % 256, i % 256))
        .collect();
    let huge = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "huge", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": excepts}}]}]}
    });
    Api::<NetworkPolicy>::namespaced(c.client.clone(), "x")
        .patch(
            "huge",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&huge),
        )
        .await
        .unwrap();
    let published = wait_for("n1's Published condition to say why", || async {
        let n1 = nps(&c.client, "n1").await?;
        let conds = n1.status.map(|s| s.conditions).unwrap_or_default();
        match condition_of(&conds, "Published") {
            Some(c) if c.0 == "False" => Ok(c),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(published.1, "ObjectTooLarge");
    assert!(
        published.2.contains("over the 524288-byte limit"),
        "{}",
        published.2
    );
    let network = wait_for("the CanalNetwork PolicyPublished condition", || async {
        let s = networks
            .get("default")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        match condition_of(&s.conditions, "PolicyPublished") {
            Some(c) if c.0 == "False" => Ok(s),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (_, reason, message) = condition_of(&network.conditions, "PolicyPublished").unwrap();
    assert_eq!(reason, "ObjectTooLarge");
    assert!(
        message.contains("1 node(s)") && message.contains("n1"),
        "{message}"
    );
    assert!(
        condition_of(&network.conditions, "Ready").is_some(),
        "the network controller's condition stays: {:?}",
        network.conditions
    );
    assert_eq!(network.policy_enforced_nodes, Some(0));
    assert_eq!(ctl.metric("canal_policy_unwritable_objects", &[]), 1.0);
    assert_eq!(ctl.metric("canal_policy_unpublished_nodes", &[]), 1.0);
    // n1 keeps the version it has, consistent: not rewritten against a
    // group version the cluster does not hold.
    let n1 = nps(&c.client, "n1").await.unwrap();
    assert_eq!(n1.metadata.generation, n1_before.metadata.generation);
    assert_eq!(view(&c.client, "n1").await.unwrap(), view_before);
    // Nodes that do not need the object are served as usual.
    set_pod_ip(&c.client, "y", "b", "10.244.2.9").await;
    wait_for("y/b's new IP on n2", || async {
        let n2 = view(&c.client, "n2").await?.node;
        n2.endpoints
            .iter()
            .any(|e| e.ips == ["10.244.2.9"])
            .then_some(())
            .ok_or(format!("{:?}", n2.endpoints))
    })
    .await;

    // Fixed: everything is written and both conditions say so.
    Api::<NetworkPolicy>::namespaced(c.client.clone(), "x")
        .delete("huge", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("n1 Published again", || async {
        let n1 = nps(&c.client, "n1").await?;
        let conds = n1.status.map(|s| s.conditions).unwrap_or_default();
        match condition_of(&conds, "Published") {
            Some(c) if c.0 == "True" && c.1 == "AllWritten" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    wait_for("PolicyPublished True", || async {
        let s = networks
            .get("default")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        match condition_of(&s.conditions, "PolicyPublished") {
            Some(c) if c.0 == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(ctl.metric("canal_policy_unwritable_objects", &[]), 0.0);
    assert!(view(&c.client, "n1").await.is_ok());
    ctl.stop().await;
}
