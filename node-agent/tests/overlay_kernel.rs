//! The overlay's netlink shell against a real kernel, in throwaway network
//! namespaces: it creates exactly the desired device, routes, neighbours and
//! FDB entries (read back with iproute2, independently of our own parser),
//! a second pass changes nothing, hand-made drift is repaired, and an
//! incompatible device is recreated while a compatible one is kept. A step
//! the kernel refuses (an MTU above the underlay's, an underlay interface
//! that does not exist) is reported and the rest is still programmed.

mod support;

use std::net::IpAddr;

use canal_agent::netns;
use canal_agent::overlay::desired::{LocalNode, OverlayConfig, Peer};
use canal_agent::overlay::diff::{DeleteReason, LinkOp};
use canal_agent::overlay::family::Family;
use canal_agent::overlay::model::Mac;
use canal_agent::overlay::netlink::{Category, Netlink};
use canal_agent::overlay::{self, FamilyInput, FamilyPlan, SyncError, Synced};
use canal_crds::{CanalNetworkSpec, NetworkConfig};
use support::Netns;

/// The IPv4 overlay's sync (the IPv6 family is removed, as on an IPv4-only
/// node).
async fn sync_v4(
    nl: &Netlink,
    local: &LocalNode,
    peers: &[Peer],
    cfg: &NetworkConfig,
    previous: Option<u32>,
) -> Result<Synced, SyncError> {
    let inputs = [
        FamilyInput {
            family: Family::V4,
            plan: FamilyPlan::Program {
                config: OverlayConfig::new(cfg, cfg.ranges[0].cidr),
                local: local.clone(),
                peers: peers.to_vec(),
            },
            interface: cfg.interface.clone(),
            previous_underlay: previous,
        },
        FamilyInput {
            family: Family::V6,
            plan: FamilyPlan::Remove,
            interface: cfg.interface.clone(),
            previous_underlay: None,
        },
    ];
    let mut all = overlay::sync(nl, &inputs).await?;
    let v6 = all.families.pop().expect("two results")?;
    assert!(v6.plan.is_empty(), "nothing of IPv6 here: {:?}", v6.plan);
    all.families.pop().expect("two results")
}

const UNDERLAY_IP: &str = "192.168.77.1";

/// A node namespace with an underlay `ul0` (192.168.77.1/24; one end of a
/// veth pair whose peer stays in the namespace, as this kernel has no dummy
/// driver) and a default route through it.
fn node_ns() -> Netns {
    let ns = Netns::new("cov");
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul0p"]);
    ns.ip(&["link", "set", "ul0p", "up"]);
    ns.ip(&["addr", "add", &format!("{UNDERLAY_IP}/24"), "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.168.77.254",
        "dev",
        "ul0",
    ]);
    ns
}

fn config() -> NetworkConfig {
    CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16")
        .validate()
        .unwrap()
}

fn local() -> LocalNode {
    LocalNode {
        name: "node-a".into(),
        subnet: "10.244.1.0/24".parse().unwrap(),
        vtep_mac: Mac(canal_crds::annotations::vtep_mac("node-a")),
    }
}

fn peer(name: &str, third: u8, public: &str) -> Peer {
    Peer {
        name: name.into(),
        subnet: format!("10.244.{third}.0/24").parse().unwrap(),
        public_ip: public.parse().unwrap(),
        vtep_mac: Mac(canal_crds::annotations::vtep_mac(name)),
    }
}

fn peers() -> Vec<Peer> {
    vec![
        peer("node-b", 2, "172.16.0.2"),
        peer("node-c", 3, "172.16.0.3"),
        peer("node-d", 4, "192.168.77.4"),
    ]
}

async fn sync(nl: &Netlink, peers: &[Peer], cfg: &NetworkConfig) -> Synced {
    let s = sync_v4(nl, &local(), peers, cfg, None).await.expect("sync");
    assert!(s.errors.is_empty(), "netlink errors: {:?}", s.errors);
    s
}

