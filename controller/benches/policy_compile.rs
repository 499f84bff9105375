//! Benchmark of the NetworkPolicy compiler on synthetic clusters.
//!
//! `cargo bench -p canal-controller --bench policy_compile [-- a b c]`
//!
//! Each scenario runs in its own process (this binary re-executes itself)
//! so peak memory (VmHWM) is per scenario. Scenarios:
//!
//! - a: 25,000 namespaces / 100,000 pods / 75,000 policies, Antrea's
//!   `getXLargeScaleWithSmallNamespaces` shape (per namespace: a default
//!   deny-all, two policies each selecting two pods and allowing ingress
//!   from them; pods on 1,000 nodes);
//! - b: 1 namespace / 10,000 pods / 10,000 policies that all select every
//!   pod and allow ingress from every pod (Antrea's
//!   `getXLargeScaleWithOneNamespace`);
//! - c: 5,000 nodes / 500 namespaces / 150,000 pods / 10,000 policies of
//!   mixed shapes (default deny, DNS egress to another namespace,
//!   monitoring by namespace label and named port, app-to-app rules with
//!   numeric and named ports, namespace+pod selectors, ipBlocks, egress to
//!   named ports), then single events: a pod add, a label change, a policy add.
//!
//! "Compile" = feeding every object to the index and the flush that yields
//! every object to write (with its fingerprint), i.e. everything before the
//! first API request. "Render" = building and serializing every object
//! one at a time into the request body the write path sends (the size
//! bound is checked there); `largest object: N bytes` is the biggest body,
//! NodePolicySet, PolicyGroup or PeerSet head or slice.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use canal_controller::policy::index::{Change, Changes, Kind, PolicyIndex};
use canal_controller::policy::input::{NamespaceInfo, NodeInfo, PodInfo};
use canal_controller::policy::objects::{self, EncodeError};
use canal_crds::{NamedPort, Protocol};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--bench") && !a.is_empty())
        .collect();
    if let Some(pos) = args.iter().position(|a| a == "--scenario") {
        let which = args.get(pos + 1).map(String::as_str).unwrap_or("");
        match which {
            "a" => scenario_a(),
            "b" => scenario_b(),
            "c" => scenario_c(),
            other => {
                eprintln!("unknown scenario {other:?}");
                std::process::exit(2);
            }
        }
        return;
    }
    let wanted: Vec<&str> = if args.is_empty() {
        vec!["a", "b", "c"]
    } else {
        args.iter().map(String::as_str).collect()
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find this binary: {e}");
            std::process::exit(1);
        }
    };
    println!("canal policy compiler benchmark (release, one thread, one process per scenario)");
    for w in wanted {
        let status = Command::new(&exe).args(["--scenario", w]).status();
        match status {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("scenario {w} failed: {other:?}");
                std::process::exit(1);
            }
        }
    }
}

// ----- measurement ----------------------------------------------------------

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time of this thread: unlike wall time, it does not count the
/// time other processes on a shared machine hold the CPU.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let n = v.len();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    format!(
        "p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        us(v[n / 2]),
        us(v[n * 99 / 100]),
        us(v[n - 1])
    )
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Inputs {
    nodes: Vec<NodeInfo>,
    namespaces: Vec<NamespaceInfo>,
    pods: Vec<PodInfo>,
    policies: Vec<NetworkPolicy>,
}

