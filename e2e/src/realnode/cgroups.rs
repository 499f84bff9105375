//! The cgroups of the real-kubelet lab. Every node's kubelet, containerd,
//! shims and pods live in one subtree, `<harness>/canal-<prefix>/<node>`,
//! created in every mounted hierarchy under the cgroup this process runs in
//! (read from `/proc/self/cgroup`), so nothing the lab starts ever touches a
//! cgroup above the harness's own. `down` kills whatever is left in a node's
//! subtree and removes it.
//!
//! The hierarchy parsing and the choice of the base path are pure
//! ([`parse_hierarchies`], [`common_base`]); the rest is thin file I/O.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hierarchy {
    /// Where it is mounted (`/sys/fs/cgroup/cpu`).
    pub mountpoint: PathBuf,
    /// `cgroup` (v1) or `cgroup2`.
    pub fstype: String,
    /// The mount options that select this hierarchy again (`cpu`,
    /// `none,name=systemd`; empty for cgroup2).
    pub options: String,
    /// This process's cgroup in it (`/`, `/process_api/<id>`).
    pub own_path: String,
}

impl Hierarchy {
    /// The directory of the cgroup `path` (absolute inside the hierarchy).
    pub fn dir(&self, path: &str) -> PathBuf {
        self.mountpoint.join(path.trim_start_matches('/'))
    }
    /// Whether this is the cpuset hierarchy (children need cpus and mems).
    fn is_cpuset(&self) -> bool {
        self.fstype == "cgroup" && self.options.split(',').any(|o| o == "cpuset")
    }
}

/// Mount options of a v1 mount that are not subsystem names.
const NON_SUBSYSTEM_OPTIONS: [&str; 6] = ["rw", "ro", "nosuid", "nodev", "noexec", "relatime"];

/// Parses `/proc/self/mountinfo` and `/proc/self/cgroup` into the mounted
/// hierarchies and this process's path in each. Pure.
pub fn parse_hierarchies(mountinfo: &str, self_cgroup: &str) -> Result<Vec<Hierarchy>, String> {
    // "<id>:<controllers>:<path>"; controllers empty for cgroup2.
    let mut own: Vec<(BTreeSet<String>, String)> = Vec::new();
    for line in self_cgroup.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(c), Some(p)) => (id, c, p),
            _ => return Err(format!("unexpected /proc/self/cgroup line {line:?}")),
        };
        let set = controllers
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        own.push((set, path.to_string()));
    }
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let (root, mountpoint, fstype, superopts) = (left[3], left[4], right[0], right[2]);
        let (set, options): (BTreeSet<String>, String) = match fstype {
            "cgroup" => {
                let subsystems: Vec<&str> = superopts
                    .split(',')
                    .filter(|o| !NON_SUBSYSTEM_OPTIONS.contains(o))
                    .collect();
                let set = subsystems.iter().map(|s| s.to_string()).collect();
                let options = if subsystems.iter().all(|s| s.starts_with("name=")) {
                    format!("none,{}", subsystems.join(","))
                } else {
                    subsystems.join(",")
                };
                (set, options)
            }
            "cgroup2" => (BTreeSet::new(), String::new()),
            _ => continue,
        };
        let Some((_, path)) = own.iter().find(|(s, _)| *s == set) else {
            return Err(format!(
                "cgroup mount {mountpoint} ({superopts}) has no line in /proc/self/cgroup"
            ));
        };
        // A mount of a sub-tree (cgroup namespaces) shows paths relative to its root.
        let own_path = if root == "/" {
            path.clone()
        } else {
            path.strip_prefix(root)
                .map(|p| {
                    if p.is_empty() {
                        "/".to_string()
                    } else {
                        p.to_string()
                    }
                })
                .ok_or_else(|| {
                    format!("cgroup {path} is outside the mount root {root} of {mountpoint}")
                })?
        };
        out.push(Hierarchy {
            mountpoint: PathBuf::from(mountpoint),
            fstype: fstype.to_string(),
            options,
            own_path,
        });
    }
    if out.is_empty() {
        return Err("no cgroup hierarchy is mounted".into());
    }
    Ok(out)
}

fn components(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

/// The deepest of the given cgroup paths, when every other one is an
/// ancestor of it (or itself): a path that is at or below this process's
/// cgroup in every hierarchy. Kubelet's `cgroupRoot` is one path for all
/// hierarchies, so the lab's subtree must sit below all of them. Pure.
pub fn common_base<'a>(paths: impl IntoIterator<Item = &'a str>) -> Result<String, String> {
    let paths: Vec<&str> = paths.into_iter().collect();
    let deepest = paths
        .iter()
        .max_by_key(|p| components(p).len())
        .copied()
        .unwrap_or("/");
    let deep = components(deepest);
    for p in &paths {
        let c = components(p);
        if c.len() > deep.len() || c[..] != deep[..c.len()] {
            return Err(format!(
                "this process's cgroups {paths:?} do not nest (no one path is below all of them)"
            ));
        }
    }
    Ok(format!("/{}", deep.join("/")))
}

