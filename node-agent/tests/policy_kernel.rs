//! Kernel tests of policy enforcement: apply into throwaway network
//! namespaces, read the kernel back, change things, restart, drift, and real
//! TCP/UDP packets through a "node" namespace with `cali` veths. Needs root
//! and iptables (nft backend) + ipset, as CI has.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use canal_agent::policy::{
    DataplaneChoice, EnforcementConfig, Exec, KernelState, PolicyEnforcer, PolicyInputs,
    PolicyMetrics, Retry, Tools, render,
};
use canal_crds::{
    CompiledPolicy, Endpoint, EndpointToHostAction, IpBlock, NamedPort, NodePolicySetSpec, Peer,
    PeerSelector, PeerSetSpec, PortMatch, Protocol, Rule,
};
use serde::Deserialize;
use support::netns::{Netns, can_run};

fn require_root() {
    assert!(
        can_run(),
        "kernel tests need root and iptables-restore/iptables-save/ipset (apt-get install iptables ipset)"
    );
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    generation: Option<i64>,
    spec: NodePolicySetSpec,
    #[serde(default)]
    peer_sets: BTreeMap<String, PeerSetSpec>,
}

/// The golden test's richest input (every rule shape, SCTP included).
fn web_mixed() -> PolicyInputs {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/web-mixed.yaml");
    let c: Case = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    PolicyInputs {
        config: EnforcementConfig {
            dataplane: DataplaneChoice::IpTables,
            ..EnforcementConfig::default()
        },
        generation: c.generation,
        spec: c.spec,
        peer_sets: c.peer_sets,
        endpoints_unknown: false,
    }
}

fn enforcer(ns: &Netns, run_dir: &Path) -> (PolicyEnforcer, PolicyMetrics) {
    let metrics = PolicyMetrics::unregistered().unwrap();
    let e =
        PolicyEnforcer::new(run_dir, metrics.clone()).with_exec(Exec::in_netns(&ns.path).unwrap());
    (e, metrics)
}

fn restores(m: &PolicyMetrics) -> u64 {
    m.restores.with_label_values(&["iptables"]).get()
        + m.restores.with_label_values(&["ipset"]).get()
}

/// The kernel's policy state, compared structurally with the desired ruleset.
fn read_back(ns: &Netns) -> KernelState {
    KernelState::parse(
        &ns.sh("iptables-save -t raw; iptables-save -t filter; iptables-save -t security"),
        &ns.sh("ipset save"),
    )
}

fn assert_kernel_matches(ns: &Netns, inputs: &PolicyInputs) {
    let want = KernelState::from_ruleset(&render(inputs).ruleset);
    let have = read_back(ns);
    let names = |s: &KernelState| s.chains.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&have), names(&want), "chains: observed vs expected");
    for (name, hashes) in &want.chains {
        assert_eq!(&have.chains[name], hashes, "rules of chain {name}");
    }
    for (builtin, hooks) in &want.hooks {
        let got = &have.hooks[builtin];
        assert_eq!(
            got.len(),
            1,
            "{builtin:?}: one hook expected, observed {got:?}"
        );
        assert_eq!(got[0].position, 1, "{builtin:?}: hook must be first");
        assert_eq!(got[0].hash, hooks[0].hash);
    }
    assert_eq!(
        have.hooks.len(),
        want.hooks.len(),
        "hooks: {:?}",
        have.hooks
    );
    assert_eq!(
        have.sets.keys().collect::<Vec<_>>(),
        want.sets.keys().collect::<Vec<_>>(),
        "sets"
    );
    for (name, set) in &want.sets {
        assert_eq!(have.sets[name].set_type, set.set_type, "type of {name}");
        assert_eq!(have.sets[name].members, set.members, "members of {name}");
    }
}