fn mac(name: &str) -> String {
    Mac(canal_crds::annotations::vtep_mac(name)).to_string()
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

#[tokio::test]
async fn creates_exactly_the_desired_state_and_a_second_pass_changes_nothing() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let mut cfg = config();
    cfg.direct_routing = true;

    let first = sync(&nl, &peers(), &cfg).await;
    let underlay = first.underlay.as_ref().unwrap();
    assert_eq!(underlay.name, "ul0");
    assert_eq!(underlay.ip, UNDERLAY_IP.parse::<IpAddr>().unwrap());
    assert_eq!(
        (first.desired.vxlan_peers, first.desired.direct_peers),
        (2, 1)
    );

    let link = ns.ip(&["-d", "link", "show", "flannel.1"]);
    for want in [
        "mtu 1450",
        &format!("link/ether {}", mac("node-a")),
        "vxlan id 1",
        &format!("local {UNDERLAY_IP}"),
        "dev ul0",
        "dstport 8472",
        "nolearning",
        "UP",
    ] {
        assert!(link.contains(want), "flannel.1 lacks {want:?}:\n{link}");
    }
    assert_eq!(
        lines(&ns.ip(&["-4", "addr", "show", "dev", "flannel.1"]))
            .iter()
            .filter(|l| l.starts_with("inet "))
            .map(|l| l.split(' ').nth(1).unwrap().to_string())
            .collect::<Vec<_>>(),
        vec!["10.244.1.0/32"]
    );
    assert_eq!(
        lines(&ns.ip(&["route", "show", "table", "main"]))
            .into_iter()
            .filter(|l| l.contains("proto 202") || l.contains("flannel.1"))
            .collect::<Vec<_>>(),
        vec![
            "10.244.2.0/24 via 10.244.2.0 dev flannel.1 proto 202 onlink".to_string(),
            "10.244.3.0/24 via 10.244.3.0 dev flannel.1 proto 202 onlink".to_string(),
            "10.244.4.0/24 via 192.168.77.4 dev ul0 proto 202".to_string(),
        ]
    );
    let mut want_neigh = vec![
        format!("10.244.2.0 lladdr {} PERMANENT", mac("node-b")),
        format!("10.244.3.0 lladdr {} PERMANENT", mac("node-c")),
    ];
    want_neigh.sort();
    assert_eq!(
        lines(&ns.ip(&["neigh", "show", "dev", "flannel.1"])),
        want_neigh
    );
    let fdb = lines(&ns.sh("bridge", &["fdb", "show", "dev", "flannel.1"]));
    let mut want_fdb = vec![
        format!("{} dst 172.16.0.2 self permanent", mac("node-b")),
        format!("{} dst 172.16.0.3 self permanent", mac("node-c")),
    ];
    want_fdb.sort();
    assert_eq!(fdb, want_fdb);

    let index_before = ns.ip(&["-o", "link", "show", "flannel.1"]);
    let second = sync(&nl, &peers(), &cfg).await;
    assert!(second.plan.is_empty(), "second pass: {:?}", second.plan);
    assert_eq!(ns.ip(&["-o", "link", "show", "flannel.1"]), index_before);
}

#[tokio::test]
async fn hand_made_drift_is_repaired_and_nothing_else_is_touched() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let cfg = config();
    sync(&nl, &peers(), &cfg).await;

    ns.ip(&["route", "del", "10.244.2.0/24"]);
    ns.ip(&["neigh", "del", "10.244.3.0", "dev", "flannel.1"]);
    ns.sh(
        "bridge",
        &[
            "fdb",
            "del",
            &mac("node-d"),
            "dev",
            "flannel.1",
            "dst",
            "192.168.77.4",
        ],
    );
    ns.ip(&["link", "set", "flannel.1", "mtu", "1300"]);
    // Something foreign on the device and a stray address: removed.
    ns.ip(&["route", "add", "10.244.99.0/24", "dev", "flannel.1"]);
    ns.ip(&["addr", "add", "10.244.1.7/24", "dev", "flannel.1"]);

    let repair = sync(&nl, &peers(), &cfg).await;
    assert_eq!(repair.plan.route_sets.len(), 1, "{:?}", repair.plan);
    assert_eq!(repair.plan.route_sets[0].dst.to_string(), "10.244.2.0/24");
    assert_eq!(repair.plan.neighbour_sets.len(), 1);
    assert_eq!(repair.plan.fdb_sets.len(), 1);
    // The foreign route; the connected route the stray /24 address made is
    // the kernel's and goes with the address.
    let mut deleted: Vec<String> = repair
        .plan
        .route_deletes
        .iter()
        .map(|r| r.route.dst.to_string())
        .collect();
    deleted.sort();
    assert_eq!(deleted, vec!["10.244.99.0/24"]);
    assert_eq!(
        repair.plan.links,
        vec![
            LinkOp::SetMtu(1450),
            LinkOp::DeleteAddress("10.244.1.7/24".parse().unwrap())
        ]
    );
    let again = sync(&nl, &peers(), &cfg).await;
    assert!(again.plan.is_empty(), "{:?}", again.plan);
    assert!(
        ns.ip(&["route", "show", "10.244.2.0/24"])
            .contains("via 10.244.2.0")
    );
    assert!(!ns.ip(&["route"]).contains("10.244.99.0"));
    assert!(!ns.ip(&["route"]).contains("10.244.1.0/24"));
}

