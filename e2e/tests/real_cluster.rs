//! canal on a real cluster: real kubelets, containerd and kube-proxy in the
//! lab's node namespaces, canal installed with `helm install` of the chart
//! on nodes without any CNI configuration (`canal-lab up --kubelet`).
//!
//! Two labs, one after the other (each test holds [`SERIAL`]): the first
//! goes from nothing to traffic, policy, a rolling `helm upgrade` and
//! `helm uninstall`; the second breaks a node in the ways a real one
//! breaks (its agent pod deleted, kubelet and containerd restarted, a pod's
//! sandbox killed) and ends with a `down` after a simulated crash. Needs
//! root. Figures (bring-up, pods Ready, roll) go to stderr
//! (`cargo test --test real_cluster -- --nocapture`).

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use canal_e2e::lab::{StateDir, netns};
use canal_e2e::realnode::cgroups::LabCgroups;
use canal_e2e::realnode::enter::{Mounts, NodeEntry};
use canal_e2e::realnode::images::agnhost_reference;
use canal_e2e::realnode::{RealLab, RealUpOptions, canal, teardown};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};

/// One real-kubelet lab at a time: each is two to three kubelets, a
/// control plane and canal, on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NS: &str = "canal-e2e";
const TIMEOUT: Duration = Duration::from_secs(180);

/// A pod running `agnhost netexec` (HTTP 8080: /hostname, /clientip) on
/// `node`, labelled `app=<app>`, with the shell `command` replacing netexec
/// when set.
fn pod_yaml(name: &str, node: &str, app: &str, command: Option<&str>) -> String {
    let image = agnhost_reference();
    // Servers restart as any pod would (kubelet recreates a dead sandbox
    // only then); a scripted pod must not: its exit is the failure.
    let restart = if command.is_some() { "Never" } else { "Always" };
    let container = match command {
        Some(cmd) => format!(
            "command: [\"/bin/sh\", \"-c\"]\n      args: [{}]",
            serde_json::to_string(cmd).unwrap()
        ),
        None => "args: [\"netexec\", \"--http-port=8080\", \"--udp-port=8081\"]".to_string(),
    };
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NS}
  labels: {{app: {app}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  restartPolicy: {restart}
  containers:
    - name: main
      image: {image}
      imagePullPolicy: Never
      {container}
      ports: [{{containerPort: 8080}}]
"
    )
}

async fn start_pods(lab: &RealLab, pods: &[(&str, &str, &str, Option<&str>)]) {
    let yaml: Vec<String> = pods
        .iter()
        .map(|(name, node, app, cmd)| pod_yaml(name, node, app, *cmd))
        .collect();
    lab.apply(&yaml.join("---\n")).expect("pods created");
    for (name, ..) in pods {
        lab.wait_pod_ready(NS, name, TIMEOUT)
            .await
            .expect("pod Ready");
    }
}

/// `curl` from a pod; Ok(body) or Err(why).
fn curl(lab: &RealLab, from: &str, url: &str, timeout_s: f32) -> Result<String, String> {
    lab.exec(
        NS,
        from,
        &["curl", "-sS", "--max-time", &timeout_s.to_string(), url],
    )
    .map_err(|e| e.to_string())
}

/// Waits until `check` holds, polling every 200 ms; the last value on timeout.
async fn eventually<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        let v = probe();
        if check(&v) {
            return (v, start.elapsed());
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: not within {timeout:?}, last: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An HTTP GET of `path` on `ip:8080` from inside the node namespace `netns`.
fn http_from_node(netns_name: &str, ip: Ipv4Addr, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let path = path.to_string();
    netns::run_in(netns_name, move || {
        let addr = SocketAddr::from((ip, 8080));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// HTTP GETs of `/hostname` on `ip` from the node namespace `netns`,
/// every 100 ms on a thread of its own until [`Prober::finish`]: pod
/// traffic with no kubelet or exec on its path.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Prober {
    fn start(netns_name: String, ip: Ipv4Addr, expect: &'static str) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                let t = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match http_from_node(&netns_name, ip, "/hostname") {
                        Ok(r) if body(&r) == expect => ok += 1,
                        other => {
                            failed.push(format!("+{:.1}s: {other:?}", t.elapsed().as_secs_f32()))
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                (ok, failed)
            })
        };
        Prober { stop, thread }
    }

    /// The probes that succeeded and the failures, each with its time.
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("prober thread")
    }
}

