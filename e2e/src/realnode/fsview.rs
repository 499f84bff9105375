//! A node's view of the file system: what its private mount namespace
//! changes so that kubelet, containerd and their pods see a machine of their
//! own, while the host's files stay as they are.
//!
//! - `/sys` again (the node's network namespace), a tmpfs on
//!   `/sys/fs/cgroup` with every hierarchy mounted again (kubelet and runc
//!   read them there);
//! - a tmpfs on `/run` (containerd's socket and state, pod network
//!   namespaces, `/run/xtables.lock`, canal's run dir);
//! - overlays on `/etc`, `/opt`, `/var` and `/usr`: the node may create
//!   `/etc/cni/net.d`, `/opt/cni/bin`, `/lib/modules` (the chart's hostPaths)
//!   and its `/var/lib/...` directories, which land in the node's own upper
//!   directory and never on the host;
//! - the node's own directories bound over `/var/lib/{kubelet,containerd,cni}`,
//!   `/var/log/{pods,containers}`, `/etc/cni/net.d`, `/opt/cni/bin` and
//!   `/lib/modules` (real directories: containerd's overlay snapshotter and
//!   cAdvisor's disk statistics do not work on an overlay);
//! - small files bound over the machine-wide `/proc/sys` entries kubelet
//!   checks (`protectKernelDefaults`), holding the values it wants, so it
//!   never writes (and never could write) the machine's.
//!
//! [`plan`] is pure; [`apply`] runs in the namespace holder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::realnode::cgroups::Hierarchy;

/// One step of a node's mount setup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum MountOp {
    /// `mount --make-rprivate /`: nothing the node mounts reaches the host.
    MakeRprivate,
    /// A fresh sysfs (it shows the mounting process's network namespace).
    Sysfs { target: PathBuf },
    /// A tmpfs.
    Tmpfs { target: PathBuf, options: String },
    /// A cgroup hierarchy mounted again.
    Cgroup {
        target: PathBuf,
        fstype: String,
        options: String,
    },
    /// An overlay of `lower` with the node's `upper`.
    Overlay {
        target: PathBuf,
        lower: PathBuf,
        upper: PathBuf,
        work: PathBuf,
    },
    /// `mkdir -p` (inside the node's view: an overlay or tmpfs takes it).
    Mkdir { path: PathBuf },
    /// A bind mount of a directory or file.
    Bind { source: PathBuf, target: PathBuf },
}

/// The directories the node owns, bound over the standard paths.
pub const NODE_DIRS: [&str; 8] = [
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/lib/modules",
];

/// The host directories the node sees through an overlay of its own.
pub const OVERLAID: [&str; 4] = ["/etc", "/opt", "/var", "/usr"];

/// The machine-wide kernel tunables kubelet checks, with the values it wants
/// (kubelet's `setupKernelTunables`).
pub const KERNEL_TUNABLES: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// The file holding a fake tunable's value in the node directory.
pub fn tunable_file(node_dir: &Path, key: &str) -> PathBuf {
    node_dir.join("sysctl").join(key.replace('/', "."))
}

/// The node directory bound over `target` (`/var/lib/kubelet` ->
/// `<node>/root/var-lib-kubelet`).
pub fn node_dir_for(node_dir: &Path, target: &str) -> PathBuf {
    node_dir
        .join("root")
        .join(target.trim_start_matches('/').replace('/', "-"))
}

/// `/lib` is a symlink to `usr/lib` on merged-/usr systems: the path inside
/// the overlays that a bind target really is.
fn resolve(target: &str, lib_is_usr_lib: bool) -> PathBuf {
    match target.strip_prefix("/lib/") {
        Some(rest) if lib_is_usr_lib => Path::new("/usr/lib").join(rest),
        _ => PathBuf::from(target),
    }
}

