//! canal-cni on dual-stack and IPv6-only nodes, the real binary against real
//! pod namespaces: a pod gets an address of each family of the node, both
//! in the result in the cluster's order, usable at once (no duplicate
//! address detection on either side), with an IPv6 default route via the
//! host veth's link-local address that plain neighbour discovery answers.
//! And fail closed: where NetworkPolicy is enforced without IPv6 support
//! (the `policy-families` contract), a pod gets no IPv6 address, IPv6 stays
//! off on its host veth, and it cannot reach the node over IPv6 at all.

mod support;

#[path = "cni_support/mod.rs"]
mod cni_support;

use std::time::{Duration, Instant};

use canal_agent::runfiles::RunDir;
use cni_support::{
    Call, NODE_IP, NODE_IP6, Node, add_ok, addresses_of, addresses6_of, cni, del_ok, expect_error,
    netns_path,
};
use serde_json::json;
use support::Netns;

const V4: &str = "10.244.5.0/24";
const V6: &str = "fd00:10:244:5::/64";
const GW6: &str = "fe80::ecee:eeff:feee:eeee";

fn host_if(pod: &str) -> String {
    canal_crds::names::veth_name("default", pod)
}

/// Pings `target` from `ns` until it answers (or `timeout`); returns how
/// long that took.
fn ping_within(ns: &Netns, target: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let out = ns.output("ping", &["-c1", "-W1", target]);
        if out.status.success() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{target} unreachable after {timeout:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn a_dual_stack_pod_gets_both_families_usable_at_once() {
    let node = Node::dual(&[V4, V6], 1400);
    let pod = Netns::new("c6p");
    let path = netns_path(&pod);
    let call = Call::add("ctr-1", &path, "web-1");
    let conf = node.conf(json!({}));
    let started = Instant::now();
    let result = add_ok(&node, &call, &conf);
    let host = host_if("web-1");
    assert_eq!(
        result["ips"],
        json!([
            {"address": "10.244.5.2/32", "gateway": "169.254.1.1", "interface": 1},
            {"address": "fd00:10:244:5::2/128", "gateway": GW6, "interface": 1},
        ]),
        "{result}"
    );
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": GW6}])
    );

    // Pod side: both addresses, the IPv6 one not tentative; a default
    // route of each family.
    assert_eq!(addresses_of(&pod, "eth0"), vec!["10.244.5.2"]);
    let v6 = addresses6_of(&pod, "eth0");
    let global: Vec<_> = v6.iter().filter(|(a, _)| a.starts_with("fd00:")).collect();
    assert_eq!(global.len(), 1, "{v6:?}");
    assert_eq!(global[0].0, "fd00:10:244:5::2/128");
    assert!(!global[0].1.contains(&"tentative".to_string()), "{v6:?}");
    assert!(
        v6.iter()
            .all(|(_, f)| !f.contains(&"tentative".to_string())),
        "no DAD on the pod's link-local either: {v6:?}"
    );
    let routes6 = pod.ip(&["-6", "route", "show", "default"]);
    assert!(
        routes6.contains(&format!("default via {GW6} dev eth0")),
        "{routes6}"
    );

    // Host side: IPv6 on, DAD and RAs off, the gateway address configured
    // and not tentative, a /128 route to the pod.
    for (key, want) in [
        ("disable_ipv6", "0"),
        ("accept_dad", "0"),
        ("accept_ra", "0"),
        ("forwarding", "1"),
    ] {
        assert_eq!(
            node.sysctl(&format!("net/ipv6/conf/{host}/{key}")),
            want,
            "{key}"
        );
    }
    let gw = node.ns.ip(&["-6", "addr", "show", "dev", &host]);
    assert!(gw.contains(&format!("inet6 {GW6}/64 scope link")), "{gw}");
    assert!(!gw.contains("tentative"), "{gw}");
    let r6 = node.ns.ip(&["-6", "route", "show", "fd00:10:244:5::2"]);
    assert!(r6.contains(&format!("dev {host}")), "{r6}");

    // It works at once, both ways, in both families.
    let first = ping_within(&pod, NODE_IP6, Duration::from_secs(3));
    ping_within(&pod, NODE_IP, Duration::from_secs(3));
    ping_within(&node.ns, "fd00:10:244:5::2", Duration::from_secs(3));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "ADD to first IPv6 answer took {:?} (first ping {first:?}): something waited for DAD",
        started.elapsed()
    );

    // IPAM holds one record per family; CHECK passes; a repeated ADD
    // returns the same result.
    assert_eq!(node.allocations(), vec!["10.244.5.2", "fd00:10:244:5::2"]);
    let check_conf = node.conf(json!({"prevResult": result}));
    let (code, doc, stderr) = cni(&node, &call.with("CHECK"), &check_conf);
    assert_eq!(code, 0, "{doc} {stderr}");
    assert_eq!(add_ok(&node, &call, &conf), result);
    // CHECK sees a missing IPv6 default route.
    pod.ip(&["-6", "route", "del", "default"]);
    let doc = expect_error(cni(&node, &call.with("CHECK"), &check_conf), 102, "CHECK");
    assert!(
        doc["details"]
            .as_str()
            .unwrap()
            .contains("IPv6 default route"),
        "{doc}"
    );
    assert_eq!(
        add_ok(&node, &call, &conf),
        result,
        "a repeated ADD repairs it"
    );

    // A second pod gets the next address of each family; DEL releases both.
    let pod2 = Netns::new("c6p");
    let path2 = netns_path(&pod2);
    let r2 = add_ok(&node, &Call::add("ctr-2", &path2, "web-2"), &conf);
    assert_eq!(r2["ips"][1]["address"], "fd00:10:244:5::3/128");
    del_ok(&node, &call, &conf);
    assert_eq!(node.allocations(), vec!["10.244.5.3", "fd00:10:244:5::3"]);
    assert!(node.link(&host).is_none());
    assert!(
        !node.ns.ip(&["-6", "route"]).contains("fd00:10:244:5::2"),
        "the /128 route went with the veth"
    );
}

