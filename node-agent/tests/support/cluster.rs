//! A "node" for tests that run the real canal-agent: a network namespace
//! with an underlay, a kubeconfig that reaches the test API server from
//! inside it, and the agent process; plus the Node objects canal-controller
//! would write.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use canal_crds::annotations;
use canal_e2e::ControlPlane;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::{Child, Netns, forward_into, http_get_in};

/// Where agents serve /metrics and /readyz inside their namespace.
pub const METRICS_PORT: u16 = 9091;

/// One node: its namespace, addresses and directories.
pub struct NodeNs {
    pub name: String,
    pub ip: String,
    pub cidr: String,
    pub ns: Netns,
    pub run_dir: PathBuf,
    pub data_dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl NodeNs {
    /// The node's VTEP MAC (what the controller publishes).
    pub fn mac(&self) -> String {
        annotations::format_mac(annotations::vtep_mac(&self.name))
    }

    /// Starts canal-agent inside the node namespace; its stderr goes to
    /// `<dir>/agent-<node>-<tag>.log`.
    pub fn start_agent(&self, dir: &Path, tag: &str) -> Child {
        self.start_agent_with(dir, tag, &[])
    }

    /// [`start_agent`](Self::start_agent) with extra flags.
    pub fn start_agent_with(&self, dir: &Path, tag: &str, extra: &[&str]) -> Child {
        self.start_agent_in(dir, tag, extra, None)
    }

    /// [`start_agent_with`](Self::start_agent_with) with the agent's `PATH`
    /// set to `path` (None: inherited), e.g. one without iptables.
    pub fn start_agent_in(
        &self,
        dir: &Path,
        tag: &str,
        extra: &[&str],
        path: Option<&Path>,
    ) -> Child {
        let log = dir.join(format!("agent-{}-{tag}.log", self.name));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = match path {
            // `env` sets PATH for the agent only, not for `ip netns exec`.
            Some(path) => {
                let mut c = self.ns.exec("env");
                c.arg(format!("PATH={}", path.display()))
                    .arg(env!("CARGO_BIN_EXE_canal-agent"));
                c
            }
            None => self.ns.exec(env!("CARGO_BIN_EXE_canal-agent")),
        };
        let child = cmd
            .arg(format!("--node-name={}", self.name))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg(format!("--metrics-addr=127.0.0.1:{METRICS_PORT}"))
            .arg("--log-level=info")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("canal-agent starts");
        Child { child, log }
    }

    /// Ok when the agent's /readyz answers 200; else the answer.
    pub fn ready(&self) -> Result<(), String> {
        let r = http_get_in(&self.ns, METRICS_PORT, "/readyz")?;
        r.starts_with("HTTP/1.1 200").then_some(()).ok_or(r)
    }

    /// One sample of the agent's /metrics (`name{labels}` exactly).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = http_get_in(&self.ns, METRICS_PORT, "/metrics").ok()?;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

/// A node namespace with an underlay `ul0` (`ip`/24, default route via .1
/// so proxy ARP works) and a kubeconfig that reaches `cp` from inside.
/// `underlay`: the namespace holding bridge `br0` to plug into, or None for
/// a lone node (the veth peer stays inside, up).
pub fn node_ns(
    cp: &ControlPlane,
    dir: &Path,
    name: &str,
    ip: &str,
    cidr: &str,
    underlay: Option<&Netns>,
) -> NodeNs {
    let ns = Netns::new("can");
    let peer = super::unique("cav");
    ns.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", &peer]);
    match underlay {
        Some(u) => {
            ns.ip(&["link", "set", &peer, "netns", &u.name]);
            u.ip(&["link", "set", &peer, "master", "br0", "up"]);
        }
        None => {
            ns.ip(&["link", "set", &peer, "up"]);
        }
    }
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    let gateway = format!("{}.1", ip.rsplit_once('.').unwrap().0);
    ns.ip(&["route", "add", "default", "via", &gateway, "dev", "ul0"]);
    let kubeconfig = kubeconfig_via(cp, &ns, dir);
    NodeNs {
        name: name.to_string(),
        ip: ip.to_string(),
        cidr: cidr.to_string(),
        run_dir: dir.join(format!("run-{name}")),
        data_dir: dir.join(format!("data-{name}")),
        kubeconfig,
        ns,
    }
}

/// Creates a Node as canal-controller leaves it: podCIDR, flannel
/// annotations, InternalIP.
pub async fn create_node(client: &kube::Client, name: &str, cidr: &str, ip: &str) {
    let api: Api<Node> = Api::all(client.clone());
    let mac = annotations::format_mac(annotations::vtep_mac(name));
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": {
                annotations::KUBE_SUBNET_MANAGER: "true",
                annotations::BACKEND_TYPE: "vxlan",
                annotations::BACKEND_DATA: format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
                annotations::PUBLIC_IP: ip,
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    }))
    .unwrap();
    api.create(&PostParams::default(), &node).await.unwrap();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}})),
    )
    .await
    .unwrap();
}

/// Deletes a Node.
pub async fn delete_node(client: &kube::Client, name: &str) {
    let api: Api<Node> = Api::all(client.clone());
    api.delete(name, &DeleteParams::default()).await.unwrap();
}

/// A kubeconfig for processes inside `ns`: the admin one, pointed at a
/// forwarder on the namespace's loopback.
pub fn kubeconfig_via(cp: &ControlPlane, ns: &Netns, dir: &Path) -> PathBuf {
    let admin = std::fs::read_to_string(cp.kubeconfig()).unwrap();
    let server = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap()
        .to_string();
    let port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    let local = forward_into(ns, port);
    let path = dir.join(format!("kubeconfig-{}", ns.name));
    std::fs::write(
        &path,
        admin.replace(&server, &format!("https://127.0.0.1:{local}")),
    )
    .unwrap();
    path
}