/// Checks that nothing the node writes to can be below what it overlays
/// (an overlay's upper directory inside its lower one does not mount).
pub fn check_state_dir(state_dir: &Path) -> Result<(), String> {
    for dir in OVERLAID.iter().chain(["/run", "/sys"].iter()) {
        if state_dir.starts_with(dir) {
            return Err(format!(
                "the real-kubelet lab's state directory {} must not be under {dir} (the nodes overlay it); use e.g. /tmp/<name>",
                state_dir.display()
            ));
        }
    }
    Ok(())
}

/// The mount steps for a node whose files live in `node_dir`. Pure.
pub fn plan(node_dir: &Path, hierarchies: &[Hierarchy], lib_is_usr_lib: bool) -> Vec<MountOp> {
    let mut ops = vec![
        MountOp::MakeRprivate,
        MountOp::Sysfs {
            target: "/sys".into(),
        },
        MountOp::Tmpfs {
            target: "/sys/fs/cgroup".into(),
            options: "mode=755".into(),
        },
    ];
    for h in hierarchies {
        ops.push(MountOp::Mkdir {
            path: h.mountpoint.clone(),
        });
        ops.push(MountOp::Cgroup {
            target: h.mountpoint.clone(),
            fstype: h.fstype.clone(),
            options: h.options.clone(),
        });
    }
    ops.push(MountOp::Tmpfs {
        target: "/run".into(),
        options: "mode=755".into(),
    });
    for dir in OVERLAID {
        let name = dir.trim_start_matches('/');
        ops.push(MountOp::Overlay {
            target: dir.into(),
            lower: dir.into(),
            upper: node_dir.join("fs").join(name).join("upper"),
            work: node_dir.join("fs").join(name).join("work"),
        });
    }
    for target in NODE_DIRS {
        let inside = resolve(target, lib_is_usr_lib);
        ops.push(MountOp::Mkdir {
            path: inside.clone(),
        });
        ops.push(MountOp::Bind {
            source: node_dir_for(node_dir, target),
            target: inside,
        });
    }
    for (key, _) in KERNEL_TUNABLES {
        ops.push(MountOp::Bind {
            source: tunable_file(node_dir, key),
            target: Path::new("/proc/sys").join(key),
        });
    }
    ops
}

/// Creates, on the host side, what the plan's sources need: the node
/// directories, the overlays' upper and work directories, the tunable files.
pub fn prepare(node_dir: &Path, ops: &[MountOp]) -> Result<(), Error> {
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|e| Error::Io(format!("creating {}", p.display()), e))
    };
    for op in ops {
        match op {
            MountOp::Overlay { upper, work, .. } => {
                mkdir(upper)?;
                mkdir(work)?;
            }
            MountOp::Bind { source, .. } if source.starts_with(node_dir.join("root")) => {
                mkdir(source)?;
            }
            _ => {}
        }
    }
    for (key, value) in KERNEL_TUNABLES {
        let file = tunable_file(node_dir, key);
        if let Some(dir) = file.parent() {
            mkdir(dir)?;
        }
        std::fs::write(&file, format!("{value}\n"))
            .map_err(|e| Error::Io(format!("writing {}", file.display()), e))?;
    }
    Ok(())
}

