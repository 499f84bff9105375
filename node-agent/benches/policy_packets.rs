//! The packet path under policy: new TCP connections per second (and
//! connect + first byte latency) from one pod to another on the same node
//! with 250 local endpoints under policy, on nftables, on iptables and with
//! no policy, in throwaway namespaces (same node, same pods, same run).
//! Every connection is new, so every SYN walks the whole policy path: on
//! iptables one `-o <iface>` rule per endpoint until the target's (the
//! pods here sort last), on nftables one verdict-map lookup. Needs root.
//!
//! `cargo bench -p canal-agent --bench policy_packets` (env
//! BENCH_CONNECTIONS=3000, BENCH_ENDPOINTS=250).

#[path = "../tests/support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use canal_agent::policy::{
    DataplaneChoice, EnforcementConfig, Exec, PolicyEnforcer, PolicyInputs, PolicyMetrics,
};
use canal_crds::{
    CompiledPolicy, Endpoint, NodePolicySetSpec, Peer, PeerSetSpec, PortMatch, Protocol, Rule,
};
use netns::Netns;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Pod {
    ns: Netns,
    ip: Ipv4Addr,
}

fn pod(node: &Netns, iface: &str, ip: &str) -> Pod {
    let ns = Netns::new("pp-pod");
    node.sh(&format!(
        "ip link add {iface} type veth peer name eth0 netns {pod} \
         && ip link set {iface} up \
         && sysctl -qw net.ipv4.conf.{iface}.proxy_arp=1 net.ipv4.neigh.{iface}.proxy_delay=0 \
         && ip route add {ip}/32 dev {iface} scope link",
        pod = ns.name
    ));
    ns.sh(&format!(
        "ip addr add {ip}/32 dev eth0 && ip link set eth0 up \
         && ip route add 169.254.1.1 dev eth0 scope link \
         && ip route add default via 169.254.1.1 dev eth0"
    ));
    Pod {
        ns,
        ip: ip.parse().unwrap(),
    }
}

fn inputs(
    endpoints: usize,
    client: &Pod,
    server: &Pod,
    dataplane: DataplaneChoice,
) -> PolicyInputs {
    let mut eps: Vec<Endpoint> = (0..endpoints - 2)
        .map(|i| Endpoint {
            namespace: "bench".into(),
            pod: format!("pod-{i}"),
            interface: format!("cali{i:011x}"),
            ips: vec![format!("10.244.{}.{}", 2 + i / 250, 2 + i % 250)],
            named_ports: vec![],
            ingress_policies: vec![format!("bench/p-{}", i % 50)],
            egress_policies: vec![],
        })
        .collect();
    // The measured pods sort last: the iptables dispatch walks every other first.
    for (iface, p, name) in [
        ("califfffffffff1", client, "client"),
        ("califfffffffff2", server, "server"),
    ] {
        eps.push(Endpoint {
            namespace: "bench".into(),
            pod: name.into(),
            interface: iface.into(),
            ips: vec![p.ip.to_string()],
            named_ports: vec![],
            ingress_policies: vec!["bench/to-server".into()],
            egress_policies: vec!["bench/from-client".into()],
        });
    }
    let rule = |ps: &str, port: u16| Rule {
        peers: Some(vec![Peer {
            peer_set: Some(ps.into()),
            ip_block: None,
        }]),
        ports: vec![PortMatch {
            protocol: Protocol::TCP,
            port: Some(port),
            end_port: None,
            named_port: None,
            named_port_set: None,
        }],
    };
    let mut policies: Vec<CompiledPolicy> = (0..50)
        .map(|p| CompiledPolicy {
            name: format!("bench/p-{p}"),
            ingress: (0..20)
                .map(|k| rule(&format!("ps-{}", (p + k) % 20), 1000 + k as u16))
                .collect(),
            egress: vec![],
        })
        .collect();
    policies.push(CompiledPolicy {
        name: "bench/to-server".into(),
        ingress: vec![rule("ps-clients", 80)],
        egress: vec![],
    });
    policies.push(CompiledPolicy {
        name: "bench/from-client".into(),
        ingress: vec![],
        egress: vec![rule("ps-servers", 80)],
    });
    let mut peer_sets: BTreeMap<String, PeerSetSpec> = (0..20)
        .map(|i| {
            let ips = (0..500)
                .map(|j| format!("10.{}.{}.{}", 100 + i, j / 256, j % 256))
                .collect();
            (
                format!("ps-{i}"),
                PeerSetSpec {
                    ips,
                    ..PeerSetSpec::default()
                },
            )
        })
        .collect();
    let mut clients: Vec<String> = (0..499)
        .map(|j| format!("10.99.{}.{}", j / 256, j % 256))
        .collect();
    clients.push(client.ip.to_string());
    peer_sets.insert(
        "ps-clients".into(),
        PeerSetSpec {
            ips: clients,
            ..PeerSetSpec::default()
        },
    );
    peer_sets.insert(
        "ps-servers".into(),
        PeerSetSpec {
            ips: vec![server.ip.to_string()],
            ..PeerSetSpec::default()
        },
    );
    PolicyInputs {
        config: EnforcementConfig {
            dataplane,
            ..EnforcementConfig::default()
        },
        generation: Some(1),
        spec: NodePolicySetSpec {
            endpoints: eps,
            policies,
        },
        peer_sets,
        endpoints_unknown: false,
    }
}