fn endpoint_files(run_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(run_dir.join("endpoints"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn apply_reads_back_and_second_sync_is_a_no_op() {
    require_root();
    let ns = Netns::new("pa-apply");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, m) = enforcer(&ns, run_dir.path());
    let inputs = web_mixed();

    let first = e.sync(&inputs).await.unwrap();
    assert!(first.full && first.applied, "{first:?}");
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    assert_kernel_matches(&ns, &inputs);
    // The text iptables-save prints is what the renderer wrote (modulo match order).
    let save = ns.sh("iptables-save -t filter");
    assert!(
        save.contains("-A FORWARD -m comment --comment \"canal:"),
        "{save}"
    );
    assert!(save.contains("--match-set"), "{save}");
    assert_eq!(
        endpoint_files(run_dir.path()),
        inputs
            .spec
            .endpoints
            .iter()
            .map(|e| e.interface.clone())
            .collect()
    );
    assert_eq!(
        std::fs::read_to_string(run_dir.path().join("endpoints/cali1a2b3c4d5e6")).unwrap(),
        "7\n"
    );
    assert!(run_dir.path().join("policy-enabled").exists());

    let before = restores(&m);
    let second = e.sync(&inputs).await.unwrap();
    assert!(!second.applied && !second.full, "{second:?}");
    assert_eq!(
        restores(&m),
        before,
        "a second sync must execute no restore"
    );
    assert_kernel_matches(&ns, &inputs);
}

/// Past 64 pods on a node the anti-spoofing state must still load: wave 2's
/// `0.0.0.0/0,<iface>` set members all hashed to one bucket and the whole
/// ipset restore failed ("Hash is full"), leaving no policy programmed.
#[tokio::test]
async fn a_node_with_150_pods_half_without_ips_yet_is_programmed() {
    require_root();
    let ns = Netns::new("pa-many");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, _) = enforcer(&ns, run_dir.path());
    let mut inputs = web_mixed();
    for i in 0..150 {
        inputs.spec.endpoints.push(Endpoint {
            namespace: "many".into(),
            pod: format!("p{i}"),
            interface: format!("cali{i:011x}"),
            // Odd pods: wired by canal-cni, IP not in the NodePolicySet yet.
            ips: if i % 2 == 0 {
                vec![format!("10.244.1.{}", 100 + i / 2)]
            } else {
                vec![]
            },
            ..Endpoint::default()
        });
    }
    let s = e.sync(&inputs).await.expect("150 endpoints programmed");
    assert!(s.applied, "{s:?}");
    assert_kernel_matches(&ns, &inputs);
    // Every known interface without an address match is dropped by a rule
    // of its own, counted as source_not_assigned.
    let raw = ns.sh("iptables-save -t raw");
    let drops = raw.matches("not an address of the pod").count();
    let routed = raw.matches("pod IPs not known yet").count();
    assert!(
        drops >= 75 && routed >= 75,
        "{drops} drops, {routed} returns:\n{raw}"
    );
    assert!(
        !e.sets_drifted().await.unwrap(),
        "the sets read back as written"
    );
}

#[tokio::test]
async fn incremental_changes_touch_only_affected_chains_and_sets() {
    require_root();
    let ns = Netns::new("pa-incr");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, _m) = enforcer(&ns, run_dir.path());
    let mut inputs = web_mixed();
    e.sync(&inputs).await.unwrap();

    // A pod elsewhere joins a PeerSet: one member added, no chain written.
    inputs
        .peer_sets
        .get_mut("ps-frontend")
        .unwrap()
        .ips
        .push("10.244.4.4".into());
    let s = e.sync(&inputs).await.unwrap();
    assert!(s.applied);
    assert_eq!(s.written_chains, Vec::<String>::new());
    assert_eq!(
        (s.plan.members_added, s.plan.members_removed),
        (1, 0),
        "{:?}",
        s.plan
    );
    assert_kernel_matches(&ns, &inputs);

    // A new local pod: its two chains, the two dispatch chains and its
    // anti-spoofing drop rule, nothing else.
    inputs.spec.endpoints.push(Endpoint {
        namespace: "shop".into(),
        pod: "web-1".into(),
        interface: "cali77777777777".into(),
        ips: vec!["10.244.1.7".into()],
        named_ports: vec![NamedPort {
            name: "http".into(),
            protocol: Protocol::TCP,
            port: 8080,
        }],
        ingress_policies: vec!["shop/allow-frontend".into()],
        egress_policies: vec![],
    });
    let s = e.sync(&inputs).await.unwrap();
    assert_eq!(
        s.written_chains,
        vec![
            "CANAL-PREROUTING",
            "CANAL-FROM-WL",
            "CANAL-FW-cali77777777777",
            "CANAL-TO-WL",
            "CANAL-TW-cali77777777777"
        ]
    );
    // Its named port joins the node-local named-port set, its address and
    // interface the anti-spoofing set.
    assert_eq!(s.plan.members_added, 2, "{:?}", s.plan);
    assert_kernel_matches(&ns, &inputs);
    assert!(endpoint_files(run_dir.path()).contains("cali77777777777"));

    // A policy stops isolating the db pod: its chains change, the policy chains
    // and the sets only it used are deleted after the jumps to them are gone.
    let db = inputs
        .spec
        .endpoints
        .iter_mut()
        .find(|e| e.pod == "db-0")
        .unwrap();
    db.ingress_policies.clear();
    db.egress_policies.clear();
    inputs.spec.policies.retain(|p| p.name != "shop/db");
    let s = e.sync(&inputs).await.unwrap();
    assert_eq!(
        s.written_chains,
        vec!["CANAL-FW-cali0f0f0f0f0f0", "CANAL-TW-cali0f0f0f0f0f0"]
    );
    assert_eq!(s.plan.chains_deleted, 2, "{:?}", s.plan);
    assert_eq!(s.plan.sets_destroyed, 2, "{:?}", s.plan);
    assert_kernel_matches(&ns, &inputs);

    // The pod goes away: its file goes, its chains go.
    inputs.spec.endpoints.retain(|e| e.pod != "web-1");
    e.sync(&inputs).await.unwrap();
    assert!(!endpoint_files(run_dir.path()).contains("cali77777777777"));
    assert_kernel_matches(&ns, &inputs);
}

