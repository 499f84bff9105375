//! `canal-lab up --kubelet`: from nothing to a Kubernetes cluster with real
//! kubelets and canal installed by helm.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::Error;
use crate::lab::family::IpFamily;
use crate::lab::state::{LabRecord, StateDir, read_json, write_json};
use crate::lab::{self, Context, cleanup, default_bin_dir, names, nodes};
use crate::realnode::cgroups::LabCgroups;
use crate::realnode::images::{self, Image};
use crate::realnode::node::{NodeContext, server_url};
use crate::realnode::{RealPaths, RealRecord, bins, canal, control, control_plane_address, fsview};

/// What `up --kubelet` builds.
#[derive(Debug, Clone)]
pub struct RealUpOptions {
    /// Number of nodes.
    pub nodes: u32,
    /// canal's binaries (default: next to this executable).
    pub bin_dir: Option<PathBuf>,
    /// Install canal with helm (otherwise the nodes stay NotReady: no CNI).
    pub install_canal: bool,
    /// Extra `helm install` arguments.
    pub helm_args: Vec<String>,
    /// Also build e2e.test (the upstream suites).
    pub with_e2e: bool,
    /// How long to wait for every node and canal pod to be ready.
    pub ready_timeout: Duration,
    /// Remove a lab already in the state directory first.
    pub replace: bool,
}

impl Default for RealUpOptions {
    fn default() -> RealUpOptions {
        RealUpOptions {
            nodes: 2,
            bin_dir: None,
            install_canal: true,
            helm_args: Vec::new(),
            with_e2e: false,
            ready_timeout: Duration::from_secs(300),
            replace: false,
        }
    }
}

/// Brings a real-kubelet lab up in `state`; on failure removes what it made.
pub async fn up(state: &StateDir, opts: &RealUpOptions) -> Result<(Context, RealRecord), Error> {
    if state.lab_file().exists() && !opts.replace {
        return Err(Error::Lab(format!(
            "a lab is already up in {} (run `canal-lab down --state-dir {}` first)",
            state.dir.display(),
            state.dir.display()
        )));
    }
    fsview::check_state_dir(&state.dir).map_err(Error::Lab)?;
    cleanup::down(state);
    let bin_dir = opts.bin_dir.clone().unwrap_or_else(default_bin_dir);
    for b in ["canal-lab", "canal-controller", "canal-agent", "canal-cni"] {
        if !bin_dir.join(b).is_file() {
            return Err(Error::Lab(format!(
                "{b} not found in {} (run `cargo build --workspace --bins`, or set CANAL_BIN_DIR)",
                bin_dir.display()
            )));
        }
    }
    bins::ensure(opts.with_e2e)?;
    std::fs::create_dir_all(&state.dir)
        .map_err(|e| Error::Io(format!("creating {}", state.dir.display()), e))?;
    match steps(state, opts, bin_dir).await {
        Ok(done) => Ok(done),
        Err(e) => {
            cleanup::down(state);
            Err(e)
        }
    }
}

/// Fails with what is missing when the state directory's file system
/// cannot hold every node's copy of the images (containerd keeps each
/// archive's content and its unpacked snapshot) plus a margin for logs and
/// pods; a full disk otherwise shows up minutes later as a crash-looping
/// install-cni or a containerd error on the last node.
fn check_disk(dir: &Path, images: &[Image], nodes: u32) -> Result<(), Error> {
    let archives: u64 = images
        .iter()
        .filter_map(|i| std::fs::metadata(&i.archive).ok())
        .map(|m| m.len())
        .sum();
    let needed = disk_needed(archives, nodes);
    let stat = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| Error::Lab(format!("reading free space of {}: {e}", dir.display())))?;
    let free = stat.blocks_available() * stat.fragment_size();
    if free < needed {
        return Err(Error::Lab(format!(
            "{} has {} MiB free; {nodes} nodes with {} MiB of images need about {} MiB",
            dir.display(),
            free >> 20,
            archives >> 20,
            needed >> 20
        )));
    }
    Ok(())
}

/// Bytes the nodes need: two copies of the archives each, and 512 MiB.
fn disk_needed(archive_bytes: u64, nodes: u32) -> u64 {
    archive_bytes
        .saturating_mul(2)
        .saturating_mul(u64::from(nodes))
        .saturating_add(512 << 20)
}

/// The images every node imports.
fn build_images() -> Result<Vec<Image>, Error> {
    Ok(vec![
        images::pause()?,
        images::busybox()?,
        images::agnhost()?,
        images::canal()?,
    ])
}

