//! The lab's machines: the underlay, the internet host, and each node (its
//! namespace and underlay link, its Node object as a kubelet would register
//! it, its CNI configuration and its canal-agent).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::Error;
use crate::certs::Pki;
use crate::control_plane::{self, Layout};
use crate::lab::family::IpFamily;
use crate::lab::names::{self, LabNames};
use crate::lab::state::{LabRecord, NodeRecord, StateDir};
use crate::lab::{Context, netns};
use crate::process;

/// Field manager of what the lab's kubelet stand-in writes.
pub const KUBELET_MANAGER: &str = "canal-lab-kubelet";

/// Builds the underlay namespace with its bridge, and the internet
/// namespace on it (the nodes' default gateway, holding
/// [`names::INTERNET_HOST`]; with IPv6 also the IPv6 gateway and
/// [`names::INTERNET_HOST6`]).
pub fn build_underlay(names: &LabNames, family: IpFamily) -> Result<(), Error> {
    let ul = names.underlay_netns();
    netns::add(&ul)?;
    netns::ip(&[
        "-n",
        &ul,
        "link",
        "add",
        names::UNDERLAY_BRIDGE,
        "type",
        "bridge",
    ])?;
    netns::ip(&["-n", &ul, "link", "set", names::UNDERLAY_BRIDGE, "up"])?;

    let inet = names.internet_netns();
    netns::add(&inet)?;
    netns::veth(&ul, names::INTERNET_PORT, &inet, names::NODE_UNDERLAY_IF)?;
    netns::ip(&[
        "-n",
        &ul,
        "link",
        "set",
        names::INTERNET_PORT,
        "master",
        names::UNDERLAY_BRIDGE,
    ])?;
    let gateway = format!("{}/{}", names.gateway(), names.underlay().prefix_len());
    netns::ip(&[
        "-n",
        &inet,
        "addr",
        "add",
        &gateway,
        "dev",
        names::NODE_UNDERLAY_IF,
    ])?;
    netns::ip(&[
        "-n",
        &inet,
        "addr",
        "add",
        &format!("{}/32", names::INTERNET_HOST),
        "dev",
        "lo",
    ])?;
    if family.has_v6() {
        // No duplicate address detection anywhere in the lab: a tentative
        // address cannot be bound or answer for a second or more.
        netns::set_sysctl(&inet, "net.ipv6.conf.all.accept_dad", "0")?;
        netns::set_sysctl(&inet, "net.ipv6.conf.default.accept_dad", "0")?;
        let gateway6 = format!("{}/{}", names.gateway6(), names.underlay6().prefix_len());
        netns::ip(&[
            "-n",
            &inet,
            "-6",
            "addr",
            "add",
            &gateway6,
            "dev",
            names::NODE_UNDERLAY_IF,
            "nodad",
        ])?;
        netns::ip(&[
            "-n",
            &inet,
            "-6",
            "addr",
            "add",
            &format!("{}/128", names::INTERNET_HOST6),
            "dev",
            "lo",
        ])?;
    }
    Ok(())
}

/// Starts the internet host's echo server (TCP and UDP 80).
pub async fn start_internet_echo(ctx: &Context) -> Result<(), Error> {
    let paths = ctx.state.internet();
    std::fs::create_dir_all(&paths.dir)
        .map_err(|e| Error::Io(format!("creating {}", paths.dir.display()), e))?;
    let mut cmd = echo_command(
        ctx,
        &ctx.names.internet_netns(),
        &["80/TCP".into(), "80/UDP".into()],
        &paths.ready(),
    );
    // The namespace also holds the underlay gateway address.
    cmd.arg("--bind").arg(names::INTERNET_HOST.to_string());
    if ctx.lab.ip_family.has_v6() {
        cmd.arg("--bind").arg(names::INTERNET_HOST6.to_string());
    }
    process::spawn_detached("internet echo server", cmd, &paths.log(), &paths.pid())?;
    wait_file(
        &paths.ready(),
        &paths.pid(),
        &paths.log(),
        "the internet echo server",
    )
    .await
}

/// `canal-lab __echo` inside `netns_name`.
pub fn echo_command(ctx: &Context, netns_name: &str, listen: &[String], ready: &Path) -> Command {
    let mut cmd = netns::exec(netns_name, ctx.lab.bin_dir.join("canal-lab"));
    cmd.arg("--state-dir").arg(&ctx.state.dir).arg("__echo");
    for l in listen {
        cmd.arg("--listen").arg(l);
    }
    cmd.arg("--ready-file").arg(ready);
    cmd
}

