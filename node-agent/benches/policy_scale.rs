//! End-to-end scale benchmark of NetworkPolicy (needs root for the agent
//! part): a real kube-apiserver + etcd (default limits), 5,000 Nodes,
//! 150,000 Pods and 10,000 NetworkPolicies created through the API, then
//! the policy controller started in its own process (this binary,
//! re-executed, running `canal_controller::policy::run`, the canal-controller
//! binary's policy task).
//!
//! Prints: the time from the controller's start to every NodePolicySet,
//! PolicyGroup and PeerSet written; bytes and objects written; the largest
//! object stored; the controller's peak RSS and CPU; API requests per
//! second; for one pod add, one label change and one policy add, the time
//! until the affected agents' views (the agent's own watch pipeline and
//! store, in this process, for four nodes) are updated and the writes it
//! took; and one agent with 110 local pods under 100 policies (its own
//! process: the agent's watches, store and enforcer, programming a fresh
//! network namespace): RSS, cold apply, incremental apply p50/p99.
//!
//! `cargo bench -p canal-agent --bench policy_scale` (env: SCALE_NODES,
//! SCALE_PODS, SCALE_POLICIES scale everything down for a quick run;
//! SCALE_CHANGES = incremental changes for the agent, default 60).

#[path = "../tests/support/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use canal_agent::policy::component::{Input, apply_input, spawn_watches};
use canal_agent::policy::store::{Fetched, PolicyStore, Shared, Step};
use canal_agent::policy::{EnforcementConfig, Exec, PolicyEnforcer, PolicyMetrics};
use canal_crds::{CanalNetworkSpec, NodePolicySet, PeerSet, PolicyGroup};
use canal_e2e::ControlPlane;
use canal_e2e::control_plane::client_from_kubeconfig;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const IN_FLIGHT: usize = 64;
const TIERS: [&str; 3] = ["web", "api", "db"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];
const HOT_NODE: &str = "node-00000";
const HOT_PODS: usize = 110;
const HOT_POLICIES: usize = 100;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match arg(&args, "--role").as_deref() {
        Some("controller") => rt.block_on(controller_role(&args)),
        Some("agent") => rt.block_on(agent_role(&args)),
        _ => rt.block_on(orchestrate()),
    }
}

// ----- measurements -------------------------------------------------------

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of a process.
fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the name: state is [0]; utime [11], stime [12].
    let tick = 100.0;
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (ut + st) / tick
}

/// Sum of the samples of `name` (optionally filtered by label pairs) in
/// Prometheus text.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

// ----- the cluster --------------------------------------------------------

/// The cluster's pod range: every address `ip` gives.
const POD_RANGE: &str = "10.64.0.0/10";

fn ip(n: usize) -> String {
    format!("10.{}.{}.{}", 64 + (n >> 16 & 63), n >> 8 & 255, n & 255)
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value, ports: Value) -> (Value, String) {
    (
        json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/x", "ports": ports}]}
        }),
        ip.to_string(),
    )
}

fn c_pod(ns: &str, app: usize, r: usize, node: &str, n: usize) -> (Value, String) {
    let tier = TIERS[app % 3];
    let (pname, pnum) = match tier {
        "web" => ("http", 8080),
        "api" => ("grpc", 9090),
        _ => ("postgres", 5432),
    };
    pod(
        ns,
        &format!("app-{app}-{r}"),
        node,
        &ip(n),
        json!({"app": format!("app-{app}"), "tier": tier, "pod-template-hash": format!("h{app}")}),
        json!([{"name": "metrics", "containerPort": 9100}, {"name": pname, "containerPort": pnum}]),
    )
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn app_policy(ns: &str, name: &str, k: usize, from_app: usize) -> Value {
    let mut peers =
        vec![json!({"podSelector": {"matchLabels": {"app": format!("app-{from_app}")}}})];
    if k.is_multiple_of(4) {
        peers.push(
            json!({"namespaceSelector": {"matchLabels": {"env": "prod"}},
                          "podSelector": {"matchLabels": {"tier": "web"}}}),
        );
    }
    if k.is_multiple_of(5) {
        peers.push(json!({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.128.0.0/9"]}}));
    }
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": format!("app-{k}")}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": "http"}]}]
    });
    if k.is_multiple_of(3) {
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
        spec["egress"] = json!([{"to": [{"podSelector": {"matchLabels": {"tier": "db"}}}],
                                 "ports": [{"protocol": "TCP", "port": "postgres"}]}]);
    }
    policy(ns, name, spec)
}