async fn steps(
    state: &StateDir,
    opts: &RealUpOptions,
    bin_dir: PathBuf,
) -> Result<(Context, RealRecord), Error> {
    let started = Instant::now();
    let names = state.names();
    let paths = RealPaths::new(state);
    // Recorded before anything exists, so `down` finds it after any crash.
    let cgroups = LabCgroups::plan(&names.prefix)?;
    write_json(&paths.cgroups(), &cgroups)?;
    bins::link_all(&paths.bin(), opts.with_e2e)?;
    let canal_lab = bin_dir.join("canal-lab");

    // Images are tar work (and a release build of canal when stale): do it
    // while the control plane starts.
    let images = tokio::task::spawn_blocking(build_images);

    // The real-kubelet lab is IPv4 only (issue 14 leaves it for later).
    nodes::build_underlay(&names, IpFamily::Ipv4)?;
    let address = control_plane_address(&names);
    let (ctl, client) = control::start(state, &paths, &canal_lab, address).await?;
    progress(
        started,
        "control plane up (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)",
    );
    let mut ctx = Context {
        state: state.clone(),
        lab: LabRecord {
            prefix: names.prefix.clone(),
            server: format!("https://127.0.0.1:{}", ctl.api_port),
            underlay: names.underlay(),
            ip_family: IpFamily::Ipv4,
            underlay6: None,
            agents: false,
            controller: false,
            bin_dir,
            controller_metrics: None,
            started_at: 0,
        },
        names: names.clone(),
        client,
    };
    write_json(&state.lab_file(), &ctx.lab)?;
    nodes::start_internet_echo(&ctx).await?;

    let images = images
        .await
        .map_err(|e| Error::Lab(format!("building images: {e}")))??;
    progress(started, "images ready (pause, busybox, agnhost, canal)");
    check_disk(&state.dir, &images, opts.nodes)?;
    let node_ctx = NodeContext {
        paths: paths.clone(),
        cgroups: cgroups.clone(),
        pki: ctl.pki.clone(),
        server: server_url(address),
        canal_lab,
    };
    let mut records = Vec::new();
    for i in 1..=opts.nodes {
        let node = nodes::plan_node(state, &names, IpFamily::Ipv4, &names::default_node_name(i))?;
        write_json(&state.node(&node.name).record(), &node)?;
        nodes::build_node(&names, &node)?;
        records.push(node);
    }
    futures::future::try_join_all(records.iter().map(|n| node_ctx.bring_up(n, &images))).await?;
    progress(
        started,
        "nodes up (containerd with the images, kubelet, kube-proxy)",
    );

    let canal_image = images
        .last()
        .map(|i| i.reference.clone())
        .unwrap_or_default();
    let mut record = RealRecord {
        control_plane: address,
        api_port: ctl.api_port,
        images: images.iter().map(|i| i.reference.clone()).collect(),
        canal_image: canal_image.clone(),
        release: String::new(),
        up_seconds: 0.0,
    };
    write_json(&paths.record(), &record)?;
    if opts.install_canal {
        canal::install(state, &canal_image, &opts.helm_args)?;
        progress(
            started,
            "helm install canal done; waiting for every node and canal pod",
        );
        record.release = canal::RELEASE.into();
        write_json(&paths.record(), &record)?;
        canal::wait_ready(&ctx.client, records.len(), opts.ready_timeout, || {
            control::check(&paths)?;
            for n in &records {
                for p in ["kubelet", "containerd", "kube-proxy", "holder"] {
                    node_ctx.check(n, p)?;
                }
            }
            Ok(())
        })
        .await?;
    }
    record.up_seconds = started.elapsed().as_secs_f64();
    write_json(&paths.record(), &record)?;
    ctx.lab.started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    write_json(&state.lab_file(), &ctx.lab)?;
    Ok((ctx, record))
}

/// One line on stderr per finished phase of `up`.
fn progress(started: Instant, what: &str) {
    eprintln!(
        "canal-lab: {what} (+{:.1}s)",
        started.elapsed().as_secs_f64()
    );
}

/// Reads the real-kubelet record of the lab in `state`.
pub fn load(state: &StateDir) -> Result<RealRecord, Error> {
    let paths = RealPaths::new(state);
    if !paths.record().exists() {
        return Err(Error::Lab(format!(
            "no real-kubelet lab in {} (run `canal-lab up --kubelet --state-dir {}`)",
            state.dir.display(),
            state.dir.display()
        )));
    }
    read_json(&paths.record())
}

/// The node context of a running real-kubelet lab.
pub fn node_context(state: &StateDir, record: &RealRecord) -> Result<NodeContext, Error> {
    let paths = RealPaths::new(state);
    let cgroups: LabCgroups = read_json(&paths.cgroups())?;
    let lab = state.load()?;
    Ok(NodeContext {
        pki: crate::realnode::pki::ClusterPki::open(&paths.pki()),
        cgroups,
        server: server_url(record.control_plane),
        canal_lab: lab.bin_dir.join("canal-lab"),
        paths,
    })
}

/// Opens the lab's context.
pub async fn open(state: &StateDir) -> Result<(Context, RealRecord), Error> {
    let record = load(state)?;
    Ok((lab::Context::open(state).await?, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_needs_two_copies_of_the_images() {
        assert_eq!(disk_needed(200 << 20, 3), (1200 + 512) << 20);
        assert_eq!(disk_needed(0, 0), 512 << 20);
        assert_eq!(disk_needed(u64::MAX, 2), u64::MAX);
    }

    #[test]
    fn a_disk_too_small_is_refused_before_any_node_starts() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("image.tar");
        // Sparse: its length counts, it takes no disk.
        let file = std::fs::File::create(&archive).unwrap();
        let image = Image {
            reference: "example/image:1".into(),
            archive,
        };
        check_disk(dir.path(), std::slice::from_ref(&image), 1).expect("an empty image fits");
        file.set_len(1 << 40).unwrap();
        let e = check_disk(dir.path(), &[image], 3).expect_err("3 nodes of a 1 TiB image");
        assert!(e.to_string().contains("MiB free"), "{e}");
    }
}