/// Waits until a detached process created its ready file; fails early with
/// its log when it died.
pub async fn wait_file(ready: &Path, pid: &Path, log: &Path, what: &str) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if ready.exists() {
            return Ok(());
        }
        if process::live_pid(pid, "canal-lab").is_none()
            && let Some(status) = process::ended(pid)
        {
            return Err(Error::Exited {
                name: what.to_string(),
                status,
                log_tail: process::tail(log, 20),
            });
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Timeout(format!("{what} to serve")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Picks a slot and addresses for a new node of a lab of `family`.
pub fn plan_node(
    state: &StateDir,
    names: &LabNames,
    family: IpFamily,
    name: &str,
) -> Result<NodeRecord, Error> {
    names::check_node_name(name).map_err(Error::Lab)?;
    let existing = state.nodes()?;
    if existing.iter().any(|n| n.name == name) {
        return Err(Error::Lab(format!("node {name} already exists")));
    }
    let used: Vec<u8> = existing.iter().map(|n| n.slot).collect();
    let slot = names::free_slot(&used)
        .ok_or_else(|| Error::Lab("the underlay has no free address left".into()))?;
    Ok(NodeRecord {
        name: name.to_string(),
        slot,
        address: names.node_address(slot),
        ipv4: family.has_v4(),
        address6: family.has_v6().then(|| names.node_address6(slot)),
        netns: names.node_netns(name),
        underlay_port: names::underlay_port(slot),
    })
}

/// Builds a node's namespace: `eth0` on the underlay bridge with its
/// address(es), a default route via the internet gateway of each family
/// (proxy ARP for pods' 169.254.1.1 needs one), and forwarding on, as on
/// any Kubernetes node.
pub fn build_node(names: &LabNames, node: &NodeRecord) -> Result<(), Error> {
    let ul = names.underlay_netns();
    netns::add(&node.netns)?;
    netns::veth(
        &ul,
        &node.underlay_port,
        &node.netns,
        names::NODE_UNDERLAY_IF,
    )?;
    netns::ip(&[
        "-n",
        &ul,
        "link",
        "set",
        &node.underlay_port,
        "master",
        names::UNDERLAY_BRIDGE,
    ])?;
    if node.ipv4 {
        let address = format!("{}/{}", node.address, names.underlay().prefix_len());
        netns::ip(&[
            "-n",
            &node.netns,
            "addr",
            "add",
            &address,
            "dev",
            names::NODE_UNDERLAY_IF,
        ])?;
        netns::ip(&[
            "-n",
            &node.netns,
            "route",
            "add",
            "default",
            "via",
            &names.gateway().to_string(),
        ])?;
        netns::set_sysctl(&node.netns, "net.ipv4.ip_forward", "1")?;
    }
    if let Some(address6) = node.address6 {
        netns::set_sysctl(&node.netns, "net.ipv6.conf.all.accept_dad", "0")?;
        netns::set_sysctl(&node.netns, "net.ipv6.conf.default.accept_dad", "0")?;
        let address = format!("{address6}/{}", names.underlay6().prefix_len());
        netns::ip(&[
            "-n",
            &node.netns,
            "-6",
            "addr",
            "add",
            &address,
            "dev",
            names::NODE_UNDERLAY_IF,
            "nodad",
        ])?;
        netns::ip(&[
            "-n",
            &node.netns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &names.gateway6().to_string(),
        ])?;
        netns::set_sysctl(&node.netns, "net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

/// Removes a node's namespace and its underlay link.
pub fn remove_node_network(names: &LabNames, node: &NodeRecord) -> Result<(), Error> {
    for pid in netns::pids(&node.netns) {
        // SAFETY: a plain syscall; only lab processes run in a lab node.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    // Deleting the bridge port deletes its peer `eth0` even if something
    // still pins the node namespace.
    let _ = netns::ip(&[
        "-n",
        &names.underlay_netns(),
        "link",
        "del",
        &node.underlay_port,
    ]);
    netns::delete(&node.netns)
}

/// Registers the Node object as a kubelet would: labels, the InternalIP and
/// a Ready condition, in one create (the API server keeps a Node's status
/// on create, and the kubelet relies on it: a controller never sees the
/// Node without its address).
pub async fn register(client: &Client, node: &NodeRecord) -> Result<(), Error> {
    let api: Api<Node> = Api::all(client.clone());
    let now = super::now();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut addresses: Vec<serde_json::Value> = node
        .addresses()
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": node.name}));
    let status = json!({
        "addresses": addresses,
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "canal-lab kubelet stand-in is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }],
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": kernel.trim(),
            "osImage": "canal-lab",
            "containerRuntimeVersion": "canal-lab://0",
            "kubeletVersion": crate::binaries::KUBERNETES_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": goarch(),
        },
    });
    let obj: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": goarch(),
            },
        },
        "status": status,
    }))
    .map_err(|e| Error::Lab(format!("building Node {}: {e}", node.name)))?;
    let created = api
        .create(&PostParams::default(), &obj)
        .await
        .map_err(|e| Error::Kube(format!("creating Node {}", node.name), e))?;
    let kept = created
        .status
        .and_then(|s| s.addresses)
        .is_some_and(|a| !a.is_empty());
    if !kept {
        api.patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .map_err(|e| Error::Kube(format!("writing the status of Node {}", node.name), e))?;
    }
    Ok(())
}

