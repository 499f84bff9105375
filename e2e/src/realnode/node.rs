//! One real node: its network namespace (as the stand-in lab builds it), its
//! cgroup subtree, the namespace holder with the node's file system view,
//! containerd with the lab's images imported, kubelet and kube-proxy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Error;
use crate::control_plane;
use crate::lab::netns;
use crate::lab::state::{NodeRecord, write_atomic, write_json};
use crate::process;
use crate::realnode::cgroups::LabCgroups;
use crate::realnode::config::{self, CONTAINERD_SOCKET};
use crate::realnode::enter::{Mounts, NodeEntry};
use crate::realnode::fsview;
use crate::realnode::images::Image;
use crate::realnode::pki::ClusterPki;
use crate::realnode::{API_PORT, CLUSTER_CIDR, NodeFiles, RealPaths};

/// The processes of a node, in stop order: (pid file stem, program).
pub const PROCESSES: [(&str, &str); 4] = [
    ("kubelet", "kubelet"),
    ("kube-proxy", "kube-proxy"),
    ("containerd", "containerd"),
    ("holder", "canal-lab"),
];

/// Everything needed to start a node's processes.
#[derive(Debug, Clone)]
pub struct NodeContext {
    /// The lab's paths.
    pub paths: RealPaths,
    /// The lab's cgroups.
    pub cgroups: LabCgroups,
    /// The certificates.
    pub pki: ClusterPki,
    /// `https://<control plane>:6443`.
    pub server: String,
    /// canal-lab (the holder).
    pub canal_lab: PathBuf,
}

impl NodeContext {
    fn files(&self, node: &NodeRecord) -> NodeFiles {
        self.paths.node(&node.name)
    }

    fn holder_pid(&self, node: &NodeRecord) -> Result<i32, Error> {
        let files = self.files(node);
        process::live_pid(&files.pid("holder"), "canal-lab").ok_or_else(|| Error::Exited {
            name: format!("the namespace holder of {}", node.name),
            status: "not running".into(),
            log_tail: process::tail(&files.log("holder"), 20),
        })
    }

    /// A command that runs inside the node (its namespaces and cgroup).
    fn spawn(&self, node: &NodeRecord, name: &str, cmd: Command) -> Result<u32, Error> {
        let entry = NodeEntry::open(
            &node.netns,
            Mounts::Of(self.holder_pid(node)?),
            &self
                .cgroups
                .procs_files(&self.cgroups.node_system(&node.name)),
        )?;
        let mut cmd = cmd;
        entry.apply(&mut cmd);
        let files = self.files(node);
        let pid = process::spawn_detached(
            &format!("{name} on {}", node.name),
            cmd,
            &files.log(name),
            &files.pid(name),
        )?;
        drop(entry);
        Ok(pid)
    }

    /// Runs a command inside the node to completion.
    pub fn run(&self, node: &NodeRecord, mut cmd: Command) -> Result<String, Error> {
        let entry = NodeEntry::open(
            &node.netns,
            Mounts::Of(self.holder_pid(node)?),
            &self
                .cgroups
                .procs_files(&self.cgroups.node_system(&node.name)),
        )?;
        entry.apply(&mut cmd);
        netns::run(&mut cmd)
    }

