//! Shared by the CNI test files: a node namespace with canal-agent's
//! network.json, the real canal-cni binary run as a runtime runs it (inside
//! the node namespace via `ip netns exec`, with the CNI environment and the
//! configuration on stdin), and readers of the kernel and IPAM state that
//! the tests compare.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use canal_agent::runfiles::{FamilyNetwork, NetworkFile, RunDir};
use serde_json::{Value, json};

use crate::support::Netns;

pub const NODE_IP: &str = "192.168.88.1";
pub const NODE_IP6: &str = "fd00:88::1";
pub const NETWORK: &str = "k8s-pod-network";

/// A node: its namespace (underlay veth with a default route, forwarding
/// on), a run dir with network.json, and an IPAM data dir.
pub struct Node {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn new(subnet: &str, mtu: u32) -> Node {
        let ns = Netns::new("ccn");
        ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul0p"]);
        ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "ul0"]);
        ns.ip(&["link", "set", "ul0", "up"]);
        ns.ip(&["link", "set", "ul0p", "up"]);
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.168.88.254",
            "dev",
            "ul0",
        ]);
        ns.sh("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let node = Node {
            ns,
            dir: tempfile::tempdir().unwrap(),
        };
        node.write_network(subnet, mtu);
        node
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The IPAM directory of the network.
    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir().join(NETWORK)
    }

    pub fn write_network(&self, subnet: &str, mtu: u32) {
        RunDir::new(self.run_dir())
            .write_network(&NetworkFile {
                cluster_cidr: "10.244.0.0/16".parse().unwrap(),
                node_subnet: subnet.parse().unwrap(),
                mtu,
                node_name: "node-1".into(),
                node_ip: Some(NODE_IP.parse().unwrap()),
                families: Vec::new(),
            })
            .unwrap();
    }

    /// network.json of a node with these subnets (in this order; IPv4
    /// ones from 10.244.0.0/16, IPv6 ones from fd00:10:244::/56).
    pub fn write_families(&self, subnets: &[&str], mtu: u32) {
        let families = subnets
            .iter()
            .map(|s| {
                let v6 = s.contains(':');
                FamilyNetwork {
                    cluster_cidr: if v6 {
                        "fd00:10:244::/56"
                    } else {
                        "10.244.0.0/16"
                    }
                    .parse()
                    .unwrap(),
                    node_subnet: s.parse().unwrap(),
                    node_ip: Some(if v6 { NODE_IP6 } else { NODE_IP }.parse().unwrap()),
                }
            })
            .collect();
        RunDir::new(self.run_dir())
            .write_network(&NetworkFile::new("node-1", mtu, families).unwrap())
            .unwrap();
    }

    /// A dual-stack node: the underlay also has an IPv6 address and route.
    pub fn dual(subnets: &[&str], mtu: u32) -> Node {
        let node = Node::new("10.244.5.0/24", mtu);
        node.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE_IP6}/64"),
            "dev",
            "ul0",
            "nodad",
        ]);
        node.ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:88::fe",
            "dev",
            "ul0",
        ]);
        node.ns
            .sh("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        node.write_families(subnets, mtu);
        node
    }

    /// The node's sysctl `key` (e.g. `net/ipv6/conf/cali.../disable_ipv6`).
    pub fn sysctl(&self, key: &str) -> String {
        self.ns
            .sh("cat", &[&format!("/proc/sys/{key}")])
            .trim()
            .to_string()
    }

    pub fn conf(&self, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "canal-cni",
            "runDir": self.run_dir(),
            "dataDir": self.data_dir(),
        });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c
    }

    /// The addresses that have an IPAM record (file names).
    pub fn allocations(&self) -> Vec<String> {
        self.records().into_iter().map(|(ip, _)| ip).collect()
    }

    /// (address, container id) of every readable IPAM record.
    pub fn records(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = std::fs::read_dir(self.ipam_dir())
            .map(|d| {
                d.filter_map(|e| {
                    let e = e.unwrap();
                    let name = e.file_name().to_string_lossy().into_owned();
                    // Regular files only (a symlink is no record canal wrote).
                    let regular = std::fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_file());
                    let address = name.starts_with("10.") || name.starts_with("fd00:");
                    if !address || !regular {
                        return None;
                    }
                    let text = std::fs::read_to_string(e.path()).ok()?;
                    let owner = text.lines().next().filter(|l| !l.is_empty())?;
                    Some((name, owner.to_string()))
                })
                .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// `ip -j -d link show` of the node namespace.
    pub fn links(&self) -> Vec<Value> {
        links_of(&self.ns)
    }

    /// The node's link called `name`, if any.
    pub fn link(&self, name: &str) -> Option<Value> {
        self.links()
            .into_iter()
            .find(|l| l["ifname"].as_str() == Some(name))
    }

    /// `ip -j route show` of the node namespace.
    pub fn routes(&self) -> Vec<Value> {
        routes_of(&self.ns)
    }

    /// The node's /32 routes into pod interfaces: (address, device).
    pub fn pod_routes(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .routes()
            .into_iter()
            .filter(|r| r["dst"].as_str().is_some_and(|d| d.starts_with("10.244.")))
            .map(|r| {
                (
                    r["dst"].as_str().unwrap().to_string(),
                    r["dev"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// The node's default route as `ip route` prints it.
    pub fn default_route(&self) -> String {
        self.ns.ip(&["route", "show", "default"]).trim().to_string()
    }
}

/// `ip -j -d link show` of a namespace.
pub fn links_of(ns: &Netns) -> Vec<Value> {
    serde_json::from_str(&ns.ip(&["-j", "-d", "link", "show"])).unwrap()
}

/// `ip -j route show` of a namespace.
pub fn routes_of(ns: &Netns) -> Vec<Value> {
    serde_json::from_str(&ns.ip(&["-j", "route", "show"])).unwrap()
}

/// The IPv4 addresses of `dev` in a namespace (empty when it is missing).
pub fn addresses_of(ns: &Netns, dev: &str) -> Vec<String> {
    let out = ns.output("ip", &["-j", "-4", "addr", "show", "dev", dev]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .collect()
}

/// The global IPv6 addresses of `dev` (`addr/prefix` and their flags).
pub fn addresses6_of(ns: &Netns, dev: &str) -> Vec<(String, Vec<String>)> {
    let out = ns.output("ip", &["-j", "-6", "addr", "show", "dev", dev]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .map(|a| {
            let flags = ["tentative", "dadfailed", "nodad"]
                .iter()
                .filter(|f| a[**f].as_bool() == Some(true))
                .map(|f| f.to_string())
                .collect();
            (
                format!(
                    "{}/{}",
                    a["local"].as_str().unwrap_or_default(),
                    a["prefixlen"]
                ),
                flags,
            )
        })
        .collect()
}

/// One CNI invocation.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    pub command: &'a str,
    pub container: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub pod: Option<(&'a str, &'a str)>,
}

impl<'a> Call<'a> {
    /// An ADD of `container` of pod `default/<pod>` in `netns`, as eth0.
    pub fn add(container: &'a str, netns: &'a str, pod: &'a str) -> Call<'a> {
        Call {
            command: "ADD",
            container,
            netns,
            ifname: "eth0",
            pod: Some(("default", pod)),
        }
    }

    /// The same call with another command.
    pub fn with(self, command: &'a str) -> Call<'a> {
        Call { command, ..self }
    }
}

pub fn cni_at(binary: &Path, node: &Node, call: &Call, conf: &Value) -> (i32, Value, String) {
    let mut cmd = node.ns.exec(binary.to_str().unwrap());
    cmd.env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            match call.pod {
                Some((ns, pod)) => format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={}",
                    call.container
                ),
                None => String::new(),
            },
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let doc = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout {stdout:?}: {e}"))
    };
    (
        out.status.code().unwrap_or(-1),
        doc,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The canal-cni binary under test: this build's, or `CANAL_CNI_BIN` (to
/// run these tests against another build, e.g. to see which fail there).
pub fn binary() -> PathBuf {
    std::env::var_os("CANAL_CNI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_canal-cni")))
}

pub fn cni(node: &Node, call: &Call, conf: &Value) -> (i32, Value, String) {
    cni_at(&binary(), node, call, conf)
}

pub fn add_ok(node: &Node, call: &Call, conf: &Value) -> Value {
    let (code, doc, stderr) = cni(node, call, conf);
    assert_eq!(code, 0, "{} failed: {doc}\n{stderr}", call.command);
    doc
}

pub fn del_ok(node: &Node, call: &Call, conf: &Value) {
    let (code, doc, stderr) = cni(node, &call.with("DEL"), conf);
    assert_eq!(code, 0, "DEL failed: {doc}\n{stderr}");
}

/// Asserts a CNI error document with `want` as its code; returns it.
pub fn expect_error((code, doc, stderr): (i32, Value, String), want: u64, what: &str) -> Value {
    assert_eq!(code, 1, "{what}: exit code; {doc} {stderr}");
    assert_eq!(doc["code"], want, "{what}: {doc} {stderr}");
    assert!(doc["cniVersion"].is_string(), "{what}: {doc}");
    assert!(
        !doc["msg"].as_str().unwrap_or("").is_empty(),
        "{what}: {doc}"
    );
    assert!(doc["details"].is_string(), "{what}: {doc}");
    doc
}

pub fn netns_path(ns: &Netns) -> String {
    ns.path().display().to_string()
}

/// The pod address of an ADD result, without the prefix length.
pub fn result_ip(result: &Value) -> String {
    result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {result}"))
        .trim_end_matches("/32")
        .to_string()
}
