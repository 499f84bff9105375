//! Throwaway network namespaces for kernel tests and benchmarks. Every
//! namespace is removed when its guard drops (success, failure or panic);
//! nothing here touches the root namespace.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace named `<prefix>-<pid>-<n>`, deleted on drop.
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

/// Deletes `<prefix>-<pid>-<n>` namespaces whose process is gone: a run
/// killed before its guards dropped (a timeout, ^C) leaves them behind.
fn sweep_dead(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        // Once per prefix and process.
        static SWEPT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        if let Ok(mut swept) = SWEPT.lock()
            && !swept.iter().any(|p| p == prefix)
        {
            sweep_dead(prefix);
            swept.push(prefix.to_string());
        }
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
        };
        ns.sh("ip link set lo up");
        ns
    }

    /// Runs a shell command inside the namespace; panics with its output on failure.
    pub fn sh(&self, script: &str) -> String {
        let out = self.sh_output(script);
        assert!(
            out.status.success(),
            "in netns {}: `{script}` failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell command inside the namespace and returns its output.
    pub fn sh_output(&self, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .output()
            .expect("run ip netns exec")
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates stay there.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path.clone();
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            // SAFETY: plain setns(2) on this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {}", path.display());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this process may create network namespaces (root with the tools).
pub fn can_run() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "iptables-restore", "iptables-save", "ipset"]
        .iter()
        .all(|t| {
            Command::new(t)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
                || *t == "ip"
        });
    root && tools
}
