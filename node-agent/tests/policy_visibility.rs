//! Kernel tests of denied-flow visibility and `spec.policy.established`:
//! long TCP and UDP streams through a "node" namespace with `cali` veths,
//! on both dataplanes. With `Cut`, a change that denies a stream ends it at
//! once while an allowed stream to the same port goes on, and a change that
//! keeps a stream allowed cuts nothing; with `Keep`, streams go on. Denied
//! probes move the per-endpoint and per-policy counters. Needs root.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canal_agent::policy::{
    DataplaneChoice, EnforcementConfig, Exec, Families, PolicyEnforcer, PolicyInputs, PolicyMetrics,
};
use canal_crds::{
    CompiledPolicy, Endpoint, EstablishedFlows, NodePolicySetSpec, Peer, PeerSelector, PeerSetSpec,
    PortMatch, Protocol, Rule,
};
use support::netns::{Netns, can_run};

struct Pod {
    ns: Netns,
    ip: IpAddr,
    iface: String,
}

fn pod(node: &Netns, prefix: &str, iface: &str, ip: &str) -> Pod {
    let ns = Netns::new(prefix);
    if ip.contains(':') {
        // IPv6: the node answers for fe80::1 on every pod link; no DAD.
        node.sh(&format!(
            "sysctl -qw net.ipv6.conf.default.accept_dad=0 \
             && ip link add {iface} type veth peer name eth0 netns {pod} \
             && ip link set {iface} up \
             && ip -6 addr add fe80::1/64 dev {iface} nodad \
             && ip -6 route add {ip}/128 dev {iface}",
            pod = ns.name
        ));
        ns.sh(&format!(
            "sysctl -qw net.ipv6.conf.eth0.accept_dad=0 \
             && ip -6 addr add {ip}/128 dev eth0 nodad && ip link set eth0 up \
             && ip -6 route add default via fe80::1 dev eth0"
        ));
        return Pod {
            ns,
            ip: ip.parse().unwrap(),
            iface: iface.into(),
        };
    }
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
        iface: iface.into(),
    }
}

fn node() -> Netns {
    let node = Netns::new("pv-node");
    node.sh(
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
         && ip link add uplink type veth peer name uplink-peer \
         && ip link set uplink up && ip link set uplink-peer up \
         && ip addr add 192.168.255.1/24 dev uplink \
         && ip route add default via 192.168.255.254 dev uplink onlink",
    );
    node
}

/// The unspecified address of `ip`'s family.
fn any(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// What the server received, by peer address: (TCP bytes, UDP datagrams).
type Received = Arc<Mutex<HashMap<IpAddr, (u64, u64)>>>;

/// Everything started here stops when the guard drops.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// TCP and UDP echo on `port` in the server pod, counting what arrives.
fn serve(p: &Pod, port: u16, stop: &Arc<AtomicBool>) -> Received {
    let got: Received = Arc::default();
    let any = any(p.ip);
    let (tcp, udp) = p.ns.run_in(move || {
        (
            TcpListener::bind((any, port)).unwrap(),
            UdpSocket::bind((any, port)).unwrap(),
        )
    });
    tcp.set_nonblocking(true).unwrap();
    let (s, g) = (stop.clone(), got.clone());
    std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            let Ok((mut c, peer)) = tcp.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let (s, g) = (s.clone(), g.clone());
            std::thread::spawn(move || {
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                while !s.load(Ordering::SeqCst) {
                    match c.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            g.lock().unwrap().entry(peer.ip()).or_default().0 += n as u64;
                            // Echo: the server talks too (the reverse direction
                            // of a cut flow must stay dropped).
                            let _ = c.write_all(&buf[..n]);
                        }
                        Err(_) => {}
                    }
                }
            });
        }
    });
    udp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let (s, g) = (stop.clone(), got.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !s.load(Ordering::SeqCst) {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                g.lock().unwrap().entry(from.ip()).or_default().1 += 1;
                let _ = udp.send_to(&buf[..n], from);
            }
        }
    });
    got
}

