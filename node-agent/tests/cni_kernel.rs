//! The real canal-cni binary, run as a container runtime runs it (inside a
//! node network namespace via `ip netns exec`, with the CNI environment and
//! the configuration on stdin), against real pod network namespaces.

mod support;

#[path = "cni_support/mod.rs"]
mod cni_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use canal_agent::runfiles::RunDir;
use cni_support::{Call, NODE_IP, Node, add_ok, cni, cni_at, netns_path};
use serde_json::{Value, json};
use support::Netns;

#[test]
fn add_check_del_round_trip_with_a_working_pod() {
    let node = Node::new("10.244.5.0/24", 1400);
    let pod = Netns::new("ccp");
    let path = netns_path(&pod);
    let call = Call {
        command: "ADD",
        container: "ctr-1",
        netns: &path,
        ifname: "eth0",
        pod: Some(("default", "web-1")),
    };
    let conf = node.conf(json!({}));
    let result = add_ok(&node, &call, &conf);
    let host_if = canal_crds::names::veth_name("default", "web-1");
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["ips"][0]["address"], "10.244.5.2/32", "{result}");
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["interfaces"][0]["name"], host_if.as_str());
    assert_eq!(result["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], path.as_str());

    // Pod side.
    let eth0 = pod.ip(&["-d", "addr", "show", "eth0"]);
    assert!(eth0.contains("inet 10.244.5.2/32"), "{eth0}");
    assert!(eth0.contains("mtu 1400"), "{eth0}");
    let routes = pod.ip(&["route"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0 scope link"),
        "{routes}"
    );
    // Host side.
    let host = node.ns.ip(&["-d", "link", "show", &host_if]);
    assert!(host.contains("link/ether ee:ee:ee:ee:ee:ee"), "{host}");
    assert!(
        host.contains("mtu 1400") && host.contains("state UP"),
        "{host}"
    );
    for (path, want) in [
        (format!("/proc/sys/net/ipv4/conf/{host_if}/proxy_arp"), "1"),
        (format!("/proc/sys/net/ipv4/conf/{host_if}/forwarding"), "1"),
        // Strict reverse-path filtering: the pod sends only from its address.
        (format!("/proc/sys/net/ipv4/conf/{host_if}/rp_filter"), "1"),
        // No IPv6 on the pod's link: canal gives pods IPv4 only.
        (
            format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6"),
            "1",
        ),
        (
            format!("/proc/sys/net/ipv4/neigh/{host_if}/proxy_delay"),
            "0",
        ),
    ] {
        assert_eq!(node.ns.sh("cat", &[&path]).trim(), want, "{path}");
    }
    assert!(
        node.ns
            .ip(&["route", "show", "10.244.5.2"])
            .contains(&format!("dev {host_if} scope link"))
    );
    // It works: the pod resolves its gateway by proxy ARP and reaches the node.
    pod.sh("ping", &["-c1", "-W2", NODE_IP]);

    // CHECK passes, and fails with the CNI error once something is broken.
    let check_conf = node.conf(json!({"prevResult": result}));
    let check = |node: &Node| {
        cni(
            node,
            &Call {
                command: "CHECK",
                ..call
            },
            &check_conf,
        )
    };
    assert_eq!(check(&node).0, 0, "{:?}", check(&node));
    pod.ip(&["route", "del", "default"]);
    let (code, doc, _) = check(&node);
    assert_eq!(code, 1);
    assert_eq!(doc["code"], 102, "{doc}");
    assert!(
        doc["details"].as_str().unwrap().contains("default route"),
        "{doc}"
    );

    // A repeated ADD returns the same result and repairs the wiring.
    let again = add_ok(&node, &call, &conf);
    assert_eq!(again, result);
    assert_eq!(check(&node).0, 0);
    assert_eq!(node.allocations(), vec!["10.244.5.2"]);

    // DEL removes the pair and the allocation; a second DEL succeeds.
    let del = Call {
        command: "DEL",
        ..call
    };
    let (code, _, stderr) = cni(&node, &del, &conf);
    assert_eq!(code, 0, "{stderr}");
    assert!(!node.ns.ip(&["link"]).contains(&host_if));
    assert!(!pod.ip(&["link"]).contains("eth0"));
    assert!(node.allocations().is_empty());
    assert_eq!(cni(&node, &del, &conf).0, 0);
}

#[test]
fn twenty_concurrent_adds_get_distinct_addresses() {
    let node = Node::new("10.244.6.0/24", 1450);
    let pods: Vec<Netns> = (0..20).map(|_| Netns::new("ccq")).collect();
    let conf = node.conf(json!({}));
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || {
                    let path = netns_path(pod);
                    let container = format!("ctr-{i}");
                    let name = format!("pod-{i}");
                    add_ok(
                        node,
                        &Call {
                            command: "ADD",
                            container: &container,
                            netns: &path,
                            ifname: "eth0",
                            pod: Some(("default", &name)),
                        },
                        conf,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<String> = results
        .iter()
        .map(|r| r["ips"][0]["address"].as_str().unwrap().to_string())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 20, "duplicate addresses: {results:?}");
    assert_eq!(node.allocations().len(), 20);
    for (i, pod) in pods.iter().enumerate() {
        let ip = results[i]["ips"][0]["address"].as_str().unwrap();
        assert!(pod.ip(&["addr", "show", "eth0"]).contains(ip));
    }
    // Pods on one node reach each other through the host.
    let to = results[7]["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32");
    pods[3].sh("ping", &["-c1", "-W2", to]);
}

#[test]
fn del_of_something_never_added_succeeds() {
    let node = Node::new("10.244.7.0/24", 1450);
    let conf = node.conf(json!({}));
    for netns in ["", "/var/run/netns/canal-no-such-netns"] {
        let (code, doc, stderr) = cni(
            &node,
            &Call {
                command: "DEL",
                container: "never-added",
                netns,
                ifname: "eth0",
                pod: Some(("default", "ghost")),
            },
            &conf,
        );
        assert_eq!(code, 0, "{doc} {stderr}");
        assert_eq!(doc, Value::Null);
    }
    // Even before the agent wrote network.json.
    std::fs::remove_file(node.run_dir().join("network.json")).unwrap();
    let pod = Netns::new("ccd");
    let path = netns_path(&pod);
    let (code, _, stderr) = cni(
        &node,
        &Call {
            command: "DEL",
            container: "never-added",
            netns: &path,
            ifname: "eth0",
            pod: None,
        },
        &conf,
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn errors_are_cni_error_documents() {
    let node = Node::new("10.244.8.0/30", 1450);
    let pod = Netns::new("cce");
    let path = netns_path(&pod);
    let add = Call {
        command: "ADD",
        container: "c1",
        netns: &path,
        ifname: "eth0",
        pod: Some(("default", "a")),
    };
    let conf = node.conf(json!({}));
    let expect = |(code, doc, _): (i32, Value, String), want: u64, what: &str| {
        assert_eq!(code, 1, "{what}: {doc}");
        assert_eq!(doc["code"], want, "{what}: {doc}");
        assert!(doc["cniVersion"].is_string(), "{what}: {doc}");
        assert!(
            !doc["msg"].as_str().unwrap_or("").is_empty(),
            "{what}: {doc}"
        );
        assert!(doc["details"].is_string(), "{what}: {doc}");
    };

    expect(
        cni(&node, &add, &json!("not a config")),
        6,
        "undecodable config",
    );
    expect(
        cni(&node, &add, &node.conf(json!({"mtu": 12}))),
        7,
        "invalid config",
    );
    expect(
        cni(&node, &add, &node.conf(json!({"cniVersion": "9.0.0"}))),
        1,
        "incompatible version",
    );
    expect(
        cni(&node, &Call { ifname: "", ..add }, &conf),
        4,
        "missing CNI_IFNAME",
    );
    expect(
        cni(
            &node,
            &Call {
                netns: "/var/run/netns/canal-no-such-netns",
                ..add
            },
            &conf,
        ),
        3,
        "missing netns",
    );
    assert!(
        node.allocations().is_empty(),
        "a failed ADD allocated nothing"
    );

    // /30: exactly one usable address.
    add_ok(&node, &add, &conf);
    let pod2 = Netns::new("cce");
    let path2 = netns_path(&pod2);
    let second = Call {
        container: "c2",
        netns: &path2,
        pod: Some(("default", "b")),
        ..add
    };
    let exhausted = cni(&node, &second, &conf);
    assert!(
        exhausted.1["details"]
            .as_str()
            .unwrap()
            .contains("10.244.8.0/30")
    );
    expect(exhausted, 100, "exhausted subnet");

    std::fs::remove_file(node.run_dir().join("network.json")).unwrap();
    let not_ready = cni(&node, &second, &conf);
    assert!(
        not_ready.1["details"]
            .as_str()
            .unwrap()
            .contains("network.json")
    );
    expect(not_ready, 11, "network.json not written yet");
}

#[test]
fn add_waits_for_the_policy_handshake() {
    let node = Node::new("10.244.9.0/24", 1450);
    let run = RunDir::new(node.run_dir());
    std::fs::write(run.policy_enabled_file(), "").unwrap();
    std::fs::create_dir_all(node.run_dir().join("endpoints")).unwrap();
    let pod = Netns::new("ccw");
    let path = netns_path(&pod);
    let call = Call {
        command: "ADD",
        container: "c1",
        netns: &path,
        ifname: "eth0",
        pod: Some(("default", "policed")),
    };
    let host_if = canal_crds::names::veth_name("default", "policed");
    let endpoint = run.endpoint_file(&host_if);
    let conf = node.conf(json!({"policyWaitSeconds": 20}));
    let written_at = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            // The agent programs the endpoint once the interface exists.
            support::wait_until("the host veth", Duration::from_secs(10), || {
                let links = node.ns.ip(&["link"]);
                links.contains(&host_if).then_some(()).ok_or(links)
            });
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(&endpoint, "1").unwrap();
            Instant::now()
        });
        add_ok(&node, &call, &conf);
        let returned_at = Instant::now();
        let written_at = writer.join().unwrap();
        assert!(
            returned_at >= written_at,
            "ADD returned before the endpoint was programmed"
        );
        written_at
    });
    let _ = written_at;

    // Without the endpoint file, ADD gives up after policyWaitSeconds and
    // succeeds (traffic stays dropped until the agent programs it).
    let pod2 = Netns::new("ccw");
    let path2 = netns_path(&pod2);
    let started = Instant::now();
    let (code, _, stderr) = cni(
        &node,
        &Call {
            container: "c2",
            netns: &path2,
            pod: Some(("default", "late")),
            ..call
        },
        &node.conf(json!({"policyWaitSeconds": 0.5})),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(stderr.contains("not programmed"), "{stderr}");
}

#[test]
fn installed_plugin_chains_with_portmap() {
    let node = Node::new("10.244.10.0/24", 1450);
    let dir = tempfile::tempdir().unwrap();
    let (bin, net_d) = (dir.path().join("bin"), dir.path().join("net.d"));
    let out = Command::new(env!("CARGO_BIN_EXE_canal-cni"))
        .args(["install", "--cni-bin-dir"])
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&net_d)
        .arg("--run-dir")
        .arg(node.run_dir())
        .arg("--data-dir")
        .arg(node.data_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value =
        serde_json::from_slice(&std::fs::read(net_d.join("10-canal.conflist")).unwrap()).unwrap();
    assert_eq!(list["plugins"][1]["type"], "portmap");

    // Run the list as a runtime does: each plugin with the list's name and
    // version, the next one getting the previous result.
    let pod = Netns::new("ccm");
    let path = netns_path(&pod);
    let call = Call {
        command: "ADD",
        container: "c1",
        netns: &path,
        ifname: "eth0",
        pod: Some(("default", "mapped")),
    };
    let entry = |i: usize, prev: Option<&Value>| {
        let mut c = list["plugins"][i].clone();
        c["name"] = list["name"].clone();
        c["cniVersion"] = list["cniVersion"].clone();
        if let Some(prev) = prev {
            c["prevResult"] = prev.clone();
        }
        c["runtimeConfig"] =
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});
        c
    };
    let (code, first, stderr) = cni_at(&bin.join("canal-cni"), &node, &call, &entry(0, None));
    assert_eq!(code, 0, "{first} {stderr}");
    let portmap = Path::new("/usr/lib/cni/portmap");
    let (code, second, stderr) = cni_at(portmap, &node, &call, &entry(1, Some(&first)));
    assert_eq!(code, 0, "portmap ADD: {second} {stderr}");
    assert_eq!(second["ips"], first["ips"], "portmap passes the result on");
    let nat = node.ns.sh("iptables-save", &["-t", "nat"]);
    assert!(
        nat.contains("--dport 8080") && nat.contains("10.244.10.2:80"),
        "{nat}"
    );
    // DEL in reverse order.
    let del = Call {
        command: "DEL",
        ..call
    };
    let (code, _, stderr) = cni_at(portmap, &node, &del, &entry(1, Some(&second)));
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = cni_at(
        &bin.join("canal-cni"),
        &node,
        &del,
        &entry(0, Some(&second)),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(node.allocations().is_empty());
}