#[tokio::test]
async fn drift_is_detected_and_repaired() {
    require_root();
    let ns = Netns::new("pa-drift");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, m) = enforcer(&ns, run_dir.path());
    let inputs = web_mixed();
    e.sync(&inputs).await.unwrap();

    let clean = e.check_drift().await.unwrap().unwrap();
    assert!(clean.full && !clean.applied, "no drift expected: {clean:?}");

    let desired = render(&inputs).ruleset;
    let (set, set_def) = desired
        .sets
        .iter()
        .find(|(_, s)| s.members.len() > 1)
        .unwrap();
    let member = set_def
        .members
        .iter()
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    ns.sh(&format!(
        "iptables -D CANAL-TO-WL 1 && iptables -D FORWARD 1 && ipset del {set} {member} && iptables -I CANAL-INPUT 1 -j ACCEPT && iptables -I INPUT 1 -s 192.0.2.1 -j ACCEPT"
    ));
    let repaired = e.check_drift().await.unwrap().unwrap();
    assert!(repaired.applied, "{repaired:?}");
    assert_eq!(
        repaired.written_chains,
        vec!["CANAL-INPUT", "CANAL-TO-WL"],
        "only the damaged chains are rewritten"
    );
    // FORWARD's hook was deleted, INPUT's pushed to position 2: both back at 1.
    assert_eq!(repaired.plan.hooks_fixed, 2);
    assert_eq!(repaired.plan.members_added, 1);
    assert_kernel_matches(&ns, &inputs);
    assert_eq!(m.drift_repairs.with_label_values(&["chain"]).get(), 2);
    assert_eq!(m.drift_repairs.with_label_values(&["hook"]).get(), 2);
    assert!(
        ns.sh("iptables-save -t filter")
            .contains("-A INPUT -s 192.0.2.1/32 -j ACCEPT"),
        "someone else's rule stays"
    );
    assert_eq!(m.drift_repairs.with_label_values(&["set"]).get(), 1);
}

