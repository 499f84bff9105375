//! Helpers shared by the lab's end-to-end tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use canal_e2e::lab::{StateDir, cleanup, netns};

pub mod dataplane;
pub mod explain;
pub mod policy;

/// Runs `canal-lab --state-dir STATE ARGS...`.
pub fn canal_lab(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canal-lab"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("canal-lab runs")
}

/// Runs `canal-lab` and fails the test with its output when it fails.
pub fn canal_lab_ok(state: &Path, args: &[&str]) -> String {
    let out = canal_lab(state, args);
    assert!(
        out.status.success(),
        "canal-lab {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a lab left behind: its namespaces, its processes, its directory.
pub fn leftovers(state: &StateDir) -> Vec<String> {
    let names = state.names();
    let mut left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| names.owns_netns(n))
        .map(|n| format!("namespace {n}"))
        .collect();
    left.extend(
        cleanup::lab_processes(state)
            .into_iter()
            .filter(|(pid, _)| !is_zombie(*pid))
            .map(|(pid, cmd)| format!("process {pid}: {cmd}")),
    );
    if state.dir.exists() {
        left.push(format!("directory {}", state.dir.display()));
    }
    left
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Links of the root namespace (names only).
pub fn root_links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// Polls `check` until it returns Ok or `timeout` passes; the last error
/// explains the failure.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("{what} did not happen within {timeout:?}; last observed: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A ptp + host-local CNI configuration for a node (the lab's own tests of
/// its machinery, independent of canal-cni).
pub fn ptp_conflist(subnet: &str, data_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "lab-ptp",
        "plugins": [
            {"type": "ptp", "ipMasq": false, "ipam": {
                "type": "host-local", "subnet": subnet,
                "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data_dir}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
    .to_string()
}

/// Serialises the tests of one binary that each bring a full lab up: the
/// machine has few cores, and labs in parallel only make each slower.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