/// Whether a `kubectl exec` error is curl's own failure (the pod's traffic
/// failed) rather than exec's (kubelet busy or restarting).
fn curl_failed(error: &str) -> bool {
    error.contains("command terminated with exit code")
}

fn body(response: &str) -> &str {
    response.split("\r\n\r\n").nth(1).unwrap_or("").trim()
}

/// The agent DaemonSet's pods by node.
async fn agents(lab: &RealLab) -> BTreeMap<String, Pod> {
    Api::<Pod>::namespaced(lab.client(), canal::NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .expect("list agents")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            (
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                p,
            )
        })
        .collect()
}

/// Waits until the agent DaemonSet has rolled out its current generation
/// on every node.
async fn wait_agent_rollout(lab: &RealLab, timeout: Duration) -> Duration {
    let api: Api<DaemonSet> = Api::namespaced(lab.client(), canal::NAMESPACE);
    let start = Instant::now();
    loop {
        let ds = api.get("canal-agent").await.expect("DaemonSet");
        let generation = ds.metadata.generation.unwrap_or_default();
        let s = ds.status.expect("status");
        if s.observed_generation == Some(generation)
            && s.updated_number_scheduled == Some(s.desired_number_scheduled)
            && s.number_ready == s.desired_number_scheduled
            && s.number_unavailable.unwrap_or(0) == 0
        {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "agent rollout stuck: {s:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// From nothing to a working cluster, then what users do with it: traffic
/// of every kind, a NetworkPolicy, a rolling upgrade under load, uninstall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_nothing_to_traffic_policy_upgrade_and_uninstall() {
    let _serial = SERIAL.lock().await;
    let host_before = HostSnapshot::take();
    let started = Instant::now();
    let lab = RealLab::up(
        RealLab::test_state_dir("cluster"),
        RealUpOptions {
            nodes: 3,
            ..RealUpOptions::default()
        },
    )
    .await
    .expect("real-kubelet lab with canal comes up");
    let up = started.elapsed();
    lab.kubectl_ok(&["create", "namespace", NS])
        .expect("namespace");

    // Pods Ready on every node.
    let t = Instant::now();
    start_pods(
        &lab,
        &[
            ("server-1", "node-1", "server", None),
            ("server-2", "node-2", "server", None),
            ("server-3", "node-3", "server", None),
            ("client-1", "node-1", "client", None),
        ],
    )
    .await;
    let pods_ready = t.elapsed();
    let logs = lab
        .kubectl_ok(&["logs", "-n", NS, "server-2"])
        .expect("kubectl logs");
    assert!(
        logs.contains("8080"),
        "netexec's log names its port: {logs}"
    );
    eprintln!(
        "real cluster: nothing -> 3 Ready nodes with canal in {:.1}s; then a pod Ready on every node in {:.1}s",
        up.as_secs_f64(),
        pods_ready.as_secs_f64()
    );

    // Pod <-> pod across nodes, both ways (the answer names the peer).
    let mut ips = BTreeMap::new();
    for p in ["server-1", "server-2", "server-3", "client-1"] {
        ips.insert(p, lab.pod_ip(NS, p).await.expect("pod IP"));
    }
    for target in ["server-2", "server-3"] {
        let got = curl(
            &lab,
            "client-1",
            &format!("http://{}:8080/hostname", ips[target]),
            3.0,
        )
        .expect("cross-node pod -> pod");
        assert_eq!(got.trim(), target);
        let seen = curl(
            &lab,
            target,
            &format!("http://{}:8080/clientip", ips["client-1"]),
            3.0,
        )
        .expect("cross-node pod -> pod, reverse");
        assert!(
            seen.starts_with(&ips[target].to_string()),
            "{target} seen as {seen}: no NAT between pods"
        );
    }

    // Node -> pod (a node's own address space reaches pods on it and on others).
    let node1 = lab.node("node-1").expect("node-1");
    for target in ["server-1", "server-2"] {
        let resp = http_from_node(&node1.netns, ips[target], "/hostname").expect("node -> pod");
        assert_eq!(body(&resp), target, "{resp}");
    }

    // Pod -> ClusterIP Service (kube-proxy's DNAT, then canal's overlay).
    lab.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: servers, namespace: {NS}}}\nspec:\n  selector: {{app: server}}\n  ports: [{{port: 80, targetPort: 8080}}]\n"
    ))
    .expect("Service");
    let cluster_ip = lab
        .kubectl_ok(&[
            "get",
            "svc",
            "-n",
            NS,
            "servers",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .expect("ClusterIP");
    let mut seen = std::collections::BTreeSet::new();
    let (_, _) = eventually(
        "the Service to reach every backend",
        Duration::from_secs(60),
        || {
            if let Ok(name) = curl(
                &lab,
                "client-1",
                &format!("http://{cluster_ip}/hostname"),
                2.0,
            ) {
                seen.insert(name.trim().to_string());
            }
            seen.len()
        },
        |n| *n == 3,
    )
    .await;

    // Pod -> outside: the internet host sees the node's address (masquerade).
    let answer = lab
        .exec(
            NS,
            "client-1",
            &[
                "bash",
                "-c",
                "exec 3<>/dev/tcp/198.18.0.1/80; echo 'PROBE m1' >&3; head -1 <&3",
            ],
        )
        .expect("pod -> outside");
    assert!(
        answer
            .trim()
            .starts_with(&format!("OK m1 {}:", node1.address)),
        "the internet host saw {answer:?}, not node-1's address {}",
        node1.address
    );

    // kubelet, containerd and kube-proxy have run for a while, canal is
    // installed: the machine's own network, sysctls and mounts are as before.
    host_before.assert_same(&HostSnapshot::take(), "with the cluster running");

    // A NetworkPolicy enforced and lifted.
    let url2 = format!("http://{}:8080/hostname", ips["server-2"]);
    lab.apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny-servers, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n"
    ))
    .expect("NetworkPolicy");
    let (_, enforced) = eventually(
        "the deny policy to block client-1 -> server-2",
        Duration::from_secs(30),
        || curl(&lab, "client-1", &url2, 1.0),
        Result::is_err,
    )
    .await;
    lab.kubectl_ok(&["delete", "networkpolicy", "-n", NS, "deny-servers"])
        .expect("policy deleted");
    let (_, lifted) = eventually(
        "client-1 -> server-2 to work again",
        Duration::from_secs(30),
        || curl(&lab, "client-1", &url2, 1.0),
        Result::is_ok,
    )
    .await;
    eprintln!(
        "real cluster: NetworkPolicy enforced after {:.1}s, lifted after {:.1}s (probe round trips included)",
        enforced.as_secs_f64(),
        lifted.as_secs_f64()
    );

    // helm upgrade rolling the agents while a cross-node TCP stream runs and
    // a denied pod keeps knocking.
    start_pods(
        &lab,
        &[
            ("sink", "node-3", "sink", Some("nc -l -k 9000 > /tmp/recv")),
            ("protected", "node-2", "protected", None),
        ],
    )
    .await;
    let sink_ip = lab.pod_ip(NS, "sink").await.expect("sink IP");
    let protected_ip = lab.pod_ip(NS, "protected").await.expect("protected IP");
    start_pods(
        &lab,
        &[
            (
                "stream",
                "node-1",
                "stream",
                Some(&format!(
                    "i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done | nc {sink_ip} 9000; echo stream-ended >&2; exit 1"
                )),
            ),
            (
                "intruder",
                "node-1",
                "intruder",
                Some(&format!(
                    "while :; do if [ -f /tmp/go ]; then if curl -s --max-time 0.3 http://{protected_ip}:8080/hostname >/dev/null; then echo LEAK; else echo blocked; fi >> /tmp/probes; else sleep 0.1; fi; done"
                )),
            ),
        ],
    )
    .await;
    lab.apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny-intruder, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{app: protected}}}}\n  policyTypes: [Ingress]\n  ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n"
    ))
    .expect("deny-intruder");
    let protected_url = format!("http://{protected_ip}:8080/hostname");
    let _ = eventually(
        "the intruder to be blocked",
        Duration::from_secs(30),
        || curl(&lab, "intruder", &protected_url, 1.0),
        Result::is_err,
    )
    .await;
    curl(&lab, "client-1", &protected_url, 2.0)
        .expect("the allowed client still reaches protected");
    lab.exec(NS, "intruder", &["touch", "/tmp/go"])
        .expect("start knocking");
    let received = |lab: &RealLab| -> u64 {
        lab.exec(NS, "sink", &["sh", "-c", "tail -n 1 /tmp/recv"])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let before_roll = received(&lab);
    let agents_before: Vec<String> = agents(&lab)
        .await
        .values()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    let roll = Instant::now();
    let image = lab.record().canal_image.clone();
    canal::upgrade(
        lab.state(),
        &image,
        &[
            "--set-string".into(),
            "agent.podAnnotations.canal-e2e/rollout=1".into(),
        ],
    )
    .expect("helm upgrade");
    let rolled = wait_agent_rollout(&lab, TIMEOUT).await;
    let agents_after = agents(&lab).await;
    assert!(
        agents_after
            .values()
            .all(|p| !agents_before.contains(p.metadata.uid.as_ref().unwrap())),
        "every agent pod was replaced"
    );
    // Let the stream run on the new agents for a moment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    lab.exec(NS, "intruder", &["rm", "/tmp/go"])
        .expect("stop knocking");
    let probes = lab
        .exec(NS, "intruder", &["cat", "/tmp/probes"])
        .expect("probe log");
    let leaks = probes.lines().filter(|l| *l == "LEAK").count();
    let blocked = probes.lines().filter(|l| *l == "blocked").count();
    let after_roll = received(&lab);
    let recv = lab
        .exec(NS, "sink", &["cat", "/tmp/recv"])
        .expect("received stream");
    let numbers: Vec<u64> = recv.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let contiguous = numbers.iter().enumerate().all(|(i, n)| *n == i as u64);
    let stream_pod = Api::<Pod>::namespaced(lab.client(), NS)
        .get("stream")
        .await
        .expect("stream pod");
    let stream_running =
        stream_pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    eprintln!(
        "real cluster: helm upgrade rolled {} agents in {:.1}s (since upgrade {:.1}s); stream {} -> {} lines, contiguous {contiguous}; intruder probes during the roll: {blocked} blocked, {leaks} leaked",
        agents_after.len(),
        rolled.as_secs_f64(),
        roll.elapsed().as_secs_f64(),
        before_roll,
        after_roll
    );
    assert_eq!(
        leaks, 0,
        "packets leaked through a deny during the roll:\n{probes}"
    );
    assert!(
        blocked > 20,
        "the intruder barely probed ({blocked}): the check proves nothing"
    );
    assert!(
        stream_running,
        "the TCP stream broke during the roll: {:?}",
        stream_pod.status
    );
    assert!(
        contiguous && !numbers.is_empty(),
        "the stream lost or reordered data"
    );
    assert!(
        after_roll > before_roll + 20,
        "the stream stalled: {before_roll} -> {after_roll}"
    );

    // helm uninstall as the README says: canal's objects go, the CRDs, the
    // podCIDRs and the nodes' CNI files stay, running pods keep their network.
    canal::uninstall(lab.state()).expect("helm uninstall");
    eventually(
        "the controller and agents to be gone",
        Duration::from_secs(60),
        || {
            lab.kubectl_ok(&[
                "get",
                "pods",
                "-n",
                canal::NAMESPACE,
                "-l",
                canal::SELECTOR,
                "-o",
                "name",
            ])
            .unwrap_or_else(|e| e.to_string())
        },
        |s| s.trim().is_empty(),
    )
    .await;
    eventually(
        "NodePolicySets and PeerSets garbage-collected",
        Duration::from_secs(60),
        || {
            lab.kubectl_ok(&["get", "nodepolicysets,peersets", "-o", "name"])
                .unwrap_or_else(|e| e.to_string())
        },
        |s| s.trim().is_empty(),
    )
    .await;
    assert!(
        lab.kubectl_ok(&["get", "canalnetwork", "default"]).is_err(),
        "CanalNetwork default removed"
    );
    let crds = lab.kubectl_ok(&["get", "crd", "-o", "name"]).expect("crds");
    for crd in [
        "canalnetworks.canal.dev",
        "nodepolicysets.canal.dev",
        "peersets.canal.dev",
    ] {
        assert!(crds.contains(crd), "CRD {crd} kept: {crds}");
    }
    let cidr = lab
        .kubectl_ok(&["get", "node", "node-1", "-o", "jsonpath={.spec.podCIDR}"])
        .expect("podCIDR");
    assert!(!cidr.is_empty(), "node-1 keeps its podCIDR");
    let conflist = lab
        .paths()
        .node("node-1")
        .dir
        .join("root/etc-cni-net.d/10-canal.conflist");
    assert!(conflist.exists(), "the node's CNI configuration stays");
    let got = curl(&lab, "client-1", &url2, 3.0).expect("pods keep their network after uninstall");
    assert_eq!(got.trim(), "server-2");

    let state = lab.state().clone();
    let bin = lab.paths().bin();
    let cgroups: LabCgroups =
        canal_e2e::lab::state::read_json(&lab.paths().cgroups()).expect("cgroups.json");
    let removed = lab.down();
    assert!(removed.failures.is_empty(), "down: {:?}", removed.failures);
    let left = support::leftovers(&state);
    assert!(left.is_empty(), "left behind: {left:?}");
    host_before.assert_same(&HostSnapshot::take(), "after down");
    assert!(
        teardown::by_executable(&bin).is_empty(),
        "processes of the lab's binaries remain"
    );
    assert!(
        cgroups
            .hierarchies
            .iter()
            .all(|h| !h.dir(&cgroups.base).exists()),
        "the lab's cgroups were not removed"
    );
}