#[tokio::test]
async fn restart_adopts_kernel_state_without_flushing() {
    require_root();
    let ns = Netns::new("pa-restart");
    let run_dir = tempfile::tempdir().unwrap();
    let inputs = web_mixed();
    {
        let (mut e, _) = enforcer(&ns, run_dir.path());
        e.sync(&inputs).await.unwrap();
    }
    // While "the agent is down": a stale policy chain and set from an older
    // generation, the overlay's own chain (not ours), a leftover endpoint file.
    ns.sh(
        "iptables -N CANAL-PI-00000000deadbeef && iptables -A CANAL-PI-00000000deadbeef -j ACCEPT \
         && iptables -N CANAL-FWD-ALLOW && iptables -A FORWARD -j CANAL-FWD-ALLOW \
         && ipset create canal-00000000deadbeef hash:net",
    );
    std::fs::write(run_dir.path().join("endpoints/caligone0000000"), "3\n").unwrap();
    // Packet counters survive only if no chain is rewritten: remember them.
    let before = read_back(&ns);

    let (mut e, m) = enforcer(&ns, run_dir.path());
    e.adopt_kernel_state().await.unwrap();
    assert!(!before.chains.is_empty());
    let s = e.sync(&inputs).await.unwrap();
    assert_eq!(
        s.written_chains,
        Vec::<String>::new(),
        "nothing rewritten: {s:?}"
    );
    assert_eq!(s.plan.chains_deleted, 1);
    assert_eq!(s.plan.sets_destroyed, 1);
    assert_eq!(s.plan.hooks_fixed, 0);
    assert_eq!(m.restores.with_label_values(&["iptables"]).get(), 1);
    assert_kernel_matches(&ns, &inputs);
    let save = ns.sh("iptables-save -t filter");
    assert!(
        save.contains(":CANAL-FWD-ALLOW"),
        "the overlay's chain must stay: {save}"
    );
    assert!(!endpoint_files(run_dir.path()).contains("caligone0000000"));
}

#[tokio::test]
async fn disabling_removes_every_policy_object_but_antispoofing_and_nothing_else() {
    require_root();
    let ns = Netns::new("pa-disable");
    let run_dir = tempfile::tempdir().unwrap();
    ns.sh("iptables -N CANAL-FWD-ALLOW && iptables -A FORWARD -j CANAL-FWD-ALLOW && iptables -t nat -N CANAL-MASQ");
    let (mut e, _) = enforcer(&ns, run_dir.path());
    let mut inputs = web_mixed();
    e.sync(&inputs).await.unwrap();
    inputs.config.enabled = false;
    let s = e.sync(&inputs).await.unwrap();
    assert!(s.applied);
    let state = read_back(&ns);
    assert_eq!(
        state.chains.keys().collect::<Vec<_>>(),
        vec!["CANAL-PREROUTING"],
        "anti-spoofing is not NetworkPolicy: it stays"
    );
    assert_eq!(
        state
            .hooks
            .keys()
            .map(|(t, b)| (t.as_str(), b.as_str()))
            .collect::<Vec<_>>(),
        vec![("raw", "PREROUTING")]
    );
    assert_eq!(state.sets.len(), 1, "the anti-spoofing set: {state:?}");
    assert_kernel_matches(&ns, &inputs);
    let save = ns.sh("iptables-save");
    assert!(
        save.contains("-A FORWARD -j CANAL-FWD-ALLOW") && save.contains(":CANAL-MASQ"),
        "{save}"
    );
    // Nothing drops unknown interfaces any more: canal-cni need not wait.
    assert!(!run_dir.path().join("policy-enabled").exists());
    assert!(endpoint_files(run_dir.path()).is_empty());
    // Without a NodePolicySet only the reverse-path check is left.
    inputs.endpoints_unknown = true;
    e.sync(&inputs).await.unwrap();
    let state = read_back(&ns);
    assert_eq!(state.sets.len(), 0);
    assert_eq!(state.chains["CANAL-PREROUTING"].len(), 1);
    inputs.endpoints_unknown = false;
    // And back on.
    inputs.config.enabled = true;
    e.sync(&inputs).await.unwrap();
    assert_kernel_matches(&ns, &inputs);
}

