//! The images every real node imports into its containerd (no registry is
//! reachable, and none is needed), made with [`crate::images`]: the pause
//! image, a small workload image (Debian's busybox-static), agnhost for the
//! upstream suites and the lab's own tests, and canal itself
//! ([`crate::images::canal_image`]: the Dockerfile's runtime stage from the
//! workspace's release binaries).
//!
//! containerd 1.6 imports the archives with `ctr -n k8s.io images import`
//! (it has no transfer service, so no `--local`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::binaries::cache_base;
use crate::images::{
    self, BaseSpec, CanalImageOptions, Entry, ImageArchive, ImageConfig, ImageSpec, Layer, Tag,
};
use crate::lab::netns;
use crate::lab::state::{read_json, write_json};
use crate::realnode::bins;

/// The workload image's reference.
pub const BUSYBOX: &str = "canal.local/busybox:1.35";
/// Where e2e.test is told the e2e-test-images live (`--kube-test-repo-list`).
pub const E2E_REGISTRY: &str = "canal.local/e2e-test-images";
/// agnhost's version in e2e.test v1.37.2's image manifest.
pub const AGNHOST_VERSION: &str = "2.66.1";
/// What upstream's agnhost image adds to its base (Alpine there, Debian
/// here): the tools e2e tests exec in agnhost pods.
pub const AGNHOST_PACKAGES: [&str; 7] = [
    "bash",
    "curl",
    "dnsutils",
    "iproute2",
    "iperf",
    "netcat-openbsd",
    "socat",
];

/// The agnhost reference e2e.test uses with the lab's repo list.
pub fn agnhost_reference() -> String {
    format!("{E2E_REGISTRY}/agnhost:{AGNHOST_VERSION}")
}

/// An image archive and the reference it imports as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Full reference.
    pub reference: String,
    /// The archive.
    pub archive: PathBuf,
}

impl From<ImageArchive> for Image {
    fn from(a: ImageArchive) -> Image {
        Image {
            reference: a.reference,
            archive: a.path,
        }
    }
}

fn image_err(e: images::Error) -> Error {
    Error::Lab(format!("building an image: {e}"))
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(what, e)
}

/// Where the lab's images go.
fn out_dir() -> PathBuf {
    cache_base().join("images").join("realnode")
}

/// An image built once per `key` (the identity of its inputs): packing a
/// layer of a hundred megabytes costs seconds, every `up` would pay them.
fn memo(
    name: &str,
    key: &str,
    build: impl FnOnce() -> Result<Image, Error>,
) -> Result<Image, Error> {
    #[derive(Serialize, Deserialize)]
    struct Stamp {
        key: String,
        image: Image,
    }
    let stamp = out_dir().join(format!("{name}.json"));
    if let Ok(s) = read_json::<Stamp>(&stamp)
        && s.key == key
        && s.image.archive.is_file()
    {
        return Ok(s.image);
    }
    let image = build()?;
    write_json(
        &stamp,
        &Stamp {
            key: key.to_string(),
            image: image.clone(),
        },
    )?;
    Ok(image)
}

/// The identity of a file for [`memo`]: path, size and modification time.
fn file_key(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    let modified = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{}:{}:{modified}",
        path.display(),
        meta.map(|m| m.len()).unwrap_or_default()
    )
}

/// The pause image (kubelet's sandbox), from the `pause` binary build.sh
/// compiles from the module's `pause.c`.
pub fn pause() -> Result<Image, Error> {
    let binary = bins::source("pause")?;
    memo("pause", &file_key(&binary), || {
        images::build_image(&ImageSpec {
            tag: Tag::Reference(super::config::SANDBOX_IMAGE.into()),
            layers: vec![Layer::Entries(vec![Entry::file("/pause", &binary, 0o755)])],
            config: ImageConfig {
                entrypoint: vec!["/pause".into()],
                user: Some("65535:65535".into()),
                ..ImageConfig::default()
            },
            out_dir: out_dir(),
        })
        .map(Image::from)
        .map_err(image_err)
    })
}