#[test]
fn an_ipv6_primary_cluster_lists_ipv6_first() {
    let node = Node::dual(&[V6, V4], 1400);
    let pod = Netns::new("c6p");
    let path = netns_path(&pod);
    let result = add_ok(
        &node,
        &Call::add("ctr-1", &path, "web-1"),
        &node.conf(json!({})),
    );
    assert_eq!(result["ips"][0]["address"], "fd00:10:244:5::2/128");
    assert_eq!(result["ips"][1]["address"], "10.244.5.2/32");
    assert_eq!(result["routes"][0]["dst"], "::/0");
    // Legacy results name the version of each.
    let old = node.conf(json!({"cniVersion": "0.4.0"}));
    let pod2 = Netns::new("c6p");
    let path2 = netns_path(&pod2);
    let r = add_ok(&node, &Call::add("ctr-2", &path2, "web-2"), &old);
    assert_eq!(r["ips"][0]["version"], "6");
    assert_eq!(r["ips"][1]["version"], "4");
}

#[test]
fn ipv6_only_nodes_give_ipv6_only_pods() {
    let node = Node::dual(&[V6], 1400);
    let pod = Netns::new("c6p");
    let path = netns_path(&pod);
    let result = add_ok(
        &node,
        &Call::add("ctr-1", &path, "web-1"),
        &node.conf(json!({})),
    );
    assert_eq!(result["ips"].as_array().unwrap().len(), 1, "{result}");
    assert_eq!(result["ips"][0]["address"], "fd00:10:244:5::2/128");
    assert_eq!(result["routes"], json!([{"dst": "::/0", "gw": GW6}]));
    assert!(addresses_of(&pod, "eth0").is_empty());
    assert!(
        pod.ip(&["-4", "route"]).trim().is_empty(),
        "no IPv4 route at all"
    );
    ping_within(&pod, NODE_IP6, Duration::from_secs(3));
}

