//! NetworkPolicy enforcement latency and the packet path under policy, in
//! a 3-node lab (root), as issue 17 measures them:
//!
//! - `single`: one target pod per node (`lat/t1..t3`, label `role=target`),
//!   each probed over TCP every 20 ms by a client pod on another node
//!   (`client/c1..c3`); a NetworkPolicy isolating the targets is created
//!   and deleted `CANAL_BENCH_REPS` times (default 20). Measured from the
//!   create request: when every target stops answering (the start of the
//!   first of three failed probes in a row; the last answered probe before
//!   it bounds the true moment from below), when the bench's own watch sees
//!   each node's NodePolicySet rewritten, and when every NodePolicySet status
//!   reports it enforced.
//! - `burst`: 194 more pods (200 in all, spread over the nodes), then
//!   `CANAL_BENCH_BURSTS` times (default 3): 99 policies created 16 at a
//!   time, each isolating two of the new pods, then the target-isolating
//!   policy last; measured from the last create request to the targets
//!   blocked on every node.
//! - `packets`: new TCP connections (connect, one request line, the
//!   answer; `CANAL_BENCH_CONNS`, default 2,000) from `client/c2` (node-2)
//!   to `lat/t1` (node-1), one after the other: with no policy, then with
//!   the 100 burst policies on the nodes and one allowing namespace
//!   `client` into the targets, then with no policy again.
//!
//! Every scenario prints p50/p90/max and the per-stage breakdown: the
//! means of the controller's `canal_policy_publish_stage_duration_seconds`
//! and the agents' `canal_policy_programming_stage_duration_seconds`,
//! scraped before and after. `CANAL_BENCH_SCENARIOS=single,burst,packets`
//! selects (default all three); the 5-node figures of earlier sessions come
//! from `cargo bench -p canal-e2e --bench policy_latency`.
//!
//! `cargo build --release --workspace --bins && cargo bench -p canal-e2e
//! --bench enforce_latency` (release binaries from `target/release`, or
//! `CANAL_BIN_DIR`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canal_crds::NodePolicySet;
use canal_e2e::Lab;
use canal_e2e::bench::{percentile, policy_enforced_everywhere};
use canal_e2e::lab::prober::{Attempt, Prober};
use canal_e2e::lab::{PodOptions, Protocol, UpOptions};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;

const NODES: u32 = 3;
const TARGET_POLICY: &str = "isolate-targets";
const BURST_PODS: usize = 194;
const BURST_GROUPS: usize = 99;
/// Probe every 20 ms (the gap after each probe; a probe takes ~1 ms).
const PROBE_GAP: Duration = Duration::from_millis(20);
const PROBE_TIMEOUT: Duration = Duration::from_millis(50);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "  {name:<58} n={:<4} p50 {:>7.1} ms  p90 {:>7.1} ms  max {:>7.1} ms",
        v.len(),
        ms(percentile(&v, 50.0)),
        ms(percentile(&v, 90.0)),
        ms(v.last().copied().unwrap_or_default()),
    );
}

// ----- metrics -------------------------------------------------------------

/// `name{labels}` -> value of every sample of a scrape.
type Samples = BTreeMap<String, f64>;