/// The hierarchies mounted on this machine, as seen by this process.
pub fn discover() -> Result<Vec<Hierarchy>, Error> {
    let read =
        |p: &str| std::fs::read_to_string(p).map_err(|e| Error::Io(format!("reading {p}"), e));
    parse_hierarchies(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?)
        .map_err(|e| Error::Lab(format!("reading the cgroup hierarchies: {e}")))
}

/// The lab's cgroups: the hierarchies and the base path of the lab's subtree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabCgroups {
    /// Every hierarchy.
    pub hierarchies: Vec<Hierarchy>,
    /// `<common own path>/canal-<prefix>`.
    pub base: String,
}

impl LabCgroups {
    /// Plans the lab's subtree for `prefix` below this process's cgroups.
    pub fn plan(prefix: &str) -> Result<LabCgroups, Error> {
        let hierarchies = discover()?;
        let own =
            common_base(hierarchies.iter().map(|h| h.own_path.as_str())).map_err(Error::Lab)?;
        Ok(LabCgroups {
            base: format!("{}/canal-{prefix}", own.trim_end_matches('/')),
            hierarchies,
        })
    }

    /// The cgroup path of `node`'s subtree.
    pub fn node(&self, node: &str) -> String {
        format!("{}/{node}", self.base)
    }

    /// Where the node's own processes go (kubelet, containerd and its shims,
    /// kube-proxy, the namespace holder).
    pub fn node_system(&self, node: &str) -> String {
        format!("{}/system", self.node(node))
    }

    /// kubelet's `cgroupRoot` (it creates `kubepods` below).
    pub fn node_pods(&self, node: &str) -> String {
        format!("{}/pods", self.node(node))
    }