/// The IPv4 and IPv6 addresses a pod got, from its ADD result.
fn families_of(result: &serde_json::Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| ip["address"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn no_ipv6_where_policy_is_enforced_without_ipv6_support() {
    let node = Node::dual(&[V4, V6], 1400);
    let run = RunDir::new(node.run_dir());
    // Policy enforced by a component that never wrote policy-families: the
    // one that guards IPv4 only. (No endpoint file: ADD does not wait.)
    std::fs::write(run.policy_enabled_file(), "enabled\n").unwrap();
    let conf = node.conf(json!({"policyWaitSeconds": 0}));
    let pod = Netns::new("c6p");
    let path = netns_path(&pod);
    let call = Call::add("ctr-1", &path, "web-1");
    let (code, result, stderr) = cni(&node, &call, &conf);
    assert_eq!(code, 0, "{result} {stderr}");
    assert_eq!(families_of(&result), vec!["10.244.5.2/32"]);
    assert!(stderr.contains("IPv6 is not given to pods"), "{stderr}");
    let host = host_if("web-1");
    assert_eq!(
        node.sysctl(&format!("net/ipv6/conf/{host}/disable_ipv6")),
        "1"
    );
    assert_eq!(node.allocations(), vec!["10.244.5.2"]);
    // The attack the rule stops: the pod has a link-local address of its
    // own and tries the node over IPv6, on the gateway address and the
    // node's own; nothing answers (IPv6 is off on the host end).
    let out = pod.output("ping", &["-6", "-c2", "-W1", &format!("{GW6}%eth0")]);
    assert!(
        !out.status.success(),
        "the node answered over link-local IPv6"
    );
    // All-nodes multicast: only the pod itself may answer (its own
    // link-local address); the node must not.
    let own: Vec<String> = addresses6_of(&pod, "eth0")
        .into_iter()
        .map(|(a, _)| a.split('/').next().unwrap_or_default().to_string())
        .collect();
    let out = pod.output("ping", &["-6", "-c2", "-W1", "ff02::1%eth0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let strangers: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("bytes from ").nth(1))
        .filter_map(|r| r.split('%').next())
        .filter(|from| !own.iter().any(|o| o == from))
        .collect();
    assert!(
        strangers.is_empty(),
        "answered all-nodes: {strangers:?}\n{text}"
    );
    ping_within(&pod, NODE_IP, Duration::from_secs(3));

    // The policy component says it guards IPv6 too: new pods get it.
    std::fs::write(run.policy_families_file(), "ipv4,ipv6\n").unwrap();
    let pod2 = Netns::new("c6p");
    let path2 = netns_path(&pod2);
    let r2 = add_ok(&node, &Call::add("ctr-2", &path2, "web-2"), &conf);
    assert_eq!(
        families_of(&r2),
        vec!["10.244.5.3/32", "fd00:10:244:5::2/128"]
    );

    // It stops guarding IPv6 (or says so with policy disabled): a repeated
    // ADD takes IPv6 away again, address, record, route and all.
    std::fs::write(run.policy_families_file(), "ipv4\n").unwrap();
    std::fs::remove_file(run.policy_enabled_file()).unwrap();
    let r2 = add_ok(&node, &Call::add("ctr-2", &path2, "web-2"), &conf);
    assert_eq!(families_of(&r2), vec!["10.244.5.3/32"]);
    let host2 = host_if("web-2");
    assert_eq!(
        node.sysctl(&format!("net/ipv6/conf/{host2}/disable_ipv6")),
        "1"
    );
    assert!(
        addresses6_of(&pod2, "eth0")
            .iter()
            .all(|(a, _)| !a.starts_with("fd00:")),
        "{:?}",
        addresses6_of(&pod2, "eth0")
    );
    assert!(
        pod2.ip(&["-6", "route", "show", "default"])
            .trim()
            .is_empty()
    );
    assert_eq!(node.allocations(), vec!["10.244.5.2", "10.244.5.3"]);
    // A file the CNI cannot read the same way: no IPv6 either.
    std::fs::write(run.policy_families_file(), "ipv4,IPV6\n").unwrap();
    let pod3 = Netns::new("c6p");
    let path3 = netns_path(&pod3);
    let (code, r3, stderr) = cni(&node, &Call::add("ctr-3", &path3, "web-3"), &conf);
    assert_eq!(code, 0, "{r3} {stderr}");
    assert_eq!(families_of(&r3).len(), 1, "{r3}");
    assert!(stderr.contains("IPV6"), "{stderr}");
}

#[test]
fn an_ipv6_only_node_without_ipv6_support_refuses_with_try_again() {
    let node = Node::dual(&[V6], 1400);
    std::fs::write(
        RunDir::new(node.run_dir()).policy_enabled_file(),
        "enabled\n",
    )
    .unwrap();
    let pod = Netns::new("c6p");
    let path = netns_path(&pod);
    let doc = expect_error(
        cni(
            &node,
            &Call::add("ctr-1", &path, "web-1"),
            &node.conf(json!({})),
        ),
        11,
        "ADD",
    );
    assert!(
        doc["details"].as_str().unwrap().contains("policy-families"),
        "{doc}"
    );
    assert!(node.allocations().is_empty());
    assert!(node.link(&host_if("web-1")).is_none(), "nothing was made");
}

#[test]
fn an_exhausted_ipv6_subnet_fails_the_add_and_keeps_no_ipv4_address() {
    let node = Node::dual(&[V4, "fd00:10:244:5::/126"], 1400);
    let conf = node.conf(json!({}));
    let pod = Netns::new("c6p");
    let path = netns_path(&pod);
    add_ok(&node, &Call::add("ctr-1", &path, "web-1"), &conf);
    let pod2 = Netns::new("c6p");
    let path2 = netns_path(&pod2);
    expect_error(
        cni(&node, &Call::add("ctr-2", &path2, "web-2"), &conf),
        100,
        "ADD",
    );
    assert_eq!(
        node.allocations(),
        vec!["10.244.5.2", "fd00:10:244:5::2"],
        "the second pod's IPv4 address was released"
    );
    assert!(node.link(&host_if("web-2")).is_none());
}