fn parse(text: &str) -> Samples {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The controller's samples and the agents' summed.
#[derive(Default)]
struct Scrape {
    controller: Samples,
    agents: Samples,
}

fn scrape(lab: &Lab) -> Scrape {
    let mut s = Scrape {
        controller: lab
            .controller_metrics()
            .map(|t| parse(&t))
            .unwrap_or_default(),
        agents: Samples::new(),
    };
    for i in 1..=NODES {
        if let Ok(t) = lab.agent_metrics(&format!("node-{i}")) {
            for (k, v) in parse(&t) {
                *s.agents.entry(k).or_default() += v;
            }
        }
    }
    s
}

/// Mean (ms) and count of a histogram series between two scrapes.
fn mean(before: &Samples, after: &Samples, name: &str, labels: &str) -> Option<(f64, f64)> {
    let key = |suffix: &str| format!("{name}_{suffix}{labels}");
    let d =
        |k: String| after.get(&k).copied().unwrap_or(0.0) - before.get(&k).copied().unwrap_or(0.0);
    let (sum, count) = (d(key("sum")), d(key("count")));
    (count > 0.0).then(|| (sum / count * 1e3, count))
}

fn print_stages(before: &Scrape, after: &Scrape) {
    println!("  per-stage means between the scrapes (creates and deletes alike):");
    let c = "canal_policy_publish_stage_duration_seconds";
    for stage in [
        "queue",
        "compile",
        "write_peersets",
        "write_policygroups",
        "write_nodepolicysets",
        "write_deletions",
        "status",
    ] {
        if let Some((m, n)) = mean(
            &before.controller,
            &after.controller,
            c,
            &format!("{{stage=\"{stage}\"}}"),
        ) {
            println!("    controller {stage:<22} mean {m:>7.2} ms  (n={n})");
        }
    }
    if let Some((m, n)) = mean(
        &before.controller,
        &after.controller,
        "canal_policy_publish_duration_seconds",
        "",
    ) {
        println!("    controller event -> objects written mean {m:>7.2} ms  (n={n})");
    }
    let a = "canal_policy_programming_stage_duration_seconds";
    for stage in ["queue", "render", "plan", "kernel", "status"] {
        if let Some((m, n)) = mean(
            &before.agents,
            &after.agents,
            a,
            &format!("{{stage=\"{stage}\"}}"),
        ) {
            println!("    agents     {stage:<22} mean {m:>7.2} ms  (n={n})");
        }
    }
    for object in ["node_policy_set", "peer_set"] {
        if let Some((m, n)) = mean(
            &before.agents,
            &after.agents,
            "canal_policy_programming_duration_seconds",
            &format!("{{object=\"{object}\"}}"),
        ) {
            println!("    agents     {object} event -> kernel mean {m:>7.2} ms  (n={n})");
        }
    }
}

// ----- observing -----------------------------------------------------------

/// When the bench's own watch saw each NodePolicySet's spec change
/// (generation bumped): a stand-in for when the agents' watches see it.
#[derive(Clone, Default)]
struct NpsWrites(Arc<Mutex<Vec<(Instant, String)>>>);

impl NpsWrites {
    fn start(client: kube::Client) -> NpsWrites {
        let seen = NpsWrites::default();
        let out = seen.clone();
        tokio::spawn(async move {
            let mut generations: BTreeMap<String, Option<i64>> = BTreeMap::new();
            let stream = watcher::watcher(
                Api::<NodePolicySet>::all(client),
                watcher::Config::default(),
            );
            let mut stream = std::pin::pin!(stream);
            while let Ok(Some(ev)) = stream.try_next().await {
                let objs = match ev {
                    watcher::Event::Apply(o) | watcher::Event::InitApply(o) => vec![o],
                    _ => continue,
                };
                for o in objs {
                    let name = o.metadata.name.clone().unwrap_or_default();
                    let g = o.metadata.generation;
                    if generations.insert(name.clone(), g) != Some(g) {
                        out.0
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((Instant::now(), name));
                    }
                }
            }
        });
        seen
    }

    /// The first write of each node's NodePolicySet at or after `t0`.
    fn first_after(&self, t0: Instant) -> BTreeMap<String, Duration> {
        let mut out = BTreeMap::new();
        for (at, name) in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if *at >= t0 {
                out.entry(name.clone()).or_insert(*at - t0);
            }
        }
        out
    }
}

