//! `down`: removes everything a lab made, whether `up` finished, failed
//! halfway, or crashed and left processes and namespaces without a record.
//! Leftovers are found three ways: pid files under the state directory,
//! processes inside namespaces carrying the lab's prefix, and processes whose
//! command line names the state directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::lab::names::LabNames;
use crate::lab::state::StateDir;
use crate::lab::{netns, udp_ports};
use crate::{control_plane, process};

/// What `down` removed.
#[derive(Debug, Clone, Default)]
pub struct Removed {
    /// Processes stopped (`name pid`).
    pub processes: Vec<String>,
    /// Network namespaces deleted.
    pub namespaces: Vec<String>,
    /// Whether the state directory existed and was removed.
    pub state_dir: bool,
    /// What could not be removed.
    pub failures: Vec<String>,
}

impl Removed {
    /// Nothing was there.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty() && self.namespaces.is_empty() && !self.state_dir
    }
}

/// Programs the lab starts, as they appear in `/proc/<pid>/cmdline`.
const LAB_PROGRAMS: [&str; 5] = [
    "etcd",
    "kube-apiserver",
    "canal-controller",
    "canal-agent",
    "canal-lab",
];

/// The program a pid file's process must be (guards against recycled pids).
fn expected_program(pid_file: &Path) -> &'static str {
    match pid_file.file_stem().and_then(|s| s.to_str()) {
        Some("agent") => "canal-agent",
        Some("controller") => "canal-controller",
        Some("etcd") => "etcd",
        Some("kube-apiserver") => "kube-apiserver",
        // The forwarder and the echo servers are canal-lab subcommands.
        _ => "canal-lab",
    }
}

/// Stop order: pods' servers and agents before the controller, the
/// forwarder and the control plane they talk to.
fn stop_rank(pid_file: &Path) -> u8 {
    match pid_file.file_stem().and_then(|s| s.to_str()) {
        Some("echo") => 0,
        Some("agent") => 1,
        Some("controller") => 2,
        Some("forwarder") => 3,
        _ => 4,
    }
}

fn pid_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && !path.ends_with("etcd-data") {
            pid_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "pid") {
            out.push(path);
        }
    }
}

/// Whether a command line refers to `dir` or something under it, as a
/// whole path (`/tmp/lab` does not match `/tmp/lab2`).
pub fn references_dir(args: &[String], dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    args.iter().any(|arg| {
        arg.match_indices(dir).any(|(i, _)| {
            let before_ok = i == 0 || matches!(arg.as_bytes()[i - 1], b'=' | b':' | b',');
            let after = &arg[i + dir.len()..];
            before_ok && (after.is_empty() || after.starts_with('/'))
        })
    })
}

/// Processes of the lab started from `state` that are still alive (found
/// by their command line, whatever their pid files say), except this one.
pub fn lab_processes(state: &StateDir) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let dir = state.dir.to_string_lossy().into_owned();
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
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(program) = args.first() else {
            continue;
        };
        let base = Path::new(program)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // `ip netns exec <ns> canal-agent ...` before its exec, too.
        let ours = LAB_PROGRAMS.contains(&base)
            || (base == "ip"
                && args
                    .iter()
                    .any(|a| LAB_PROGRAMS.iter().any(|p| a.ends_with(p))));
        if ours && references_dir(&args, &dir) {
            found.push((pid, args.join(" ")));
        }
    }
    found
}

