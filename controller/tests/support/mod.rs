//! What the controller's integration tests share: a control plane with the
//! CRDs, the real canal-controller binary as a child process, Nodes as a
//! kubelet would register them, and waiting on conditions with a deadline.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use canal_crds::{CanalNetwork, CanalNetworkSpec, annotations};
use canal_e2e::ControlPlane;
use canal_e2e::process::OwnedChild;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// Tests in one binary run one at a time: each starts its own etcd,
/// kube-apiserver and controllers, and timing assertions (failover) must not
/// compete with another test's control plane for the two cores.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A control plane with canal's CRDs installed.
pub async fn cluster() -> ControlPlane {
    let cp = ControlPlane::start().await.expect("control plane starts");
    canal_e2e::install::install_crds(&cp.client())
        .await
        .expect("CRDs install");
    cp
}

/// Applies CanalNetwork `default` with the given range.
pub async fn apply_network(cp: &ControlPlane, cidr: &str, len: u8) -> CanalNetwork {
    let spec = CanalNetworkSpec {
        node_subnet_length: len,
        ..CanalNetworkSpec::with_cluster_cidr(cidr)
    };
    canal_e2e::install::apply_default_network(&cp.client(), spec)
        .await
        .expect("CanalNetwork default applies")
}

/// A running canal-controller; killed when dropped.
pub struct Controller {
    child: OwnedChild,
    /// The metrics endpoint.
    pub metrics_addr: String,
    /// Its log file.
    pub log: PathBuf,
    /// Its Lease identity.
    pub identity: String,
}

fn free_port() -> u16 {
    canal_e2e::ports::free_loopback_port().unwrap()
}

impl Controller {
    /// Starts the binary against `cp` with `--leader-elect=false`.
    pub fn start(cp: &ControlPlane, name: &str) -> Controller {
        Controller::start_with(cp, name, &["--leader-elect=false"])
    }

    /// Starts the binary against `cp` with extra flags; `name` labels the
    /// log file and is the Lease identity.
    pub fn start_with(cp: &ControlPlane, name: &str, extra: &[&str]) -> Controller {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let log = cp.layout.log(&format!("controller-{name}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_canal-controller"));
        cmd.arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
            .arg(format!("--metrics-addr={metrics_addr}"))
            .arg(format!("--identity={name}"))
            .arg("--lease-namespace=kube-system")
            .args(extra)
            .env("RUST_LOG", "info,canal_controller=debug");
        let child = OwnedChild::spawn(&format!("canal-controller {name}"), cmd, &log)
            .expect("canal-controller starts");
        Controller {
            child,
            metrics_addr,
            log,
            identity: name.to_string(),
        }
    }

    /// Kills the process with SIGKILL: it releases nothing.
    pub fn kill_hard(&mut self) {
        if let Some(pid) = self.child.pid() {
            // SAFETY: a plain kill(2) on our own child.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        self.child.stop(Duration::from_secs(1));
    }

    /// Stops the process with SIGTERM (graceful).
    pub fn stop(&mut self) {
        self.child.stop(Duration::from_secs(10));
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.child.log_tail(lines)
    }

    /// Fails with the log when the process died.
    pub fn check_running(&mut self) {
        if let Err(e) = self.child.check_running() {
            panic!("canal-controller died: {e}");
        }
    }

    /// `/metrics` as text, or None while the endpoint does not answer.
    pub async fn metrics_text(&self) -> Option<String> {
        http_get(&self.metrics_addr, "/metrics").await
    }

    /// The value of one sample (`name{labels}` exactly as printed), or None.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.metrics_text().await?;
        metric_value(&text, sample)
    }
}

/// Finds `sample` (e.g. `canal_controller_leader` or
/// `canal_controller_api_writes_total{resource="node"}`) in Prometheus text.
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

/// A minimal HTTP/1.1 GET returning the body.
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// Polls `check` until it returns Ok or `timeout` passes; panics with the
/// last observation and `what` was expected.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(observed) => {
                if Instant::now() > deadline {
                    panic!(
                        "timed out after {timeout:?} waiting for {what}; last observed: {observed}"
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers a Node like a kubelet would (no kubelet runs here): the object
/// with its InternalIP in status (Nodes accept status on create, as kubelet
/// registration relies on), falling back to a status patch.
pub async fn create_node(client: &Client, name: &str, ip: &str, pod_cidr: Option<&str>) -> Node {
    let api: Api<Node> = Api::all(client.clone());
    let mut spec = json!({});
    if let Some(c) = pod_cidr {
        spec = json!({"podCIDR": c, "podCIDRs": [c]});
    }
    let addresses = json!([
        {"type": "InternalIP", "address": ip},
        {"type": "Hostname", "address": name},
    ]);
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": spec,
        "status": {"addresses": addresses},
    }))
    .unwrap();
    let created = api
        .create(&PostParams::default(), &node)
        .await
        .unwrap_or_else(|e| panic!("creating Node {name}: {e}"));
    let has_ip = created
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .is_some_and(|a| !a.is_empty());
    if has_ip {
        return created;
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"addresses": addresses}})),
    )
    .await
    .unwrap_or_else(|e| panic!("setting the InternalIP of Node {name}: {e}"))
}