async fn wait_converged(client: &kube::Client, policy: &str, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !policy_enforced_everywhere(client, NODES as usize, policy, present).await {
        assert!(
            Instant::now() < deadline,
            "NodePolicySets did not converge on {policy} present={present} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The start of the first attempt at or after `t0` that begins a run of
/// three in the wanted state, and the start of the last attempt before it
/// in the other state (the true change lies between the two).
fn settled(attempts: &[Attempt], t0: Instant, connected: bool) -> Option<(Duration, Duration)> {
    let a: Vec<&Attempt> = attempts.iter().filter(|x| x.at >= t0).collect();
    let i = a
        .windows(3)
        .position(|w| w.iter().all(|x| x.connected == connected))?;
    let before = a[..i]
        .iter()
        .rev()
        .find(|x| x.connected != connected)
        .map_or(Duration::ZERO, |x| x.at - t0);
    Some((a[i].at - t0, before))
}

/// Per target: (first attempt in the new state, last one in the old state).
async fn wait_all(probers: &[Prober], t0: Instant, connected: bool) -> Vec<(Duration, Duration)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: Vec<Option<(Duration, Duration)>> = probers
            .iter()
            .map(|p| settled(&p.attempts(), t0, connected))
            .collect();
        if done.iter().all(Option::is_some) {
            return done.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "targets did not become {} within 30 s",
            if connected { "reachable" } else { "blocked" }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ----- the lab ---------------------------------------------------------------

struct Bench {
    lab: Lab,
    client: kube::Client,
    /// (client pod netns, target address) per node's target.
    pairs: Vec<(String, String, SocketAddr)>,
    writes: NpsWrites,
}

fn policy(name: &str, select: (&str, &str), allow_client: bool) -> NetworkPolicy {
    let ingress = if allow_client {
        serde_json::json!([{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "client"}}}]}])
    } else {
        serde_json::json!([])
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "lat"},
        "spec": {
            "podSelector": {"matchLabels": {select.0: select.1}},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }))
    .expect("a valid NetworkPolicy")
}

impl Bench {
    fn probers(&self) -> Vec<Prober> {
        self.pairs
            .iter()
            .map(|(label, netns, dst)| {
                Prober::start(label, netns, *dst, Protocol::Tcp, PROBE_TIMEOUT, PROBE_GAP)
            })
            .collect()
    }

    fn policies(&self) -> Api<NetworkPolicy> {
        Api::namespaced(self.client.clone(), "lat")
    }

    async fn single(&self, reps: usize) {
        let api = self.policies();
        let target = policy(TARGET_POLICY, ("role", "target"), false);
        let full = format!("lat/{TARGET_POLICY}");
        wait_converged(&self.client, &full, false).await;
        let before = scrape(&self.lab);
        let (mut all, mut per_node, mut lower, mut written, mut status, mut restore) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for rep in 0..reps {
            let probers = self.probers();
            wait_all(&probers, Instant::now(), true).await;
            let t0 = Instant::now();
            api.create(&PostParams::default(), &target)
                .await
                .expect("create");
            let status_task = {
                let (client, full) = (self.client.clone(), full.clone());
                tokio::spawn(async move {
                    wait_converged(&client, &full, true).await;
                    t0.elapsed()
                })
            };
            let blocked = wait_all(&probers, t0, false).await;
            status.push(status_task.await.expect("status task"));
            all.push(blocked.iter().map(|b| b.0).max().unwrap_or_default());
            lower.push(blocked.iter().map(|b| b.1).max().unwrap_or_default());
            per_node.extend(blocked.iter().map(|b| b.0));
            written.push(
                self.writes
                    .first_after(t0)
                    .values()
                    .max()
                    .copied()
                    .unwrap_or_default(),
            );
            drop(probers);

            let probers = self.probers();
            wait_all(&probers, Instant::now(), false).await;
            let t1 = Instant::now();
            api.delete(TARGET_POLICY, &DeleteParams::default())
                .await
                .expect("delete");
            let open = wait_all(&probers, t1, true).await;
            restore.push(open.iter().map(|b| b.0).max().unwrap_or_default());
            drop(probers);
            wait_converged(&self.client, &full, false).await;
            if (rep + 1) % 5 == 0 {
                eprintln!("single: {} repetitions done", rep + 1);
            }
        }
        let after = scrape(&self.lab);
        println!(
            "\nsingle policy, {NODES} nodes, {reps} repetitions, probes every {} ms (load average {}):",
            PROBE_GAP.as_millis(),
            loadavg()
        );
        summary("create -> blocked on every node (first failed probe)", all);
        summary("  last answered probe before it (lower bound)", lower);
        summary("create -> blocked, each node", per_node);
        summary(
            "create -> every NodePolicySet rewritten (bench's watch)",
            written,
        );
        summary("create -> every NodePolicySet status enforced", status);
        summary("delete -> reachable on every node", restore);
        print_stages(&before, &after);
    }