    /// Writes the node's files: mount plan and its sources, configs,
    /// kubeconfigs.
    pub fn prepare(&self, node: &NodeRecord) -> Result<(), Error> {
        let files = self.files(node);
        std::fs::create_dir_all(&files.dir)
            .map_err(|e| Error::Io(format!("creating {}", files.dir.display()), e))?;
        let lib_is_usr_lib = std::fs::read_link("/lib").is_ok_and(|t| t == Path::new("usr/lib"));
        let ops = fsview::plan(&files.dir, &self.cgroups.hierarchies, lib_is_usr_lib);
        fsview::prepare(&files.dir, &ops)?;
        write_json(&files.file("mounts.json"), &ops)?;

        let write = |name: &str, text: String| write_atomic(&files.file(name), text.as_bytes());
        write(
            "containerd.toml",
            config::Containerd {
                runc: super::bins::RUNC.into(),
            }
            .render(),
        )?;
        // No cluster DNS runs: pods resolve nothing (and never ask the host's resolver).
        write(
            "resolv.conf",
            "# canal-lab: no DNS in the lab\noptions ndots:1\n".into(),
        )?;
        write(
            "kubelet.yaml",
            config::Kubelet {
                node_ip: node.address,
                cgroup_root: self.cgroups.node_pods(&node.name),
                client_ca: self.pki.base.ca_cert.clone(),
                resolv_conf: files.file("resolv.conf"),
            }
            .render(),
        )?;
        let kubelet_cert = self.pki.kubelet(&node.name)?;
        control_plane::write_kubeconfig(
            &files.file("kubelet.kubeconfig"),
            &self.server,
            &self.pki.base.ca_cert,
            &kubelet_cert.cert,
            &kubelet_cert.key,
        )?;
        control_plane::write_kubeconfig(
            &files.file("kube-proxy.kubeconfig"),
            &self.server,
            &self.pki.base.ca_cert,
            &self.pki.kube_proxy.cert,
            &self.pki.kube_proxy.key,
        )?;
        write(
            "kube-proxy.yaml",
            config::KubeProxy {
                node: node.name.clone(),
                kubeconfig: files.file("kube-proxy.kubeconfig"),
                cluster_cidr: CLUSTER_CIDR.into(),
            }
            .render(),
        )?;
        self.cgroups.create(&self.cgroups.node_system(&node.name))?;
        self.cgroups.create(&self.cgroups.node_pods(&node.name))?;
        Ok(())
    }

    /// Starts the namespace holder and waits until the node's file system
    /// view is in place.
    pub async fn start_holder(&self, node: &NodeRecord) -> Result<(), Error> {
        let files = self.files(node);
        let ready = files.file("holder.ready");
        let _ = std::fs::remove_file(&ready);
        let entry = NodeEntry::open(
            &node.netns,
            Mounts::New,
            &self
                .cgroups
                .procs_files(&self.cgroups.node_system(&node.name)),
        )?;
        let mut cmd = Command::new(&self.canal_lab);
        cmd.arg("--state-dir")
            .arg(self.paths.dir.parent().unwrap_or(Path::new("/")))
            .arg("__node-holder")
            .arg("--plan")
            .arg(files.file("mounts.json"))
            .arg("--ready")
            .arg(&ready);
        entry.apply(&mut cmd);
        process::spawn_detached(
            &format!("the namespace holder of {}", node.name),
            cmd,
            &files.log("holder"),
            &files.pid("holder"),
        )?;
        drop(entry);
        wait_for(
            Duration::from_secs(20),
            &format!("{}'s namespace holder", node.name),
            || {
                self.holder_pid(node)?;
                Ok(ready.exists())
            },
        )
        .await
    }

    /// The path of a file inside the node's mount namespace, from here.
    fn inside(&self, node: &NodeRecord, path: &str) -> Result<PathBuf, Error> {
        Ok(
            PathBuf::from(format!("/proc/{}/root", self.holder_pid(node)?))
                .join(path.trim_start_matches('/')),
        )
    }

    /// Starts containerd and waits for its socket.
    pub async fn start_containerd(&self, node: &NodeRecord) -> Result<(), Error> {
        let files = self.files(node);
        let mut cmd = Command::new(self.paths.bin().join("containerd"));
        cmd.arg("--config").arg(files.file("containerd.toml"));
        // The shim is found next to containerd, on PATH; runc by its path.
        cmd.env("PATH", node_path(&self.paths));
        self.spawn(node, "containerd", cmd)?;
        let socket = self.inside(node, CONTAINERD_SOCKET)?;
        wait_for(
            Duration::from_secs(30),
            &format!("containerd on {}", node.name),
            || {
                self.check(node, "containerd")?;
                Ok(socket.exists() && self.ctr(node, &["version"]).is_ok())
            },
        )
        .await
    }