/// Feeds everything, flushes, prints the figures; returns the index with
/// every change marked written (as after the first sync).
fn full_compile(name: &str, inputs: Inputs) -> PolicyIndex {
    let (n_nodes, n_ns, n_pods, n_pol) = (
        inputs.nodes.len(),
        inputs.namespaces.len(),
        inputs.pods.len(),
        inputs.policies.len(),
    );
    let rss_inputs = status_kb("VmRSS:");
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    let mut index = PolicyIndex::new();
    index.reset_nodes(inputs.nodes);
    index.reset_namespaces(inputs.namespaces);
    let t_ns = t0.elapsed();
    index.reset_pods(inputs.pods);
    let t_pods = t0.elapsed();
    index.reset_policies(inputs.policies);
    let t_pol = t0.elapsed();
    let changes = index.flush();
    let total = t0.elapsed();
    let cpu = thread_cpu().saturating_sub(cpu0);
    let hwm_compile = status_kb("VmHWM:");
    let stats = index.stats();
    println!(
        "\n== scenario {name}: {n_nodes} nodes, {n_ns} namespaces, {n_pods} pods, {n_pol} policies"
    );
    println!(
        "full compile: {:.0} ms wall, {:.0} ms CPU (wall: nodes+namespaces {:.0} ms, pods {:.0} ms, policies {:.0} ms, flush {:.0} ms)",
        ms(total),
        ms(cpu),
        ms(t_ns),
        ms(t_pods - t_ns),
        ms(t_pol - t_pods),
        ms(total - t_pol)
    );
    println!(
        "output: {} NodePolicySets, {} PolicyGroup objects, {} PeerSet objects to write (heads and slices); {} endpoints, {} policy groups ({} sharded), {} peer sets ({} sharded)",
        changes.node_policy_sets.len(),
        changes.policy_groups.len(),
        changes.peer_sets.len(),
        stats.endpoints,
        stats.groups,
        stats.sharded_policy_groups,
        stats.peer_sets,
        stats.sharded_peer_sets,
    );
    println!(
        "memory: peak RSS (VmHWM) {:.0} MB after compile; inputs held before compile {:.0} MB",
        mb(hwm_compile),
        mb(rss_inputs)
    );
    if std::env::var_os("CANAL_BENCH_COMPILE_ONLY").is_some() {
        // For profiling the compile alone.
        std::process::exit(0);
    }
    // The write path: render + serialize each object once, one at a time.
    let t1 = Instant::now();
    let w = write_all(&mut index, &changes);
    println!(
        "write path (render + encode every request body, one at a time): {:.0} ms, {:.1} MB in {} objects; VmHWM now {:.0} MB",
        ms(t1.elapsed()),
        w.bytes as f64 / 1e6,
        w.objects,
        mb(status_kb("VmHWM:"))
    );
    println!(
        "largest object: {} bytes ({}; the bound is {} bytes){}",
        w.largest.0,
        w.largest.1,
        canal_crds::MAX_OBJECT_BYTES,
        if w.refused.is_empty() {
            String::new()
        } else {
            format!("; REFUSED over the bound: {:?}", w.refused)
        }
    );
    let again = index.flush();
    assert!(
        again.is_empty() || !w.refused.is_empty(),
        "a second flush must write nothing"
    );
    index
}

// ----- generators -------------------------------------------------------------

/// splitmix64: deterministic runs without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0A00_0000u32 + n as u32 + 1))
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: if pairs.is_empty() {
            None
        } else {
            Some(map(pairs))
        },
        match_expressions: None,
    }
}

fn nodes(n: usize) -> Vec<NodeInfo> {
    (0..n)
        .map(|i| NodeInfo {
            name: format!("node-{i}"),
            ..Default::default()
        })
        .collect()
}

fn namespace(name: &str, extra: &[(&str, &str)]) -> NamespaceInfo {
    let mut labels = map(extra);
    labels.insert("kubernetes.io/metadata.name".into(), name.into());
    NamespaceInfo {
        name: name.into(),
        labels,
    }
}

fn pod_info(ns: &str, name: String, node: usize, ip_n: usize, labels: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name,
        node: Some(format!("node-{node}")),
        labels: map(labels),
        ips: vec![ip(ip_n)],
        named_ports: vec![],
        host_network: false,
        finished: false,
        ..Default::default()
    }
}

fn policy(ns: &str, name: &str, spec: NetworkPolicySpec) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(spec),
    }
}

/// Antrea's `newNetworkPolicy(ns, name, podSelector, ingressPodSelector, nil, nil, nil)`:
/// types Ingress+Egress, one ingress rule from the pod selector (if any).
fn antrea_policy(
    ns: &str,
    name: &str,
    pods: &[(&str, &str)],
    from: Option<&[(&str, &str)]>,
) -> NetworkPolicy {
    policy(
        ns,
        name,
        NetworkPolicySpec {
            pod_selector: Some(sel(pods)),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: from.map(|f| {
                vec![NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(sel(f)),
                        ..Default::default()
                    }]),
                    ports: None,
                }]
            }),
            egress: None,
        },
    )
}