fn kill(pid: i32, signal: i32) {
    // SAFETY: a plain syscall on a pid the lab started.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Stops and removes everything the lab in `state` made. Safe to run twice,
/// after a crash, and on a state directory that was deleted by hand.
pub fn down(state: &StateDir) -> Removed {
    let mut removed = stop(state);
    udp_ports::remove_rotation(&state.names().prefix);
    if state.dir.exists() {
        match std::fs::remove_dir_all(&state.dir) {
            Ok(()) => removed.state_dir = true,
            Err(e) => removed
                .failures
                .push(format!("{}: {e}", state.dir.display())),
        }
    }
    removed
}

/// Stops every process of the lab and removes its namespaces, keeping the
/// state directory (a failed `up` keeps its logs).
pub fn stop(state: &StateDir) -> Removed {
    let names: LabNames = state.names();
    let mut removed = Removed::default();

    // 1. Processes with pid files, in order.
    let mut files = Vec::new();
    pid_files(&state.dir, &mut files);
    files.retain(|f| !f.starts_with(state.control_plane()));
    files.sort_by_key(|f| stop_rank(f));
    for file in files {
        let program = expected_program(&file);
        if let Some(pid) = process::live_pid(&file, program) {
            process::stop_pid_file(&file, program, Duration::from_secs(3));
            removed.processes.push(format!("{program} {pid}"));
        }
    }
    for name in control_plane::stop_detached(&state.control_plane()) {
        removed.processes.push(name);
    }

    // 2. Anything still running inside the lab's namespaces.
    let mut namespaces: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| names.owns_netns(n))
        .collect();
    namespaces.sort_by_key(|n| names.removal_rank(n));
    for ns in &namespaces {
        for pid in netns::pids(ns) {
            kill(pid, libc::SIGKILL);
            removed.processes.push(format!("pid {pid} in {ns}"));
        }
    }

    // 3. Anything whose command line names the state directory.
    let stragglers = lab_processes(state);
    for (pid, _) in &stragglers {
        kill(*pid, libc::SIGTERM);
    }
    std::thread::sleep(if stragglers.is_empty() {
        Duration::ZERO
    } else {
        Duration::from_millis(500)
    });
    for (pid, cmdline) in stragglers {
        kill(pid, libc::SIGKILL);
        removed.processes.push(format!("{cmdline} ({pid})"));
    }

    // 4. The namespaces (their links go with them).
    for ns in namespaces {
        match netns::delete(&ns) {
            Ok(()) => removed.namespaces.push(ns),
            Err(e) => removed.failures.push(format!("namespace {ns}: {e}")),
        }
    }

    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn command_lines_match_whole_paths() {
        let dir = "/tmp/lab";
        assert!(references_dir(
            &args("canal-lab --state-dir /tmp/lab __echo"),
            dir
        ));
        assert!(references_dir(
            &args("etcd --data-dir=/tmp/lab/control-plane/etcd-data"),
            dir
        ));
        assert!(references_dir(
            &args("canal-agent --kubeconfig /tmp/lab/nodes/node-1/kubeconfig"),
            dir
        ));
        assert!(!references_dir(
            &args("canal-lab --state-dir /tmp/lab2"),
            dir
        ));
        assert!(!references_dir(
            &args("canal-lab --state-dir /x/tmp/lab"),
            dir
        ));
        assert!(references_dir(
            &args("canal-lab --state-dir /tmp/lab/"),
            "/tmp/lab/"
        ));
    }

    #[test]
    fn pid_files_map_to_programs_and_order() {
        assert_eq!(
            expected_program(Path::new("/s/nodes/n/agent.pid")),
            "canal-agent"
        );
        assert_eq!(expected_program(Path::new("/s/forwarder.pid")), "canal-lab");
        assert_eq!(
            expected_program(Path::new("/s/pods/x/a/echo.pid")),
            "canal-lab"
        );
        let mut files = [
            PathBuf::from("/s/forwarder.pid"),
            PathBuf::from("/s/controller.pid"),
            PathBuf::from("/s/nodes/n/agent.pid"),
            PathBuf::from("/s/pods/x/a/echo.pid"),
        ];
        files.sort_by_key(|f| stop_rank(f));
        assert_eq!(files[0], PathBuf::from("/s/pods/x/a/echo.pid"));
        assert_eq!(files[3], PathBuf::from("/s/forwarder.pid"));
    }
}
