//! Kernel tests of the nftables dataplane and of the seam: apply into
//! throwaway namespaces and read canal's table back, one transaction per
//! change touching only what changed, restart adoption, repair of foreign
//! changes (`nft flush ruleset` included), a foreign table that accepts,
//! switching dataplanes both ways without leaving anything behind, and IPv6
//! packets (ipBlock /128, PeerSets, named ports, neighbour discovery under
//! default-deny) on both dataplanes. Needs root, nftables, iptables, ipset.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use canal_agent::policy::nft::render::render as nft_render;
use canal_agent::policy::nft::{NftState, Runner};
use canal_agent::policy::{
    DataplaneChoice, EnforcementConfig, Exec, Families, PolicyEnforcer, PolicyInputs,
    PolicyMetrics, model,
};
use canal_crds::{
    CompiledPolicy, Endpoint, IpBlock, NamedPort, NodePolicySetSpec, Peer, PeerSetSpec, PortMatch,
    Protocol, Rule,
};
use serde::Deserialize;
use support::netns::{Netns, can_run};

fn require_root() {
    assert!(
        can_run()
            && std::process::Command::new("nft")
                .arg("--version")
                .output()
                .is_ok(),
        "kernel tests need root, nftables, iptables and ipset"
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

fn web_mixed(dataplane: DataplaneChoice) -> PolicyInputs {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/web-mixed.yaml");
    let c: Case = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    PolicyInputs {
        config: EnforcementConfig {
            dataplane,
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

fn nft_runs(m: &PolicyMetrics) -> u64 {
    m.restores.with_label_values(&["nft"]).get()
}

/// canal's table as the kernel shows it.
fn read_back(ns: &Netns) -> NftState {
    NftState::parse("canal", &ns.sh("nft -j list table inet canal")).unwrap()
}

fn assert_kernel_matches(ns: &Netns, inputs: &PolicyInputs) {
    let want = NftState::from_ruleset(&nft_render(&model::build(inputs)));
    let have = read_back(ns);
    assert_eq!(
        have.chains.keys().collect::<Vec<_>>(),
        want.chains.keys().collect::<Vec<_>>(),
        "chains"
    );
    for (name, c) in &want.chains {
        assert_eq!(&have.chains[name], c, "chain {name}");
    }
    assert_eq!(
        have.sets.keys().collect::<Vec<_>>(),
        want.sets.keys().collect::<Vec<_>>(),
        "sets"
    );
    for (name, s) in &want.sets {
        assert_eq!(&have.sets[name], s, "set {name}");
    }
}

/// Nothing of canal's policy in iptables / ipset.
fn iptables_clean(ns: &Netns) -> bool {
    let all = ns.sh("iptables-save; ip6tables-save; ipset list -n");
    !all.contains("CANAL-") && !all.contains("canal-")
}

/// The first ingress rule of the first policy that has one.
fn first_ingress_rule(inputs: &mut PolicyInputs) -> &mut Rule {
    let p = inputs
        .spec
        .policies
        .iter_mut()
        .find(|p| !p.ingress.is_empty())
        .unwrap();
    &mut p.ingress[0]
}

fn nft_table_exists(ns: &Netns) -> bool {
    ns.sh_output("nft list table inet canal").status.success()
}

#[tokio::test]
async fn nft_apply_reads_back_adopts_and_changes_one_thing_per_transaction() {
    require_root();
    let ns = Netns::new("pn-apply");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, m) = enforcer(&ns, run_dir.path());
    let mut inputs = web_mixed(DataplaneChoice::NfTables);

    let first = e.sync(&inputs).await.unwrap();
    assert!(first.full && first.applied, "{first:?}");
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    assert_eq!(nft_runs(&m), 1, "one transaction for the whole table");
    assert_kernel_matches(&ns, &inputs);
    assert!(iptables_clean(&ns));
    assert!(run_dir.path().join("endpoints/cali1a2b3c4d5e6").exists());
    assert_eq!(
        std::fs::read_to_string(run_dir.path().join("policy-families")).unwrap(),
        "ipv4\n"
    );

    let second = e.sync(&inputs).await.unwrap();
    assert!(!second.applied && !second.full, "{second:?}");
    assert_eq!(nft_runs(&m), 1);

    // A new agent adopts the table: nothing to do.
    let (mut restarted, m2) = enforcer(&ns, run_dir.path());
    let s = restarted.sync(&inputs).await.unwrap();
    assert!(s.full && !s.applied, "restart must change nothing: {s:?}");
    assert_eq!(nft_runs(&m2), 0);

    // A PeerSet member: one element added, no chain.
    inputs
        .peer_sets
        .get_mut("ps-frontend")
        .unwrap()
        .ips
        .push("10.244.4.4".into());
    let s = restarted.sync(&inputs).await.unwrap();
    assert_eq!(s.written_chains, Vec::<String>::new());
    assert_eq!((s.plan.members_added, s.plan.members_removed), (1, 0));
    assert_eq!(nft_runs(&m2), 1);
    assert_kernel_matches(&ns, &inputs);

    // A policy rule: that policy's chain only.
    first_ingress_rule(&mut inputs).ports = vec![PortMatch {
        protocol: Protocol::TCP,
        port: Some(9999),
        end_port: None,
        named_port: None,
        named_port_set: None,
    }];
    let s = restarted.sync(&inputs).await.unwrap();
    assert_eq!(s.written_chains.len(), 1, "{:?}", s.written_chains);
    assert!(s.written_chains[0].starts_with("pi-"));
    assert_kernel_matches(&ns, &inputs);

    // A port list: one named set, read back as rendered (a no-op resync),
    // deleted with the last rule that used it.
    let list_of = |ports: &[(u16, Option<u16>)]| {
        ports
            .iter()
            .map(|&(port, end_port)| PortMatch {
                protocol: Protocol::TCP,
                port: Some(port),
                end_port,
                named_port: None,
                named_port_set: None,
            })
            .collect::<Vec<_>>()
    };
    first_ingress_rule(&mut inputs).ports =
        list_of(&[(9999, None), (443, None), (5000, Some(5100))]);
    let s = restarted.sync(&inputs).await.unwrap();
    assert_eq!(s.written_chains.len(), 1, "{:?}", s.written_chains);
    assert_kernel_matches(&ns, &inputs);
    let port_sets = |ns: &Netns| {
        read_back(ns)
            .sets
            .keys()
            .filter(|n| n.starts_with("pt-"))
            .count()
    };
    assert_eq!(port_sets(&ns), 1);
    let (mut again, m3) = enforcer(&ns, run_dir.path());
    let s = again.sync(&inputs).await.unwrap();
    assert!(!s.applied, "the port set reads back as rendered: {s:?}");
    assert_eq!(nft_runs(&m3), 0);
    first_ingress_rule(&mut inputs).ports = list_of(&[(9999, None)]);
    let s = restarted.sync(&inputs).await.unwrap();
    assert!(s.applied);
    assert_kernel_matches(&ns, &inputs);
    assert_eq!(port_sets(&ns), 0, "an unused port set is deleted");

    // A pod replaced (new interface): its chains, map entries and
    // anti-spoofing elements; no other chain.
    let ep = inputs
        .spec
        .endpoints
        .iter_mut()
        .find(|e| e.pod == "db-0")
        .unwrap();
    ep.interface = "cali0f0f0f0f0f1".into();
    let s = restarted.sync(&inputs).await.unwrap();
    let mut w = s.written_chains.clone();
    w.sort();
    assert_eq!(w, vec!["fw-cali0f0f0f0f0f1", "tw-cali0f0f0f0f0f1"]);
    assert_eq!(s.plan.chains_deleted, 2);
    assert_kernel_matches(&ns, &inputs);
    assert!(!run_dir.path().join("endpoints/cali0f0f0f0f0f0").exists());
    assert!(run_dir.path().join("endpoints/cali0f0f0f0f0f1").exists());
}

#[tokio::test]
async fn nft_foreign_changes_are_repaired_and_iptables_flushes_do_not_touch_it() {
    require_root();
    let ns = Netns::new("pn-drift");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, m) = enforcer(&ns, run_dir.path());
    let mut inputs = web_mixed(DataplaneChoice::NfTables);
    // A port list, so the table holds a shared port set to tamper with.
    first_ingress_rule(&mut inputs).ports = [80, 8080]
        .map(|port| PortMatch {
            protocol: Protocol::TCP,
            port: Some(port),
            end_port: None,
            named_port: None,
            named_port_set: None,
        })
        .to_vec();
    e.sync(&inputs).await.unwrap();
    let clean = e.check_drift().await.unwrap().unwrap();
    assert!(clean.full && !clean.applied, "{clean:?}");

    // iptables -F (and a whole iptables reload) is not canal's table.
    ns.sh("iptables -F; iptables -X; iptables -t raw -F");
    let s = e.check_drift().await.unwrap().unwrap();
    assert!(!s.applied, "{s:?}");

    for damage in [
        "nft flush chain inet canal tw-cali1a2b3c4d5e6",
        "nft delete element inet canal to-wl '{ \"cali1a2b3c4d5e6\" }'",
        "nft flush set inet canal spoof-v4",
        "nft insert rule inet canal forward accept",
        "nft delete chain inet canal input",
        "nft flush ruleset",
        "nft delete table inet canal",
    ] {
        ns.sh(damage);
        let s = e.check_drift().await.unwrap().unwrap();
        assert!(s.applied, "{damage}: {s:?}");
        assert_kernel_matches(&ns, &inputs);
    }
    // The port set is shared by every rule with that list: a port added to
    // it by another program would open that port wherever the list is used.
    let ports = read_back(&ns)
        .sets
        .keys()
        .find(|n| n.starts_with("pt-"))
        .cloned()
        .expect("a port set");
    for damage in [
        format!("nft add element inet canal {ports} '{{ 22 }}'"),
        format!("nft flush set inet canal {ports}"),
    ] {
        ns.sh(&damage);
        let s = e.check_drift().await.unwrap().unwrap();
        assert!(s.applied, "{damage}: {s:?}");
        assert_kernel_matches(&ns, &inputs);
    }
    assert!(m.drift_repairs.with_label_values(&["chain"]).get() >= 4);
    assert!(m.drift_repairs.with_label_values(&["set"]).get() >= 2);
}

#[tokio::test]
async fn switching_dataplanes_leaves_nothing_behind() {
    require_root();
    let ns = Netns::new("pn-switch");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, _) = enforcer(&ns, run_dir.path());
    let mut inputs = web_mixed(DataplaneChoice::IpTables);
    e.sync(&inputs).await.unwrap();
    assert!(!nft_table_exists(&ns) && !iptables_clean(&ns));

    inputs.config.dataplane = DataplaneChoice::NfTables;
    let s = e.sync(&inputs).await.unwrap();
    assert!(s.removed_other, "{s:?}");
    assert!(nft_table_exists(&ns));
    assert!(
        iptables_clean(&ns),
        "{}",
        ns.sh("iptables-save; ipset list -n")
    );
    assert_kernel_matches(&ns, &inputs);

    inputs.config.dataplane = DataplaneChoice::IpTables;
    let s = e.sync(&inputs).await.unwrap();
    assert!(s.removed_other, "{s:?}");
    assert!(!nft_table_exists(&ns), "{}", ns.sh("nft list ruleset"));
    assert!(!iptables_clean(&ns));

    // A restarted agent asked for nftables finds iptables state from before
    // and removes it after programming its table.
    let (mut restarted, _) = enforcer(&ns, run_dir.path());
    inputs.config.dataplane = DataplaneChoice::NfTables;
    let s = restarted.sync(&inputs).await.unwrap();
    assert!(s.removed_other);
    assert!(iptables_clean(&ns) && nft_table_exists(&ns));
}

#[tokio::test]
async fn the_library_and_the_program_write_the_same_table() {
    require_root();
    let ns = Netns::new("pn-runner");
    let run_dir = tempfile::tempdir().unwrap();
    let inputs = web_mixed(DataplaneChoice::NfTables);
    let metrics = PolicyMetrics::unregistered().unwrap();
    let mut e = PolicyEnforcer::new(run_dir.path(), metrics)
        .with_exec(Exec::in_netns(&ns.path).unwrap())
        .with_nft_process();
    e.sync(&inputs).await.unwrap();
    assert_kernel_matches(&ns, &inputs);
    // The library, inside the namespace, sees it and finds nothing to do.
    let runner = Runner::new(&Exec::in_netns(&ns.path).unwrap());
    assert_eq!(runner.kind(), "library");
    let (mut lib, m) = enforcer(&ns, run_dir.path());
    let s = lib.sync(&inputs).await.unwrap();
    assert!(!s.applied, "{s:?}");
    assert_eq!(nft_runs(&m), 0);
}

// ---------------------------------------------------------------------------
// IPv6 packets, both dataplanes.

struct Pod {
    ns: Netns,
    ip: IpAddr,
    iface: String,
}

/// A node namespace forwarding IPv6, with a default route out of an uplink.
fn node6() -> Netns {
    let node = Netns::new("pn-node");
    node.sh(
        "sysctl -qw net.ipv6.conf.all.forwarding=1 net.ipv4.ip_forward=1 \
         && ip link add uplink type veth peer name uplink-peer \
         && ip link set uplink up && ip link set uplink-peer up \
         && ip -6 addr add fd00:ffff::1/64 dev uplink nodad \
         && ip -6 route add default via fd00:ffff::fe dev uplink",
    );
    node
}

/// An IPv6 pod: `eth0` with a /128 and a default route via the host veth's
/// link-local `fe80::1` (so neighbour discovery with the node is needed in
/// both directions); the node routes the /128 to the `cali` veth.
fn pod6(node: &Netns, prefix: &str, iface: &str, ip: &str) -> Pod {
    let ns = Netns::new(prefix);
    node.sh(&format!(
        "ip link add {iface} type veth peer name eth0 netns {pod} \
         && sysctl -qw net.ipv6.conf.{iface}.disable_ipv6=0 net.ipv6.conf.{iface}.accept_dad=0 \
         && ip link set {iface} up \
         && ip -6 addr add fe80::1/64 dev {iface} nodad \
         && ip -6 route add {ip}/128 dev {iface}",
        pod = ns.name
    ));
    ns.sh(&format!(
        "sysctl -qw net.ipv6.conf.eth0.accept_dad=0 \
         && ip link set eth0 up \
         && ip -6 addr add {ip}/128 dev eth0 nodad \
         && ip -6 route add default via fe80::1 dev eth0"
    ));
    Pod {
        ns,
        ip: ip.parse().unwrap(),
        iface: iface.into(),
    }
}

struct Servers(Arc<AtomicBool>);

impl Drop for Servers {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn serve(p: &Pod, ports: &[u16]) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    for &port in ports {
        let tcp =
            p.ns.run_in(move || TcpListener::bind(("::", port)).unwrap());
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
    }
    Servers(stop)
}

fn tcp_probe(from: &Netns, to: IpAddr, port: u16, wait: Duration) -> bool {
    from.run_in(
        move || match TcpStream::connect_timeout(&SocketAddr::new(to, port), wait) {
            Ok(mut s) => {
                s.set_read_timeout(Some(wait)).unwrap();
                let mut buf = [0u8; 2];
                s.read_exact(&mut buf).is_ok()
            }
            Err(_) => false,
        },
    )
}

fn check(cases: &[(&str, &Netns, IpAddr, u16, bool)]) {
    let mut report = Vec::new();
    let mut failed = false;
    for (what, from, to, port, want) in cases {
        let wait = Duration::from_millis(if *want { 3000 } else { 800 });
        let got = tcp_probe(from, *to, *port, wait);
        failed |= got != *want;
        report.push(format!(
            "{} {what:<44} tcp/{port:<5} expected {:<9} observed {}",
            if got == *want { "ok  " } else { "FAIL" },
            if *want { "connected" } else { "blocked" },
            if got { "connected" } else { "blocked" }
        ));
    }
    assert!(!failed, "IPv6 connectivity differs:\n{}", report.join("\n"));
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

fn tcp(port: u16) -> PortMatch {
    PortMatch {
        protocol: Protocol::TCP,
        port: Some(port),
        end_port: None,
        named_port: None,
        named_port_set: None,
    }
}

#[tokio::test]
async fn ipv6_follows_policy_on_iptables() {
    ipv6_packets(DataplaneChoice::IpTables).await;
}

#[tokio::test]
async fn ipv6_follows_policy_on_nftables() {
    ipv6_packets(DataplaneChoice::NfTables).await;
}

async fn ipv6_packets(dataplane: DataplaneChoice) {
    require_root();
    let node = node6();
    let client = pod6(&node, "pn-cli", "cali00000000c01", "fd00:10:244:1::2");
    let other = pod6(&node, "pn-oth", "cali00000000c02", "fd00:10:244:1::4");
    let server = pod6(&node, "pn-srv", "cali00000000d01", "fd00:10:244:1::3");
    let _s = serve(&server, &[80, 81, 8080]);
    let _c = serve(&client, &[80]);
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, m) = enforcer(&node, run_dir.path());
    let (s, c) = (server.ip, client.ip);

    // Everyone isolated both ways: nothing allowed yet, except what the
    // policies below allow; neighbour discovery must still work.
    let mut inputs = PolicyInputs {
        config: EnforcementConfig {
            dataplane,
            families: Families::DUAL,
            ..EnforcementConfig::default()
        },
        generation: Some(1),
        spec: NodePolicySetSpec {
            endpoints: vec![
                endpoint(&client, "client", &["t/deny"], &["t/deny", "t/to-server"]),
                endpoint(&other, "other", &[], &[]),
                endpoint(&server, "server", &["t/deny", "t/from-client"], &["t/deny"]),
            ],
            policies: vec![
                CompiledPolicy {
                    name: "t/deny".into(),
                    ..CompiledPolicy::default()
                },
                CompiledPolicy {
                    name: "t/to-server".into(),
                    ingress: vec![],
                    egress: vec![Rule {
                        peers: Some(vec![Peer {
                            peer_set: Some("ps-server".into()),
                            ip_block: None,
                        }]),
                        ports: vec![],
                    }],
                },
                CompiledPolicy {
                    name: "t/from-client".into(),
                    ingress: vec![Rule {
                        peers: Some(vec![Peer {
                            peer_set: Some("ps-client".into()),
                            ip_block: None,
                        }]),
                        ports: vec![tcp(80)],
                    }],
                    egress: vec![],
                },
            ],
        },
        peer_sets: BTreeMap::from([
            (
                "ps-client".to_string(),
                PeerSetSpec {
                    ips: vec!["10.244.1.2".into(), c.to_string()],
                    ..PeerSetSpec::default()
                },
            ),
            (
                "ps-server".to_string(),
                PeerSetSpec {
                    ips: vec![s.to_string()],
                    ..PeerSetSpec::default()
                },
            ),
        ]),
        endpoints_unknown: false,
    };
    let first = e.sync(&inputs).await.unwrap();
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    assert_eq!(
        std::fs::read_to_string(run_dir.path().join("policy-families")).unwrap(),
        "ipv4,ipv6\n"
    );
    check(&[
        ("node -> server (host never policed)", &node, s, 80, true),
        (
            "client -> server (PeerSet, both isolated)",
            &client.ns,
            s,
            80,
            true,
        ),
        ("client -> server:81 (port)", &client.ns, s, 81, false),
        (
            "other -> server (not in the PeerSet)",
            &other.ns,
            s,
            80,
            false,
        ),
        (
            "server -> client (server egress deny)",
            &server.ns,
            c,
            80,
            false,
        ),
    ]);
    // Neighbour discovery survived the default-deny: the node resolved both.
    let neigh = node.sh("ip -6 neigh show");
    for p in [&client, &server] {
        assert!(
            neigh
                .lines()
                .any(|l| l.starts_with(&p.ip.to_string()) && !l.contains("FAILED")),
            "{neigh}"
        );
    }

    // ipBlock /128 with except and an ingress named port, per family.
    let mut srv = endpoint(&server, "server", &["t/block", "t/named"], &[]);
    srv.named_ports = vec![NamedPort {
        name: "http-alt".into(),
        protocol: Protocol::TCP,
        port: 8080,
    }];
    inputs.spec.endpoints[2] = srv;
    inputs.spec.endpoints[0].egress_policies.clear();
    inputs.spec.policies.extend([
        CompiledPolicy {
            name: "t/block".into(),
            ingress: vec![Rule {
                peers: Some(vec![
                    Peer {
                        peer_set: None,
                        ip_block: Some(IpBlock {
                            cidr: "fd00:10:244:1::/64".into(),
                            except: vec![format!("{c}/128")],
                        }),
                    },
                    Peer {
                        peer_set: None,
                        ip_block: Some(IpBlock {
                            cidr: "10.244.0.0/16".into(),
                            except: vec![],
                        }),
                    },
                ]),
                ports: vec![tcp(80)],
            }],
            egress: vec![],
        },
        CompiledPolicy {
            name: "t/named".into(),
            ingress: vec![Rule {
                peers: Some(vec![Peer {
                    peer_set: None,
                    ip_block: Some(IpBlock {
                        cidr: format!("{c}/128"),
                        except: vec![],
                    }),
                }]),
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
    ]);
    e.sync(&inputs).await.unwrap();
    check(&[
        (
            "client -> server:80 (ipBlock except /128)",
            &client.ns,
            s,
            80,
            false,
        ),
        ("other -> server:80 (ipBlock /64)", &other.ns, s, 80, true),
        (
            "client -> server:8080 (named port, /128)",
            &client.ns,
            s,
            8080,
            true,
        ),
        (
            "other -> server:8080 (not the /128)",
            &other.ns,
            s,
            8080,
            false,
        ),
    ]);

    // Forged IPv6 sources are dropped before policy and counted: the
    // client claims other's address (routed to another interface: rpf).
    client
        .ns
        .sh(&format!("ip -6 addr add {}/128 dev eth0 nodad", other.ip));
    let from = other.ip;
    client.ns.run_in(move || {
        let sock = std::net::UdpSocket::bind(SocketAddr::new(from, 0)).unwrap();
        for _ in 0..5 {
            let _ = sock.send_to(b"forged", SocketAddr::new(s, 9));
        }
    });
    e.record_spoof_counters().await.unwrap();
    assert!(
        m.spoofed_packets.with_label_values(&["rpf"]).get() >= 5,
        "forged IPv6 datagrams counted as rpf drops"
    );
}