/// Applies the plan in the calling process's (private) mount namespace.
/// Tunables that the running kernel does not have are skipped.
pub fn apply(ops: &[MountOp]) -> Result<(), Error> {
    use nix::mount::{MsFlags, mount};
    let fail = |what: String, e: nix::Error| Error::Io(what, std::io::Error::from(e));
    for op in ops {
        match op {
            MountOp::MakeRprivate => mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(|e| fail("making / private".into(), e))?,
            MountOp::Sysfs { target } => mount(
                Some("sysfs"),
                target,
                Some("sysfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(|e| fail(format!("mounting sysfs on {}", target.display()), e))?,
            MountOp::Tmpfs { target, options } => mount(
                Some("tmpfs"),
                target,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(options.as_str()),
            )
            .map_err(|e| fail(format!("mounting a tmpfs on {}", target.display()), e))?,
            MountOp::Cgroup {
                target,
                fstype,
                options,
            } => mount(
                Some("cgroup"),
                target,
                Some(fstype.as_str()),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                (!options.is_empty()).then_some(options.as_str()),
            )
            .map_err(|e| {
                fail(
                    format!("mounting cgroup {options} on {}", target.display()),
                    e,
                )
            })?,
            MountOp::Overlay {
                target,
                lower,
                upper,
                work,
            } => {
                let data = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    work.display()
                );
                mount(
                    Some("overlay"),
                    target,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(data.as_str()),
                )
                .map_err(|e| fail(format!("mounting an overlay on {}", target.display()), e))?
            }
            MountOp::Mkdir { path } => std::fs::create_dir_all(path)
                .map_err(|e| Error::Io(format!("creating {}", path.display()), e))?,
            MountOp::Bind { source, target } => {
                if target.starts_with("/proc/sys") && !target.exists() {
                    continue;
                }
                mount(
                    Some(source.as_path()),
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| {
                    fail(
                        format!("binding {} on {}", source.display(), target.display()),
                        e,
                    )
                })?
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hierarchies() -> Vec<Hierarchy> {
        vec![
            Hierarchy {
                mountpoint: "/sys/fs/cgroup/cpu".into(),
                fstype: "cgroup".into(),
                options: "cpu".into(),
                own_path: "/".into(),
            },
            Hierarchy {
                mountpoint: "/sys/fs/cgroup/unified".into(),
                fstype: "cgroup2".into(),
                options: String::new(),
                own_path: "/".into(),
            },
        ]
    }

    #[test]
    fn the_plan_remounts_before_it_binds() {
        let ops = plan(Path::new("/tmp/lab/nodes/n1/real"), &hierarchies(), true);
        assert_eq!(ops[0], MountOp::MakeRprivate);
        let pos = |pred: &dyn Fn(&MountOp) -> bool| ops.iter().position(pred).unwrap();
        let cgroup_tmpfs = pos(
            &|o| matches!(o, MountOp::Tmpfs { target, .. } if target == Path::new("/sys/fs/cgroup")),
        );
        let sysfs = pos(&|o| matches!(o, MountOp::Sysfs { .. }));
        let cpu = pos(&|o| matches!(o, MountOp::Cgroup { options, .. } if options == "cpu"));
        assert!(sysfs < cgroup_tmpfs && cgroup_tmpfs < cpu);
        let var_overlay =
            pos(&|o| matches!(o, MountOp::Overlay { target, .. } if target == Path::new("/var")));
        let kubelet_bind = pos(
            &|o| matches!(o, MountOp::Bind { target, .. } if target == Path::new("/var/lib/kubelet")),
        );
        assert!(var_overlay < kubelet_bind);
    }

    #[test]
    fn lib_modules_resolves_through_the_usr_overlay() {
        let ops = plan(Path::new("/s/n"), &hierarchies(), true);
        assert!(ops.contains(&MountOp::Bind {
            source: "/s/n/root/lib-modules".into(),
            target: "/usr/lib/modules".into()
        }));
        let ops = plan(Path::new("/s/n"), &hierarchies(), false);
        assert!(ops.contains(&MountOp::Bind {
            source: "/s/n/root/lib-modules".into(),
            target: "/lib/modules".into()
        }));
    }

    #[test]
    fn every_tunable_is_covered() {
        let ops = plan(Path::new("/s/n"), &hierarchies(), true);
        for (key, _) in KERNEL_TUNABLES {
            assert!(ops.contains(&MountOp::Bind {
                source: tunable_file(Path::new("/s/n"), key),
                target: Path::new("/proc/sys").join(key)
            }));
        }
    }

    #[test]
    fn overlaid_state_dirs_are_refused() {
        assert!(check_state_dir(Path::new("/tmp/lab")).is_ok());
        assert!(check_state_dir(Path::new("/var/tmp/lab")).is_err());
        assert!(check_state_dir(Path::new("/run/lab")).is_err());
        assert!(check_state_dir(Path::new("/usrx/lab")).is_ok());
    }
}
