//! The lab's state directory: where every command finds what `up` made.
//!
//! ```text
//! DIR/lab.json                 the lab (names, API server, options)
//! DIR/up-failed.txt            why the last `up` failed (no lab.json then)
//! DIR/kubeconfig               admin kubeconfig for people and tests
//! DIR/control-plane/           etcd + kube-apiserver (logs, pid files, pki)
//! DIR/controller.{log,pid}     canal-controller
//! DIR/forwarder.{log,pid}      the API forwarder into the node namespaces
//! DIR/internet/                the internet host's echo server
//! DIR/nodes/<node>/            node.json, kubeconfig, run/ (the agent's run
//!                              dir), net.d/ + cni-bin/ + cni-data/ (CNI),
//!                              agent.{log,pid}
//! DIR/pods/<ns>/<pod>/         pod.json, echo.{log,pid,ready}
//! ```

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::lab::family::{self, Family, IpFamily};
use crate::lab::names::LabNames;
use crate::lab::protocol::Protocol;

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/tmp/canal-lab";

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory, absolute.
    pub dir: PathBuf,
}

impl StateDir {
    /// Wraps a directory path, made absolute (names derive from it, so
    /// `./lab` and `$PWD/lab` must give the same lab).
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        let dir = dir.into();
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        StateDir { dir }
    }

    /// The lab's names.
    pub fn names(&self) -> LabNames {
        LabNames::for_state_dir(&self.dir)
    }
    /// The kubeconfig users and tests use.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// The control plane's own directory.
    pub fn control_plane(&self) -> PathBuf {
        self.dir.join("control-plane")
    }
    /// The lab record.
    pub fn lab_file(&self) -> PathBuf {
        self.dir.join("lab.json")
    }
    /// Why the last `up` failed (kept with the logs until `down`).
    pub fn up_failed_file(&self) -> PathBuf {
        self.dir.join("up-failed.txt")
    }
    /// The lock serialising commands that change the lab's shape.
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }
    /// A log file of a lab-wide process.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
    /// A pid file of a lab-wide process.
    pub fn pid_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }
    /// The internet host's files.
    pub fn internet(&self) -> ProcessPaths {
        ProcessPaths::new(self.dir.join("internet"), "echo")
    }
    /// Every node's directory.
    pub fn nodes_dir(&self) -> PathBuf {
        self.dir.join("nodes")
    }
    /// One node's files.
    pub fn node(&self, name: &str) -> NodePaths {
        NodePaths {
            dir: self.nodes_dir().join(name),
        }
    }
    /// Every pod's directory.
    pub fn pods_dir(&self) -> PathBuf {
        self.dir.join("pods")
    }
    /// One pod's files.
    pub fn pod(&self, namespace: &str, name: &str) -> PodPaths {
        PodPaths {
            dir: self.pods_dir().join(namespace).join(name),
        }
    }

    /// Reads the lab record.
    pub fn load(&self) -> Result<LabRecord, Error> {
        let failed = self.up_failed_file();
        if !self.lab_file().exists() && failed.exists() {
            return Err(Error::Lab(format!(
                "no lab at {}: the last `up` failed ({} says why; `canal-lab down --state-dir {}` removes what is left)",
                self.dir.display(),
                failed.display(),
                self.dir.display()
            )));
        }
        if !self.lab_file().exists() {
            return Err(Error::Lab(format!(
                "no lab at {} (run `canal-lab up --state-dir {}` first)",
                self.dir.display(),
                self.dir.display()
            )));
        }
        read_json(&self.lab_file())
    }

    /// Every node record, sorted by slot.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        let mut nodes: Vec<NodeRecord> = list_dirs(&self.nodes_dir())?
            .into_iter()
            .filter_map(|dir| {
                let file = dir.join("node.json");
                file.exists().then(|| read_json(&file))
            })
            .collect::<Result<_, _>>()?;
        nodes.sort_by_key(|n| n.slot);
        Ok(nodes)
    }

    /// One node record.
    pub fn load_node(&self, name: &str) -> Result<NodeRecord, Error> {
        let file = self.node(name).record();
        if !file.exists() {
            let known: Vec<String> = self
                .nodes()
                .unwrap_or_default()
                .into_iter()
                .map(|n| n.name)
                .collect();
            return Err(Error::Lab(format!(
                "no node {name} in this lab (nodes: {})",
                known.join(", ")
            )));
        }
        read_json(&file)
    }

    /// Every pod record, sorted by namespace and name.
    pub fn pods(&self) -> Result<Vec<PodRecord>, Error> {
        let mut pods = Vec::new();
        for ns_dir in list_dirs(&self.pods_dir())? {
            for pod_dir in list_dirs(&ns_dir)? {
                let file = pod_dir.join("pod.json");
                if file.exists() {
                    pods.push(read_json::<PodRecord>(&file)?);
                }
            }
        }
        pods.sort_by_key(PodRecord::key);
        Ok(pods)
    }

    /// One pod record.
    pub fn load_pod(&self, namespace: &str, name: &str) -> Result<PodRecord, Error> {
        let file = self.pod(namespace, name).record();
        if !file.exists() {
            return Err(Error::Lab(format!(
                "no pod {namespace}/{name} in this lab (see `canal-lab status`)"
            )));
        }
        read_json(&file)
    }

    /// Takes the state directory's lock (created if missing), blocking until
    /// another command releases it.
    pub fn lock(&self) -> Result<StateLock, Error> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Io(format!("creating {}", self.dir.display()), e))?;
        let path = self.lock_file();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::Io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock on a descriptor we own; released when the file closes.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::Io(
                format!("locking {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(StateLock { _file: file })
    }
}

