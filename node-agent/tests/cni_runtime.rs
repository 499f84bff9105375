//! canal-cni under what real container runtimes do (issue 10, item 4): a
//! pod's sandbox recreated under a new container id, a second CNI_IFNAME,
//! concurrent calls for one container, the node's own namespace passed as
//! CNI_NETNS, namespaces that already have routes, malformed environments,
//! and pods sending from addresses canal did not give them. The real binary,
//! the real kernel, throwaway namespaces.

mod support;

#[path = "cni_support/mod.rs"]
mod cni_support;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cni_support::{
    Call, NODE_IP, Node, add_ok, addresses_of, cni, del_ok, expect_error, netns_path, result_ip,
};
use serde_json::{Value, json};
use support::Netns;

/// Asserts that the pod `name` is wired into `pod` with `ip` by `container`:
/// the store, the host veth, the host route and the pod side agree, and
/// the pod reaches the node.
fn assert_wired(node: &Node, pod: &Netns, name: &str, container: &str, ip: &str) {
    let host_if = canal_crds::names::veth_name("default", name);
    assert_eq!(addresses_of(pod, "eth0"), vec![ip.to_string()], "pod eth0");
    let link = node
        .link(&host_if)
        .unwrap_or_else(|| panic!("{host_if} is missing: {:?}", node.links()));
    assert_eq!(link["address"], "ee:ee:ee:ee:ee:ee", "{link}");
    let routes: Vec<_> = node
        .pod_routes()
        .into_iter()
        .filter(|(_, dev)| *dev == host_if)
        .collect();
    assert_eq!(
        routes,
        vec![(ip.to_string(), host_if.clone())],
        "host routes into {host_if}"
    );
    let records: Vec<_> = node
        .records()
        .into_iter()
        .filter(|(_, c)| c == container)
        .collect();
    assert_eq!(records, vec![(ip.to_string(), container.to_string())]);
    pod.sh("ping", &["-c1", "-W2", NODE_IP]);
}

fn assert_no_records_of(node: &Node, container: &str) {
    let records = node.records();
    assert!(
        !records.iter().any(|(_, c)| c == container),
        "{container} still has records: {records:?}"
    );
}

