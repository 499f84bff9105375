//! The IPv6 overlay against a real kernel, in throwaway network namespaces
//! with a dual-stack underlay: one sync programs `flannel.1` over the
//! underlay's IPv4 address and `flannel-v6.1` over its IPv6 address (VTEP
//! MAC, /128 address without DAD, MTU 70 below the underlay's), each with
//! its own onlink routes, permanent neighbours and FDB entries (read back
//! with iproute2); a second pass changes nothing; drift of one family is
//! repaired without touching the other; direct routing works per family; a
//! family the cluster drops loses its device and routes while the other
//! keeps everything; an MTU only IPv4's overhead allows is refused for the
//! IPv6 device alone.

mod support;

use std::net::IpAddr;

use canal_agent::netns;
use canal_agent::overlay::desired::{LocalNode, OverlayConfig, Peer};
use canal_agent::overlay::family::Family;
use canal_agent::overlay::model::Mac;
use canal_agent::overlay::netlink::{Category, Netlink};
use canal_agent::overlay::{self, FamilyInput, FamilyPlan, SyncedAll};
use canal_crds::annotations::{vtep_mac, vtep_mac_v6};
use canal_crds::{CanalNetworkSpec, NetworkConfig};
use support::Netns;

const UNDERLAY_V4: &str = "192.168.78.1";
const UNDERLAY_V6: &str = "fd00:78::1";
const CLUSTER_V4: &str = "10.244.0.0/16";
const CLUSTER_V6: &str = "fd00:10:244::/56";

/// A node namespace with a dual-stack underlay `ul0` (a veth whose peer
/// stays inside) and a default route of each family through it.
fn node_ns() -> Netns {
    let ns = Netns::new("co6");
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul0p"]);
    ns.ip(&["link", "set", "ul0p", "up"]);
    ns.ip(&["addr", "add", &format!("{UNDERLAY_V4}/24"), "dev", "ul0"]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{UNDERLAY_V6}/64"),
        "dev",
        "ul0",
        "nodad",
    ]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.168.78.254",
        "dev",
        "ul0",
    ]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:78::fe",
        "dev",
        "ul0",
    ]);
    ns
}

fn config() -> NetworkConfig {
    CanalNetworkSpec::with_cluster_cidr(CLUSTER_V4)
        .validate()
        .unwrap()
}

fn v6_mac(name: &str) -> Mac {
    Mac(vtep_mac_v6(name))
}