/// What happens to nodes in production: an agent pod deleted, kubelet and
/// containerd restarted, a pod's sandbox killed; then a crash-style `down`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_survives_agent_deletion_runtime_restarts_and_sandbox_kills() {
    let _serial = SERIAL.lock().await;
    let lab = RealLab::up(
        RealLab::test_state_dir("node"),
        RealUpOptions {
            nodes: 2,
            ..RealUpOptions::default()
        },
    )
    .await
    .expect("real-kubelet lab with canal comes up");
    lab.kubectl_ok(&["create", "namespace", NS])
        .expect("namespace");
    start_pods(
        &lab,
        &[
            ("server", "node-2", "server", None),
            ("client", "node-1", "client", None),
        ],
    )
    .await;
    let server_ip = lab.pod_ip(NS, "server").await.expect("server IP");
    let client_ip = lab.pod_ip(NS, "client").await.expect("client IP");
    let node2 = lab.node("node-2").expect("node-2").netns;
    let url = format!("http://{server_ip}:8080/hostname");
    curl(&lab, "client", &url, 3.0).expect("baseline");

    // 1. The agent pod of node-1 deleted: traffic keeps flowing meanwhile,
    // the DaemonSet recreates it, and new pods on node-1 get a network.
    let old = agents(&lab)
        .await
        .remove("node-1")
        .expect("agent on node-1");
    let api: Api<Pod> = Api::namespaced(lab.client(), canal::NAMESPACE);
    api.delete(
        old.metadata.name.as_deref().unwrap(),
        &DeleteParams::default(),
    )
    .await
    .expect("agent deleted");
    // Both directions: node-2 into node-1's pod (no kubelet on the path),
    // and node-1's pod out to node-2 (through exec, whose own failures
    // while kubelet replaces the agent pod are not the network's).
    let prober = Prober::start(node2.clone(), client_ip, "client");
    let (mut failures, mut exec_errors) = (Vec::new(), Vec::new());
    let mut probes = 0;
    let t = Instant::now();
    loop {
        probes += 1;
        match curl(&lab, "client", &url, 2.0) {
            Ok(_) => {}
            Err(e) if curl_failed(&e) => {
                failures.push(format!("+{:.1}s: {e}", t.elapsed().as_secs_f32()))
            }
            Err(e) => exec_errors.push(format!("+{:.1}s: {e}", t.elapsed().as_secs_f32())),
        }
        let current = agents(&lab).await;
        let replaced = current
            .get("node-1")
            .is_some_and(|p| p.metadata.uid != old.metadata.uid && canal::pod_ready(p));
        if replaced {
            break;
        }
        assert!(t.elapsed() < TIMEOUT, "node-1's agent was not recreated");
    }
    let (inbound_ok, inbound_failed) = prober.finish();
    eprintln!(
        "real cluster: agent of node-1 replaced in {:.1}s; node-1 pod -> node-2: {probes} probes, {} failed, {} exec errors; node-2 -> node-1 pod: {inbound_ok} ok, {} failed",
        t.elapsed().as_secs_f32(),
        failures.len(),
        exec_errors.len(),
        inbound_failed.len()
    );
    assert!(
        failures.is_empty() && inbound_failed.is_empty() && inbound_ok > 0,
        "pod traffic failed while the agent was away:\n  outbound ({probes} probes): {failures:?}\n  inbound ({inbound_ok} ok): {inbound_failed:?}\n  (exec errors, not counted: {exec_errors:?})"
    );
    assert!(
        exec_errors.len() < probes,
        "no probe from node-1's pod ran: {exec_errors:?}"
    );
    start_pods(&lab, &[("after-agent", "node-1", "client", None)]).await;
    curl(&lab, "after-agent", &url, 3.0).expect("a new pod on node-1 reaches node-2");

    // 2. kubelet and containerd of node-1 restarted: pods keep running and
    // keep their network; the node comes back Ready; new pods work.
    let before: Pod = Api::<Pod>::namespaced(lab.client(), NS)
        .get("client")
        .await
        .unwrap();
    // node-2 probes node-1's pod all along (no kubelet on that path).
    let prober = Prober::start(node2.clone(), client_ip, "client");
    lab.restart_kubelet_and_containerd("node-1", TIMEOUT)
        .await
        .expect("kubelet and containerd restart");
    // kubelet takes a moment to know its pods again (exec needs it).
    let (_, back) = eventually(
        "kubectl exec into node-1's pod after the restart",
        TIMEOUT,
        || curl(&lab, "client", &url, 3.0),
        Result::is_ok,
    )
    .await;
    let (ok, failed) = prober.finish();
    eprintln!(
        "real cluster: kubelet + containerd of node-1 restarted; exec works again after {:.1}s; node-2 -> node-1 pod: {ok} ok, {} failed",
        back.as_secs_f64(),
        failed.len()
    );
    assert!(
        ok > 10 && failed.is_empty(),
        "node-1's pod lost its network during the restart: {failed:?}"
    );
    let after: Pod = Api::<Pod>::namespaced(lab.client(), NS)
        .get("client")
        .await
        .unwrap();
    let restarts = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|c| c.iter().map(|c| c.restart_count).sum::<i32>())
    };
    assert_eq!(
        restarts(&before),
        restarts(&after),
        "the client container was not restarted"
    );
    start_pods(&lab, &[("after-restart", "node-1", "client", None)]).await;
    curl(&lab, "after-restart", &url, 3.0).expect("a pod started after the restart works");

    // 3. A pod's sandbox killed: kubelet makes a new one (ADD for a new
    // container id); the old sandbox's DEL, as containerd sends it when the
    // old sandbox is stopped (again), must leave the new one alone.
    start_pods(&lab, &[("victim", "node-1", "server", None)]).await;
    let node1 = lab.node("node-1").expect("node-1");
    let ctx = lab.node_context().expect("node context");
    let sandbox_of = |pod: &str| -> Vec<String> {
        ctx.ctr(
            &node1,
            &[
                "containers",
                "ls",
                "-q",
                // One filter, its conditions joined by ',' (AND; separate filters OR).
                &format!(
                    "labels.\"io.kubernetes.pod.name\"=={pod},labels.\"io.cri-containerd.kind\"==sandbox"
                ),
            ],
        )
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
    };
    let old_sandboxes = sandbox_of("victim");
    assert_eq!(old_sandboxes.len(), 1, "one sandbox: {old_sandboxes:?}");
    let old_id = old_sandboxes[0].clone();
    ctx.ctr(&node1, &["tasks", "kill", "-s", "SIGKILL", &old_id])
        .expect("sandbox killed");
    let t = Instant::now();
    let new_ip = loop {
        let fresh = sandbox_of("victim").iter().any(|i| *i != old_id);
        if fresh
            && let Ok(ip) = lab.pod_ip(NS, "victim").await
            && curl(&lab, "client", &format!("http://{ip}:8080/hostname"), 1.0).is_ok()
        {
            break ip;
        }
        assert!(
            t.elapsed() < TIMEOUT,
            "kubelet did not recreate the killed sandbox of victim (sandboxes {:?})",
            sandbox_of("victim")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let recreated = t.elapsed();
    eprintln!(
        "real cluster: killed sandbox replaced, pod serving again at {new_ip} after {:.1}s",
        recreated.as_secs_f64()
    );
    // The old sandbox's DEL: canal's conflist chain in reverse (portmap,
    // then canal-cni), the old container id, its network namespace gone.
    let conflist: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            lab.paths()
                .node("node-1")
                .dir
                .join("root/etc-cni-net.d/10-canal.conflist"),
        )
        .expect("conflist"),
    )
    .expect("conflist JSON");
    let holder: i32 = std::fs::read_to_string(lab.paths().node("node-1").pid("holder"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let victim_uid = Api::<Pod>::namespaced(lab.client(), NS)
        .get("victim")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    for plugin in conflist["plugins"].as_array().unwrap().iter().rev() {
        let mut conf = plugin.clone();
        conf["name"] = conflist["name"].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        let kind = conf["type"].as_str().unwrap().to_string();
        let entry = NodeEntry::open(&node1.netns, Mounts::Of(holder), &[]).expect("enter node-1");
        let mut cmd = std::process::Command::new(format!("/opt/cni/bin/{kind}"));
        cmd.env_clear()
            .env("CNI_COMMAND", "DEL")
            .env("CNI_CONTAINERID", &old_id)
            .env("CNI_NETNS", "")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE={NS};K8S_POD_NAME=victim;K8S_POD_INFRA_CONTAINER_ID={old_id};K8S_POD_UID={victim_uid};IgnoreUnknown=1"),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        entry.apply(&mut cmd);
        let mut child = cmd.spawn().expect("CNI plugin runs");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "DEL of the old sandbox by {kind} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_del = curl(
        &lab,
        "client",
        &format!("http://{new_ip}:8080/hostname"),
        3.0,
    );
    let routes = netns::ip(&[
        "-n",
        &node1.netns,
        "-4",
        "route",
        "show",
        &format!("{new_ip}/32"),
    ])
    .unwrap_or_default();
    // Judged after the crash-style `down` below, so that runs either way.
    let sandbox_verdict = (after_del.is_ok() && !routes.trim().is_empty()).then_some(()).ok_or_else(|| {
        format!(
            "the old sandbox's DEL (container id {old_id}) broke the new sandbox of the same pod: \
             reach {new_ip}: {after_del:?}; node-1's route to it: {routes:?}"
        )
    });

    // 4. A crash: the pid files are gone; `down` still finds and removes
    // everything (by executable path, cgroup and namespace).
    let state: StateDir = lab.state().clone();
    let bin = lab.paths().bin();
    let cgroups: LabCgroups =
        canal_e2e::lab::state::read_json(&lab.paths().cgroups()).expect("cgroups.json");
    for entry in walk_pid_files(&state.dir) {
        let _ = std::fs::remove_file(entry);
    }
    let removed = lab.down();
    assert!(removed.failures.is_empty(), "down: {:?}", removed.failures);
    let left = support::leftovers(&state);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        teardown::by_executable(&bin).is_empty(),
        "processes of the lab's binaries remain"
    );
    let cgroups_left: Vec<_> = cgroups
        .hierarchies
        .iter()
        .map(|h| h.dir(&cgroups.base))
        .filter(|d| d.exists())
        .collect();
    assert!(
        cgroups_left.is_empty(),
        "cgroups left behind: {cgroups_left:?}"
    );

    if let Err(why) = sandbox_verdict {
        panic!("{why}");
    }
}