/// A TCP stream from `from` to `to:port`: 64 bytes every 10 ms, echo drained.
fn tcp_stream(from: &Pod, to: IpAddr, port: u16, stop: &Arc<AtomicBool>) {
    let mut c = from.ns.run_in(move || {
        TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(3)).unwrap()
    });
    c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    c.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !s.load(Ordering::SeqCst) {
            // A blocked stream fills its send buffer: keep trying, as an
            // application would, until the test ends.
            let _ = c.write(&[7u8; 64]);
            let _ = c.read(&mut buf);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

/// A UDP stream (one socket, one source port) every 10 ms, echo drained.
fn udp_stream(from: &Pod, to: IpAddr, port: u16, stop: &Arc<AtomicBool>) {
    let a = any(to);
    let u = from.ns.run_in(move || UdpSocket::bind((a, 0)).unwrap());
    u.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !s.load(Ordering::SeqCst) {
            let _ = u.send_to(b"stream", (to, port));
            let _ = u.recv_from(&mut buf);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

fn endpoint(ns: &str, p: &Pod, name: &str, ingress: &[&str]) -> Endpoint {
    Endpoint {
        namespace: ns.into(),
        pod: name.into(),
        interface: p.iface.clone(),
        ips: vec![p.ip.to_string()],
        named_ports: vec![],
        ingress_policies: ingress.iter().map(|s| s.to_string()).collect(),
        egress_policies: vec![],
    }
}

fn port80(protocol: Protocol) -> PortMatch {
    PortMatch {
        protocol,
        port: Some(80),
        end_port: None,
        named_port: None,
        named_port_set: None,
    }
}

/// The server admits TCP and UDP 80 from the PeerSet `ps` only.
fn isolate(inputs: &mut PolicyInputs, ns: &str, members: &[IpAddr]) {
    let policy = format!("{ns}/allow-peers");
    inputs.spec.endpoints[2].ingress_policies = vec![policy.clone()];
    inputs.spec.policies = vec![CompiledPolicy {
        name: policy,
        ingress: vec![Rule {
            peers: Some(vec![Peer {
                peer_set: Some("ps".into()),
                ip_block: None,
            }]),
            ports: vec![port80(Protocol::TCP), port80(Protocol::UDP)],
        }],
        egress: vec![],
    }];
    inputs.peer_sets = BTreeMap::from([(
        "ps".to_string(),
        PeerSetSpec {
            selector: PeerSelector::default(),
            member_count: members.len() as u32,
            ips: members.iter().map(|m| m.to_string()).collect(),
            ports: vec![],
        },
    )]);
    inputs.generation = inputs.generation.map(|g| g + 1);
}

fn progress(got: &Received, ip: IpAddr) -> (u64, u64) {
    got.lock().unwrap().get(&ip).copied().unwrap_or_default()
}

/// Whether both halves (TCP, UDP) of `ip`'s streams grow over `window`.
fn grows(got: &Received, ip: IpAddr, window: Duration) -> (bool, bool) {
    let a = progress(got, ip);
    std::thread::sleep(window);
    let b = progress(got, ip);
    (b.0 > a.0, b.1 > a.1)
}

/// Marked (cut) conntrack entries from `src`, one line each.
fn cut_entries(node: &Netns, src: IpAddr) -> Vec<String> {
    let f = if src.is_ipv6() { "ipv6" } else { "ipv4" };
    let out = node.sh_output(&format!(
        "conntrack -L -f {f} --orig-src {src} --mark 0x1000000/0x1000000 2>/dev/null"
    ));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn denied_count(endpoint: &str) -> u64 {
    canal_agent::policy::denied::METRICS
        .packets
        .with_label_values(&[endpoint, "ingress"])
        .get()
}

fn denied_by_policy(policy: &str) -> u64 {
    canal_agent::policy::denied::METRICS
        .by_policy
        .with_label_values(&[policy, "ingress"])
        .get()
}

/// One fresh TCP connection attempt and a few datagrams from a new port.
fn denied_probe(from: &Pod, to: IpAddr) {
    from.ns.run_in(move || {
        let _ = TcpStream::connect_timeout(&SocketAddr::from((to, 80)), Duration::from_millis(300));
        let u = UdpSocket::bind((any(to), 0)).unwrap();
        for _ in 0..3 {
            let _ = u.send_to(b"probe", (to, 80));
        }
    });
}

async fn established(dataplane: DataplaneChoice, mode: EstablishedFlows, v6: bool) {
    assert!(can_run(), "kernel tests need root, iptables, ipset");
    let tag = format!(
        "pv{}-{}-{}",
        if v6 { "6" } else { "" },
        match dataplane {
            DataplaneChoice::NfTables => "nft",
            _ => "ipt",
        },
        match mode {
            EstablishedFlows::Cut => "cut",
            EstablishedFlows::Keep => "keep",
        }
    );
    let node = node();
    let addr = |n: u8| match v6 {
        false => format!("10.244.1.{n}"),
        true => format!("fd00:10:244:1::{n}"),
    };
    let client = pod(&node, "pv-cli", "cali00000000c01", &addr(2));
    let other = pod(&node, "pv-oth", "cali00000000c02", &addr(4));
    let server = pod(&node, "pv-srv", "cali00000000d01", &addr(3));
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = Stop(stop.clone());
    let got = serve(&server, 80, &stop);
    let run_dir = tempfile::tempdir().unwrap();
    let mut e = PolicyEnforcer::new(run_dir.path(), PolicyMetrics::unregistered().unwrap())
        .with_exec(Exec::in_netns(&node.path).unwrap());
    let mut inputs = PolicyInputs {
        config: EnforcementConfig {
            dataplane,
            established: mode,
            // The log on with Cut, off with Keep: off must log nothing.
            log_denied: mode == EstablishedFlows::Cut,
            families: if v6 { Families::DUAL } else { Families::V4 },
            ..EnforcementConfig::default()
        },
        generation: Some(1),
        spec: NodePolicySetSpec {
            endpoints: vec![
                endpoint(&tag, &client, "client", &[]),
                endpoint(&tag, &other, "other", &[]),
                endpoint(&tag, &server, "server", &[]),
            ],
            policies: vec![],
        },
        peer_sets: BTreeMap::new(),
        endpoints_unknown: false,
    };
    e.sync(&inputs).await.unwrap();
    let (s, c, o) = (server.ip, client.ip, other.ip);
    // Neighbours first (proxy ARP), then the streams.
    node.sh(&format!(
        "ping -c1 -W2 {s} >/dev/null; ping -c1 -W2 {c} >/dev/null; ping -c1 -W2 {o} >/dev/null"
    ));
    tcp_stream(&client, s, 80, &stop);
    udp_stream(&client, s, 80, &stop);
    tcp_stream(&other, s, 80, &stop);
    let w = Duration::from_millis(400);
    assert_eq!(grows(&got, c, w), (true, true), "client streams flow");
    assert!(grows(&got, o, w).0, "other's stream flows");

    // A change that keeps every stream allowed cuts nothing.
    isolate(&mut inputs, &tag, &[c, o]);
    e.sync(&inputs).await.unwrap();
    assert_eq!(
        grows(&got, c, w),
        (true, true),
        "still allowed: client streams go on"
    );
    assert!(grows(&got, o, w).0, "still allowed: other's stream goes on");
    assert!(cut_entries(&node, c).is_empty(), "nothing cut");

    // Deny the client; `other` keeps the same port.
    isolate(&mut inputs, &tag, &[o]);
    let before = (
        denied_count(&format!("{tag}/server")),
        denied_by_policy(&format!("{tag}/allow-peers")),
    );
    let cut = &canal_agent::policy::conntrack::METRICS.duration;
    let (sum0, n0) = (cut.get_sample_sum(), cut.get_sample_count());
    let synced = e.sync(&inputs).await.unwrap();
    let enforced = Instant::now();
    eprintln!(
        "{tag}: the denying sync took {:?}; cut pass(es) meanwhile: {} taking {:.2} ms",
        synced.duration,
        cut.get_sample_count() - n0,
        (cut.get_sample_sum() - sum0) * 1e3
    );
    // Sample until 1 s after enforcement: when did the client's streams last move?
    let mut last = progress(&got, c);
    let mut last_move = Duration::ZERO;
    while enforced.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(10));
        let now = progress(&got, c);
        if now != last {
            last = now;
            last_move = enforced.elapsed();
        }
    }
    let after = grows(&got, c, Duration::from_millis(1500));
    let other_goes_on = grows(&got, o, w).0;
    eprintln!(
        "{tag}: client streams last moved {last_move:?} after the sync returned; afterwards (tcp, udp) grew: {after:?}"
    );
    assert!(
        other_goes_on,
        "{tag}: the allowed stream to the same port goes on"
    );
    match mode {
        EstablishedFlows::Cut => {
            assert_eq!(after, (false, false), "{tag}: denied streams are cut");
            assert!(last_move < Duration::from_secs(1), "{last_move:?}");
            let cut = cut_entries(&node, c);
            assert!(
                cut.iter().any(|l| l.starts_with("tcp"))
                    && cut.iter().any(|l| l.starts_with("udp")),
                "{tag}: the client's TCP and UDP entries are cut: {cut:?}"
            );
            assert!(
                cut_entries(&node, o).is_empty(),
                "{tag}: other's entry is not cut"
            );
        }
        EstablishedFlows::Keep => {
            assert_eq!(
                after,
                (true, true),
                "{tag}: Keep leaves established streams"
            );
            assert!(cut_entries(&node, c).is_empty());
        }
    }

    // New connections from the client are denied and counted.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        denied_probe(&client, s);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = (
            denied_count(&format!("{tag}/server")),
            denied_by_policy(&format!("{tag}/allow-peers")),
        );
        if now.0 > before.0 && now.1 > before.1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: denied counters did not move: {before:?} -> {now:?}"
        );
    }

    // The denied-connection log names the connection and the policy.
    let logged = |tag: &str| -> Vec<String> {
        canal_agent::policy::flowlog::RECENT
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, pod, _)| pod == &format!("{tag}/server"))
            .map(|(d, pod, policies)| {
                format!(
                    "{} {} {} {} {} {pod} {policies:?}",
                    d.src, d.dst, d.protocol, d.port, d.direction
                )
            })
            .collect()
    };
    match mode {
        EstablishedFlows::Cut => {
            let want_tcp = format!("{c} {s} TCP 80 ingress {tag}/server [\"{tag}/allow-peers\"]");
            let want_udp = format!("{c} {s} UDP 80 ingress {tag}/server [\"{tag}/allow-peers\"]");
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let lines = logged(&tag);
                if lines.contains(&want_tcp) && lines.contains(&want_udp) {
                    break;
                }
                assert!(Instant::now() < deadline, "{tag}: log lines {lines:?}");
                denied_probe(&client, s);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        EstablishedFlows::Keep => {
            assert!(logged(&tag).is_empty(), "{tag}: logDenied off logs nothing");
        }
    }

    if mode == EstablishedFlows::Cut {
        // The agent restarts between the cut and the release: a new
        // enforcer on the same run directory, which remembers nothing of
        // the cut (the marks in conntrack are the only record).
        drop(e);
        let mut e = PolicyEnforcer::new(run_dir.path(), PolicyMetrics::unregistered().unwrap())
            .with_exec(Exec::in_netns(&node.path).unwrap());
        e.sync(&inputs).await.unwrap();
        assert!(
            !grows(&got, c, Duration::from_millis(400)).1,
            "{tag}: still denied after the restart: UDP stays cut"
        );
        assert!(!cut_entries(&node, c).is_empty(), "{tag}: still cut");
        // Allowed again: the cut entries are released and UDP resumes.
        isolate(&mut inputs, &tag, &[c, o]);
        e.sync(&inputs).await.unwrap();
        assert!(cut_entries(&node, c).is_empty(), "{tag}: released");
        let deadline = Instant::now() + Duration::from_secs(3);
        while !grows(&got, c, Duration::from_millis(200)).1 {
            assert!(Instant::now() < deadline, "{tag}: UDP resumes once allowed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_ends_denied_streams_and_spares_allowed_ones_on_iptables() {
    established(DataplaneChoice::IpTables, EstablishedFlows::Cut, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_ends_denied_streams_and_spares_allowed_ones_on_nftables() {
    established(DataplaneChoice::NfTables, EstablishedFlows::Cut, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_leaves_denied_established_streams_on_iptables() {
    established(DataplaneChoice::IpTables, EstablishedFlows::Keep, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_leaves_denied_established_streams_on_nftables() {
    established(DataplaneChoice::NfTables, EstablishedFlows::Keep, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_ends_denied_ipv6_streams_on_iptables() {
    established(DataplaneChoice::IpTables, EstablishedFlows::Cut, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_ends_denied_ipv6_streams_on_nftables() {
    established(DataplaneChoice::NfTables, EstablishedFlows::Cut, true).await;
}