    /// Creates `path` in every hierarchy (cpuset children get their parent's
    /// cpus and mems, or no process could join them).
    pub fn create(&self, path: &str) -> Result<(), Error> {
        for h in &self.hierarchies {
            let mut dir = h.mountpoint.clone();
            for c in components(path) {
                let parent = dir.clone();
                dir.push(c);
                // Another lab may remove an empty parent between our mkdirs
                // (see `remove_node`): retry a little.
                let mut tries = 0;
                loop {
                    match std::fs::create_dir(&dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => break,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 5 => {
                            tries += 1;
                            let _ = std::fs::create_dir_all(&parent);
                        }
                        Err(e) => {
                            return Err(Error::Io(format!("creating cgroup {}", dir.display()), e));
                        }
                    }
                }
                if h.is_cpuset() {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let mine = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
                        if mine.trim().is_empty() {
                            let theirs =
                                std::fs::read_to_string(parent.join(file)).map_err(|e| {
                                    Error::Io(format!("reading {}", parent.join(file).display()), e)
                                })?;
                            std::fs::write(dir.join(file), theirs.trim()).map_err(|e| {
                                Error::Io(format!("writing {}", dir.join(file).display()), e)
                            })?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files of `path` in every hierarchy.
    pub fn procs_files(&self, path: &str) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| h.dir(path).join("cgroup.procs"))
            .collect()
    }

    /// Every process in `path` or below, in any hierarchy.
    pub fn processes(&self, path: &str) -> BTreeSet<i32> {
        let mut pids = BTreeSet::new();
        for h in &self.hierarchies {
            collect_procs(&h.dir(path), &mut pids);
        }
        pids
    }

    /// Kills every process in the node's subtree (SIGKILL, until none is
    /// left or `timeout`), then removes the subtree from every hierarchy, and
    /// the lab's base and the parents it created when they are empty.
    /// Returns the number of processes killed and what could not be removed.
    pub fn remove_node(&self, node: &str, timeout: Duration) -> (usize, Vec<String>) {
        let path = self.node(node);
        let deadline = Instant::now() + timeout;
        let mut killed = BTreeSet::new();
        loop {
            let pids = self.processes(&path);
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                // SAFETY: a plain syscall on a process inside the lab's own cgroup.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                killed.insert(pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut failures = Vec::new();
        for h in &self.hierarchies {
            let dir = h.dir(&path);
            if let Err(e) = remove_tree(&dir, deadline) {
                failures.push(format!("cgroup {}: {e}", dir.display()));
            }
        }
        (killed.len(), failures)
    }

    /// Removes the lab's base when no node is left in it, and the parents
    /// this lab created above it (never this process's own cgroup or its
    /// ancestors).
    pub fn remove_base(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for h in &self.hierarchies {
            let own = components(&h.own_path).len();
            let comps = components(&self.base);
            // From the base up to (not including) this process's own cgroup.
            for depth in (own + 1..=comps.len()).rev() {
                let dir = h.dir(&comps[..depth].join("/"));
                match std::fs::remove_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    // Another lab still has nodes below: leave it.
                    Err(_) if depth < comps.len() => break,
                    Err(e) => {
                        if dir.exists() && list_children(&dir).is_empty() {
                            failures.push(format!("cgroup {}: {e}", dir.display()));
                        }
                        break;
                    }
                }
            }
        }
        failures
    }

    /// The nodes that have a subtree under the base (found even when the
    /// state directory says nothing, e.g. after a crash).
    pub fn nodes(&self) -> Vec<String> {
        let mut out = BTreeSet::new();
        for h in &self.hierarchies {
            for child in list_children(&h.dir(&self.base)) {
                if let Some(name) = child.file_name().and_then(|n| n.to_str()) {
                    out.insert(name.to_string());
                }
            }
        }
        out.into_iter().collect()
    }
}

fn list_children(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

fn collect_procs(dir: &Path, out: &mut BTreeSet<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for child in list_children(dir) {
        collect_procs(&child, out);
    }
}

/// Removes a cgroup directory tree, deepest first; a cgroup whose last
/// process is still exiting is busy for a moment, so retry until `deadline`.
fn remove_tree(dir: &Path, deadline: Instant) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for child in list_children(dir) {
        remove_tree(&child, deadline)?;
    }
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const SELF: &str = "\
9:name=systemd:/
4:memory:/process_api/78d8
3:cpuset:/
2:cpu,cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn hierarchies_parse_with_their_options_and_own_paths() {
        let hs = parse_hierarchies(MOUNTINFO, SELF).unwrap();
        let by_mp = |mp: &str| hs.iter().find(|h| h.mountpoint == Path::new(mp)).unwrap();
        assert_eq!(hs.len(), 6);
        assert_eq!(by_mp("/sys/fs/cgroup/cpu").options, "cpu");
        assert_eq!(by_mp("/sys/fs/cgroup/cpu,cpuacct").options, "cpu,cpuacct");
        assert_eq!(by_mp("/sys/fs/cgroup/systemd").options, "none,name=systemd");
        assert_eq!(by_mp("/sys/fs/cgroup/memory").own_path, "/process_api/78d8");
        assert_eq!(by_mp("/sys/fs/cgroup/unified").fstype, "cgroup2");
        assert_eq!(by_mp("/sys/fs/cgroup/unified").own_path, "/");
        assert!(by_mp("/sys/fs/cgroup/cpuset").is_cpuset());
    }

    #[test]
    fn a_mount_without_a_cgroup_line_is_an_error() {
        let err = parse_hierarchies(MOUNTINFO, "4:memory:/\n").unwrap_err();
        assert!(err.contains("/sys/fs/cgroup/cpu"), "{err}");
    }

    #[test]
    fn sub_tree_mounts_give_relative_paths() {
        let info = "50 1 0:40 /process_api /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let hs = parse_hierarchies(info, "4:memory:/process_api/78d8\n").unwrap();
        assert_eq!(hs[0].own_path, "/78d8");
    }

    #[test]
    fn the_base_is_below_every_own_path() {
        assert_eq!(
            common_base(["/", "/process_api/78d8", "/"]).unwrap(),
            "/process_api/78d8"
        );
        assert_eq!(common_base(["/", "/"]).unwrap(), "/");
        assert_eq!(common_base(["/a", "/a/b", "/"]).unwrap(), "/a/b");
        assert!(common_base(["/a", "/b"]).is_err());
        assert!(common_base(["/a/b", "/a/c"]).is_err());
        // Whole components: /ab is not below /a.
        assert!(common_base(["/a", "/ab/c"]).is_err());
    }

    #[test]
    fn node_paths_nest_under_the_base() {
        let lab = LabCgroups {
            hierarchies: parse_hierarchies(MOUNTINFO, SELF).unwrap(),
            base: "/process_api/78d8/canal-cl123456".into(),
        };
        assert_eq!(
            lab.node_pods("node-1"),
            "/process_api/78d8/canal-cl123456/node-1/pods"
        );
        assert_eq!(
            lab.hierarchies[0].dir(&lab.node_system("node-1")),
            PathBuf::from("/sys/fs/cgroup/cpu/process_api/78d8/canal-cl123456/node-1/system")
        );
    }
}