/// What the lab must never change on the machine itself: the root
/// namespace's iptables, addresses and routes, the machine-wide sysctls
/// kubelet and kube-proxy care about, and its mounts.
#[derive(Debug, PartialEq)]
struct HostSnapshot {
    iptables: String,
    addresses: String,
    routes: String,
    sysctls: Vec<(String, String)>,
    mounts: Vec<String>,
}

impl HostSnapshot {
    fn take() -> HostSnapshot {
        let run = |cmd: &str, args: &[&str]| {
            let out = std::process::Command::new(cmd)
                .args(args)
                .output()
                .expect(cmd);
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        // Packet counters change with any traffic; the rules must not.
        let iptables = run("iptables-save", &[])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let sysctls = [
            "vm/overcommit_memory",
            "vm/panic_on_oom",
            "kernel/panic",
            "kernel/panic_on_oops",
            "kernel/keys/root_maxkeys",
            "kernel/keys/root_maxbytes",
            "net/netfilter/nf_conntrack_max",
            "net/ipv4/ip_forward",
            "net/ipv4/conf/all/route_localnet",
            "net/bridge/bridge-nf-call-iptables",
        ]
        .iter()
        .map(|k| {
            (
                k.to_string(),
                std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap_or_default(),
            )
        })
        .collect();
        // Other labs on the machine add and remove named network namespaces.
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| !m.starts_with("/run/netns/"))
            .collect();
        mounts.sort();
        HostSnapshot {
            iptables,
            addresses: run("ip", &["-br", "addr"]),
            routes: run("ip", &["route"]),
            sysctls,
            mounts,
        }
    }