#[tokio::test]
async fn failed_restore_is_retried_then_reported_by_category() {
    require_root();
    let ns = Netns::new("pa-retry");
    let run_dir = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    // Fails on its first run, then behaves like iptables-restore.
    let flaky = bin.path().join("flaky-restore");
    let marker = bin.path().join("failed-once");
    std::fs::write(
        &flaky,
        format!(
            "#!/bin/sh\nif [ ! -e {m} ]; then touch {m}; cat >/dev/null; echo 'Another app is currently holding the xtables lock' >&2; exit 4; fi\nexec iptables-restore \"$@\"\n",
            m = marker.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(&flaky)
        .status()
        .unwrap();
    let (e, m) = enforcer(&ns, run_dir.path());
    let mut e = e
        .with_tools(Tools {
            iptables_restore: flaky.display().to_string(),
            ..Tools::default()
        })
        .with_retry(Retry {
            attempts: 3,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        });
    let inputs = web_mixed();
    let s = e.sync(&inputs).await.unwrap();
    assert_eq!(s.attempts, 2, "{s:?}");
    assert_eq!(m.restore_failures.with_label_values(&["iptables"]).get(), 1);
    assert_kernel_matches(&ns, &inputs);

    let (e, m) = enforcer(&ns, run_dir.path());
    let mut e = e
        .with_tools(Tools {
            iptables_restore: "/nonexistent/iptables-restore".into(),
            ..Tools::default()
        })
        .with_retry(Retry {
            attempts: 2,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        });
    // A change of chains only (a removed pod would change set members
    // first, which is fine but not what this checks).
    let mut changed = inputs.clone();
    changed.config.endpoint_to_host = EndpointToHostAction::Drop;
    let err = e.sync(&changed).await.unwrap_err();
    assert_eq!(err.category(), "tool_missing", "{err}");
    assert_eq!(m.sync_errors.with_label_values(&["tool_missing"]).get(), 1);
    // Enforcement of the previous generation is untouched.
    assert_kernel_matches(&ns, &inputs);
}

// ---------------------------------------------------------------------------
// Real packets.

/// A pod: its own namespace, `eth0` with a /32 and a default route via
/// 169.254.1.1, and a `cali` veth in the node namespace with proxy ARP and a
/// /32 route (DESIGN.md's verified ground).
struct Pod {
    ns: Netns,
    ip: Ipv4Addr,
    iface: String,
}

fn pod(node: &Netns, prefix: &str, iface: &str, ip: &str) -> Pod {
    let ns = Netns::new(prefix);
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
    let node = Netns::new("pa-node");
    // A default route out of another interface, so proxy ARP answers for 169.254.1.1.
    node.sh("sysctl -qw net.ipv4.ip_forward=1 \
         && ip link add uplink type veth peer name uplink-peer \
         && ip link set uplink up && ip link set uplink-peer up \
         && ip addr add 192.168.255.1/24 dev uplink \
         && ip route add default via 192.168.255.254 dev uplink onlink");
    node
}

/// TCP and UDP echo servers inside a pod, stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(p: &Pod, ports: &[u16]) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    for &port in ports {
        let (tcp, udp) = p.ns.run_in(move || {
            (
                TcpListener::bind(("0.0.0.0", port)).unwrap(),
                UdpSocket::bind(("0.0.0.0", port)).unwrap(),
            )
        });
        tcp.set_nonblocking(true).unwrap();
        let s = stop.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match tcp.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.write_all(b"hi");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::SeqCst) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        });
    }
    Servers { stop }
}

const ALLOWED_WAIT: Duration = Duration::from_secs(3);
const BLOCKED_WAIT: Duration = Duration::from_millis(800);

fn tcp_probe(from: &Netns, to: Ipv4Addr, port: u16, wait: Duration) -> bool {
    from.run_in(
        move || match TcpStream::connect_timeout(&SocketAddr::from((to, port)), wait) {
            Ok(mut s) => {
                s.set_read_timeout(Some(wait)).unwrap();
                let mut buf = [0u8; 2];
                s.read_exact(&mut buf).is_ok()
            }
            Err(_) => false,
        },
    )
}

