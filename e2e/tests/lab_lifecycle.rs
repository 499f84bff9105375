//! `canal-lab up`, `kubectl`, `down`: the lab starts, serves the CRDs, and
//! leaves no process or file behind.

use std::path::Path;
use std::process::Command;

fn lab(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_canal-lab"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("canal-lab runs")
}

fn pids_under(state: &Path) -> Vec<String> {
    let needle = state.display().to_string();
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

#[test]
fn up_kubectl_down_leaves_nothing_behind() {
    let parent = tempfile::tempdir().unwrap();
    let state = parent.path().join("lab");

    let up = lab(&state, &["up", "--nodes", "1"]);
    assert!(
        up.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(state.join("kubeconfig").is_file());

    let again = lab(&state, &["up"]);
    assert!(
        !again.status.success(),
        "a second up on the same state dir must refuse"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    let crds = lab(&state, &["kubectl", "--", "get", "crd", "-o", "name"]);
    let listed = String::from_utf8_lossy(&crds.stdout);
    for crd in [
        "canalnetworks.canal.dev",
        "nodepolicysets.canal.dev",
        "peersets.canal.dev",
    ] {
        assert!(listed.contains(crd), "missing {crd} in:\n{listed}");
    }
    let net = lab(
        &state,
        &[
            "kubectl",
            "--",
            "get",
            "canalnetwork",
            "default",
            "-o",
            "jsonpath={.spec.clusterCIDR}",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&net.stdout), "10.244.0.0/16");

    assert!(
        !pids_under(&state).is_empty(),
        "the lab's processes should be running"
    );
    let down = lab(&state, &["down"]);
    assert!(
        down.status.success(),
        "down failed: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!state.exists(), "down must remove the state dir");
    let left = pids_under(&state)
        .into_iter()
        .filter(|p| !p.contains("<defunct>"))
        .collect::<Vec<_>>();
    assert!(left.is_empty(), "processes left behind: {left:?}");

    let status = lab(&state, &["status"]);
    assert!(!status.status.success());
}