/// Deletes a Node (no finalizers: gone at once).
pub async fn delete_node(client: &Client, name: &str) {
    let api: Api<Node> = Api::all(client.clone());
    api.delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("deleting Node {name}: {e}"));
}

/// Every Node by name.
pub async fn nodes(client: &Client) -> BTreeMap<String, Node> {
    let api: Api<Node> = Api::all(client.clone());
    api.list(&ListParams::default())
        .await
        .expect("listing Nodes")
        .items
        .into_iter()
        .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
        .collect()
}

/// spec.podCIDR of a Node.
pub fn pod_cidr(node: &Node) -> Option<String> {
    node.spec.as_ref().and_then(|s| s.pod_cidr.clone())
}

/// One annotation of a Node.
pub fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// True when the Node carries a podCIDR and all four flannel annotations.
pub fn is_published(node: &Node) -> bool {
    pod_cidr(node).is_some()
        && [
            annotations::BACKEND_TYPE,
            annotations::BACKEND_DATA,
            annotations::PUBLIC_IP,
            annotations::KUBE_SUBNET_MANAGER,
        ]
        .iter()
        .all(|k| annotation(node, k).is_some())
}

/// The CanalNetwork `name`.
pub async fn network(client: &Client, name: &str) -> CanalNetwork {
    let api: Api<CanalNetwork> = Api::all(client.clone());
    api.get(name)
        .await
        .unwrap_or_else(|e| panic!("reading CanalNetwork {name}: {e}"))
}

/// (status, reason, message) of a condition of CanalNetwork `name`, read
/// untyped so it works for objects whose spec does not parse.
pub async fn condition(
    client: &Client,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let api: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<CanalNetwork>(&()),
    );
    let obj = api
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("reading CanalNetwork {name}: {e}"));
    let conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> =
        serde_json::from_value(obj.data["status"]["conditions"].clone()).unwrap_or_default();
    canal_crds::condition::find(&conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Events (events.k8s.io/v1) about the object `kind`/`name`, as (reason, note).
pub async fn events_about(client: &Client, kind: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default())
        .await
        .expect("listing Events")
        .items
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Waits for an Event with `reason` about `kind`/`name` and returns its note.
pub async fn wait_for_event(client: &Client, kind: &str, name: &str, reason: &str) -> String {
    wait_for(
        &format!("a {reason} Event about {kind} {name}"),
        Duration::from_secs(20),
        || async {
            let events = events_about(client, kind, name).await;
            events
                .iter()
                .find(|(r, _)| r == reason)
                .map(|(_, note)| note.clone())
                .ok_or_else(|| format!("{events:?}"))
        },
    )
    .await
}

/// Waits until every Node in `names` has a podCIDR and the flannel annotations.
pub async fn wait_published(
    client: &Client,
    names: &[String],
    timeout: Duration,
) -> BTreeMap<String, Node> {
    wait_for(
        &format!("{} Nodes to get a podCIDR and annotations", names.len()),
        timeout,
        || async {
            let all = nodes(client).await;
            let missing: Vec<&String> = names
                .iter()
                .filter(|n| !all.get(*n).is_some_and(is_published))
                .collect();
            if missing.is_empty() {
                Ok(all)
            } else {
                Err(format!(
                    "{} without: {:?}",
                    missing.len(),
                    missing.iter().take(10).collect::<Vec<_>>()
                ))
            }
        },
    )
    .await
}

/// Asserts the podCIDRs of `nodes` are distinct, valid and inside `cidr`.
pub fn assert_distinct_inside(nodes: &BTreeMap<String, Node>, cidr: &str) {
    let cluster: ipnet::Ipv4Net = cidr.parse().unwrap();
    let mut seen: Vec<(ipnet::Ipv4Net, &String)> = Vec::new();
    for (name, node) in nodes {
        let Some(c) = pod_cidr(node) else { continue };
        let net: ipnet::Ipv4Net = c
            .parse()
            .unwrap_or_else(|_| panic!("{name}: bad podCIDR {c}"));
        assert!(cluster.contains(&net), "{name}: {net} outside {cluster}");
        for (other, other_name) in &seen {
            assert!(
                !other.contains(&net) && !net.contains(other),
                "{name} {net} overlaps {other_name} {other}"
            );
        }
        seen.push((net, name));
    }
}

/// Resource versions of every Node.
pub async fn resource_versions(client: &Client) -> BTreeMap<String, String> {
    nodes(client)
        .await
        .into_iter()
        .map(|(n, node)| (n, node.metadata.resource_version.unwrap_or_default()))
        .collect()
}
