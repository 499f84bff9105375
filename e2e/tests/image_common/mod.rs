//! Checks shared by the image tests: what a canal image's root filesystem
//! must hold, running its programs inside it, and comparing file trees.
// Each test crate uses only some of these.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// Runs `cmd` with `root` as `/` (chroot), as `user` when given, in a new
/// network namespace, so nothing a program in the image does can reach the
/// machine's own network state.
pub fn in_image(root: &Path, user: Option<&str>, cmd: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("unshare");
    c.args(["--net", "--", "chroot"]);
    if let Some(u) = user {
        c.arg(format!("--userspec={u}"));
    }
    c.arg(root).args(cmd).env_clear().env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(root: &Path, user: Option<&str>, cmd: &[&str], env: &[(&str, &str)]) -> String {
    let out = in_image(root, user, cmd, env);
    assert!(
        out.status.success(),
        "{cmd:?} in the image failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The canal image's contract: the binaries run (`--help`; the
/// controller as the image's non-root user too), and every tool the agent,
/// canal-cni install and an operator's `kubectl exec` use is there and
/// runs from the image's own libraries.
pub fn check_canal_rootfs(root: &Path, user: Option<&str>) {
    for bin in [
        "canal-controller",
        "canal-agent",
        "canal-cni",
        "kubectl-canal",
    ] {
        let path = format!("/usr/local/bin/{bin}");
        let help = ok(root, None, &[&path, "--help"], &[]);
        assert!(help.contains("Usage"), "{bin} --help:\n{help}");
    }
    let user = user.expect("the canal image runs as a non-root user");
    assert_ne!(user.split(':').next(), Some("0"), "USER {user}");
    ok(
        root,
        Some(user),
        &["/usr/local/bin/canal-controller", "--help"],
        &[],
    );
    // iptables through Debian's alternatives, on the nft backend the agent
    // expects; the batch tools it runs.
    let v = ok(root, None, &["iptables", "--version"], &[]);
    assert!(v.contains("nf_tables"), "iptables is not iptables-nft: {v}");
    for tool in ["iptables-save", "iptables-restore", "ip6tables-restore"] {
        ok(root, None, &[tool, "--version"], &[]);
    }
    ok(root, None, &["conntrack", "--version"], &[]);
    ok(root, None, &["nsenter", "--version"], &[]);
    // ipset talks to the kernel even for its version: only check it is
    // there and linked (ldd-free: the loader lists what it resolves).
    let ipset = ok(
        root,
        None,
        &["/lib64/ld-linux-x86-64.so.2", "--list", "/usr/sbin/ipset"],
        &[],
    );
    assert!(!ipset.contains("not found"), "ipset's libraries: {ipset}");
    // portmap, which canal-cni install copies out of the image.
    let pm = ok(
        root,
        None,
        &["/usr/lib/cni/portmap"],
        &[("CNI_COMMAND", "VERSION")],
    );
    assert!(pm.contains("supportedVersions"), "portmap VERSION: {pm}");
    let ca = std::fs::metadata(root.join("etc/ssl/certs/ca-certificates.crt")).expect("CA bundle");
    assert!(ca.len() > 100_000, "CA bundle of {} bytes", ca.len());
    // Nothing of the build machine or of apt's work stays behind.
    for gone in ["etc/resolv.conf", "etc/hostname", "usr/sbin/policy-rc.d"] {
        assert!(!root.join(gone).exists(), "/{gone} is in the image");
    }
    let lists = std::fs::read_dir(root.join("var/lib/apt/lists"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(lists, 0, "apt lists left in the image");
    let devs = std::fs::read_dir(root.join("dev")).unwrap().count();
    assert_eq!(devs, 0, "/dev of the image is not empty");
}

/// Every path under `root` with its type, mode, owner, size, link target,
/// capability and content hash.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.unwrap();
        let m = e.path().symlink_metadata().unwrap();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        let what = if m.file_type().is_symlink() {
            format!("link -> {}", fs::read_link(e.path()).unwrap().display())
        } else if m.is_dir() {
            "dir".to_string()
        } else {
            let cap = xattr::get(e.path(), "security.capability").unwrap();
            format!(
                "file {} cap={:?} sha={}",
                m.len(),
                cap,
                hex::encode(Sha256::digest(fs::read(e.path()).unwrap()))
            )
        };
        let mode = if m.file_type().is_symlink() {
            0
        } else {
            m.mode() & 0o7777
        };
        out.insert(
            rel,
            format!("{what} mode={mode:o} owner={}:{}", m.uid(), m.gid()),
        );
    }
    out
}
