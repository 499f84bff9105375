//! The binary starts, documents itself, and fails cleanly without a cluster.

use std::process::Command;

#[test]
fn help_lists_the_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_canal-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--node-name",
        "--kubeconfig",
        "--metrics-addr",
        "--run-dir",
        "--resync-interval",
        "--set-network-unavailable",
        "--policy-resync-interval",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[test]
fn unreachable_cluster_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // Port 1 on loopback: nothing listens there.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_canal-agent"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--metrics-addr=127.0.0.1:0")
        .arg("--node-name=node-1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach the Kubernetes API server at https://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cni_plugin_answers_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_canal-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        doc["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "1.0.0")
    );
}
