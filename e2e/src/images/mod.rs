//! Container images without a registry and without a container engine.
//!
//! The lab's real-kubelet nodes run canal (and test workloads) from images
//! that are imported into each node's containerd with
//! `ctr -n k8s.io images import --local <archive>`. This module makes those
//! archives from plain files:
//!
//! - [`canal_image`]: the canal image, built like the Dockerfile's runtime
//!   stage: a Debian base made with `debootstrap` carrying the packages the
//!   Dockerfile's `runtime-base` stage installs (read from the Dockerfile
//!   itself), plus `target/release/{canal-controller,canal-agent,canal-cni}`
//!   in `/usr/local/bin` (built with `cargo build --release` first; cargo
//!   decides whether anything is stale), with the Dockerfile's `USER` and
//!   `ENTRYPOINT`.
//! - [`build_image`]: any image from an ordered list of [`Layer`]s (a cached
//!   [`debian_base`], a directory, or a list of [`Entry`]s) and an
//!   [`ImageConfig`].
//! - [`debian_base`]: a Debian base layer (`debootstrap --variant=minbase`,
//!   then a chroot `apt-get install` of the requested packages, trimmed like
//!   Debian's `-slim` images), cached under `~/.cache/canal/images/` by a hash
//!   of the suite, mirror and package list, built once under a lock.
//! - [`read_archive`] / [`extract_rootfs`]: parse an archive back, verify
//!   every digest, and unpack its layers (the tests, and the Dockerfile check
//!   in [`dockerfile_build`]).
//! - [`build_all`]: every image the lab needs, as `canal-lab images build`
//!   prints them.
//!
//! ```no_run
//! use canal_e2e::images::{self, CanalImageOptions};
//! let canal = images::canal_image(&CanalImageOptions::default())?;
//! // ctr -n k8s.io images import --local <canal.path>, then
//! // helm install ... --set image.repository=<canal.repository()> --set image.tag=<canal.tag()>
//! println!("{} {}", canal.reference, canal.path.display());
//! # Ok::<(), canal_e2e::images::Error>(())
//! ```
//!
//! # The archive
//!
//! One uncompressed tar holding both an OCI image layout (`oci-layout`,
//! `index.json` whose manifest carries the `io.containerd.image.name`
//! annotation with the full reference, `blobs/sha256/<hex>`) and a
//! docker-save `manifest.json` pointing at the same blobs, so containerd
//! (which prefers the OCI layout), `docker load` and `podman load` all read
//! it. Layers are uncompressed tars (importing skips a decompression, and a
//! layer's digest is its `diff_id`).
//!
//! Output is deterministic: entries sorted by path, mtimes 0, numeric
//! owners without names, fixed JSON field order. Packing the same files
//! twice gives the same bytes, so an image's manifest digest identifies its
//! content; [`canal_image`] puts it in the tag (`0.1.0-dev.<12 hex>`), and an
//! archive whose digest is already on disk is not written again.

mod archive;
mod buildah;
mod cache;
mod canal;
pub mod debian;
pub mod dockerfile;
mod layer;
mod oci;
mod read;
mod reference;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use archive::{ImageArchive, ImageSpec, Tag, build_image};
pub use buildah::{DOCKERFILE_TAG, DockerfileBuild, dockerfile_build};
pub use canal::{
    CANAL_REPOSITORY, CanalImageOptions, canal_image, release_binaries, workspace_root,
};
pub use debian::{Base, BaseSpec, debian_base};
pub use layer::{Entry, EntryKind, Layer, PackedLayer};
pub use read::{ArchiveContents, ArchiveImage, extract_rootfs, read_archive};
pub use reference::normalize_reference;

/// The runtime settings of an image (the `config` object of an OCI image
/// configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// `CMD`.
    pub cmd: Vec<String>,
    /// `KEY=VALUE` pairs; `PATH` defaults to Debian's when absent.
    pub env: Vec<String>,
    /// `USER`, e.g. `65532:65532`.
    pub user: Option<String>,
    /// `WORKDIR`.
    pub workdir: Option<String>,
    /// `LABEL`s.
    pub labels: BTreeMap<String, String>,
}

/// The `PATH` of Debian's images (and of every image built here unless the
/// config sets its own).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Every image the lab imports into its nodes, built when stale. The lab's
/// other images (pause, agnhost, test workloads) join this list.
pub fn build_all(opts: &CanalImageOptions) -> Result<Vec<ImageArchive>, Error> {
    Ok(vec![canal_image(opts)?])
}

/// Everything that can go wrong while building or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// An external command (debootstrap, chroot apt-get, cargo, buildah)
    /// failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command line, shortened.
        command: String,
        /// Its exit status and the tail of its output.
        detail: String,
    },
    /// A tool the build needs is not installed.
    #[error("{tool} not found: {hint}")]
    MissingTool {
        /// The program.
        tool: String,
        /// How to get it.
        hint: String,
    },
    /// An archive does not hold a valid image.
    #[error("image archive {path}: {reason}")]
    Format {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The Dockerfile does not have the shape the image builders rely on.
    #[error("Dockerfile {path}: {reason}")]
    Dockerfile {
        /// The Dockerfile.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// An image or layer spec is invalid (a bad reference, a relative or
    /// duplicate path).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(what: impl std::fmt::Display, e: std::io::Error) -> Error {
        Error::Io(what.to_string(), e)
    }
}

/// Runs a command to completion; a non-zero exit becomes
/// [`Error::Command`] with the tail of its combined output.
pub(crate) fn run(cmd: &mut std::process::Command) -> Result<String, Error> {
    let shown = show(cmd);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingTool {
                tool: cmd.get_program().to_string_lossy().into_owned(),
                hint: "install it (see .ci/run's package list)".into(),
            },
            _ => Error::io(format!("running {shown}"), e),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Command {
            command: shown,
            detail: format!("{}\n{}", out.status, tail(&format!("{stdout}{stderr}"), 30)),
        });
    }
    Ok(stdout)
}

fn show(cmd: &std::process::Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args().take(8) {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if cmd.get_args().len() > 8 {
        s.push_str(" ...");
    }
    s
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