/// Held while a command changes the lab's shape (up, down, node add/del).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Log, pid and ready files of one detached process.
#[derive(Debug, Clone)]
pub struct ProcessPaths {
    /// The directory holding them.
    pub dir: PathBuf,
    name: String,
}

impl ProcessPaths {
    fn new(dir: PathBuf, name: &str) -> ProcessPaths {
        ProcessPaths {
            dir,
            name: name.into(),
        }
    }
    /// The log.
    pub fn log(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }
    /// The pid file.
    pub fn pid(&self) -> PathBuf {
        self.dir.join(format!("{}.pid", self.name))
    }
    /// Created by the process once it serves.
    pub fn ready(&self) -> PathBuf {
        self.dir.join(format!("{}.ready", self.name))
    }
}

/// One node's files.
#[derive(Debug, Clone)]
pub struct NodePaths {
    /// The node's directory.
    pub dir: PathBuf,
}

impl NodePaths {
    /// The node record.
    pub fn record(&self) -> PathBuf {
        self.dir.join("node.json")
    }
    /// The agent's kubeconfig (the forwarder's address inside the namespace).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// The agent's run dir, shared with canal-cni (`/run/canal` on a node).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    /// The node's CNI binaries (`/opt/cni/bin` on a node).
    pub fn cni_bin(&self) -> PathBuf {
        self.dir.join("cni-bin")
    }
    /// The node's CNI configuration (`/etc/cni/net.d` on a node).
    pub fn cni_conf(&self) -> PathBuf {
        self.dir.join("net.d")
    }
    /// canal-cni's data (IPAM allocations; `/var/lib/cni/canal` on a node).
    pub fn cni_data(&self) -> PathBuf {
        self.dir.join("cni-data")
    }
    /// The agent's log and pid file.
    pub fn agent(&self) -> ProcessPaths {
        ProcessPaths::new(self.dir.clone(), "agent")
    }
}

/// One pod's files.
#[derive(Debug, Clone)]
pub struct PodPaths {
    /// The pod's directory.
    pub dir: PathBuf,
}

impl PodPaths {
    /// The pod record.
    pub fn record(&self) -> PathBuf {
        self.dir.join("pod.json")
    }
    /// The echo server's files.
    pub fn echo(&self) -> ProcessPaths {
        ProcessPaths::new(self.dir.clone(), "echo")
    }
}

/// What `up` recorded about the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabRecord {
    /// Prefix of every namespace the lab made.
    pub prefix: String,
    /// API server URL in the root namespace.
    pub server: String,
    /// The underlay network.
    pub underlay: Ipv4Net,
    /// The IP families (labs from before families existed: IPv4).
    #[serde(default)]
    pub ip_family: IpFamily,
    /// The IPv6 underlay network (labs with IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay6: Option<Ipv6Net>,
    /// Whether canal-agent and canal-cni run on the nodes.
    pub agents: bool,
    /// Whether canal-controller runs.
    pub controller: bool,
    /// Where canal's binaries come from.
    pub bin_dir: PathBuf,
    /// The controller's metrics address, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_metrics: Option<std::net::SocketAddr>,
    /// Unix time `up` finished.
    pub started_at: u64,
}

impl LabRecord {
    /// The API server's port on the root namespace's loopback.
    pub fn api_port(&self) -> Result<u16, Error> {
        self.server
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| Error::Lab(format!("no port in API server URL {}", self.server)))
    }
}

/// One node of the lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Node name (also the Node object's name).
    pub name: String,
    /// Slot on the underlay (fixes the address and the bridge port).
    pub slot: u8,
    /// IPv4 underlay address of the node's slot (the Node's InternalIP,
    /// configured on the node when `ipv4` is set).
    pub address: Ipv4Addr,
    /// Whether the node has its IPv4 address (not in an IPv6-only lab).
    #[serde(default = "yes")]
    pub ipv4: bool,
    /// IPv6 underlay address (labs with IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// The node's network namespace.
    pub netns: String,
    /// The bridge port in the underlay namespace.
    pub underlay_port: String,
}

fn yes() -> bool {
    true
}

impl NodeRecord {
    /// The node's underlay addresses (its InternalIPs), IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if self.ipv4 {
            out.push(IpAddr::V4(self.address));
        }
        out.extend(self.address6.map(IpAddr::V6));
        out
    }

    /// The node's underlay address of `family`.
    pub fn address_of(&self, family: Family) -> Option<IpAddr> {
        family::pick(&self.addresses(), family)
    }
}