    /// `ctr -n k8s.io ARGS` inside the node.
    pub fn ctr(&self, node: &NodeRecord, args: &[&str]) -> Result<String, Error> {
        let mut cmd = Command::new(self.paths.bin().join("ctr"));
        cmd.args(["--address", CONTAINERD_SOCKET, "-n", "k8s.io"])
            .args(args);
        self.run(node, cmd)
    }

    /// Imports the images into the node's containerd.
    pub fn import(&self, node: &NodeRecord, images: &[Image]) -> Result<(), Error> {
        for image in images {
            let archive = image.archive.to_string_lossy();
            self.ctr(node, &["images", "import", "--no-unpack=false", &archive])
                .map_err(|e| {
                    Error::Lab(format!(
                        "importing {} into {}: {e}",
                        image.reference, node.name
                    ))
                })?;
        }
        Ok(())
    }

    /// Starts kubelet.
    pub fn start_kubelet(&self, node: &NodeRecord) -> Result<(), Error> {
        let files = self.files(node);
        let mut cmd = Command::new(self.paths.bin().join("kubelet"));
        cmd.arg(format!("--config={}", files.file("kubelet.yaml").display()))
            .arg(format!(
                "--kubeconfig={}",
                files.file("kubelet.kubeconfig").display()
            ))
            .arg(format!("--hostname-override={}", node.name))
            .arg(format!("--node-ip={}", node.address))
            .env("PATH", node_path(&self.paths));
        self.spawn(node, "kubelet", cmd).map(|_| ())
    }

    /// Starts kube-proxy.
    pub fn start_kube_proxy(&self, node: &NodeRecord) -> Result<(), Error> {
        let files = self.files(node);
        let mut cmd = Command::new(self.paths.bin().join("kube-proxy"));
        cmd.arg(format!(
            "--config={}",
            files.file("kube-proxy.yaml").display()
        ))
        .env("PATH", node_path(&self.paths));
        self.spawn(node, "kube-proxy", cmd).map(|_| ())
    }

    /// Fails with the log tail when the node's process `name` is not running.
    pub fn check(&self, node: &NodeRecord, name: &str) -> Result<(), Error> {
        let files = self.files(node);
        let program = PROCESSES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .unwrap_or(name);
        match process::live_pid(&files.pid(name), program) {
            Some(_) => Ok(()),
            None => Err(Error::Exited {
                name: format!("{name} on {}", node.name),
                status: "exited".into(),
                log_tail: process::tail(&files.log(name), 30),
            }),
        }
    }

    /// Stops one of the node's processes (SIGTERM, SIGKILL after `grace`).
    pub fn stop(&self, node: &NodeRecord, name: &str, grace: Duration) -> bool {
        let program = PROCESSES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .unwrap_or(name);
        process::stop_pid_file(&self.files(node).pid(name), program, grace)
    }

    /// Brings the whole node up: holder, containerd, images, kubelet, kube-proxy.
    pub async fn bring_up(&self, node: &NodeRecord, images: &[Image]) -> Result<(), Error> {
        self.prepare(node)?;
        self.start_holder(node).await?;
        self.start_containerd(node).await?;
        let (ctx, n, imgs) = (self.clone(), node.clone(), images.to_vec());
        tokio::task::spawn_blocking(move || ctx.import(&n, &imgs))
            .await
            .map_err(|e| Error::Lab(format!("importing images: {e}")))??;
        self.start_kubelet(node)?;
        self.start_kube_proxy(node)?;
        Ok(())
    }
}

/// PATH inside a node: the lab's binaries first (containerd finds its shim
/// there), then the system's (runc, iptables, mount).
fn node_path(paths: &RealPaths) -> String {
    format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        paths.bin().display()
    )
}

/// The API server URL nodes use.
pub fn server_url(address: std::net::Ipv4Addr) -> String {
    format!("https://{address}:{API_PORT}")
}

/// Polls `done` every 50 ms until it says true, fails, or `timeout` passes.
pub async fn wait_for(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> Result<bool, Error>,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(what.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
