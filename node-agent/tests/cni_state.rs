//! canal-cni's state against the kernel's: an IPAM directory with entries
//! it cannot read, GC of stale attachments, CHECK of a pod whose record or
//! wiring is gone (a result cache that lies), and a repeated ADD after the
//! record was lost. The real binary, the real kernel, throwaway namespaces.

mod support;

#[path = "cni_support/mod.rs"]
mod cni_support;

use std::os::unix::ffi::OsStrExt;

use cni_support::{
    Call, NODE_IP, Node, add_ok, addresses_of, cni, del_ok, expect_error, netns_path, result_ip,
};
use serde_json::json;
use support::Netns;

#[test]
fn unreadable_ipam_entries_are_skipped_and_never_handed_out() {
    // /29: .2 to .6 are usable; four of them get entries canal cannot read.
    let node = Node::new("10.244.30.0/29", 1450);
    let conf = node.conf(json!({}));
    let dir = node.ipam_dir();
    std::fs::create_dir_all(dir.join("10.244.30.2")).unwrap();
    std::fs::write(dir.join("10.244.30.3"), [0xff, 0xfe, 0x00, b'\n']).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("10.244.30.4")).unwrap();
    std::fs::write(dir.join("10.244.30.5"), "").unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"\xff\xfe-not-utf8");
    std::fs::write(dir.join(odd), "x").unwrap();
    std::fs::write(dir.join("notes.txt"), "hello").unwrap();

    let (p1, p2) = (Netns::new("ccu"), Netns::new("ccu"));
    let (path1, path2) = (netns_path(&p1), netns_path(&p2));
    let first = Call::add("u1", &path1, "u1");
    let second = Call::add("u2", &path2, "u2");
    let (code, doc, stderr) = cni(&node, &first, &conf);
    assert_eq!(
        code, 0,
        "one bad entry must not fail every ADD: {doc} {stderr}"
    );
    assert_eq!(result_ip(&doc), "10.244.30.6", "fail closed: {doc}");
    assert!(
        stderr.contains("10.244.30.2") && stderr.contains("10.244.30.3"),
        "the unreadable entries are reported: {stderr}"
    );
    p1.sh("ping", &["-c1", "-W2", NODE_IP]);
    // Every readable address is taken now; the unreadable ones stay taken.
    expect_error(cni(&node, &second, &conf), 100, "exhausted");
    // DEL releases by container id despite the bad entries.
    del_ok(&node, &first, &conf);
    assert!(!dir.join("10.244.30.6").exists());
    assert!(addresses_of(&p1, "eth0").is_empty());
    assert_eq!(result_ip(&add_ok(&node, &second, &conf)), "10.244.30.6");
    // What canal could not read, it left alone.
    assert!(dir.join("10.244.30.2").is_dir());
    assert!(dir.join("10.244.30.4").is_symlink());
    assert!(dir.join(odd).exists() && dir.join("notes.txt").exists());
    assert_eq!(
        std::fs::read(dir.join("10.244.30.3")).unwrap(),
        [0xff, 0xfe, 0x00, b'\n']
    );
    // GC with garbage around works too and keeps what is valid.
    let gc = node.conf(json!({
        "cniVersion": "1.1.0",
        "cni.dev/valid-attachments": [{"containerID": "u2", "ifname": "eth0"}],
    }));
    let (code, doc, stderr) = cni(&node, &second.with("GC"), &gc);
    assert_eq!(code, 0, "{doc} {stderr}");
    assert_eq!(node.allocations(), vec!["10.244.30.6"]);
}

#[test]
fn gc_removes_the_interfaces_of_attachments_it_releases() {
    let node = Node::new("10.244.31.0/24", 1450);
    let conf = node.conf(json!({}));
    let (stale, live) = (Netns::new("ccg"), Netns::new("ccg"));
    let (stale_path, live_path) = (netns_path(&stale), netns_path(&live));
    let stale_call = Call::add("stale", &stale_path, "stale");
    let live_call = Call::add("live", &live_path, "live");
    let stale_ip = result_ip(&add_ok(&node, &stale_call, &conf));
    let live_ip = result_ip(&add_ok(&node, &live_call, &conf));
    let gc = node.conf(json!({
        "cniVersion": "1.1.0",
        "cni.dev/valid-attachments": [{"containerID": "live", "ifname": "eth0"}],
    }));
    let (code, doc, stderr) = cni(&node, &live_call.with("GC"), &gc);
    assert_eq!(code, 0, "{doc} {stderr}");
    assert_eq!(node.allocations(), vec![live_ip.clone()]);
    // The released address is no longer wired anywhere: no interface, no
    // route, so handing it out again cannot collide.
    let stale_if = canal_crds::names::veth_name("default", "stale");
    assert!(node.link(&stale_if).is_none(), "GC left {stale_if} behind");
    assert!(addresses_of(&stale, "eth0").is_empty());
    assert!(
        !node.pod_routes().iter().any(|(ip, _)| *ip == stale_ip),
        "{:?}",
        node.pod_routes()
    );
    assert_eq!(addresses_of(&live, "eth0"), vec![live_ip]);
    live.sh("ping", &["-c1", "-W2", NODE_IP]);
}