fn local(family: Family) -> LocalNode {
    match family {
        Family::V4 => LocalNode {
            name: "node-a".into(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            vtep_mac: Mac(vtep_mac("node-a")),
        },
        Family::V6 => LocalNode {
            name: "node-a".into(),
            subnet: "fd00:10:244:1::/64".parse().unwrap(),
            vtep_mac: v6_mac("node-a"),
        },
    }
}

/// node-b and node-c are far (VXLAN), node-d shares the segment.
fn peers(family: Family) -> Vec<Peer> {
    let p = |name: &str, n: u8, v4: &str, v6: &str| match family {
        Family::V4 => Peer {
            name: name.into(),
            subnet: format!("10.244.{n}.0/24").parse().unwrap(),
            public_ip: v4.parse().unwrap(),
            vtep_mac: Mac(vtep_mac(name)),
        },
        Family::V6 => Peer {
            name: name.into(),
            subnet: format!("fd00:10:244:{n}::/64").parse().unwrap(),
            public_ip: v6.parse().unwrap(),
            vtep_mac: v6_mac(name),
        },
    };
    vec![
        p("node-b", 2, "172.16.0.2", "fd00:99::2"),
        p("node-c", 3, "172.16.0.3", "fd00:99::3"),
        p("node-d", 4, "192.168.78.4", "fd00:78::4"),
    ]
}

fn input(family: Family, cfg: &NetworkConfig, peers: Vec<Peer>) -> FamilyInput {
    let cluster = match family {
        Family::V4 => CLUSTER_V4,
        Family::V6 => CLUSTER_V6,
    };
    FamilyInput {
        family,
        plan: FamilyPlan::Program {
            config: OverlayConfig::new(cfg, cluster.parse().unwrap()),
            local: local(family),
            peers,
        },
        interface: cfg.interface.clone(),
        previous_underlay: None,
    }
}

fn removed(family: Family) -> FamilyInput {
    FamilyInput {
        family,
        plan: FamilyPlan::Remove,
        interface: None,
        previous_underlay: None,
    }
}

/// Both families with every peer.
fn dual(cfg: &NetworkConfig) -> Vec<FamilyInput> {
    vec![
        input(Family::V4, cfg, peers(Family::V4)),
        input(Family::V6, cfg, peers(Family::V6)),
    ]
}

/// Syncs and asserts that nothing failed.
async fn sync(nl: &Netlink, inputs: &[FamilyInput]) -> SyncedAll {
    let all = overlay::sync(nl, inputs).await.expect("dump");
    for r in &all.families {
        let s = r.as_ref().expect("family sync");
        assert!(s.errors.is_empty(), "{}: {:?}", s.family, s.errors);
    }
    all
}

fn lines(text: &str) -> Vec<String> {
    let mut l: Vec<String> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    l.sort();
    l
}

/// canal's IPv6 routes (on the VXLAN device or with canal's protocol),
/// without the kernel's metric/pref decorations.
fn v6_routes(ns: &Netns) -> Vec<String> {
    lines(&ns.ip(&["-6", "route", "show", "table", "main"]))
        .into_iter()
        .filter(|l| l.contains("proto 202"))
        .map(|l| l.replace(" metric 1024", "").replace(" pref medium", ""))
        .collect()
}

fn plan_len(all: &SyncedAll) -> usize {
    all.families
        .iter()
        .map(|r| r.as_ref().map_or(0, |s| s.plan.len()))
        .sum()
}

#[tokio::test]
async fn both_families_are_programmed_each_on_its_own_device() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let mut cfg = config();
    cfg.direct_routing = true;
    let all = sync(&nl, &dual(&cfg)).await;
    let v6 = all.families[1].as_ref().unwrap();
    assert_eq!(v6.family, Family::V6);
    assert_eq!(
        v6.underlay.as_ref().unwrap().ip,
        UNDERLAY_V6.parse::<IpAddr>().unwrap()
    );
    assert_eq!((v6.desired.vxlan_peers, v6.desired.direct_peers), (2, 1));
    assert_eq!(v6.pod_mtu, 1430, "an IPv6 underlay costs 70 bytes");
    assert_eq!(all.families[0].as_ref().unwrap().pod_mtu, 1450);

    let link = ns.ip(&["-d", "link", "show", "flannel-v6.1"]);
    for want in [
        "mtu 1430",
        &format!("link/ether {}", v6_mac("node-a")),
        "vxlan id 1",
        &format!("local {UNDERLAY_V6}"),
        "dev ul0",
        "dstport 8472",
        "nolearning",
        "UP",
    ] {
        assert!(link.contains(want), "flannel-v6.1 lacks {want:?}:\n{link}");
    }
    let addrs = ns.ip(&[
        "-6",
        "addr",
        "show",
        "dev",
        "flannel-v6.1",
        "scope",
        "global",
    ]);
    assert!(addrs.contains("inet6 fd00:10:244:1::/128"), "{addrs}");
    assert!(!addrs.contains("tentative"), "no DAD: {addrs}");
    assert_eq!(
        v6_routes(&ns),
        vec![
            "fd00:10:244:2::/64 via fd00:10:244:2:: dev flannel-v6.1 proto 202 onlink",
            "fd00:10:244:3::/64 via fd00:10:244:3:: dev flannel-v6.1 proto 202 onlink",
            "fd00:10:244:4::/64 via fd00:78::4 dev ul0 proto 202",
        ]
    );
    let neigh: Vec<String> = lines(&ns.ip(&["-6", "neigh", "show", "dev", "flannel-v6.1"]))
        .into_iter()
        .filter(|l| l.contains("PERMANENT"))
        .collect();
    let mut want_neigh = vec![
        format!("fd00:10:244:2:: lladdr {} PERMANENT", v6_mac("node-b")),
        format!("fd00:10:244:3:: lladdr {} PERMANENT", v6_mac("node-c")),
    ];
    want_neigh.sort();
    assert_eq!(neigh, want_neigh);
    let fdb = lines(&ns.sh("bridge", &["fdb", "show", "dev", "flannel-v6.1"]));
    let mut want_fdb = vec![
        format!("{} dst fd00:99::2 self permanent", v6_mac("node-b")),
        format!("{} dst fd00:99::3 self permanent", v6_mac("node-c")),
    ];
    want_fdb.sort();
    assert_eq!(fdb, want_fdb);
    // The IPv4 device is as it always was, and holds nothing of IPv6's.
    let v4 = ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(
        v4.contains(&format!("local {UNDERLAY_V4}")) && v4.contains("mtu 1450"),
        "{v4}"
    );
    assert_eq!(
        lines(&ns.sh("bridge", &["fdb", "show", "dev", "flannel.1"])).len(),
        2
    );

    let again = sync(&nl, &dual(&cfg)).await;
    assert_eq!(plan_len(&again), 0, "a second pass changes nothing");
}