fn scenario_a() {
    let mut rng = Rng(1);
    let mut inputs = Inputs {
        nodes: nodes(1000),
        namespaces: Vec::new(),
        pods: Vec::new(),
        policies: Vec::new(),
    };
    for i in 0..25_000 {
        let ns = format!("ns-{i:05}");
        inputs.namespaces.push(namespace(&ns, &[("app", &ns)]));
        inputs
            .policies
            .push(antrea_policy(&ns, "default-deny-all", &[], None));
        inputs.policies.push(antrea_policy(
            &ns,
            "np-1",
            &[("app-1", "scale-1")],
            Some(&[("app-1", "scale-1")]),
        ));
        inputs.policies.push(antrea_policy(
            &ns,
            "np-2",
            &[("app-2", "scale-2")],
            Some(&[("app-2", "scale-2")]),
        ));
        for (p, l) in [("pod1", "1"), ("pod2", "1"), ("pod3", "2"), ("pod4", "2")] {
            let n = inputs.pods.len();
            let key = format!("app-{l}");
            let value = format!("scale-{l}");
            inputs.pods.push(pod_info(
                &ns,
                p.into(),
                rng.below(1000),
                n,
                &[(&key, &value)],
            ));
        }
    }
    full_compile("a (Antrea XLargeScaleWithSmallNamespaces)", inputs);
}

fn scenario_b() {
    let mut rng = Rng(2);
    let ns = "ns-one";
    let mut inputs = Inputs {
        nodes: nodes(1000),
        namespaces: vec![namespace(ns, &[("app", ns)])],
        pods: Vec::new(),
        policies: Vec::new(),
    };
    for i in 0..10_000 {
        let l = [("app-1", "scale-1")];
        inputs
            .policies
            .push(antrea_policy(ns, &format!("np-{i:05}"), &l, Some(&l)));
        inputs
            .pods
            .push(pod_info(ns, format!("pod-{i:05}"), rng.below(1000), i, &l));
    }
    full_compile(
        "b (Antrea XLargeScaleWithOneNamespace: every policy selects every pod)",
        inputs,
    );
}

const TIERS: [&str; 3] = ["web", "api", "db"];

fn c_pod(rng: &mut Rng, ns: &str, name: String, app: usize, ip_n: usize) -> PodInfo {
    let app_l = format!("app-{app}");
    let hash = format!("h{app}");
    let tier = TIERS[app % 3];
    let mut p = pod_info(
        ns,
        name,
        rng.below(5000),
        ip_n,
        &[
            ("app", &app_l),
            ("tier", tier),
            ("pod-template-hash", &hash),
        ],
    );
    let mut ports = vec![NamedPort {
        name: "metrics".into(),
        protocol: Protocol::TCP,
        port: 9100,
    }];
    ports.push(match tier {
        "web" => NamedPort {
            name: "http".into(),
            protocol: Protocol::TCP,
            port: 8080,
        },
        "api" => NamedPort {
            name: "grpc".into(),
            protocol: Protocol::TCP,
            port: 9090,
        },
        _ => NamedPort {
            name: "postgres".into(),
            protocol: Protocol::TCP,
            port: 5432,
        },
    });
    ports.sort();
    p.named_ports = ports;
    p
}

fn port(protocol: &str, p: IntOrString) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some(protocol.into()),
        port: Some(p),
        end_port: None,
    }
}