    fn assert_same(&self, now: &HostSnapshot, when: &str) {
        assert_eq!(
            self.iptables, now.iptables,
            "root namespace iptables changed {when}"
        );
        // Other tests on the machine may add links of their own for a moment:
        // the machine's interfaces are compared, and none of ours may appear.
        for line in self.addresses.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let after = now
                .addresses
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name));
            assert_eq!(
                Some(line),
                after,
                "root namespace interface {name} changed {when}"
            );
        }
        let ours: Vec<&str> = now
            .addresses
            .lines()
            .filter(|l| l.contains("flannel") || l.contains("172.30.") || l.contains("10.244."))
            .collect();
        assert!(
            ours.is_empty(),
            "lab links in the root namespace {when}: {ours:?}"
        );
        assert_eq!(
            self.routes, now.routes,
            "root namespace routes changed {when}"
        );
        assert_eq!(
            self.sysctls, now.sysctls,
            "machine-wide sysctls changed {when}"
        );
        assert_eq!(
            self.mounts, now.mounts,
            "the machine's mounts changed {when}"
        );
    }
}

fn walk_pid_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            if p.file_name()
                .is_some_and(|n| n == "root" || n == "fs" || n == "etcd-data")
            {
                continue;
            }
            out.extend(walk_pid_files(&p));
        } else if p.extension().is_some_and(|x| x == "pid") {
            out.push(p);
        }
    }
    out
}