/// A Debian package unpacked once into the cache (never installed).
fn unpacked(package: &str) -> Result<PathBuf, Error> {
    let cache = cache_base().join("images").join("debs");
    let dir = cache.join(package);
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&cache).map_err(io(format!("creating {}", cache.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".deb-")
        .tempdir_in(&cache)
        .map_err(io("creating a temporary directory".into()))?;
    netns::run(Command::new("apt-get").current_dir(tmp.path()).args([
        "download",
        "-qq",
        "-o",
        "APT::Sandbox::User=root",
        package,
    ]))?;
    let deb = std::fs::read_dir(tmp.path())
        .map_err(io("listing the download".into()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| Error::Lab(format!("apt-get download {package} gave no .deb")))?;
    netns::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(tmp.path().join("root")),
    )?;
    std::fs::rename(tmp.path().join("root"), &dir)
        .map_err(io(format!("placing {}", dir.display())))?;
    Ok(dir)
}

/// The workload image: Debian's static busybox with its applets in /bin
/// (sh, nc, wget, ping, httpd), 2 MB.
pub fn busybox() -> Result<Image, Error> {
    let busybox = unpacked("busybox-static")?.join("bin/busybox");
    memo("busybox", &file_key(&busybox), || {
        let list = netns::run(Command::new(&busybox).arg("--list"))?;
        let mut entries = vec![
            Entry::file("/bin/busybox", &busybox, 0o755),
            Entry::dir("/tmp", 0o1777),
            Entry::bytes(
                "/etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
                0o644,
            ),
            Entry::bytes("/etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644),
        ];
        entries.extend(
            list.lines()
                .map(str::trim)
                .filter(|a| !a.is_empty() && *a != "busybox")
                .map(|a| Entry::symlink(format!("/bin/{a}"), "busybox")),
        );
        images::build_image(&ImageSpec {
            tag: Tag::Reference(BUSYBOX.into()),
            layers: vec![Layer::Entries(entries)],
            config: ImageConfig {
                cmd: vec!["sh".into()],
                ..ImageConfig::default()
            },
            out_dir: out_dir(),
        })
        .map(Image::from)
        .map_err(image_err)
    })
}

/// agnhost as upstream's image has it (`/agnhost`, `/agnhost-2`,
/// `/uploads`, porter's certificate, entrypoint `/agnhost`, `pause` by
/// default) on a Debian base with the tools e2e tests exec
/// ([`AGNHOST_PACKAGES`]), from the binary build.sh compiles from
/// `k8s.io/kubernetes/test/images/agnhost`.
pub fn agnhost() -> Result<Image, Error> {
    let binary = bins::source("agnhost")?;
    let porter = agnhost_source_dir()?.join("porter");
    let spec = BaseSpec::new("bookworm", &AGNHOST_PACKAGES);
    memo(
        "agnhost",
        &format!("{}|{}", file_key(&binary), spec.key()),
        || {
            let base = images::debian_base(&spec).map_err(image_err)?;
            images::build_image(&ImageSpec {
                tag: Tag::Reference(agnhost_reference()),
                layers: vec![
                    base.layer(),
                    Layer::Entries(vec![
                        Entry::file("/agnhost", &binary, 0o755),
                        Entry::symlink("/agnhost-2", "agnhost"),
                        Entry::dir("/uploads", 0o755),
                        Entry::file("/localhost.crt", porter.join("localhost.crt"), 0o644),
                        Entry::file("/localhost.key", porter.join("localhost.key"), 0o644),
                    ]),
                ],
                config: ImageConfig {
                    entrypoint: vec!["/agnhost".into()],
                    cmd: vec!["pause".into()],
                    ..ImageConfig::default()
                },
                out_dir: out_dir(),
            })
            .map(Image::from)
            .map_err(image_err)
        },
    )
}

/// `test/images/agnhost` in the Go module cache (porter's certificate).
fn agnhost_source_dir() -> Result<PathBuf, Error> {
    let go_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("go");
    let out = netns::run(
        Command::new("go")
            .current_dir(&go_dir)
            .env("GOFLAGS", "-mod=mod")
            .args(["list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"]),
    )?;
    Ok(PathBuf::from(out.trim()).join("test/images/agnhost"))
}

/// The canal image: the Dockerfile's runtime stage, with the workspace's
/// release binaries (built first when stale).
pub fn canal() -> Result<Image, Error> {
    images::canal_image(&CanalImageOptions::default())
        .map(Image::from)
        .map_err(image_err)
}