    async fn add_burst_pods(&self) {
        let t = Instant::now();
        let pods: Vec<PodOptions> = (0..BURST_PODS)
            .map(|i| {
                PodOptions::new(
                    "lat",
                    &format!("b{i}"),
                    &format!("node-{}", i as u32 % NODES + 1),
                )
                .label("app", &format!("p{}", i % BURST_GROUPS))
            })
            .collect();
        for chunk in pods.chunks(16) {
            self.lab.add_pods(chunk.to_vec()).await.expect("burst pods");
        }
        eprintln!(
            "added {BURST_PODS} pods in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    async fn burst(&self, bursts: usize) {
        let api = self.policies();
        let others: Vec<NetworkPolicy> = (0..BURST_GROUPS)
            .map(|i| policy(&format!("burst-{i}"), ("app", &format!("p{i}")), false))
            .collect();
        let last = policy(TARGET_POLICY, ("role", "target"), false);
        let full = format!("lat/{TARGET_POLICY}");
        let (mut blocked_all, mut lower, mut written, mut status, mut spread) =
            (vec![], vec![], vec![], vec![], vec![]);
        let before = scrape(&self.lab);
        for round in 0..bursts {
            wait_converged(&self.client, &full, false).await;
            let probers = self.probers();
            wait_all(&probers, Instant::now(), true).await;
            let first = Instant::now();
            futures::stream::iter(others.iter())
                .map(|p| {
                    let api = api.clone();
                    async move { api.create(&PostParams::default(), p).await.map(drop) }
                })
                .buffer_unordered(16)
                .try_collect::<Vec<()>>()
                .await
                .expect("burst creates");
            let t0 = Instant::now();
            api.create(&PostParams::default(), &last)
                .await
                .expect("create the last policy");
            spread.push(t0 - first);
            let blocked = wait_all(&probers, t0, false).await;
            blocked_all.push(blocked.iter().map(|b| b.0).max().unwrap_or_default());
            lower.push(blocked.iter().map(|b| b.1).max().unwrap_or_default());
            wait_converged(&self.client, &full, true).await;
            status.push(t0.elapsed());
            written.push(
                self.writes
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .filter(|(at, _)| *at >= t0)
                    .map(|(at, _)| *at - t0)
                    .next()
                    .unwrap_or_default(),
            );
            drop(probers);
            eprintln!("burst {} done", round + 1);
            if round + 1 < bursts {
                self.delete_all().await;
            }
        }
        let after = scrape(&self.lab);
        println!(
            "\nburst: {} policies at {} pods, {NODES} nodes, {bursts} bursts (load average {}):",
            BURST_GROUPS + 1,
            BURST_PODS + 6,
            loadavg()
        );
        summary(
            "first create -> last create (99 creates, 16 at a time)",
            spread,
        );
        summary(
            "last create -> blocked on every node (first failed probe)",
            blocked_all,
        );
        summary("  last answered probe before it (lower bound)", lower);
        summary("last create -> first NodePolicySet write after it", written);
        summary("last create -> every NodePolicySet status enforced", status);
        print_stages(&before, &after);
    }

    async fn delete_all(&self) {
        let api = self.policies();
        let names: Vec<String> = api
            .list(&ListParams::default())
            .await
            .expect("list policies")
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        futures::stream::iter(names)
            .map(|n| {
                let api = api.clone();
                async move { api.delete(&n, &DeleteParams::default()).await.map(drop) }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await
            .expect("deletes");
        wait_converged(&self.client, &format!("lat/{TARGET_POLICY}"), false).await;
    }

    /// `n` connections one after the other from `client/c2` to `lat/t1`.
    fn connections(&self, n: usize) -> (f64, Vec<Duration>) {
        // pairs[0] probes lat/t1 from the client pod on node-2.
        let (_, netns, dst) = self.pairs[0].clone();
        std::thread::spawn(move || {
            canal_e2e::lab::netns::enter(&netns).expect("enter the client pod");
            let mut lat = Vec::with_capacity(n);
            let start = Instant::now();
            for _ in 0..n {
                let t = Instant::now();
                let o =
                    canal_e2e::lab::probe::probe_here(dst, Protocol::Tcp, Duration::from_secs(1))
                        .expect("probe");
                assert!(o.connected, "an allowed connection failed: {}", o.detail);
                lat.push(t.elapsed());
            }
            (n as f64 / start.elapsed().as_secs_f64(), lat)
        })
        .join()
        .expect("connection thread")
    }

    async fn packets(&self, conns: usize) {
        let mut rows = Vec::new();
        self.delete_all().await;
        rows.push(("no policy", self.connections(conns)));
        let api = self.policies();
        for i in 0..BURST_GROUPS {
            let p = policy(&format!("burst-{i}"), ("app", &format!("p{i}")), false);
            api.create(&PostParams::default(), &p)
                .await
                .expect("create");
        }
        api.create(
            &PostParams::default(),
            &policy(TARGET_POLICY, ("role", "target"), false),
        )
        .await
        .expect("create");
        api.create(
            &PostParams::default(),
            &policy("allow-client", ("role", "target"), true),
        )
        .await
        .expect("create");
        wait_converged(&self.client, "lat/allow-client", true).await;
        rows.push((
            "101 policies, one allowing the client",
            self.connections(conns),
        ));
        self.delete_all().await;
        rows.push(("no policy again", self.connections(conns)));
        println!(
            "\npacket path: {conns} new TCP connections (connect, request, answer) node-2 -> node-1 (load average {}):",
            loadavg()
        );
        let base = (rows[0].1.0 + rows[2].1.0) / 2.0;
        for (name, (rate, mut lat)) in rows {
            lat.sort();
            println!(
                "  {name:<40} {rate:>8.0} conn/s ({:>5.1}% of no policy)  p50 {:.3} ms  p99 {:.3} ms",
                rate / base * 100.0,
                ms(percentile(&lat, 50.0)),
                ms(percentile(&lat, 99.0)),
            );
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let scenarios: BTreeSet<String> = std::env::var("CANAL_BENCH_SCENARIOS")
        .unwrap_or_else(|_| "single,burst,packets".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let started = Instant::now();
    println!(
        "enforce_latency: binaries from {}, load average {}",
        canal_e2e::lab::default_bin_dir().display(),
        loadavg()
    );
    let lab = Lab::up(
        Lab::test_state_dir("bench-enforce-latency"),
        UpOptions {
            nodes: NODES,
            replace: true,
            ..UpOptions::default()
        },
    )
    .await
    .expect("a 3-node lab (run as root)");
    let mut pods: Vec<PodOptions> = (1..=NODES)
        .map(|i| {
            PodOptions::new("lat", &format!("t{i}"), &format!("node-{i}")).label("role", "target")
        })
        .collect();
    pods.extend(
        (1..=NODES).map(|i| PodOptions::new("client", &format!("c{i}"), &format!("node-{i}"))),
    );
    lab.add_pods(pods).await.expect("pods");
    // Target on node i, probed from the client on node i % 3 + 1.
    let pairs = (1..=NODES)
        .map(|i| {
            let c = i % NODES + 1;
            let ip = lab
                .pod(&format!("lat/t{i}"))
                .expect("target")
                .ipv4()
                .expect("IPv4");
            (
                format!("client/c{c} -> lat/t{i}"),
                lab.pod(&format!("client/c{c}")).expect("client").netns,
                SocketAddr::from((ip, 80)),
            )
        })
        .collect();
    let client = lab.client();
    let dataplane = scrape(&lab)
        .agents
        .iter()
        .filter(|(k, v)| k.starts_with("canal_policy_dataplane{") && **v > 0.0)
        .map(|(k, _)| k.clone())
        .collect::<Vec<_>>()
        .join(", ");
    println!("dataplane: {dataplane}");
    let bench = Bench {
        writes: NpsWrites::start(client.clone()),
        lab,
        client,
        pairs,
    };
    if scenarios.contains("single") {
        bench.single(env_usize("CANAL_BENCH_REPS", 20)).await;
    }
    if scenarios.contains("burst") || scenarios.contains("packets") {
        bench.add_burst_pods().await;
    }
    if scenarios.contains("burst") {
        bench.burst(env_usize("CANAL_BENCH_BURSTS", 3)).await;
    }
    if scenarios.contains("packets") {
        bench.packets(env_usize("CANAL_BENCH_CONNS", 2000)).await;
    }
    println!(
        "\nenforce_latency took {:.0} s, load average {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    bench.lab.down();
}