#[test]
fn check_fails_when_the_record_or_the_wiring_is_gone_and_add_repairs_cleanly() {
    let node = Node::new("10.244.32.0/24", 1450);
    let conf = node.conf(json!({}));
    let pod = Netns::new("ccc");
    let path = netns_path(&pod);
    let call = Call::add("checked", &path, "checked");
    let result = add_ok(&node, &call, &conf);
    let ip = result_ip(&result);
    let host_if = canal_crds::names::veth_name("default", "checked");
    let check_conf = node.conf(json!({"prevResult": result}));
    let check = || cni(&node, &call.with("CHECK"), &check_conf);
    assert_eq!(check().0, 0, "{:?}", check());

    // Half-wired: strict reverse-path filtering switched off.
    let rp = format!("net.ipv4.conf.{host_if}.rp_filter");
    node.ns.sh("sysctl", &["-qw", &format!("{rp}=0")]);
    let doc = expect_error(check(), 102, "rp_filter off");
    assert!(
        doc["details"].as_str().unwrap().contains("rp_filter"),
        "{doc}"
    );
    add_ok(&node, &call, &conf);
    assert_eq!(check().0, 0, "ADD repaired it: {:?}", check());

    // The cached result says the pod has an address canal has no record of:
    // the address could be handed out again, so CHECK must say so.
    std::fs::remove_file(node.ipam_dir().join(&ip)).unwrap();
    let doc = expect_error(check(), 102, "record gone");
    assert!(doc["details"].as_str().unwrap().contains(&ip), "{doc}");

    // A repeated ADD records an address again, and no route to the
    // unrecorded one stays behind on the pod's interface.
    let again = add_ok(&node, &call, &conf);
    let new_ip = result_ip(&again);
    assert_eq!(node.allocations(), vec![new_ip.clone()]);
    assert_eq!(node.pod_routes(), vec![(new_ip.clone(), host_if.clone())]);
    assert_eq!(addresses_of(&pod, "eth0"), vec![new_ip]);
    pod.sh("ping", &["-c1", "-W2", NODE_IP]);
    let check_conf = node.conf(json!({"prevResult": again}));
    let (code, doc, stderr) = cni(&node, &call.with("CHECK"), &check_conf);
    assert_eq!(code, 0, "{doc} {stderr}");
    del_ok(&node, &call, &conf);
    assert!(node.pod_routes().is_empty());
}

/// Turns a pod wired by this version into one wired by the previous one:
/// no mark on the host veth, a two-line record.
fn as_previous_version(node: &Node, name: &str, container: &str, ip: &str) {
    let host_if = canal_crds::names::veth_name("default", name);
    node.ns.ip(&["link", "set", "dev", &host_if, "alias", ""]);
    assert!(node.link(&host_if).unwrap().get("ifalias").is_none());
    std::fs::write(node.ipam_dir().join(ip), format!("{container}\neth0\n")).unwrap();
}

#[test]
fn what_the_previous_version_left_is_still_cleaned_up() {
    let node = Node::new("10.244.33.0/24", 1450);
    let conf = node.conf(json!({}));
    let pods: Vec<Netns> = (0..4).map(|_| Netns::new("ccv")).collect();
    let paths: Vec<String> = pods.iter().map(netns_path).collect();
    let names = [
        "legacy-del",
        "legacy-add",
        "legacy-gc",
        "legacy-new-sandbox",
    ];
    let calls: Vec<Call> = names
        .iter()
        .zip(&paths)
        .map(|(name, path)| Call::add(name, path, name))
        .collect();
    let ips: Vec<String> = calls
        .iter()
        .map(|c| result_ip(&add_ok(&node, c, &conf)))
        .collect();
    for (i, name) in names.iter().enumerate() {
        as_previous_version(&node, name, name, &ips[i]);
    }
    let host_if = |name: &str| canal_crds::names::veth_name("default", name);

    // DEL with the container's namespace: the unmarked veth is paired with
    // its eth0, so it is the container's.
    del_ok(&node, &calls[0], &conf);
    assert!(node.link(&host_if(names[0])).is_none());
    assert!(!node.ipam_dir().join(&ips[0]).exists());

    // A repeated ADD marks the veth and completes the record.
    assert_eq!(result_ip(&add_ok(&node, &calls[1], &conf)), ips[1]);
    let link = node.link(&host_if(names[1])).unwrap();
    assert_eq!(link["ifalias"], format!("canal:{}:eth0", names[1]));
    let record = std::fs::read_to_string(node.ipam_dir().join(&ips[1])).unwrap();
    assert_eq!(
        record,
        format!("{}\neth0\n{}\n", names[1], host_if(names[1]))
    );

    // GC finds the unmarked veth of a two-line record by its route.
    let gc = node.conf(json!({
        "cniVersion": "1.1.0",
        "cni.dev/valid-attachments": [
            {"containerID": names[1], "ifname": "eth0"},
            {"containerID": names[3], "ifname": "eth0"},
        ],
    }));
    let (code, doc, stderr) = cni(&node, &calls[2].with("GC"), &gc);
    assert_eq!(code, 0, "{doc} {stderr}");
    assert!(
        node.link(&host_if(names[2])).is_none(),
        "GC left the unmarked veth"
    );
    assert!(!node.ipam_dir().join(&ips[2]).exists());
    assert!(node.link(&host_if(names[1])).is_some());

    // A new sandbox replaces the old one's unmarked veth; the old one's
    // DEL then leaves the new sandbox alone.
    let newer = Netns::new("ccv");
    let newer_path = netns_path(&newer);
    let b = Call::add("legacy-newer", &newer_path, names[3]);
    let b_ip = result_ip(&add_ok(&node, &b, &conf));
    del_ok(&node, &calls[3], &conf);
    assert_eq!(addresses_of(&newer, "eth0"), vec![b_ip.clone()]);
    assert_eq!(
        node.pod_routes()
            .iter()
            .filter(|(ip, _)| *ip == b_ip)
            .count(),
        1
    );
    newer.sh("ping", &["-c1", "-W2", NODE_IP]);
    assert!(!node.ipam_dir().join(&ips[3]).exists());
}
