//! The images every real node imports into its containerd (no registry is
//! reachable, and none is needed): the pause image, a small workload image
//! (Debian's busybox-static), agnhost for the upstream suites and the lab's
//! own tests, and canal.
//!
//! Archives are one tar with an OCI layout (whose index names the image
//! with `io.containerd.image.name`) and a docker-save `manifest.json`, which
//! `ctr -n k8s.io images import` reads (containerd 1.6 imports locally; 2.x
//! needs `--local`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::Error;
use crate::binaries::cache_base;
use crate::lab::netns;
use crate::realnode::bins;

/// The workload image's reference.
pub const BUSYBOX: &str = "canal.local/busybox:1.35";
/// Where e2e.test is told the e2e-test-images live (`--kube-test-repo-list`).
pub const E2E_REGISTRY: &str = "canal.local/e2e-test-images";
/// agnhost's version in e2e.test v1.37.2's image manifest.
pub const AGNHOST_VERSION: &str = "2.66.1";

/// The agnhost reference e2e.test uses with the lab's repo list.
pub fn agnhost_reference() -> String {
    format!("{E2E_REGISTRY}/agnhost:{AGNHOST_VERSION}")
}

/// An image archive and the reference it imports as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Full reference.
    pub reference: String,
    /// The archive.
    pub archive: PathBuf,
}

/// The runtime settings of an image.
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD.
    pub cmd: Vec<String>,
    /// USER.
    pub user: Option<String>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(what, e)
}

fn run(cmd: &mut Command) -> Result<String, Error> {
    netns::run(cmd)
}

fn sha256_file(path: &Path) -> Result<(String, u64), Error> {
    let mut file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut hasher = Sha256::new();
    let size =
        std::io::copy(&mut file, &mut hasher).map_err(io(format!("reading {}", path.display())))?;
    Ok((hex::encode(hasher.finalize()), size))
}

fn put_blob(dir: &Path, bytes: &[u8]) -> Result<(String, u64), Error> {
    let digest = hex::encode(Sha256::digest(bytes));
    let path = dir.join("blobs/sha256").join(&digest);
    std::fs::write(&path, bytes).map_err(io(format!("writing {}", path.display())))?;
    Ok((digest, bytes.len() as u64))
}

/// Packs the directory `rootfs` as a one-layer image named `reference` into
/// `out` (written atomically).
pub fn pack(rootfs: &Path, reference: &str, config: &RunConfig, out: &Path) -> Result<(), Error> {
    let parent = out.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".image-")
        .tempdir_in(parent)
        .map_err(io(format!("creating a directory in {}", parent.display())))?;
    let layout = tmp.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256"))
        .map_err(io("creating the layout".into()))?;
    let layer = tmp.path().join("layer.tar");
    run(Command::new("tar")
        .arg("--numeric-owner")
        .arg("--sort=name")
        .arg("--mtime=@0")
        .arg("-C")
        .arg(rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    let (layer_digest, layer_size) = sha256_file(&layer)?;
    std::fs::rename(&layer, layout.join("blobs/sha256").join(&layer_digest))
        .map_err(io("placing the layer".into()))?;
    let mut run_config = json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Entrypoint": config.entrypoint,
        "Cmd": config.cmd,
    });
    if let Some(user) = &config.user {
        run_config["User"] = json!(user);
    }
    let image_config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    });
    let (config_digest, config_size) = put_blob(&layout, image_config.to_string().as_bytes())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put_blob(&layout, manifest.to_string().as_bytes())?;
    let tag = reference
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_size,
            "annotations": {"io.containerd.image.name": reference, "org.opencontainers.image.ref.name": tag},
        }],
    });
    let write = |name: &str, text: String| {
        std::fs::write(layout.join(name), text).map_err(io(format!("writing {name}")))
    };
    write("index.json", index.to_string())?;
    write(
        "oci-layout",
        json!({"imageLayoutVersion": "1.0.0"}).to_string(),
    )?;
    write(
        "manifest.json",
        json!([{
            "Config": format!("blobs/sha256/{config_digest}"),
            "RepoTags": [reference],
            "Layers": [format!("blobs/sha256/{layer_digest}")],
        }])
        .to_string(),
    )?;
    let packed = tmp.path().join("image.tar");
    run(Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&packed)
        .arg("."))?;
    std::fs::rename(&packed, out).map_err(io(format!("writing {}", out.display())))
}

fn images_cache() -> PathBuf {
    cache_base().join("images")
}

/// The pause image (kubelet's sandbox), from the `pause` binary build.sh
/// compiles from the module's `pause.c`.
pub fn pause() -> Result<Image, Error> {
    let reference = super::config::SANDBOX_IMAGE.to_string();
    let archive = images_cache().join("pause-3.10.2.tar");
    if !archive.is_file() {
        let root = tempfile::tempdir().map_err(io("creating a temporary directory".into()))?;
        bins::link(&bins::source("pause")?, &root.path().join("pause"))?;
        pack(
            root.path(),
            &reference,
            &RunConfig {
                entrypoint: vec!["/pause".into()],
                user: Some("65535:65535".into()),
                ..RunConfig::default()
            },
            &archive,
        )?;
    }
    Ok(Image { reference, archive })
}