#[tokio::test]
async fn removed_peers_lose_route_neighbour_and_fdb() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let cfg = config();
    sync(&nl, &peers(), &cfg).await;
    let s = sync(&nl, &peers()[..1], &cfg).await;
    assert_eq!(s.plan.route_deletes.len(), 2);
    assert_eq!(
        lines(&ns.ip(&["route", "show", "dev", "flannel.1"])),
        vec!["10.244.2.0/24 via 10.244.2.0 proto 202 onlink".to_string()]
    );
    assert_eq!(
        lines(&ns.ip(&["neigh", "show", "dev", "flannel.1"])).len(),
        1
    );
    assert_eq!(
        lines(&ns.sh("bridge", &["fdb", "show", "dev", "flannel.1"])).len(),
        1
    );
}

#[tokio::test]
async fn incompatible_device_is_recreated() {
    let ns = node_ns();
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "5",
        "dstport",
        "4789",
        "dev",
        "ul0",
        "local",
        UNDERLAY_IP,
    ]);
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let s = sync(&nl, &peers(), &config()).await;
    assert!(
        matches!(
            s.plan.links[0],
            LinkOp::Delete {
                reason: DeleteReason::Incompatible,
                ..
            }
        ),
        "{:?}",
        s.plan.links
    );
    let link = ns.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(
        link.contains("vxlan id 1 ") && link.contains("dstport 8472"),
        "{link}"
    );
    assert_eq!(
        lines(&ns.ip(&["neigh", "show", "dev", "flannel.1"])).len(),
        3
    );
    let again = sync(&nl, &peers(), &config()).await;
    assert!(again.plan.is_empty(), "{:?}", again.plan);
}

#[tokio::test]
async fn compatible_device_is_kept_with_its_mac_corrected_and_stale_devices_go() {
    let ns = node_ns();
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "address",
        "02:11:22:33:44:55",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "dev",
        "ul0",
        "local",
        UNDERLAY_IP,
        "nolearning",
    ]);
    ns.ip(&[
        "link",
        "add",
        "flannel.9",
        "type",
        "vxlan",
        "id",
        "9",
        "dstport",
        "8472",
        "dev",
        "ul0",
    ]);
    let index = |ns: &Netns| {
        ns.ip(&["-o", "link", "show", "flannel.1"])
            .split(':')
            .next()
            .unwrap()
            .to_string()
    };
    let before = index(&ns);
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let s = sync(&nl, &peers(), &config()).await;
    assert!(s.plan.links.contains(&LinkOp::SetMac(local().vtep_mac)));
    assert!(s.plan.links.iter().any(|op| matches!(
        op,
        LinkOp::Delete {
            reason: DeleteReason::Stale,
            name,
            ..
        } if name == "flannel.9"
    )));
    assert_eq!(index(&ns), before, "the device was kept");
    assert!(
        ns.ip(&["link", "show", "flannel.1"])
            .contains(&mac("node-a"))
    );
    assert!(!ns.ip(&["link"]).contains("flannel.9"));
}

#[tokio::test]
async fn host_gw_routes_via_node_addresses_without_a_device() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    sync(&nl, &peers(), &config()).await;
    let mut cfg = config();
    cfg.backend = canal_crds::BackendType::HostGw;
    let s = sync(&nl, &peers(), &cfg).await;
    assert_eq!(s.desired.skipped.len(), 2, "two peers are off the segment");
    assert!(!ns.ip(&["link"]).contains("flannel.1"));
    assert_eq!(
        lines(&ns.ip(&["route", "show", "proto", "202"])),
        vec!["10.244.4.0/24 via 192.168.77.4 dev ul0".to_string()]
    );
    assert!(sync(&nl, &peers(), &cfg).await.plan.is_empty());
}

/// The routes canal added, as iproute2 shows them.
fn canal_routes(ns: &Netns) -> Vec<String> {
    lines(&ns.ip(&["route", "show", "proto", "202"]))
}