/// `n` connections from `client` (connect, read 2 bytes, close): the rate
/// and the latency percentiles.
fn connections(client: &Pod, server: Ipv4Addr, n: usize) -> (f64, Duration, Duration) {
    client.ns.run_in(move || {
        let mut lat = Vec::with_capacity(n);
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((server, 80)), Duration::from_secs(2))
                    .expect("an allowed connection");
            let mut buf = [0u8; 2];
            s.read_exact(&mut buf).expect("the server's greeting");
            lat.push(t.elapsed());
            // RST instead of TIME_WAIT: the client's ports do not run out.
            // (SO_LINGER through nix: std's set_linger is unstable.)
            let _ = nix::sys::socket::setsockopt(
                &s,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        lat.sort();
        (rate, lat[n / 2], lat[(n * 99) / 100])
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if !netns::can_run() {
        eprintln!("policy_packets bench needs root with iptables, ipset and nftables; skipped");
        return;
    }
    let n = env_usize("BENCH_CONNECTIONS", 3000);
    let endpoints = env_usize("BENCH_ENDPOINTS", 250);
    let node = Netns::new("pp-node");
    node.sh("sysctl -qw net.ipv4.ip_forward=1 \
         && ip link add uplink type veth peer name uplink-peer \
         && ip link set uplink up && ip link set uplink-peer up \
         && ip addr add 192.168.255.1/24 dev uplink \
         && ip route add default via 192.168.255.254 dev uplink onlink");
    let client = pod(&node, "califfffffffff1", "10.244.1.2");
    let server = pod(&node, "califfffffffff2", "10.244.1.3");
    let stop = Arc::new(AtomicBool::new(false));
    let listener = server
        .ns
        .run_in(|| TcpListener::bind(("0.0.0.0", 80)).unwrap());
    let s = stop.clone();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            if s.load(Ordering::SeqCst) {
                return;
            }
            if let Ok(mut c) = c {
                let _ = c.write_all(b"hi");
            }
        }
    });
    println!(
        "policy_packets benchmark: {endpoints} local endpoints under policy, {n} new TCP connections per dataplane"
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("  machine load average at start: {}", load.trim());
    }
    let run_dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (name, dp) in [
        ("no policy", None),
        ("iptables", Some(DataplaneChoice::IpTables)),
        ("nftables", Some(DataplaneChoice::NfTables)),
        ("no policy (again)", None),
    ] {
        let mut e = PolicyEnforcer::new(run_dir.path(), PolicyMetrics::unregistered().unwrap())
            .with_exec(Exec::in_netns(&node.path).unwrap());
        if let Some(dp) = dp {
            let s = e
                .sync(&inputs(endpoints, &client, &server, dp))
                .await
                .unwrap();
            assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        } else {
            // Both dataplanes emptied (a disabled, endpoint-less enforcer
            // keeps only an rpf check; clear that too).
            node.sh("nft delete table inet canal 2>/dev/null; iptables -t raw -F; iptables -F; iptables -t security -F; true");
        }
        let _ = connections(&client, server.ip, 200); // warm up
        let (rate, p50, p99) = connections(&client, server.ip, n);
        println!(
            "  {name:<18} {rate:>8.0} connections/s   connect+first byte p50 {:.3} ms  p99 {:.3} ms",
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0
        );
        results.push((name, rate));
        if dp.is_some() {
            node.sh("nft delete table inet canal 2>/dev/null; true");
            // Remove the iptables state through the enforcer's own switch.
            let mut off = inputs(endpoints, &client, &server, DataplaneChoice::NfTables);
            off.config.enabled = false;
            e.sync(&off).await.unwrap();
        }
    }
    stop.store(true, Ordering::SeqCst);
    let base = results[0].1;
    for (name, rate) in &results[1..3] {
        println!(
            "  {name}: {:+.1}% connections/s vs no policy",
            (rate / base - 1.0) * 100.0
        );
    }
}