/// One port a pod serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodPort {
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Port name (for named ports in NetworkPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl PodPort {
    /// Parses `80/TCP:serve-80-tcp`, `80/UDP`, `80` (TCP).
    pub fn parse(text: &str) -> Result<PodPort, String> {
        let (spec, name) = match text.split_once(':') {
            Some((spec, name)) if !name.is_empty() => (spec, Some(name.to_string())),
            Some(_) => return Err(format!("port {text:?}: empty name after ':'")),
            None => (text, None),
        };
        let (port, protocol) = match spec.split_once('/') {
            Some((port, proto)) => (port, proto.parse::<Protocol>()?),
            None => (spec, Protocol::Tcp),
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {text:?}: {port:?} is not a port number 1-65535"))?;
        if let Some(name) = &name {
            let ok = name.len() <= 15
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && name.chars().any(|c| c.is_ascii_lowercase());
            if !ok {
                return Err(format!(
                    "port {text:?}: name {name:?} must be an IANA service name (at most 15 lowercase letters, digits, '-')"
                ));
            }
        }
        Ok(PodPort {
            port,
            protocol,
            name,
        })
    }

    /// The NetworkPolicy conformance model's ports: TCP and UDP 80 and 81,
    /// named `serve-<port>-<tcp|udp>`.
    pub fn conformance_defaults() -> Vec<PodPort> {
        let mut ports = Vec::new();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for port in [80, 81] {
                ports.push(PodPort {
                    port,
                    protocol,
                    name: Some(format!(
                        "serve-{port}-{}",
                        protocol.as_str().to_ascii_lowercase()
                    )),
                });
            }
        }
        ports
    }
}

impl std::fmt::Display for PodPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.as_str())?;
        if let Some(name) = &self.name {
            write!(f, ":{name}")?;
        }
        Ok(())
    }
}

/// One pod of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// The pod's network namespace.
    pub netns: String,
    /// The Pod object's UID.
    pub uid: String,
    /// The sandbox id given to CNI (CNI_CONTAINERID).
    pub container_id: String,
    /// Addresses from the CNI result.
    pub ips: Vec<IpAddr>,
    /// Ports the echo server serves.
    pub ports: Vec<PodPort>,
    /// Labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The CNI configuration used and the chain's result (DEL gets it back
    /// as prevResult, as libcni does).
    pub cni: CniRecord,
}

impl PodRecord {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    /// The first IPv4 address.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    /// The address of `family`.
    pub fn ip(&self, family: Family) -> Option<IpAddr> {
        family::pick(&self.ips, family)
    }
}

/// The CNI side of a pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniRecord {
    /// The network configuration file the chain came from.
    pub conf_file: PathBuf,
    /// The final result of the ADD chain.
    pub result: serde_json::Value,
}

/// Reads a JSON file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| Error::Lab(format!("reading {}: {e}", path.display())))
}

/// Writes a JSON file atomically (temporary file + rename), creating its
/// directory.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Lab(format!("encoding {}: {e}", path.display())))?;
    write_atomic(path, text.as_bytes())
}

/// Writes a file atomically (temporary file + rename), creating its directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
    }
    let tmp = path.with_extension("tmp");
    let mut file =
        File::create(&tmp).map_err(|e| Error::Io(format!("creating {}", tmp.display()), e))?;
    file.write_all(bytes)
        .map_err(|e| Error::Io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::Io(format!("renaming {} into place", tmp.display()), e))
}

fn list_dirs(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::Io(format!("listing {}", dir.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse() {
        assert_eq!(
            PodPort::parse("80/TCP:serve-80-tcp").unwrap(),
            PodPort {
                port: 80,
                protocol: Protocol::Tcp,
                name: Some("serve-80-tcp".into())
            }
        );
        assert_eq!(
            PodPort::parse("81/udp").unwrap(),
            PodPort {
                port: 81,
                protocol: Protocol::Udp,
                name: None
            }
        );
        assert_eq!(PodPort::parse("8080").unwrap().protocol, Protocol::Tcp);
        assert_eq!(
            PodPort::parse("80/SCTP:s").unwrap().protocol,
            Protocol::Sctp
        );
        for bad in [
            "0",
            "70000",
            "x/TCP",
            "80/ICMP",
            "80/TCP:",
            "80/TCP:Serve",
            "80/TCP:12",
            "80/TCP:a-name-far-too-long",
        ] {
            assert!(PodPort::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn ports_print_as_parsed() {
        for text in ["80/TCP:serve-80-tcp", "81/UDP"] {
            assert_eq!(PodPort::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn conformance_ports() {
        let names: Vec<String> = PodPort::conformance_defaults()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "80/TCP:serve-80-tcp",
                "81/TCP:serve-81-tcp",
                "80/UDP:serve-80-udp",
                "81/UDP:serve-81-udp"
            ]
        );
    }

    #[test]
    fn state_dirs_are_absolute() {
        let s = StateDir::new("relative/lab");
        assert!(s.dir.is_absolute());
        assert_eq!(s.names(), StateDir::new(s.dir.clone()).names());
    }
}