/// The policies of one ordinary namespace (benchmark (c)'s shape).
fn c_policies(ns: &str) -> Vec<Value> {
    let mut out = vec![
        policy(
            ns,
            "default-deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
        policy(
            ns,
            "allow-dns",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-000"}},
                                "podSelector": {"matchLabels": {"app": "app-0"}}}],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
        ),
        policy(
            ns,
            "allow-monitoring",
            json!({"podSelector": {}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "team-0"}}}],
                         "ports": [{"protocol": "TCP", "port": "metrics"}]}]}),
        ),
    ];
    for k in 0..17 {
        out.push(app_policy(ns, &format!("allow-app-{k}"), k, (k + 1) % 30));
    }
    out
}

/// 100 policies over the hot node's 110 pods: each references big shared
/// sets (every prod web pod, a team's namespaces, every postgres port).
fn hot_policies() -> Vec<Value> {
    (0..HOT_POLICIES)
        .map(|i| {
            let select = json!({"matchLabels": {"app": format!("hot-{}", i % 10)}});
            let spec = match i % 4 {
                0 => json!({"podSelector": select, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchLabels": {"tier": "web"}}}],
                    "ports": [{"protocol": "TCP", "port": 8000 + i}]}]}),
                1 => json!({"podSelector": select, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i % 50)}}}],
                    "ports": [{"protocol": "TCP", "port": 8000 + i}]}]}),
                2 => json!({"podSelector": select, "policyTypes": ["Egress"], "egress": [{"to": [
                    {"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "db"}}}],
                    "ports": [{"protocol": "TCP", "port": "postgres"}]}]}),
                _ => json!({"podSelector": select, "ingress": [{"from": [
                    {"podSelector": {"matchLabels": {"app": format!("hot-{}", (i + 1) % 10)}}},
                    {"ipBlock": {"cidr": format!("172.{}.0.0/16", 16 + i % 16)}}]}]}),
            };
            policy("hot", &format!("hot-{i:03}"), spec)
        })
        .collect()
}

struct Shape {
    nodes: usize,
    namespaces: usize,
    policy_namespaces: usize,
    spare_pods: usize,
}

fn shape() -> Shape {
    let nodes = env_usize("SCALE_NODES", 5_000);
    let pods = env_usize("SCALE_PODS", 150_000);
    let policies = env_usize("SCALE_POLICIES", 10_000);
    let namespaces = (pods - HOT_PODS) / 300;
    Shape {
        nodes,
        namespaces,
        policy_namespaces: ((policies - HOT_POLICIES) / 20).min(namespaces),
        spare_pods: pods - HOT_PODS - namespaces * 300,
    }
}

/// splitmix64, for placing pods on nodes reproducibly.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A node other than the hot one, or a pinned one for the pods the event
/// measurements watch.
fn node_for(s: &Shape, ns: usize, app: usize, r: usize, n: usize) -> String {
    match (ns, app, r) {
        (1, 0, 0) => "node-00002".into(),
        _ => format!("node-{:05}", 1 + mix(n as u64) as usize % (s.nodes - 1)),
    }
}