fn device_mtu(ns: &Netns) -> String {
    let link = ns.ip(&["link", "show", "flannel.1"]);
    link.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_refused_mtu_is_reported_and_new_peers_are_still_programmed() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let two = &peers()[..2];
    sync(&nl, two, &config()).await;
    assert_eq!(device_mtu(&ns), "1450");

    // 65535 passes the API's validation; the kernel refuses it for a VXLAN
    // device on a 1500-byte underlay. node-d arrives at the same time.
    let mut cfg = config();
    cfg.mtu = Some(65535);
    let s = sync_v4(&nl, &local(), &peers(), &cfg, None)
        .await
        .expect("a refused MTU does not fail the whole sync");
    let mtu_errors: Vec<_> = s
        .errors
        .iter()
        .filter(|e| e.category == Category::Mtu)
        .collect();
    assert_eq!(mtu_errors.len(), 1, "{:?}", s.errors);
    assert_eq!(s.errors.len(), 1, "nothing else failed: {:?}", s.errors);
    let text = mtu_errors[0].to_string();
    assert!(text.contains("MTU") && text.contains("65535"), "{text}");
    assert!(
        canal_routes(&ns)
            .contains(&"10.244.4.0/24 via 10.244.4.0 dev flannel.1 onlink".to_string()),
        "the new peer got its route: {:?}",
        canal_routes(&ns)
    );
    assert!(
        lines(&ns.ip(&["neigh", "show", "dev", "flannel.1"]))
            .iter()
            .any(|l| l.starts_with("10.244.4.0 ")),
        "and its neighbour entry"
    );
    assert_eq!(device_mtu(&ns), "1450", "the device keeps its MTU");
    assert_eq!(s.pod_mtu, 1450, "pods get the MTU the device really has");

    // Every later sync reports the same, and changes nothing else.
    let again = sync_v4(&nl, &local(), &peers(), &cfg, None).await.unwrap();
    assert_eq!(again.errors.len(), 1);
    assert_eq!(again.plan.links.len(), 1, "{:?}", again.plan);
    assert!(again.plan.route_sets.is_empty() && again.plan.fdb_sets.is_empty());

    // Back to a derivable MTU: clean.
    let s = sync(&nl, &peers(), &config()).await;
    assert!(s.errors.is_empty());
}

#[tokio::test]
async fn a_device_refused_with_its_mtu_is_created_with_the_kernels() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let mut cfg = config();
    cfg.mtu = Some(65535);
    let s = sync_v4(&nl, &local(), &peers(), &cfg, None)
        .await
        .expect("sync");
    assert_eq!(
        s.errors.iter().map(|e| e.category).collect::<Vec<_>>(),
        vec![Category::Mtu],
        "{:?}",
        s.errors
    );
    assert_eq!(device_mtu(&ns), "1450", "created with the kernel's MTU");
    assert_eq!(s.pod_mtu, 1450);
    assert_eq!(
        lines(&ns.ip(&["neigh", "show", "dev", "flannel.1"])).len(),
        3,
        "neighbours were programmed"
    );
    assert_eq!(canal_routes(&ns).len(), 3, "{:?}", canal_routes(&ns));
}

#[tokio::test]
async fn a_missing_underlay_interface_keeps_the_one_in_use() {
    let ns = node_ns();
    let nl = Netlink::new(netns::handle_in(&ns.path()).unwrap());
    let first = sync(&nl, &peers()[..2], &config()).await;
    let index = first.underlay.as_ref().unwrap().index;
    let mut cfg = config();
    cfg.interface = Some("nosuch0".into());

    // The agent remembers its underlay; and a restarted agent (nothing
    // remembered) finds it on the existing device.
    for previous in [Some(index), None] {
        let s = sync_v4(&nl, &local(), &peers(), &cfg, previous)
            .await
            .expect("the underlay in use is kept");
        let e = s
            .underlay_error
            .as_ref()
            .expect("the missing interface is reported");
        assert!(e.to_string().contains("\"nosuch0\""), "{e}");
        assert_eq!(s.underlay.as_ref().unwrap().name, "ul0");
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert!(
            canal_routes(&ns)
                .iter()
                .any(|r| r.starts_with("10.244.4.0/24")),
            "a new peer is programmed: {:?}",
            canal_routes(&ns)
        );
    }
    assert!(
        ns.ip(&["-d", "link", "show", "flannel.1"])
            .contains("dev ul0"),
        "the device stays on ul0"
    );

    // A node that never had an overlay cannot guess an underlay.
    let fresh = node_ns();
    let nl = Netlink::new(netns::handle_in(&fresh.path()).unwrap());
    let err = sync_v4(&nl, &local(), &peers(), &cfg, None)
        .await
        .expect_err("nothing to fall back to");
    assert!(err.to_string().contains("nosuch0"), "{err}");
    assert!(!fresh.ip(&["link"]).contains("flannel.1"));
}