#[tokio::test]
async fn ipv6_drift_is_repaired_and_ipv4_is_not_touched() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let cfg = config();
    sync(&nl, &dual(&cfg)).await;
    ns.ip(&["-6", "route", "del", "fd00:10:244:2::/64"]);
    ns.ip(&[
        "-6",
        "neigh",
        "del",
        "fd00:10:244:3::",
        "dev",
        "flannel-v6.1",
    ]);
    ns.sh(
        "bridge",
        &[
            "fdb",
            "del",
            &v6_mac("node-d").to_string(),
            "dev",
            "flannel-v6.1",
            "dst",
            "fd00:78::4",
        ],
    );
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:10:244:1::9/64",
        "dev",
        "flannel-v6.1",
        "nodad",
    ]);
    let repair = sync(&nl, &dual(&cfg)).await;
    let v4 = repair.families[0].as_ref().unwrap();
    let v6 = repair.families[1].as_ref().unwrap();
    assert!(v4.plan.is_empty(), "IPv4 untouched: {:?}", v4.plan);
    assert_eq!(v6.plan.route_sets.len(), 1, "{:?}", v6.plan);
    assert_eq!(v6.plan.neighbour_sets.len(), 1);
    assert_eq!(v6.plan.fdb_sets.len(), 1);
    assert_eq!(
        v6.plan
            .route_deletes
            .iter()
            .map(|r| r.route.dst.to_string())
            .collect::<Vec<_>>(),
        Vec::<String>::new(),
        "the stray address's prefix route is the kernel's and goes with the address"
    );
    assert!(
        v6.plan.links.iter().any(|op| matches!(
            op,
            canal_agent::overlay::diff::LinkOp::DeleteAddress(a) if a.to_string() == "fd00:10:244:1::9/64"
        )),
        "{:?}",
        v6.plan.links
    );
    let again = sync(&nl, &dual(&cfg)).await;
    assert_eq!(plan_len(&again), 0);
    assert!(!ns.ip(&["-6", "route"]).contains("fd00:10:244:1::/64"));
}

#[tokio::test]
async fn a_removed_family_loses_its_device_and_routes_and_the_other_keeps_all() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let mut cfg = config();
    cfg.direct_routing = true;
    sync(&nl, &dual(&cfg)).await;
    let v4_routes = lines(&ns.ip(&["-4", "route", "show", "proto", "202"]));
    assert_eq!(v4_routes.len(), 3);

    let all = sync(
        &nl,
        &[
            input(Family::V4, &cfg, peers(Family::V4)),
            removed(Family::V6),
        ],
    )
    .await;
    assert!(all.families[0].as_ref().unwrap().plan.is_empty());
    assert!(!ns.ip(&["link"]).contains("flannel-v6"), "device gone");
    assert!(v6_routes(&ns).is_empty(), "{:?}", v6_routes(&ns));
    assert_eq!(
        lines(&ns.ip(&["-4", "route", "show", "proto", "202"])),
        v4_routes
    );

    // An IPv6-only node: the IPv4 device and routes go instead.
    sync(&nl, &dual(&cfg)).await;
    sync(
        &nl,
        &[
            input(Family::V6, &cfg, peers(Family::V6)),
            removed(Family::V4),
        ],
    )
    .await;
    assert!(!ns.ip(&["link"]).contains("flannel.1"));
    assert!(
        ns.ip(&["-4", "route", "show", "proto", "202"])
            .trim()
            .is_empty()
    );
    assert_eq!(v6_routes(&ns).len(), 3);
}

#[tokio::test]
async fn an_mtu_that_fits_ipv4_only_is_refused_for_the_ipv6_device_alone() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    sync(&nl, &dual(&config())).await;
    let mut cfg = config();
    cfg.mtu = Some(1450);
    let all = overlay::sync(&nl, &dual(&cfg)).await.unwrap();
    let v4 = all.families[0].as_ref().unwrap();
    let v6 = all.families[1].as_ref().unwrap();
    assert!(v4.errors.is_empty(), "{:?}", v4.errors);
    assert_eq!(
        v6.errors.iter().map(|e| e.category).collect::<Vec<_>>(),
        vec![Category::Mtu]
    );
    assert_eq!(v6.pod_mtu, 1430, "pods get what the IPv6 device really has");
    assert!(
        ns.ip(&["link", "show", "flannel-v6.1"])
            .contains("mtu 1430")
    );
}

#[tokio::test]
async fn without_an_ipv6_underlay_address_only_ipv6_fails() {
    let ns = Netns::new("co6");
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul0p"]);
    ns.ip(&["link", "set", "ul0p", "up"]);
    ns.ip(&["addr", "add", &format!("{UNDERLAY_V4}/24"), "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.168.78.254",
        "dev",
        "ul0",
    ]);
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let all = overlay::sync(&nl, &dual(&config())).await.unwrap();
    assert!(all.families[0].as_ref().is_ok_and(|s| s.errors.is_empty()));
    let e = all.families[1].as_ref().expect_err("no IPv6 underlay");
    assert!(e.to_string().contains("no IPv6 address"), "{e}");
    assert!(ns.ip(&["link"]).contains("flannel.1"));
    assert!(!ns.ip(&["link"]).contains("flannel-v6"));
}
