//! NetworkPolicy create -> enforced on every node, in a 5-node lab (root).
//!
//! `cargo bench -p canal-e2e --bench policy_latency` (`CANAL_BENCH_REPS`,
//! default 50). One target pod per node (namespace `lat`) and a client pod
//! on node-1 (namespace `client`) probing every target over TCP in a loop.
//! Each repetition creates a deny-all-ingress policy in `lat` (it isolates
//! a pod on every node) and measures, from the create request:
//!
//! - probes: when each target stops answering (the start of the first of
//!   three failed probes in a row), the slowest of the five nodes;
//! - statuses: when every NodePolicySet reports the generation that holds
//!   the policy (observedGeneration == generation, Enforced=True);
//!
//! then deletes it and measures when every target answers again. Prints
//! p50/p90/p99/max of each.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use canal_e2e::Lab;
use canal_e2e::bench::{percentile, policy_enforced_everywhere};
use canal_e2e::lab::prober::Prober;
use canal_e2e::lab::{PodOptions, Protocol, UpOptions};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, PostParams};

const NODES: u32 = 5;
const POLICY: &str = "deny-all";

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len().max(1) as u32;
    println!(
        "{name:<48} n={:<3} p50 {:>6.1} ms  p90 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  mean {:>6.1} ms",
        v.len(),
        percentile(&v, 50.0).as_secs_f64() * 1e3,
        percentile(&v, 90.0).as_secs_f64() * 1e3,
        percentile(&v, 99.0).as_secs_f64() * 1e3,
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3,
    );
}

/// The start of the first attempt at or after `t0` that begins a run of
/// three attempts in the wanted state (connected or not).
fn settled(p: &Prober, t0: Instant, connected: bool) -> Option<Duration> {
    let a = p.since(t0);
    a.windows(3)
        .find(|w| w.iter().all(|x| x.connected == connected))
        .map(|w| w[0].at - t0)
}

async fn wait_all(probers: &[Prober], t0: Instant, connected: bool) -> Vec<Duration> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: Vec<Option<Duration>> =
            probers.iter().map(|p| settled(p, t0, connected)).collect();
        if done.iter().all(Option::is_some) {
            return done.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "targets did not become {} within 30 s",
            if connected { "reachable" } else { "blocked" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let reps: usize = std::env::var("CANAL_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let lab = Lab::up(
        Lab::test_state_dir("bench-policy-latency"),
        UpOptions {
            nodes: NODES,
            ..UpOptions::default()
        },
    )
    .await
    .expect("a 5-node lab (run as root)");
    let mut pods: Vec<PodOptions> = (1..=NODES)
        .map(|i| PodOptions::new("lat", &format!("t{i}"), &format!("node-{i}")))
        .collect();
    pods.push(PodOptions::new("client", "c", "node-1"));
    lab.add_pods(pods).await.expect("pods");
    let client = lab.client();
    let source = lab.pod("client/c").unwrap().netns;
    let targets: Vec<(String, SocketAddr)> = (1..=NODES)
        .map(|i| {
            let key = format!("lat/t{i}");
            let ip = lab.pod(&key).unwrap().ipv4().unwrap();
            (key, SocketAddr::from((ip, 80)))
        })
        .collect();
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), "lat");
    let policy: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": POLICY, "namespace": "lat"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }))
    .unwrap();
    let start_probers = || -> Vec<Prober> {
        targets
            .iter()
            .map(|(key, dst)| {
                Prober::start(
                    &format!("client/c -> {key}"),
                    &source,
                    *dst,
                    Protocol::Tcp,
                    Duration::from_millis(50),
                    Duration::from_millis(2),
                )
            })
            .collect()
    };
    while !policy_enforced_everywhere(&client, NODES as usize, &format!("lat/{POLICY}"), false)
        .await
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (mut by_probes, mut by_status, mut per_node, mut restore) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let probers = start_probers();
        wait_all(&probers, Instant::now(), true).await;
        let t0 = Instant::now();
        api.create(&PostParams::default(), &policy)
            .await
            .expect("create");
        let status_task = {
            let client = client.clone();
            tokio::spawn(async move {
                while !policy_enforced_everywhere(
                    &client,
                    NODES as usize,
                    &format!("lat/{POLICY}"),
                    true,
                )
                .await
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                t0.elapsed()
            })
        };
        let blocked = wait_all(&probers, t0, false).await;
        by_status.push(status_task.await.unwrap());
        per_node.extend(blocked.iter().copied());
        by_probes.push(blocked.iter().copied().max().unwrap_or_default());
        drop(probers);

        let probers = start_probers();
        wait_all(&probers, Instant::now(), false).await;
        let t1 = Instant::now();
        api.delete(POLICY, &DeleteParams::default())
            .await
            .expect("delete");
        let open = wait_all(&probers, t1, true).await;
        restore.push(open.iter().copied().max().unwrap_or_default());
        drop(probers);
        while !policy_enforced_everywhere(&client, NODES as usize, &format!("lat/{POLICY}"), false)
            .await
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if (rep + 1) % 10 == 0 {
            eprintln!("{} repetitions done", rep + 1);
        }
    }
    println!(
        "NetworkPolicy enforcement latency, {NODES}-node lab, {reps} repetitions, binaries from {}:",
        canal_e2e::lab::default_bin_dir().display()
    );
    summary("create -> blocked on every node (probes)", by_probes);
    summary("create -> blocked, each node (probes)", per_node);
    summary("create -> every NodePolicySet status enforced", by_status);
    summary("delete -> reachable on every node (probes)", restore);
}