fn app_policy(ns: &str, k: usize, from_app: usize) -> NetworkPolicy {
    let app = format!("app-{k}");
    let from = format!("app-{from_app}");
    let mut peers = vec![NetworkPolicyPeer {
        pod_selector: Some(sel(&[("app", &from)])),
        ..Default::default()
    }];
    if k.is_multiple_of(4) {
        peers.push(NetworkPolicyPeer {
            namespace_selector: Some(sel(&[("env", "prod")])),
            pod_selector: Some(sel(&[("tier", "web")])),
            ..Default::default()
        });
    }
    if k.is_multiple_of(5) {
        peers.push(NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: "10.0.0.0/8".into(),
                except: Some(vec!["10.128.0.0/9".into()]),
            }),
            ..Default::default()
        });
    }
    let egress = k.is_multiple_of(3).then(|| {
        vec![NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(sel(&[("tier", "db")])),
                ..Default::default()
            }]),
            ports: Some(vec![port("TCP", IntOrString::String("postgres".into()))]),
        }]
    });
    let types = if egress.is_some() {
        vec!["Ingress".to_string(), "Egress".to_string()]
    } else {
        vec!["Ingress".to_string()]
    };
    policy(
        ns,
        &format!("allow-{app}"),
        NetworkPolicySpec {
            pod_selector: Some(sel(&[("app", &app)])),
            policy_types: Some(types),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(peers),
                ports: Some(vec![
                    port("TCP", IntOrString::Int(8080)),
                    port("TCP", IntOrString::String("http".into())),
                ]),
            }]),
            egress,
        },
    )
}

fn scenario_c() {
    let mut rng = Rng(3);
    let mut inputs = Inputs {
        nodes: nodes(5000),
        namespaces: Vec::new(),
        pods: Vec::new(),
        policies: Vec::new(),
    };
    let envs = ["prod", "staging", "dev"];
    for i in 0..500 {
        let ns = format!("ns-{i:03}");
        let team = format!("team-{}", i % 50);
        inputs
            .namespaces
            .push(namespace(&ns, &[("team", &team), ("env", envs[i % 3])]));
        for app in 0..30 {
            for r in 0..10 {
                let n = inputs.pods.len();
                inputs
                    .pods
                    .push(c_pod(&mut rng, &ns, format!("app-{app}-{r}"), app, n));
            }
        }
        inputs.policies.push(policy(
            &ns,
            "default-deny",
            NetworkPolicySpec {
                pod_selector: Some(sel(&[])),
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ..Default::default()
            },
        ));
        inputs.policies.push(policy(
            &ns,
            "allow-dns",
            NetworkPolicySpec {
                pod_selector: Some(sel(&[])),
                policy_types: Some(vec!["Egress".into()]),
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(sel(&[("kubernetes.io/metadata.name", "ns-000")])),
                        pod_selector: Some(sel(&[("app", "app-0")])),
                        ..Default::default()
                    }]),
                    ports: Some(vec![
                        port("UDP", IntOrString::Int(53)),
                        port("TCP", IntOrString::Int(53)),
                    ]),
                }]),
                ..Default::default()
            },
        ));
        inputs.policies.push(policy(
            &ns,
            "allow-monitoring",
            NetworkPolicySpec {
                pod_selector: Some(sel(&[])),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(sel(&[("team", "team-0")])),
                        ..Default::default()
                    }]),
                    ports: Some(vec![port("TCP", IntOrString::String("metrics".into()))]),
                }]),
                ..Default::default()
            },
        ));
        for k in 0..17 {
            inputs.policies.push(app_policy(&ns, k, (k + 1) % 30));
        }
    }
    let pod_nodes: Vec<String> = inputs
        .pods
        .iter()
        .map(|p| p.node.clone().unwrap_or_default())
        .collect();
    let mut index = full_compile("c (5,000 nodes, mixed policies)", inputs);

    // Single events, each measured as apply + flush (the compute before
    // any write), then the writes are rendered and marked done.
    const N: usize = 300;
    let mut next_ip = 150_000;
    let events = |label: &str,
                  index: &mut PolicyIndex,
                  f: &mut dyn FnMut(&mut PolicyIndex, usize)| {
        let mut wall = Vec::with_capacity(N);
        let mut cpu = Vec::with_capacity(N);
        let (mut nps, mut pg, mut ps, mut render) = (0usize, 0usize, 0usize, Duration::ZERO);
        let mut largest = 0usize;
        for i in 0..N {
            let (t, c) = (Instant::now(), thread_cpu());
            f(index, i);
            let changes = index.flush();
            cpu.push(thread_cpu().saturating_sub(c));
            wall.push(t.elapsed());
            nps += changes.node_policy_sets.len();
            pg += changes.policy_groups.len();
            ps += changes.peer_sets.len();
            let t = Instant::now();
            let w = write_all(index, &changes);
            render += t.elapsed();
            largest = largest.max(w.largest.0);
        }
        println!(
            "{label}: compute (apply + flush) CPU {}; wall {}; writes per event: {:.2} NodePolicySets + {:.2} PolicyGroup objects + {:.2} PeerSet objects; rendering those {:.0} us/event, largest {largest} bytes",
            percentiles(cpu),
            percentiles(wall),
            nps as f64 / N as f64,
            pg as f64 / N as f64,
            ps as f64 / N as f64,
            render.as_secs_f64() * 1e6 / N as f64,
        );
    };
    let mut rng2 = Rng(4);
    events("one pod add", &mut index, &mut |index, i| {
        let ns = format!("ns-{:03}", rng2.below(500));
        let app = rng2.below(30);
        next_ip += 1;
        let p = c_pod(&mut rng2, &ns, format!("extra-{i}"), app, next_ip);
        index.apply_pod(p);
    });
    let mut rng3 = Rng(5);
    events("one label change", &mut index, &mut |index, _| {
        let ns = format!("ns-{:03}", rng3.below(500));
        let app = rng3.below(30);
        let r = rng3.below(10);
        // Same pod (same node and IP as generated), new app label.
        let mut p = pod_by_position(&pod_nodes, &ns, app, r);
        let new_app = (app + 1 + rng3.below(29)) % 30;
        p.labels.insert("app".into(), format!("app-{new_app}"));
        p.labels.insert("tier".into(), TIERS[new_app % 3].into());
        index.apply_pod(p);
    });
    let mut rng4 = Rng(6);
    events("one policy add", &mut index, &mut |index, i| {
        let ns = format!("ns-{:03}", rng4.below(500));
        let mut p = app_policy(&ns, 17 + rng4.below(13), rng4.below(30));
        p.metadata.name = Some(format!("extra-{i}"));
        index.apply_policy(&p);
    });
    println!("memory: VmHWM {:.0} MB at the end", mb(status_kb("VmHWM:")));
}