fn udp_probe(from: &Netns, to: Ipv4Addr, port: u16, wait: Duration) -> bool {
    from.run_in(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = std::time::Instant::now() + wait;
        let mut buf = [0u8; 16];
        // Resend until the deadline: the first datagram may wait for ARP.
        while std::time::Instant::now() < deadline {
            let _ = s.send_to(b"ping", (to, port));
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return &buf[..n] == b"ping";
            }
        }
        false
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// Probes every case and fails with the whole expected-vs-observed table.
fn check_matrix(cases: &[(&str, &Netns, Ipv4Addr, Proto, u16, bool)]) {
    let mut report = Vec::new();
    let mut failed = false;
    for (what, from, to, proto, port, want) in cases {
        let wait = if *want { ALLOWED_WAIT } else { BLOCKED_WAIT };
        let got = match proto {
            Proto::Tcp => tcp_probe(from, *to, *port, wait),
            Proto::Udp => udp_probe(from, *to, *port, wait),
        };
        failed |= got != *want;
        report.push(format!(
            "{} {what:<40} {proto:?}/{port:<5} expected {:<9} observed {}",
            if got == *want { "ok  " } else { "FAIL" },
            if *want { "connected" } else { "blocked" },
            if got { "connected" } else { "blocked" }
        ));
    }
    assert!(!failed, "connectivity differs:\n{}", report.join("\n"));
}

fn endpoint(p: &Pod, name: &str, ingress: &[&str], egress: &[&str]) -> Endpoint {
    Endpoint {
        namespace: "t".into(),
        pod: name.into(),
        interface: p.iface.clone(),
        ips: vec![p.ip.to_string()],
        named_ports: vec![],
        ingress_policies: ingress.iter().map(|s| s.to_string()).collect(),
        egress_policies: egress.iter().map(|s| s.to_string()).collect(),
    }
}

fn tcp_port(port: u16) -> PortMatch {
    PortMatch {
        protocol: Protocol::TCP,
        port: Some(port),
        end_port: None,
        named_port: None,
        named_port_set: None,
    }
}

#[tokio::test]
async fn real_packets_follow_the_rendered_policy() {
    real_packets(DataplaneChoice::IpTables).await;
}

#[tokio::test]
async fn real_packets_follow_the_rendered_policy_on_nftables() {
    real_packets(DataplaneChoice::NfTables).await;
}

/// The same truth tables on either dataplane (the conformance the seam
/// promises, at kernel level).
async fn real_packets(dataplane: DataplaneChoice) {
    require_root();
    let node = node();
    let client = pod(&node, "pa-cli", "cali00000000c01", "10.244.1.2");
    let other = pod(&node, "pa-oth", "cali00000000c02", "10.244.1.4");
    let server = pod(&node, "pa-srv", "cali00000000d01", "10.244.1.3");
    let stranger = pod(&node, "pa-str", "cali00000000bad", "10.244.1.9");
    let _servers = serve(&server, &[80, 81, 8080]);
    let _stranger_servers = serve(&stranger, &[80]);
    let _client_servers = serve(&client, &[80]);
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, _) = enforcer(&node, run_dir.path());
    let (s, c, x) = (server.ip, client.ip, stranger.ip);
    use Proto::{Tcp, Udp};

    // Phase 0: nobody isolated; the stranger's interface is unknown to the agent.
    let mut inputs = PolicyInputs {
        config: EnforcementConfig {
            enabled: true,
            endpoint_to_host: EndpointToHostAction::Accept,
            dataplane,
            ..EnforcementConfig::default()
        },
        generation: Some(1),
        spec: NodePolicySetSpec {
            endpoints: vec![
                endpoint(&client, "client", &[], &[]),
                endpoint(&other, "other", &[], &[]),
                endpoint(&server, "server", &[], &[]),
            ],
            policies: vec![],
        },
        peer_sets: BTreeMap::new(),
        endpoints_unknown: false,
    };
    e.sync(&inputs).await.unwrap();
    check_matrix(&[
        ("node -> server (warms neighbours)", &node, s, Tcp, 80, true),
        ("node -> client", &node, c, Tcp, 80, true),
        (
            "node -> stranger (host never policed)",
            &node,
            x,
            Tcp,
            80,
            true,
        ),
        ("client -> server", &client.ns, s, Tcp, 80, true),
        ("client -> server", &client.ns, s, Udp, 80, true),
        (
            "stranger -> server (unknown iface)",
            &stranger.ns,
            s,
            Tcp,
            80,
            false,
        ),
        (
            "server -> stranger (unknown iface)",
            &server.ns,
            x,
            Tcp,
            80,
            false,
        ),
    ]);

    // Phase 1: deny-all ingress on the server.
    inputs.spec.endpoints[2].ingress_policies = vec!["t/deny".into()];
    inputs.spec.policies.push(CompiledPolicy {
        name: "t/deny".into(),
        ..CompiledPolicy::default()
    });
    e.sync(&inputs).await.unwrap();
    check_matrix(&[
        ("client -> server", &client.ns, s, Tcp, 80, false),
        ("client -> server", &client.ns, s, Udp, 80, false),
        ("other -> server", &other.ns, s, Tcp, 81, false),
        ("node -> server (kubelet probe)", &node, s, Tcp, 80, true),
        (
            "server -> client (egress not isolated)",
            &server.ns,
            c,
            Tcp,
            80,
            true,
        ),
    ]);

    // Phase 2: allow TCP 80 from a PeerSet holding the client; the server is
    // also egress deny-all, so replies must pass on conntrack alone.
    inputs.spec.endpoints[2].ingress_policies = vec!["t/deny".into(), "t/allow-client".into()];
    inputs.spec.endpoints[2].egress_policies = vec!["t/deny".into()];
    inputs.spec.policies.push(CompiledPolicy {
        name: "t/allow-client".into(),
        ingress: vec![Rule {
            peers: Some(vec![Peer {
                peer_set: Some("ps-client".into()),
                ip_block: None,
            }]),
            ports: vec![
                tcp_port(80),
                PortMatch {
                    protocol: Protocol::UDP,
                    ..tcp_port(80)
                },
            ],
        }],
        egress: vec![],
    });
    inputs.peer_sets.insert(
        "ps-client".into(),
        PeerSetSpec {
            selector: PeerSelector::default(),
            member_count: 1,
            ips: vec![c.to_string()],
            ports: vec![],
        },
    );
    e.sync(&inputs).await.unwrap();
    check_matrix(&[
        (
            "client -> server (allowed, reply passes)",
            &client.ns,
            s,
            Tcp,
            80,
            true,
        ),
        (
            "client -> server udp (allowed, reply)",
            &client.ns,
            s,
            Udp,
            80,
            true,
        ),
        ("client -> server other port", &client.ns, s, Tcp, 81, false),
        (
            "other -> server (not in PeerSet)",
            &other.ns,
            s,
            Tcp,
            80,
            false,
        ),
        (
            "server -> client (server egress deny)",
            &server.ns,
            c,
            Tcp,
            80,
            false,
        ),
        ("node -> server", &node, s, Tcp, 81, true),
    ]);

    // Phase 3: ipBlock with except, and a named port.
    let mut srv = endpoint(&server, "server", &["t/block", "t/named"], &[]);
    srv.named_ports = vec![NamedPort {
        name: "http-alt".into(),
        protocol: Protocol::TCP,
        port: 8080,
    }];
    inputs.spec.endpoints[2] = srv;
    inputs.spec.policies = vec![
        CompiledPolicy {
            name: "t/block".into(),
            ingress: vec![Rule {
                peers: Some(vec![Peer {
                    peer_set: None,
                    ip_block: Some(IpBlock {
                        cidr: "10.244.1.0/24".into(),
                        except: vec!["10.244.1.2/32".into()],
                    }),
                }]),
                ports: vec![tcp_port(80)],
            }],
            egress: vec![],
        },
        CompiledPolicy {
            name: "t/named".into(),
            ingress: vec![Rule {
                peers: None,
                ports: vec![PortMatch {
                    protocol: Protocol::TCP,
                    port: None,
                    end_port: None,
                    named_port: Some("http-alt".into()),
                    named_port_set: None,
                }],
            }],
            egress: vec![],
        },
    ];
    inputs.generation = Some(4);
    e.sync(&inputs).await.unwrap();
    check_matrix(&[
        (
            "client -> server:80 (ipBlock except)",
            &client.ns,
            s,
            Tcp,
            80,
            false,
        ),
        ("other -> server:80 (ipBlock)", &other.ns, s, Tcp, 80, true),
        ("other -> server:81", &other.ns, s, Tcp, 81, false),
        (
            "client -> server:8080 (named port)",
            &client.ns,
            s,
            Tcp,
            8080,
            true,
        ),
        (
            "client -> server udp/8080 (wrong proto)",
            &client.ns,
            s,
            Udp,
            8080,
            false,
        ),
    ]);
    assert_eq!(
        std::fs::read_to_string(run_dir.path().join("endpoints").join(&server.iface)).unwrap(),
        "4\n"
    );
    // The verdicts above came from the dataplane asked for, and only from it.
    let nft = node.sh_output("nft list table inet canal").status.success();
    let ipt = node.sh("iptables-save; ipset list -n");
    match dataplane {
        DataplaneChoice::NfTables => {
            assert!(nft, "canal's nftables table");
            assert!(!ipt.contains("CANAL-") && !ipt.contains("canal-"), "{ipt}");
        }
        _ => {
            assert!(!nft, "no nftables table on the iptables dataplane");
            assert!(ipt.contains("CANAL-FORWARD"), "{ipt}");
        }
    }
}