async fn create_pod(client: Client, obj: Value, ip: String) {
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api: Api<Pod> = Api::namespaced(client, &ns);
    let pod: Pod = serde_json::from_value(obj).expect("pod json");
    for attempt in 0..5 {
        match api.create(&PostParams::default(), &pod).await {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 409 => break,
            Err(e) if attempt < 4 => {
                eprintln!("create pod {ns}/{name}: {e} (retrying)");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("create pod {ns}/{name}: {e}"),
        }
    }
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    for attempt in 0..5 {
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            Ok(_) => return,
            Err(e) if attempt < 4 => {
                eprintln!("status of {ns}/{name}: {e} (retrying)");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("status of {ns}/{name}: {e}"),
        }
    }
}

async fn apply_policy(client: &Client, p: &Value) {
    let ns = p["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = p["metadata"]["name"].as_str().unwrap_or_default();
    Api::<NetworkPolicy>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::apply("bench").force(), &Patch::Apply(p))
        .await
        .unwrap_or_else(|e| panic!("policy {ns}/{name}: {e}"));
}

async fn build_cluster(client: &Client, s: &Shape) {
    let t = Instant::now();
    futures::stream::iter(0..s.nodes)
        .map(|i| {
            let c = client.clone();
            async move {
                // Pod IPs count for NetworkPolicy only inside their node's
                // podCIDR; `ip` places pods independently of nodes, so every
                // node gets the whole pod range (the claims are still
                // checked, and every IP is one pod's).
                let n: Node = serde_json::from_value(json!({
                    "metadata": {"name": format!("node-{i:05}")},
                    "spec": {"podCIDR": POD_RANGE, "podCIDRs": [POD_RANGE]}
                }))
                .expect("node json");
                let _ = Api::<Node>::all(c).create(&PostParams::default(), &n).await;
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    let mut namespaces: Vec<(String, Value)> = (0..s.namespaces)
        .map(|i| {
            (
                format!("ns-{i:03}"),
                json!({"team": format!("team-{}", i % 50), "env": ENVS[i % 3]}),
            )
        })
        .collect();
    namespaces.push(("hot".into(), json!({"team": "hot"})));
    namespaces.push(("spare".into(), json!({})));
    for (name, labels) in namespaces {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
        let _ = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await;
    }
    println!(
        "  created {} Nodes and {} Namespaces in {:.1?}",
        s.nodes,
        s.namespaces + 2,
        t.elapsed()
    );
    let t = Instant::now();
    let mut pods: Vec<(Value, String)> = Vec::new();
    let mut n = 0usize;
    for i in 0..s.namespaces {
        let ns = format!("ns-{i:03}");
        for app in 0..30 {
            for r in 0..10 {
                n += 1;
                pods.push(c_pod(&ns, app, r, &node_for(s, i, app, r, n), n));
            }
        }
    }
    for h in 0..HOT_PODS {
        n += 1;
        pods.push(pod(
            "hot",
            &format!("hot-{h:03}"),
            HOT_NODE,
            &ip(n),
            json!({"app": format!("hot-{}", h % 10)}),
            json!([{"name": "http", "containerPort": 8080}]),
        ));
    }
    for p in 0..s.spare_pods {
        n += 1;
        pods.push(pod(
            "spare",
            &format!("spare-{p}"),
            &format!("node-{:05}", 1 + p % (s.nodes - 1)),
            &ip(n),
            json!({"app": "spare"}),
            json!([]),
        ));
    }
    let total = pods.len();
    let c = client.clone();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p2 = progress.clone();
    let reporter = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            println!(
                "    ... {} of {total} pods created",
                p2.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    });
    futures::stream::iter(pods)
        .map(|(obj, ip)| {
            let c = c.clone();
            let progress = progress.clone();
            async move {
                create_pod(c, obj, ip).await;
                progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    reporter.abort();
    println!(
        "  created {total} Pods (create + status) in {:.1?} ({:.0} pods/s)",
        t.elapsed(),
        total as f64 / t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut policies: Vec<Value> = Vec::new();
    for i in 0..s.policy_namespaces {
        policies.extend(c_policies(&format!("ns-{i:03}")));
    }
    policies.extend(hot_policies());
    let count = policies.len();
    let c = client.clone();
    futures::stream::iter(policies)
        .map(|p| {
            let c = c.clone();
            async move { apply_policy(&c, &p).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    println!("  created {count} NetworkPolicies in {:.1?}", t.elapsed());
}

// ----- roles ----------------------------------------------------------------

/// The policy controller in its own process, dumping its metrics to a file.
async fn controller_role(args: &[String]) {
    let kubeconfig = PathBuf::from(arg(args, "--kubeconfig").expect("--kubeconfig"));
    let file = PathBuf::from(arg(args, "--metrics-file").expect("--metrics-file"));
    let client = client_from_kubeconfig(&kubeconfig).await.expect("client");
    let registry = prometheus::Registry::new();
    let reg = registry.clone();
    tokio::spawn(async move {
        loop {
            let mut out = Vec::new();
            let _ = prometheus::Encoder::encode(
                &prometheus::TextEncoder::new(),
                &reg.gather(),
                &mut out,
            );
            let tmp = file.with_extension("tmp");
            if std::fs::write(&tmp, &out).is_ok() {
                let _ = std::fs::rename(&tmp, &file);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let r = canal_controller::policy::run(client, &registry, Default::default()).await;
    eprintln!("policy controller stopped: {r:?}");
}

/// GETs what a store asks for, as the agent does.
async fn answer_fetches(client: &Client, store: &mut PolicyStore) {
    for (kind, name) in store.take_fetches() {
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
        store.fetched(result, std::time::Instant::now());
    }
}

/// One agent for the hot node in its own process: the agent's watches and
/// store, and its enforcer programming a fresh network namespace. Writes
/// JSON lines to the report file.
async fn agent_role(args: &[String]) {
    let kubeconfig = PathBuf::from(arg(args, "--kubeconfig").expect("--kubeconfig"));
    let report = PathBuf::from(arg(args, "--report").expect("--report"));
    let node = arg(args, "--node").expect("--node");
    let client = client_from_kubeconfig(&kubeconfig).await.expect("client");
    let ns = netns::Netns::new("scale-agent");
    let run_dir = tempfile::tempdir().expect("run dir");
    let mut enforcer = PolicyEnforcer::new(run_dir.path(), PolicyMetrics::unregistered().unwrap())
        .with_exec(Exec::in_netns(&ns.path).unwrap());
    let metrics = PolicyMetrics::unregistered().unwrap();
    let (tx, mut rx) = mpsc::channel::<(std::time::Instant, Input)>(4096);
    let _watches = spawn_watches(&client, &node, &tx, &metrics);
    let mut store = PolicyStore::new();
    store.set_config(
        Some(EnforcementConfig::default()),
        std::time::Instant::now(),
    );
    let started = Instant::now();
    let write = |line: Value| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&report)
            .expect("report");
        let _ = writeln!(f, "{line}");
    };
    let mut first = true;
    let mut dirty = false;
    while let Some((at, input)) = rx.recv().await {
        dirty |= apply_input(&mut store, at, input);
        while let Ok((at, input)) = rx.try_recv() {
            dirty |= apply_input(&mut store, at, input);
        }
        answer_fetches(&client, &mut store).await;
        if !dirty || store.next_step() != Step::Sync {
            continue;
        }
        dirty = false;
        let t = Instant::now();
        let stats = match enforcer.sync(store.inputs()).await {
            Ok(s) => s,
            Err(e) => {
                write(json!({"event": "error", "error": e.to_string()}));
                continue;
            }
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let pid = std::process::id();
        if first {
            first = false;
            let members: usize = store
                .inputs()
                .peer_sets
                .values()
                .map(|s| s.ips.len() + s.ports.len())
                .sum();
            write(
                json!({"event": "cold", "view_ms": (t - started).as_secs_f64() * 1e3, "apply_ms": ms,
                "endpoints": stats.endpoints, "rules": stats.rules, "sets": stats.sets,
                "peer_sets": store.inputs().peer_sets.len(), "members": members,
                "policies": store.inputs().spec.policies.len(),
                "rss_kib": proc_kib(pid, "VmRSS:"), "hwm_kib": proc_kib(pid, "VmHWM:")}),
            );
        } else {
            write(
                json!({"event": "sync", "apply_ms": ms, "applied": stats.applied,
                "rss_kib": proc_kib(pid, "VmRSS:"), "hwm_kib": proc_kib(pid, "VmHWM:")}),
            );
        }
    }
}

// ----- simulated agents ------------------------------------------------------

/// The agent's watch pipeline and store for one node, in this process.
struct Reader {
    store: PolicyStore,
    rx: mpsc::Receiver<(std::time::Instant, Input)>,
    _watches: tokio::task::JoinSet<()>,
}

impl Reader {
    fn start(client: &Client, node: &str) -> Reader {
        let (tx, rx) = mpsc::channel(8192);
        let metrics = PolicyMetrics::unregistered().unwrap();
        let watches = spawn_watches(client, node, &tx, &metrics);
        let mut store = PolicyStore::new();
        store.set_config(
            Some(EnforcementConfig::default()),
            std::time::Instant::now(),
        );
        Reader {
            store,
            rx,
            _watches: watches,
        }
    }

    /// Applies whatever arrived.
    async fn pump(&mut self, client: &Client) {
        while let Ok((at, input)) = self.rx.try_recv() {
            apply_input(&mut self.store, at, input);
        }
        answer_fetches(client, &mut self.store).await;
    }
}

/// Pumps the readers until `check` holds for reader `i`; returns when.
async fn until(
    client: &Client,
    readers: &mut [Reader],
    i: usize,
    what: &str,
    check: impl Fn(&PolicyStore) -> bool,
) -> Instant {
    let t = Instant::now();
    loop {
        for r in readers.iter_mut() {
            r.pump(client).await;
        }
        if readers[i].store.next_step() == Step::Sync && check(&readers[i].store) {
            return Instant::now();
        }
        if t.elapsed() > Duration::from_secs(600) {
            panic!(
                "timed out waiting for {what}: {:?}",
                readers[i].store.next_step()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn set_has(store: &PolicyStore, ip: &str) -> bool {
    store
        .inputs()
        .peer_sets
        .values()
        .any(|s| s.ips.iter().any(|i| i == ip))
}

// ----- the orchestration --------------------------------------------------------

fn spawn_role(exe: &Path, role: &str, extra: &[&str]) -> Child {
    Command::new(exe)
        .args(["--role", role])
        .args(extra)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn role")
}

struct Metrics(PathBuf);

impl Metrics {
    fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.text(), name, labels)
    }
    fn writes(&self) -> f64 {
        self.get("canal_policy_objects_written_total", &[])
            - self.get("canal_policy_objects_written_total", &[("kind", "Event")])
            - self.get(
                "canal_policy_objects_written_total",
                &[("kind", "CanalNetworkStatus")],
            )
    }
    fn writes_by_kind(&self) -> String {
        ["PeerSet", "PolicyGroup", "NodePolicySet"]
            .iter()
            .map(|k| {
                format!(
                    "{k} {:.0}",
                    self.get("canal_policy_objects_written_total", &[("kind", k)])
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Requests the API server has served (its own counter).
fn apiserver_requests(cp: &ControlPlane) -> f64 {
    let out = cp
        .kubectl()
        .ok()
        .and_then(|mut k| k.args(["get", "--raw", "/metrics"]).output().ok());
    match out {
        Some(o) if o.status.success() => metric(
            &String::from_utf8_lossy(&o.stdout),
            "apiserver_request_total",
            &[],
        ),
        _ => f64::NAN,
    }
}

/// The largest stored object of a kind (JSON as the API returns it).
async fn largest<K>(client: &Client) -> (usize, String, usize)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    let mut lp = ListParams::default().limit(200);
    let (mut best, mut name, mut count) = (0usize, String::new(), 0usize);
    loop {
        let list = api.list(&lp).await.expect("list");
        for o in &list.items {
            count += 1;
            let len = serde_json::to_vec(o).map(|v| v.len()).unwrap_or(0);
            if len > best {
                best = len;
                name = o.meta().name.clone().unwrap_or_default();
            }
        }
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    (best, name, count)
}

/// Waits until the controller wrote what an event needs and writes settle;
/// returns the writes it took.
async fn settle_writes(m: &Metrics, before: f64) -> f64 {
    let mut last = m.writes();
    let mut quiet = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = m.writes();
        if now != last {
            last = now;
            quiet = Instant::now();
        } else if quiet.elapsed() > Duration::from_secs(2) {
            return now - before;
        }
    }
}

async fn orchestrate() {
    let s = shape();
    if !netns::can_run() {
        eprintln!(
            "policy_scale needs root with iptables and ipset (the agent part programs a netns)"
        );
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    println!(
        "canal NetworkPolicy end-to-end scale benchmark (release; real kube-apiserver + etcd, default limits)"
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("  machine load average at start: {}", load.trim());
    }
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    canal_e2e::install::install_crds(&client)
        .await
        .expect("CRDs");
    canal_e2e::install::apply_default_network(
        &client,
        CanalNetworkSpec::with_cluster_cidr(POD_RANGE),
    )
    .await
    .expect("CanalNetwork");
    let pods_total = s.namespaces * 300 + HOT_PODS + s.spare_pods;
    println!(
        "  shape: {} Nodes, {} Namespaces, {pods_total} Pods, {} NetworkPolicies (benchmark (c)'s shape, plus {HOT_PODS} pods on {HOT_NODE} under {HOT_POLICIES} policies)",
        s.nodes,
        s.namespaces + 2,
        s.policy_namespaces * 20 + HOT_POLICIES
    );
    build_cluster(&client, &s).await;

    // The controller.
    let dir = tempfile::tempdir().expect("dir");
    let metrics_file = dir.path().join("controller.metrics");
    let m = Metrics(metrics_file.clone());
    let kubeconfig = cp.kubeconfig();
    let requests_before = apiserver_requests(&cp);
    let started = Instant::now();
    let mut controller = spawn_role(
        &exe,
        "controller",
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap_or_default(),
            "--metrics-file",
            metrics_file.to_str().unwrap_or_default(),
        ],
    );
    let pid = controller.id();
    let mut nps_done: Option<Duration> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if nps_done.is_none()
            && m.get(
                "canal_policy_objects_written_total",
                &[("kind", "NodePolicySet"), ("operation", "apply")],
            ) >= s.nodes as f64
        {
            nps_done = Some(started.elapsed());
        }
        if m.get("canal_policy_syncs_total", &[]) >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "controller never finished"
        );
    }
    let all_done = started.elapsed();
    let requests = apiserver_requests(&cp) - requests_before;
    let cpu = proc_cpu(pid);
    let compile = m.get("canal_policy_compile_duration_seconds_sum", &[]);
    let write_time = m.get("canal_policy_sync_duration_seconds_sum", &[]);
    println!("\ncontroller, cold start to everything written:");
    println!(
        "  every NodePolicySet written after {:.1?}; every object after {all_done:.1?} (compile {compile:.2} s, writing {write_time:.1} s)",
        nps_done.unwrap_or(all_done)
    );
    println!(
        "  objects written: {:.0} ({}), {:.1} MB of request bodies",
        m.writes(),
        m.writes_by_kind(),
        m.get("canal_policy_object_bytes_sum", &[]) / 1e6
    );
    println!(
        "  controller peak RSS (VmHWM) {:.0} MiB, RSS now {:.0} MiB, CPU {cpu:.1} s",
        proc_kib(pid, "VmHWM:") as f64 / 1024.0,
        proc_kib(pid, "VmRSS:") as f64 / 1024.0
    );
    println!(
        "  API requests (all clients, apiserver_request_total): {requests:.0} in {all_done:.1?} = {:.0}/s",
        requests / all_done.as_secs_f64()
    );
    println!(
        "  unwritable objects: {}, unpublished nodes: {}",
        m.get("canal_policy_unwritable_objects", &[]),
        m.get("canal_policy_unpublished_nodes", &[])
    );
    let (nps_b, nps_n, nps_c) = largest::<NodePolicySet>(&client).await;
    let (pg_b, pg_n, pg_c) = largest::<PolicyGroup>(&client).await;
    let (ps_b, ps_n, ps_c) = largest::<PeerSet>(&client).await;
    println!(
        "  stored: {nps_c} NodePolicySets (largest {nps_b} bytes, {nps_n}), {pg_c} PolicyGroup objects (largest {pg_b} bytes, {pg_n}), {ps_c} PeerSet objects (largest {ps_b} bytes, {ps_n})"
    );
    println!(
        "largest object: {} bytes (as stored, metadata included; the bound is {} bytes)",
        nps_b.max(pg_b).max(ps_b),
        canal_crds::MAX_OBJECT_BYTES
    );

    // Four simulated agents: the agent's watches and store.
    let nodes = [HOT_NODE, "node-00001", "node-00002", "node-00003"];
    let t = Instant::now();
    let mut readers: Vec<Reader> = nodes.iter().map(|n| Reader::start(&client, n)).collect();
    for i in 0..readers.len() {
        until(&client, &mut readers, i, "first consistent view", |_| true).await;
    }
    println!(
        "\nsimulated agents ({}): every one has a consistent view {:.1?} after its watches start",
        nodes.len(),
        t.elapsed()
    );
    let restarts = m.writes();

    // One pod add on node-00001, app-1 of ns-001: its NodePolicySet, and
    // the set "ns-001 app=app-1" node-00002 uses (it hosts ns-001/app-0-0,
    // which allow-app-0 admits app-1 to).
    let before = m.writes();
    let new_ip = ip(900_001);
    let (obj, _) = c_pod("ns-001", 1, 99, "node-00001", 900_001);
    let t0 = Instant::now();
    create_pod(client.clone(), obj, new_ip.clone()).await;
    let created = t0.elapsed();
    let own = until(
        &client,
        &mut readers,
        1,
        "the new endpoint on node-00001",
        |st| {
            st.inputs()
                .spec
                .endpoints
                .iter()
                .any(|e| e.pod == "app-1-99" && !e.ips.is_empty())
        },
    )
    .await;
    let peer = until(
        &client,
        &mut readers,
        2,
        "the new member on node-00002",
        |st| set_has(st, &new_ip),
    )
    .await;
    let writes = settle_writes(&m, before).await;
    println!(
        "one pod add (create + status {:.0} ms): its node's view updated {:.0} ms, a node using its PeerSet {:.0} ms after the create; {writes:.0} writes",
        created.as_secs_f64() * 1e3,
        (own - t0).as_secs_f64() * 1e3,
        (peer - t0).as_secs_f64() * 1e3,
    );

    // One label change: ns-001/app-1-99 becomes app-5: out of the set node-00002 uses.
    let before = m.writes();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns-001");
    let t = Instant::now();
    pods.patch(
        "app-1-99",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "app-5", "tier": "api"}}})),
    )
    .await
    .unwrap();
    let gone = until(
        &client,
        &mut readers,
        2,
        "the member gone on node-00002",
        |st| !set_has(st, &new_ip),
    )
    .await;
    let writes = settle_writes(&m, before).await;
    println!(
        "one label change: a node using the PeerSet it left updated {:.0} ms after the patch; {writes:.0} writes",
        (gone - t).as_secs_f64() * 1e3
    );

    // One policy add in ns-001 on app-0 (the selector of allow-app-0): the
    // group, its new PeerSet, and the NodePolicySets of app-0's nodes.
    let before = m.writes();
    let mut p = app_policy("ns-001", "extra-policy", 0, 9);
    p["spec"]["ingress"][0]["from"] = json!([{"podSelector": {"matchLabels": {"app": "app-9"}}}]);
    let t = Instant::now();
    apply_policy(&client, &p).await;
    let added = until(
        &client,
        &mut readers,
        2,
        "the new policy on node-00002",
        |st| {
            st.inputs()
                .spec
                .policies
                .iter()
                .any(|p| p.name == "ns-001/extra-policy")
        },
    )
    .await;
    let writes = settle_writes(&m, before).await;
    println!(
        "one policy add: a node it selects pods on updated {:.0} ms after the apply; {writes:.0} writes",
        (added - t).as_secs_f64() * 1e3
    );
    let _ = restarts;
    drop(readers);

    // The hot agent in its own process.
    let report = dir.path().join("agent.jsonl");
    let mut agent = spawn_role(
        &exe,
        "agent",
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap_or_default(),
            "--report",
            report.to_str().unwrap_or_default(),
            "--node",
            HOT_NODE,
        ],
    );
    let agent_pid = agent.id();
    let read_report = || -> Vec<Value> {
        std::fs::read_to_string(&report)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let t = Instant::now();
    let cold = loop {
        if let Some(c) = read_report().into_iter().find(|e| e["event"] == "cold") {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "the agent never synced: {:?}",
            read_report()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "\nagent on {HOT_NODE} at {} nodes ({} local pods, {} policies, {} PeerSets with {} members; {} rules, {} sets):",
        s.nodes,
        cold["endpoints"],
        cold["policies"],
        cold["peer_sets"],
        cold["members"],
        cold["rules"],
        cold["sets"]
    );
    println!(
        "  first consistent view {:.0} ms after start; cold apply {:.0} ms; RSS {:.0} MiB",
        cold["view_ms"].as_f64().unwrap_or(f64::NAN),
        cold["apply_ms"].as_f64().unwrap_or(f64::NAN),
        cold["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0
    );
    // Incremental: pods come and go in a prod namespace (the every-prod-web
    // set) and a team namespace, as a busy cluster would.
    let changes = env_usize("SCALE_CHANGES", 60);
    for i in 0..changes {
        let ns = if i % 2 == 0 { "ns-000" } else { "ns-001" };
        let name = format!("churn-{i}");
        if i % 3 == 2 {
            let _ = Api::<Pod>::namespaced(client.clone(), "ns-000")
                .delete(
                    &format!("churn-{}", i - 2),
                    &kube::api::DeleteParams::default().grace_period(0),
                )
                .await;
        } else {
            let (obj, _) = c_pod(ns, 0, 1000 + i, "node-00004", 950_000 + i);
            let mut obj = obj;
            obj["metadata"]["name"] = json!(name);
            create_pod(client.clone(), obj, ip(950_000 + i)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = read_report();
    let mut syncs: Vec<f64> = events
        .iter()
        .filter(|e| e["event"] == "sync" && e["applied"] == true)
        .filter_map(|e| e["apply_ms"].as_f64())
        .collect();
    let n = syncs.len();
    println!(
        "  incremental apply over {n} syncs ({changes} pod changes in sets it uses): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(&mut syncs, 0.5),
        pct(&mut syncs, 0.99),
        pct(&mut syncs, 1.0)
    );
    println!(
        "  agent RSS {:.0} MiB, peak {:.0} MiB",
        proc_kib(agent_pid, "VmRSS:") as f64 / 1024.0,
        proc_kib(agent_pid, "VmHWM:") as f64 / 1024.0
    );
    if let Some(e) = events.iter().find(|e| e["event"] == "error") {
        println!("  agent errors: {e}");
    }
    let _ = agent.kill();
    let _ = agent.wait();
    // SIGKILL skips the agent's own cleanup: remove the namespace it made
    // (`Netns::new("scale-agent")`, the first of its process).
    let _ = Command::new("ip")
        .args(["netns", "del", &format!("scale-agent-{agent_pid}-0")])
        .output();
    let _ = controller.kill();
    let _ = controller.wait();
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("  machine load average at the end: {}", load.trim());
    }
    drop(cp);
}
