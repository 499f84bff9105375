//! Scale benchmark (needs root): one real canal-agent in a node network
//! namespace against a real kube-apiserver; N Node objects (default 1,000,
//! `CANAL_BENCH_NODES`) are created while it runs. Prints the time until
//! every route, neighbour and FDB entry is in the kernel, the agent's memory,
//! its own latency histogram, and the time to remove them all again.
//!
//! `cargo bench -p canal-agent --bench agent_scale`

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use canal_agent::netns;
use canal_agent::overlay::family::Family;
use canal_agent::overlay::netlink::Netlink;
use canal_crds::{CanalNetworkSpec, annotations};
use canal_e2e::{ControlPlane, install};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use support::{Child, Netns};

const IN_FLIGHT: usize = 32;
const METRICS_PORT: u16 = 9091;

fn node_object(i: u32) -> Node {
    let name = format!("bench-{i:05}");
    let mac = annotations::format_mac(annotations::vtep_mac(&name));
    let cidr = format!("10.{}.{}.0/24", i >> 8, i & 0xff);
    let ip = format!("172.16.{}.{}", i >> 8, i & 0xff);
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {
            annotations::KUBE_SUBNET_MANAGER: "true",
            annotations::BACKEND_TYPE: "vxlan",
            annotations::BACKEND_DATA: format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
            annotations::PUBLIC_IP: ip,
        }},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    }))
    .unwrap()
}

/// (routes, permanent neighbours, permanent FDB entries) on flannel.1.
async fn counts(nl: &Netlink, underlay: u32) -> (usize, usize, usize) {
    match nl.snapshot().await {
        Ok(s) => {
            let o = s.observe(Some("flannel.1"), underlay, Family::V4);
            (
                o.routes.len(),
                o.neighbours.iter().filter(|n| n.permanent).count(),
                o.fdb.iter().filter(|f| f.permanent).count(),
            )
        }
        Err(_) => (0, 0, 0),
    }
}

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn metric(ns: &Netns, name: &str) -> f64 {
    support::http_get_in(ns, METRICS_PORT, "/metrics")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn wait_counts(nl: &Netlink, underlay: u32, want: usize, agent: &Child) -> Duration {
    let started = Instant::now();
    loop {
        let c = counts(nl, underlay).await;
        if c == (want, want, want) {
            return started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!(
                "timed out: kernel has {c:?}, want {want} of each\n{}",
                agent.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("agent_scale: needs root (network namespaces); skipped");
        return;
    }
    // `cargo bench` passes --bench; nothing else is accepted.
    let n: u32 = std::env::var("CANAL_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    install::install_crds(&client).await.unwrap();
    // The overlay alone (policy readiness would wait for a NodePolicySet).
    let mut spec = CanalNetworkSpec::with_cluster_cidr("10.0.0.0/8");
    spec.policy.enabled = false;
    install::apply_default_network(&client, spec).await.unwrap();

    let ns = Netns::new("cbs");
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul0p"]);
    ns.ip(&["addr", "add", "192.168.100.1/24", "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.ip(&["link", "set", "ul0p", "up"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.168.100.254",
        "dev",
        "ul0",
    ]);
    let api: Api<Node> = Api::all(client.clone());
    let mut local = node_object(0);
    local.metadata.name = Some("bench-local".into());
    let local_mac = annotations::format_mac(annotations::vtep_mac("bench-local"));
    local.metadata.annotations.as_mut().unwrap().insert(
        annotations::BACKEND_DATA.into(),
        format!(r#"{{"VNI":1,"VtepMAC":"{local_mac}"}}"#),
    );
    local
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(annotations::PUBLIC_IP.into(), "192.168.100.1".into());
    api.create(&PostParams::default(), &local).await.unwrap();

    let admin = std::fs::read_to_string(cp.kubeconfig()).unwrap();
    let server = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap()
        .to_string();
    let port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    let forwarded = support::forward_into(&ns, port);
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        admin.replace(&server, &format!("https://127.0.0.1:{forwarded}")),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let agent = Child {
        child: ns
            .exec(env!("CARGO_BIN_EXE_canal-agent"))
            .arg("--node-name=bench-local")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg(format!("--metrics-addr=127.0.0.1:{METRICS_PORT}"))
            .arg("--log-level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    };
    let pid = agent.child.id();
    support::wait_until("agent ready", Duration::from_secs(60), || {
        let r = support::http_get_in(&ns, METRICS_PORT, "/readyz")?;
        r.starts_with("HTTP/1.1 200").then_some(()).ok_or(r)
    });
    let rss_idle = proc_kib(pid, "VmRSS:");

    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let underlay = nl
        .snapshot()
        .await
        .unwrap()
        .link_named("ul0")
        .unwrap()
        .index;

    // Add N nodes.
    let started = Instant::now();
    futures::stream::iter(1..=n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &node_object(i))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let created = started.elapsed();
    wait_counts(&nl, underlay, n as usize, &agent).await;
    let total = started.elapsed();
    let rss = proc_kib(pid, "VmRSS:");
    let hwm = proc_kib(pid, "VmHWM:");

    // Let a few periodic resyncs run at this size.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let lat_sum = metric(&ns, "canal_network_programming_duration_seconds_sum");
    let lat_count = metric(&ns, "canal_network_programming_duration_seconds_count");
    let sync_sum = metric(&ns, "canal_sync_full_duration_seconds_sum");
    let sync_count = metric(&ns, "canal_sync_full_duration_seconds_count");
    let resyncs = metric(
        &ns,
        "canal_syncs_total{result=\"success\",trigger=\"resync\"}",
    );
    let rss_steady = proc_kib(pid, "VmRSS:");

    // And delete them all.
    let del_started = Instant::now();
    futures::stream::iter(1..=n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.delete(&format!("bench-{i:05}"), &DeleteParams::default())
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let deleted = del_started.elapsed();
    wait_counts(&nl, underlay, 0, &agent).await;
    let cleaned = del_started.elapsed();

    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "canal-agent scale benchmark: {n} Node objects added to a running agent (one netns, real kube-apiserver)"
    );
    println!(
        "  API: {n} Node creates ({IN_FLIGHT} in flight) took          {:>8.2} s",
        created.as_secs_f64()
    );
    println!(
        "  all {n} routes + neighbours + FDB entries in the kernel   {:>8.2} s after the first create",
        total.as_secs_f64()
    );
    println!(
        "  canal_network_programming_duration_seconds: mean {:.3} s over {lat_count} peer changes",
        lat_sum / lat_count
    );
    println!(
        "  full sync at {n} peers (incl. startup syncs): mean {:.1} ms over {sync_count} syncs ({resyncs} periodic)",
        1000.0 * sync_sum / sync_count
    );
    println!(
        "  agent VmRSS: {:.1} MiB idle (0 peers), {:.1} MiB right after, {:.1} MiB after resyncs; peak VmHWM {:.1} MiB",
        mib(rss_idle),
        mib(rss),
        mib(rss_steady),
        mib(hwm)
    );
    println!(
        "  delete all {n}: API {:.2} s; kernel clean {:.2} s after the first delete",
        deleted.as_secs_f64(),
        cleaned.as_secs_f64()
    );
    drop(agent);
}