/// The architecture as Kubernetes names it (Go's GOARCH).
fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Deletes the Node object (a missing one is fine).
pub async fn unregister(client: &Client, name: &str) -> Result<(), Error> {
    let api: Api<Node> = Api::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::Kube(format!("deleting Node {name}"), e)),
    }
}

/// Writes the node's kubeconfig: the forwarder's address inside its
/// namespace, with the admin credentials.
pub fn write_kubeconfig(state: &StateDir, node: &NodeRecord) -> Result<(), Error> {
    let layout = Layout {
        dir: state.control_plane(),
    };
    let pki = Pki::at(&layout.pki_dir());
    let paths = state.node(&node.name);
    std::fs::create_dir_all(&paths.dir)
        .map_err(|e| Error::Io(format!("creating {}", paths.dir.display()), e))?;
    control_plane::write_kubeconfig(
        &paths.kubeconfig(),
        &format!("https://127.0.0.1:{}", names::NODE_API_PORT),
        &pki.ca_cert,
        &pki.admin_cert,
        &pki.admin_key,
    )
}

/// Runs `canal-cni install` for the node, as the chart's init container
/// does: the plugin into the node's CNI bin dir, the conflist into its conf dir.
pub fn install_cni(lab: &LabRecord, state: &StateDir, node: &NodeRecord) -> Result<(), Error> {
    let paths = state.node(&node.name);
    let mut cmd = netns::exec(&node.netns, lab.bin_dir.join("canal-cni"));
    cmd.arg("install")
        .arg("--cni-bin-dir")
        .arg(paths.cni_bin())
        .arg("--cni-conf-dir")
        .arg(paths.cni_conf())
        .arg("--run-dir")
        .arg(paths.run_dir())
        .arg("--data-dir")
        .arg(paths.cni_data());
    netns::run(&mut cmd).map(|_| ())
}

/// Starts the node's canal-agent inside its namespace, detached.
pub fn start_agent(lab: &LabRecord, state: &StateDir, node: &NodeRecord) -> Result<u32, Error> {
    let paths = state.node(&node.name);
    std::fs::create_dir_all(paths.run_dir())
        .map_err(|e| Error::Io(format!("creating {}", paths.run_dir().display()), e))?;
    let mut cmd = netns::exec(&node.netns, lab.bin_dir.join("canal-agent"));
    cmd.arg("--node-name")
        .arg(&node.name)
        .arg("--kubeconfig")
        .arg(paths.kubeconfig())
        .arg("--run-dir")
        .arg(paths.run_dir())
        .arg("--metrics-addr")
        .arg(format!("0.0.0.0:{}", names::AGENT_METRICS_PORT))
        .arg("--log-level")
        .arg("info");
    let agent = paths.agent();
    process::spawn_detached(
        &format!("canal-agent on {}", node.name),
        cmd,
        &agent.log(),
        &agent.pid(),
    )
}

/// Stops the node's agent (SIGTERM, then SIGKILL after `grace`); false when
/// it was not running.
pub fn stop_agent(state: &StateDir, node: &str, grace: Duration) -> bool {
    process::stop_pid_file(&state.node(node).agent().pid(), "canal-agent", grace)
}

/// Whether the node's agent process is alive.
pub fn agent_running(state: &StateDir, node: &str) -> bool {
    process::live_pid(&state.node(node).agent().pid(), "canal-agent").is_some()
}

/// GETs `path` from `port` on the loopback of `netns_name` (None: the root
/// namespace) and returns the raw response.
pub fn http_get(netns_name: Option<&str>, port: u16, path: &str) -> Result<String, Error> {
    let shown = format!("GET 127.0.0.1:{port}{path}");
    let path = path.to_string();
    let get = move || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let result = match netns_name {
        Some(ns) => netns::run_in(ns, get)?,
        None => get(),
    };
    result.map_err(|e| Error::Io(shown, e))
}

/// Starts canal-controller in the root namespace with the admin kubeconfig.
pub fn start_controller(
    state: &StateDir,
    bin_dir: &Path,
    metrics: SocketAddr,
) -> Result<u32, Error> {
    let bin = bin_dir.join("canal-controller");
    let mut cmd = Command::new(&bin);
    cmd.arg("--kubeconfig")
        .arg(state.kubeconfig())
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .arg("--log-level")
        .arg("info");
    // One replica: no Lease to wait for after a restart.
    cmd.arg("--leader-elect=false");
    process::spawn_detached(
        "canal-controller",
        cmd,
        &state.log("controller"),
        &state.pid_file("controller"),
    )
}