/// A Debian package unpacked once into the cache (never installed).
fn unpacked(package: &str) -> Result<PathBuf, Error> {
    let dir = images_cache().join(package);
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(images_cache()).map_err(io("creating the image cache".into()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".deb-")
        .tempdir_in(images_cache())
        .map_err(io("creating a temporary directory".into()))?;
    run(Command::new("apt-get").current_dir(tmp.path()).args([
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
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(tmp.path().join("root")))?;
    std::fs::rename(tmp.path().join("root"), &dir)
        .map_err(io(format!("placing {}", dir.display())))?;
    Ok(dir)
}

/// Debian's busybox-static.
fn busybox_binary() -> Result<PathBuf, Error> {
    Ok(unpacked("busybox-static")?.join("bin/busybox"))
}

/// A root file system with busybox and its applets in /bin, a passwd with
/// root, nobody and uid 1000 (agnhost's image has it), and /tmp.
fn busybox_rootfs(root: &Path) -> Result<(), Error> {
    let busybox = busybox_binary()?;
    for dir in ["bin", "etc", "tmp", "uploads"] {
        std::fs::create_dir_all(root.join(dir)).map_err(io(format!("creating {dir}")))?;
    }
    bins::link(&busybox, &root.join("bin/busybox"))?;
    let list = run(Command::new(&busybox).arg("--list"))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    let _ = std::os::unix::fs::symlink("bin", root.join("sbin"));
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\nuser-defined-in-image:x:1000:1000::/tmp:/bin/sh\n",
    )
    .map_err(io("writing /etc/passwd".into()))?;
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\nuser-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n",
    )
    .map_err(io("writing /etc/group".into()))?;
    let tmp = root.join("tmp");
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .map_err(io("chmod /tmp".into()))?;
    Ok(())
}

/// The workload image: busybox (sh, nc, wget, httpd).
pub fn busybox() -> Result<Image, Error> {
    let archive = images_cache().join("busybox-1.35.tar");
    if !archive.is_file() {
        let root = tempfile::tempdir().map_err(io("creating a temporary directory".into()))?;
        busybox_rootfs(root.path())?;
        pack(
            root.path(),
            BUSYBOX,
            &RunConfig {
                cmd: vec!["sh".into()],
                ..RunConfig::default()
            },
            &archive,
        )?;
    }
    Ok(Image {
        reference: BUSYBOX.into(),
        archive,
    })
}

/// agnhost, from the binary build.sh compiles from
/// `k8s.io/kubernetes/test/images/agnhost`, on the busybox root file system
/// (the upstream image adds curl, bind-tools and friends on Alpine).
pub fn agnhost() -> Result<Image, Error> {
    let reference = agnhost_reference();
    let binary = bins::source("agnhost")?;
    let archive = images_cache().join(format!("agnhost-{AGNHOST_VERSION}.tar"));
    let fresh = archive
        .metadata()
        .and_then(|a| Ok(a.modified()? >= binary.metadata()?.modified()?))
        .unwrap_or(false);
    if !fresh {
        let root = tempfile::tempdir().map_err(io("creating a temporary directory".into()))?;
        busybox_rootfs(root.path())?;
        // What e2e tests exec in agnhost pods: curl, OpenBSD nc (UDP), bash, ip.
        for tool in ["/usr/bin/curl", "/usr/bin/bash", "/usr/sbin/ip"] {
            let tool = Path::new(tool);
            copy_into(root.path(), tool)?;
            for lib in libraries(tool)? {
                copy_into(root.path(), &lib)?;
            }
        }
        let nc = unpacked("netcat-openbsd")?.join("bin/nc.openbsd");
        std::fs::create_dir_all(root.path().join("usr/bin"))
            .map_err(io("creating usr/bin".into()))?;
        bins::link(&nc, &root.path().join("usr/bin/nc"))?;
        for lib in libraries(&nc)? {
            copy_into(root.path(), &lib)?;
        }
        // Debian's static busybox runs its own applets before PATH (its nc
        // has no -u): the tests' `sh -c` must be a shell that does not.
        let _ = std::fs::remove_file(root.path().join("bin/sh"));
        std::os::unix::fs::symlink("/usr/bin/bash", root.path().join("bin/sh"))
            .map_err(io("linking /bin/sh".into()))?;
        bins::link(&binary, &root.path().join("agnhost"))?;
        let _ = std::os::unix::fs::symlink("agnhost", root.path().join("agnhost-2"));
        pack(
            root.path(),
            &reference,
            &RunConfig {
                entrypoint: vec!["/agnhost".into()],
                cmd: vec!["pause".into()],
                ..RunConfig::default()
            },
            &archive,
        )?;
    }
    Ok(Image { reference, archive })
}

/// The shared libraries `binary` needs (from `ldd`).
fn libraries(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = match run(Command::new("ldd").arg(binary)) {
        Ok(out) => out,
        // A static binary.
        Err(_) => return Ok(Vec::new()),
    };
    Ok(out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim().split(' ').next()?,
                None => l.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn copy_into(root: &Path, file: &Path) -> Result<(), Error> {
    let dest = root.join(file.strip_prefix("/").unwrap_or(file));
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let meta =
        std::fs::symlink_metadata(file).map_err(io(format!("reading {}", file.display())))?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(file).map_err(io(format!("reading {}", file.display())))?;
        let _ = std::fs::remove_file(&dest);
        std::os::unix::fs::symlink(&target, &dest)
            .map_err(io(format!("linking {}", dest.display())))?;
        let resolved = if target.is_absolute() {
            target
        } else {
            file.parent().unwrap_or(Path::new("/")).join(target)
        };
        return copy_into(root, &resolved);
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(file)
            .map_err(io(format!("listing {}", file.display())))?
            .flatten()
        {
            copy_into(root, &entry.path())?;
        }
        return Ok(());
    }
    if !dest.exists() {
        std::fs::copy(file, &dest).map_err(io(format!("copying {}", file.display())))?;
    }
    Ok(())
}

/// The canal image, made from this machine's Debian files and canal's
/// binaries in `bin_dir`: the runtime stage of the Dockerfile (iptables with
/// its nft backend, ipset, conntrack, portmap) without a base image.
/// Interim until the image builder (`canal_e2e::images`) lands.
pub fn canal(bin_dir: &Path, out_dir: &Path) -> Result<Image, Error> {
    let root = tempfile::tempdir().map_err(io("creating a temporary directory".into()))?;
    let r = root.path();
    let mut files: Vec<PathBuf> = [
        "/usr/sbin/xtables-nft-multi",
        "/usr/sbin/iptables",
        "/usr/sbin/iptables-restore",
        "/usr/sbin/iptables-save",
        "/usr/sbin/ip6tables",
        "/usr/sbin/ip6tables-restore",
        "/usr/sbin/ip6tables-save",
        "/usr/sbin/ipset",
        "/usr/sbin/conntrack",
        "/usr/lib/cni/portmap",
        "/usr/lib/cni/loopback",
        "/usr/lib/x86_64-linux-gnu/xtables",
        "/etc/protocols",
        "/etc/services",
        "/etc/ethertypes",
        "/etc/alternatives/iptables",
        "/etc/alternatives/iptables-restore",
        "/etc/alternatives/iptables-save",
        "/etc/alternatives/ip6tables",
        "/etc/alternatives/ip6tables-restore",
        "/etc/alternatives/ip6tables-save",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.symlink_metadata().is_ok())
    .collect();
    let mut libs = Vec::new();
    for f in &files {
        if f.is_file() {
            libs.extend(libraries(f)?);
        }
    }
    for entry in std::fs::read_dir("/usr/lib/x86_64-linux-gnu/xtables")
        .into_iter()
        .flatten()
        .flatten()
    {
        libs.extend(libraries(&entry.path())?);
    }
    for name in ["canal-controller", "canal-agent", "canal-cni"] {
        let bin = bin_dir.join(name);
        libs.extend(libraries(&bin)?);
        let dest = r.join("usr/local/bin").join(name);
        std::fs::create_dir_all(r.join("usr/local/bin"))
            .map_err(io("creating usr/local/bin".into()))?;
        bins::link(&bin, &dest)?;
    }
    files.extend(libs);
    files.sort();
    files.dedup();
    for f in &files {
        copy_into(r, f)?;
    }
    for link in ["bin", "sbin", "lib", "lib64"] {
        let _ = std::fs::create_dir_all(r.join("usr").join(link));
        let _ = std::os::unix::fs::symlink(format!("usr/{link}"), r.join(link));
    }
    for dir in ["tmp", "run", "etc"] {
        let _ = std::fs::create_dir_all(r.join(dir));
    }
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/false\nnonroot:x:65532:65532::/:/bin/false\n",
    )
    .map_err(io("writing /etc/passwd".into()))?;
    std::fs::write(r.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n")
        .map_err(io("writing /etc/group".into()))?;
    // A content tag: a rebuilt image rolls the pods on `helm upgrade`.
    let digest = {
        let mut hasher = Sha256::new();
        for f in &files {
            hasher.update(f.as_os_str().as_encoded_bytes());
        }
        for name in ["canal-controller", "canal-agent", "canal-cni"] {
            let mut f =
                std::fs::File::open(bin_dir.join(name)).map_err(io(format!("reading {name}")))?;
            std::io::copy(&mut f, &mut hasher).map_err(io(format!("reading {name}")))?;
        }
        hex::encode(hasher.finalize())
    };
    let reference = format!("canal.local/canal:dev-{}", &digest[..12]);
    let archive = out_dir.join(format!("canal-{}.tar", &digest[..12]));
    if !archive.is_file() {
        pack(
            r,
            &reference,
            &RunConfig {
                entrypoint: vec!["/usr/local/bin/canal-controller".into()],
                user: Some("65532:65532".into()),
                ..RunConfig::default()
            },
            &archive,
        )?;
    }
    Ok(Image { reference, archive })
}