#[test]
fn a_recreated_sandbox_survives_every_order_of_add_and_del() {
    let node = Node::new("10.244.20.0/24", 1450);
    let conf = node.conf(json!({}));

    // Each scenario: sandbox A (old) and B (new) of one pod; `run` does the
    // calls after A is added and returns the old sandbox's netns guard.
    type Scenario = fn(&Node, &Value, &Call, &Call, Netns) -> Option<Netns>;
    let scenarios: [(&str, Scenario); 4] = [
        ("ADD new, then DEL old", |node, conf, a, b, old| {
            add_ok(node, b, conf);
            del_ok(node, a, conf);
            Some(old)
        }),
        ("DEL old, then ADD new", |node, conf, a, b, old| {
            del_ok(node, a, conf);
            add_ok(node, b, conf);
            Some(old)
        }),
        (
            "ADD new, old netns removed, DEL old",
            |node, conf, a, b, old| {
                add_ok(node, b, conf);
                drop(old);
                del_ok(node, a, conf);
                None
            },
        ),
        (
            "ADD new, DEL old without CNI_NETNS",
            |node, conf, a, b, old| {
                add_ok(node, b, conf);
                del_ok(node, &Call { netns: "", ..*a }, conf);
                Some(old)
            },
        ),
    ];
    for (i, (what, run)) in scenarios.iter().enumerate() {
        let name = format!("web-{i}");
        let (old, new) = (Netns::new("cco"), Netns::new("ccn"));
        let (old_path, new_path) = (netns_path(&old), netns_path(&new));
        let (a_id, b_id) = (format!("old-{i}"), format!("new-{i}"));
        let a = Call::add(&a_id, &old_path, &name);
        let b = Call::add(&b_id, &new_path, &name);
        let a_ip = result_ip(&add_ok(&node, &a, &conf));
        let _old = run(&node, &conf, &a, &b, old);
        // B's own record: a repeated ADD returns B's address.
        let b_ip = result_ip(&add_ok(&node, &b, &conf));
        assert_ne!(a_ip, b_ip, "{what}: the new sandbox has its own address");
        assert_wired(&node, &new, &name, &b_id, &b_ip);
        assert_no_records_of(&node, &a_id);
        // A second DEL of the old sandbox changes nothing either.
        del_ok(&node, &a, &conf);
        assert_wired(&node, &new, &name, &b_id, &b_ip);
        del_ok(&node, &b, &conf);
        assert!(
            node.link(&canal_crds::names::veth_name("default", &name))
                .is_none()
        );
        assert!(
            node.pod_routes().is_empty(),
            "{what}: {:?}",
            node.pod_routes()
        );
        assert!(node.records().is_empty(), "{what}: {:?}", node.records());
    }

    // Concurrent: the runtime's ADD of the new sandbox and DEL of the old.
    for round in 0..6 {
        let name = "racer";
        let (old, new) = (Netns::new("cco"), Netns::new("ccn"));
        let (old_path, new_path) = (netns_path(&old), netns_path(&new));
        let (a_id, b_id) = (format!("race-old-{round}"), format!("race-new-{round}"));
        let a = Call::add(&a_id, &old_path, name);
        let b = Call::add(&b_id, &new_path, name);
        add_ok(&node, &a, &conf);
        let b_result = std::thread::scope(|s| {
            let add = s.spawn(|| add_ok(&node, &b, &conf));
            let del = s.spawn(|| del_ok(&node, &a, &conf));
            del.join().unwrap();
            add.join().unwrap()
        });
        assert_wired(&node, &new, name, &b_id, &result_ip(&b_result));
        assert_no_records_of(&node, &a_id);
        del_ok(&node, &b, &conf);
        assert!(node.records().is_empty(), "{:?}", node.records());
    }
}

#[test]
fn a_second_interface_for_a_container_is_refused_and_eth0_survives() {
    let node = Node::new("10.244.21.0/24", 1450);
    let conf = node.conf(json!({}));
    for (i, pod_args) in [true, false].into_iter().enumerate() {
        let pod = Netns::new("cci");
        let path = netns_path(&pod);
        let id = format!("multi-{i}");
        let name = format!("multi-{i}");
        let mut eth0 = Call::add(&id, &path, &name);
        if !pod_args {
            eth0.pod = None;
        }
        let ip = result_ip(&add_ok(&node, &eth0, &conf));
        let doc = expect_error(
            cni(
                &node,
                &Call {
                    ifname: "net1",
                    ..eth0
                },
                &conf,
            ),
            103,
            "a second interface",
        );
        assert!(
            doc["details"].as_str().unwrap().contains("eth0"),
            "the error names the existing interface: {doc}"
        );
        assert_eq!(addresses_of(&pod, "eth0"), vec![ip.clone()]);
        assert!(addresses_of(&pod, "net1").is_empty());
        pod.sh("ping", &["-c1", "-W2", NODE_IP]);
        assert_eq!(node.allocations(), vec![ip.clone()]);
        // DEL of the refused interface leaves eth0 alone too.
        del_ok(
            &node,
            &Call {
                ifname: "net1",
                ..eth0
            },
            &conf,
        );
        assert_eq!(addresses_of(&pod, "eth0"), vec![ip.clone()]);
        pod.sh("ping", &["-c1", "-W2", NODE_IP]);
        assert_eq!(node.allocations(), vec![ip]);
        del_ok(&node, &eth0, &conf);
        assert!(node.allocations().is_empty());
    }
}

