//! Removing a real-kubelet lab: the node processes (by pid file, then by
//! the path of their executable under the lab's `bin/`), everything left in
//! the nodes' cgroups (shims, pause and pod processes), the cgroups
//! themselves, and the control plane. Hooked into the lab's `down` before it
//! deletes the namespaces; safe after a crash and on a lab that never was.
//! The nodes' mounts need no unmounting: they live in the nodes' private
//! mount namespaces, which go away with their last process.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::lab::cleanup::Removed;
use crate::lab::state::{StateDir, read_json};
use crate::realnode::cgroups::LabCgroups;
use crate::realnode::{RealPaths, control, node};

/// Stops and removes what a real-kubelet lab in `state` made (nothing when
/// the lab is a stand-in lab), recording it in `removed`.
pub fn down(state: &StateDir, removed: &mut Removed) {
    let paths = RealPaths::new(state);
    let recorded: Option<LabCgroups> = read_json(&paths.cgroups()).ok();
    if recorded.is_none() && !paths.dir.exists() {
        return;
    }

    // 1. The node processes, kubelet first (so it restarts nothing).
    let node_names: BTreeSet<String> = std::fs::read_dir(state.nodes_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("real").is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    for (name, program) in node::PROCESSES {
        for n in &node_names {
            let pid_file = paths.node(n).pid(name);
            if crate::process::stop_pid_file(&pid_file, program, Duration::from_secs(5)) {
                removed.processes.push(format!("{name} on {n}"));
            }
        }
    }

    // 2. The control plane (the stand-in lab's `down` removes its namespace).
    for name in control::stop(&paths) {
        removed.processes.push(name);
    }
    // 3. Anything still running from the lab's binaries (a crash left no
    // pid file, or a shim containerd started).
    for (pid, exe) in by_executable(&paths.bin()) {
        // SAFETY: a plain syscall on a process running one of this lab's binaries.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        removed.processes.push(format!("{exe} ({pid})"));
    }

    // 4. Whatever is left in the nodes' cgroups (pods), and the cgroups.
    if let Some(cgroups) = recorded.or_else(|| LabCgroups::plan(&state.names().prefix).ok()) {
        let mut nodes: BTreeSet<String> = cgroups.nodes().into_iter().collect();
        nodes.extend(node_names);
        for n in nodes {
            let (killed, failures) = cgroups.remove_node(&n, Duration::from_secs(10));
            if killed > 0 {
                removed
                    .processes
                    .push(format!("{killed} process(es) in {n}'s cgroup"));
            }
            removed.failures.extend(failures);
        }
        removed.failures.extend(cgroups.remove_base());
    }
}

/// Processes whose executable lies in `bin_dir` (also when the state
/// directory was deleted under them: the kernel then shows " (deleted)").
pub fn by_executable(bin_dir: &Path) -> Vec<(i32, String)> {
    let dir = bin_dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        let exe = exe.to_string_lossy().into_owned();
        if exe.starts_with(&format!("{dir}/")) {
            found.push((pid, exe));
        }
    }
    found
}