/// Re-creates the generated pod `app-<app>-<r>` of `ns` (same node and IP).
fn pod_by_position(pod_nodes: &[String], ns: &str, app: usize, r: usize) -> PodInfo {
    let i: usize = ns[3..].parse().unwrap_or(0);
    let n = i * 300 + app * 10 + r;
    let mut p = c_pod(&mut Rng(0), ns, format!("app-{app}-{r}"), app, n);
    p.node = Some(pod_nodes[n].clone());
    p
}

/// What rendering a batch of writes produced.
#[derive(Default)]
struct Written {
    objects: usize,
    bytes: usize,
    largest: (usize, String),
    refused: Vec<String>,
}

/// Renders and encodes every object a flush asked for (as the controller
/// does, in its order) and marks it written.
fn write_all(index: &mut PolicyIndex, changes: &Changes) -> Written {
    let owner = objects::owner_reference("bench");
    let mut w = Written::default();
    for kind in [Kind::PeerSet, Kind::PolicyGroup, Kind::NodePolicySet] {
        for c in changes.of(kind) {
            match c {
                Change::Apply(name) => match objects::encode_object(index, kind, name, &owner) {
                    Some(Ok(o)) => {
                        let len = o.body.get().len();
                        w.objects += 1;
                        w.bytes += len;
                        if len > w.largest.0 {
                            w.largest = (len, format!("{} {name}", kind.as_str()));
                        }
                        index.mark_written(kind, name, Some(o.fingerprint));
                    }
                    Some(Err(EncodeError::TooLarge { bytes, .. })) => {
                        w.refused
                            .push(format!("{} {name} ({bytes} bytes)", kind.as_str()));
                        index.mark_written(kind, name, None);
                    }
                    Some(Err(e)) => panic!("encoding {name}: {e}"),
                    None => {}
                },
                Change::Delete(name) => index.mark_written(kind, name, None),
            }
        }
    }
    w
}