#[test]
fn twenty_concurrent_add_and_del_of_one_container_leave_store_and_kernel_agreeing() {
    let node = Node::new("10.244.22.0/24", 1450);
    let conf = node.conf(json!({}));
    let host_if = canal_crds::names::veth_name("default", "flappy");
    for round in 0..4 {
        let pod = Netns::new("ccf");
        let path = netns_path(&pod);
        let call = Call::add("flappy-ctr", &path, "flappy");
        let outcomes: Vec<(i32, Value, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..20)
                .map(|i| {
                    let c = if (i + round) % 2 == 0 {
                        call
                    } else {
                        call.with("DEL")
                    };
                    let (node, conf) = (&node, &conf);
                    s.spawn(move || cni(node, &c, conf))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (code, doc, stderr) in &outcomes {
            assert_eq!(*code, 0, "round {round}: a call failed: {doc} {stderr}");
        }
        // Whatever order they ran in, the store and the kernel agree.
        let records = node.records();
        let routes = node.pod_routes();
        let pod_ips = addresses_of(&pod, "eth0");
        match records.as_slice() {
            [] => {
                assert!(
                    node.link(&host_if).is_none(),
                    "round {round}: veth without record"
                );
                assert!(
                    routes.is_empty(),
                    "round {round}: routes without record: {routes:?}"
                );
                assert!(
                    pod_ips.is_empty(),
                    "round {round}: address without record: {pod_ips:?}"
                );
            }
            [(ip, owner)] => {
                assert_eq!(owner, "flappy-ctr");
                assert!(
                    node.link(&host_if).is_some(),
                    "round {round}: record without veth"
                );
                assert_eq!(routes, vec![(ip.clone(), host_if.clone())], "round {round}");
                assert_eq!(pod_ips, vec![ip.clone()], "round {round}");
                pod.sh("ping", &["-c1", "-W2", NODE_IP]);
            }
            more => panic!("round {round}: one container, several records: {more:?}"),
        }
        del_ok(&node, &call, &conf);
        assert!(node.records().is_empty());
        assert!(node.link(&host_if).is_none());
        assert!(node.pod_routes().is_empty());
    }
}

/// A bind mount of a namespace file at another path; unmounted on drop.
struct BindMount {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl BindMount {
    fn of(source: &Path) -> BindMount {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netns");
        std::fs::write(&path, "").unwrap();
        support::run(Command::new("mount").arg("--bind").arg(source).arg(&path));
        BindMount { _dir: dir, path }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[test]
fn the_nodes_own_namespace_is_refused_by_every_path() {
    let node = Node::new("10.244.23.0/24", 1450);
    let conf = node.conf(json!({}));
    let default_before = node.default_route();
    let links_before: Vec<Value> = node.links().iter().map(|l| l["ifname"].clone()).collect();
    let bind = BindMount::of(&node.ns.path());
    let mut sleeper = support::Child {
        child: node.ns.exec("sleep").arg("60").spawn().unwrap(),
        log: PathBuf::new(),
    };
    let via_pid = format!("/proc/{}/ns/net", sleeper.child.id());
    let not_a_netns = tempfile::NamedTempFile::new().unwrap();
    let not_a_netns = not_a_netns.path().display().to_string();
    let node_path = netns_path(&node.ns);
    let bind_path = bind.path.display().to_string();
    let paths = [
        node_path.as_str(),
        bind_path.as_str(),
        via_pid.as_str(),
        "/proc/self/ns/net",
        not_a_netns.as_str(),
    ];
    for path in paths {
        let add = Call::add("intruder", path, "intruder");
        let doc = expect_error(cni(&node, &add, &conf), 4, path);
        assert!(
            doc["msg"].as_str().unwrap().contains("CNI_NETNS"),
            "{path}: {doc}"
        );
        expect_error(cni(&node, &add.with("CHECK"), &conf), 4, path);
        // A DEL there must not delete the node's interfaces.
        for ifname in ["eth0", "ul0"] {
            del_ok(&node, &Call { ifname, ..add }, &conf);
        }
        assert_eq!(node.default_route(), default_before, "{path}");
        let links: Vec<Value> = node.links().iter().map(|l| l["ifname"].clone()).collect();
        assert_eq!(links, links_before, "{path}");
        assert!(node.records().is_empty(), "{path}: {:?}", node.records());
    }
    sleeper.kill();
}

#[test]
fn routes_a_namespace_already_has_are_never_replaced_or_removed() {
    let node = Node::new("10.244.24.0/24", 1450);
    let conf = node.conf(json!({}));
    let side = |pod: &Netns| {
        // Another interface someone else made (a veth: no dummy module here).
        pod.ip(&[
            "link", "add", "side0", "type", "veth", "peer", "name", "side0p",
        ]);
        pod.ip(&["addr", "add", "10.99.0.1/24", "dev", "side0"]);
        pod.ip(&["link", "set", "side0p", "up"]);
        pod.ip(&["link", "set", "side0", "up"]);
    };

    // A namespace with a default route of its own: refused, nothing left.
    let pod = Netns::new("ccr");
    side(&pod);
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.99.0.254",
        "dev",
        "side0",
    ]);
    let path = netns_path(&pod);
    let call = Call::add("routed", &path, "routed");
    let doc = expect_error(cni(&node, &call, &conf), 104, "existing default route");
    assert!(
        doc["details"].as_str().unwrap().contains("default"),
        "{doc}"
    );
    let routes = pod.ip(&["route", "show", "default"]);
    assert_eq!(
        routes.trim(),
        "default via 10.99.0.254 dev side0",
        "{routes}"
    );
    assert!(addresses_of(&pod, "eth0").is_empty());
    assert!(node.pod_routes().is_empty(), "{:?}", node.pod_routes());
    assert!(
        node.link(&canal_crds::names::veth_name("default", "routed"))
            .is_none(),
        "the veth made for the refused ADD is gone"
    );
    assert!(node.records().is_empty(), "{:?}", node.records());

    // Other routes stay through ADD and DEL.
    let pod = Netns::new("ccr");
    side(&pod);
    pod.ip(&[
        "route",
        "add",
        "10.98.0.0/16",
        "via",
        "10.99.0.254",
        "dev",
        "side0",
    ]);
    let path = netns_path(&pod);
    let call = Call::add("routed-2", &path, "routed-2");
    add_ok(&node, &call, &conf);
    let routes = pod.ip(&["route"]);
    assert!(
        routes.contains("10.98.0.0/16 via 10.99.0.254 dev side0"),
        "{routes}"
    );
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    pod.sh("ping", &["-c1", "-W2", NODE_IP]);
    del_ok(&node, &call, &conf);
    let routes = pod.ip(&["route"]);
    assert!(
        routes.contains("10.98.0.0/16 via 10.99.0.254 dev side0"),
        "{routes}"
    );
    assert!(addresses_of(&pod, "side0") == vec!["10.99.0.1".to_string()]);
}

#[test]
fn malformed_container_ids_and_interface_names_are_refused() {
    let node = Node::new("10.244.25.0/24", 1450);
    let conf = node.conf(json!({}));
    let pod = Netns::new("ccx");
    let path = netns_path(&pod);
    let long_id = "a".repeat(201);
    let links_before = node.links().len();
    let bad_ids = [
        "../../escape",
        "a/b",
        "a\nb",
        "-leading-dash",
        ".hidden",
        long_id.as_str(),
    ];
    for id in bad_ids {
        let call = Call::add(id, &path, "bad");
        for command in ["ADD", "DEL", "CHECK"] {
            let doc = expect_error(cni(&node, &call.with(command), &conf), 4, id);
            assert!(
                doc["msg"].as_str().unwrap().contains("CNI_CONTAINERID"),
                "{id:?}: {doc}"
            );
        }
    }
    for ifname in [
        "a:b",
        "..",
        ".",
        "eth 0",
        "x/y",
        "eth0\n",
        "abcdefghijklmnop",
    ] {
        let call = Call {
            ifname,
            ..Call::add("good-id", &path, "bad")
        };
        let doc = expect_error(cni(&node, &call, &conf), 4, ifname);
        assert!(
            doc["msg"].as_str().unwrap().contains("CNI_IFNAME"),
            "{ifname:?}: {doc}"
        );
    }
    assert_eq!(node.links().len(), links_before);
    assert!(links_of_pod_are_only_lo(&pod));
    assert!(node.records().is_empty());
    assert!(
        !node.dir.path().join("escape").exists() && !node.data_dir().join("escape").exists(),
        "nothing was written outside the data directory"
    );
}

fn links_of_pod_are_only_lo(pod: &Netns) -> bool {
    cni_support::links_of(pod)
        .iter()
        .all(|l| l["ifname"] == "lo")
}

#[test]
fn without_cni_command_a_runtime_gets_a_cni_error_document() {
    let bin = cni_support::binary();
    let path = "/usr/bin:/bin";
    for env in [
        vec![],
        vec![("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")],
        vec![("CNI_COMMAND", "")],
    ] {
        let out = Command::new(&bin)
            .env_clear()
            .env("PATH", path)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{env:?}: {stdout}");
        let doc: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!("{env:?}: stdout is not a CNI error document ({e}): {stdout:?}")
        });
        assert_eq!(doc["code"], 4, "{doc}");
        assert!(
            doc["msg"].as_str().unwrap().contains("CNI_COMMAND"),
            "{doc}"
        );
        assert!(
            doc["cniVersion"].is_string() && doc["details"].is_string(),
            "{doc}"
        );
    }
    // A person asking for help gets it.
    let out = Command::new(&bin)
        .env_clear()
        .env("PATH", path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("install"));
}

/// A UDP receiver inside `ns` on `port`; returns (source, payload) of what
/// arrived within `window`.
fn receiver(
    ns: &Netns,
    port: u16,
    window: Duration,
) -> std::thread::JoinHandle<Vec<(String, String)>> {
    let file = std::fs::File::open(ns.path()).unwrap();
    let (ready, wait) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        ready.send(()).unwrap();
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        let mut buf = [0u8; 128];
        while Instant::now() < deadline {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                got.push((
                    from.ip().to_string(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
        got
    });
    wait.recv().unwrap();
    handle
}

/// Sends `payload` three times from `src` (an address of the namespace).
fn send_from(ns: &Netns, src: &str, dst: &str, port: u16, payload: &str) {
    let (src, dst, payload) = (src.to_string(), dst.to_string(), payload.to_string());
    support::in_netns(&ns.path(), move || {
        let sock = UdpSocket::bind((src.as_str(), 0)).unwrap();
        for _ in 0..3 {
            let _ = sock.send_to(payload.as_bytes(), (dst.as_str(), port));
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

/// The node's count of packets dropped by reverse-path filtering.
fn rp_filter_drops(node: &Node) -> u64 {
    let text = node.ns.sh("cat", &["/proc/net/netstat"]);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "IPReversePathFilter")
        .map(|(_, v)| v.parse().unwrap())
        .expect("IPReversePathFilter counter")
}

#[test]
fn a_pod_cannot_send_from_an_address_it_was_not_given() {
    let node = Node::new("10.244.26.0/24", 1450);
    let conf = node.conf(json!({}));
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("ccs")).collect();
    let paths: Vec<String> = pods.iter().map(netns_path).collect();
    let ips: Vec<String> = ["attacker", "victim", "target"]
        .iter()
        .zip(&paths)
        .map(|(name, path)| result_ip(&add_ok(&node, &Call::add(name, path, name), &conf)))
        .collect();
    let (attacker, victim, target) = (&pods[0], &pods[1], &pods[2]);
    let (a_ip, v_ip, t_ip) = (&ips[0], &ips[1], &ips[2]);
    let host_if = canal_crds::names::veth_name("default", "attacker");
    assert_eq!(
        node.ns
            .sh(
                "cat",
                &[&format!("/proc/sys/net/ipv4/conf/{host_if}/rp_filter")]
            )
            .trim(),
        "1"
    );

    let listening = receiver(target, 7000, Duration::from_secs(3));
    // Genuine traffic first: it also resolves the gateway by proxy ARP.
    send_from(attacker, a_ip, t_ip, 7000, "genuine-1");
    let drops_before = rp_filter_drops(&node);
    let spoofed = [
        ("another pod", v_ip.as_str()),
        ("a free pod address", "10.244.26.200"),
        ("an outside address", "203.0.113.7"),
        ("the pod gateway", "169.254.1.1"),
    ];
    for (_, src) in spoofed {
        attacker.ip(&["addr", "add", &format!("{src}/32"), "dev", "eth0"]);
        send_from(attacker, src, t_ip, 7000, &format!("spoofed-{src}"));
    }
    send_from(attacker, a_ip, t_ip, 7000, "genuine-2");
    let got = listening.join().unwrap();
    let drops = rp_filter_drops(&node) - drops_before;
    for (what, src) in spoofed {
        assert!(
            !got.iter().any(|(from, _)| from == src),
            "a datagram from {what} ({src}) was delivered: {got:?}"
        );
    }
    for genuine in ["genuine-1", "genuine-2"] {
        assert!(
            got.iter().any(|(from, p)| from == a_ip && p == genuine),
            "{genuine} from {a_ip} did not arrive: {got:?}"
        );
    }
    assert!(drops >= 1, "the kernel counted no reverse-path drops");

    // The victim's address, now also on the attacker's eth0, still routes
    // to the victim: routes are the host's.
    let at_victim = receiver(victim, 7001, Duration::from_secs(2));
    let at_attacker = receiver(attacker, 7001, Duration::from_secs(2));
    send_from(target, t_ip, v_ip, 7001, "to-victim");
    assert!(
        at_victim
            .join()
            .unwrap()
            .iter()
            .any(|(_, p)| p == "to-victim")
    );
    assert!(at_attacker.join().unwrap().is_empty());
    eprintln!(
        "spoofed datagrams delivered: 0 of {}; kernel reverse-path drops counted: {drops}",
        3 * spoofed.len()
    );
}

#[test]
fn a_pod_cannot_reach_the_node_over_ipv6() {
    let node = Node::new("10.244.27.0/24", 1450);
    let conf = node.conf(json!({}));
    let pod = Netns::new("cc6");
    let path = netns_path(&pod);
    add_ok(&node, &Call::add("six", &path, "six"), &conf);
    let host_if = canal_crds::names::veth_name("default", "six");
    let v6 = node.ns.ip(&["-6", "addr", "show", "dev", &host_if]);
    assert!(
        !v6.contains("inet6"),
        "the host veth has IPv6 addresses: {v6}"
    );
    // The host end's link-local address (from its MAC) would answer
    // before the fix; give the pod's own link-local time to get through
    // duplicate address detection.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let ping = pod.output(
            "ping",
            &["-6", "-c1", "-W1", "fe80::ecee:eeff:feee:eeee%eth0"],
        );
        assert!(
            !ping.status.success(),
            "the pod reached the node over IPv6: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // IPv4 is unaffected.
    pod.sh("ping", &["-c1", "-W2", NODE_IP]);
}

#[test]
fn del_with_other_cni_args_than_add_still_removes_the_pods_veth() {
    let node = Node::new("10.244.28.0/24", 1450);
    let conf = node.conf(json!({}));
    let host_if = canal_crds::names::veth_name("default", "argless");
    for (i, with_netns) in [false, true].into_iter().enumerate() {
        let pod = Netns::new("cca");
        let path = netns_path(&pod);
        let id = format!("argless-{i}");
        let add = Call::add(&id, &path, "argless");
        let ip = result_ip(&add_ok(&node, &add, &conf));
        let del = Call {
            pod: None,
            netns: if with_netns { &path } else { "" },
            ..add
        };
        del_ok(&node, &del, &conf);
        assert!(
            node.link(&host_if).is_none(),
            "DEL left {host_if} (netns given: {with_netns})"
        );
        assert!(!node.pod_routes().iter().any(|(r, _)| *r == ip));
        assert!(node.records().is_empty(), "{:?}", node.records());
    }
}
