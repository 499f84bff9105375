//! The README's "Install on a cluster" commands, run as written against a
//! real kube-apiserver (what can run without nodes: helm template, install,
//! the kubectl checks that read objects, uninstall), and `helm template`
//! without `--kube-version`, as GitOps tools render the chart.

use std::path::{Path, PathBuf};
use std::process::Command;

use canal_e2e::ControlPlane;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// The shell commands of the README section `heading` (```sh blocks, with
/// `\` continuations joined and comments dropped), in order.
fn section_commands(readme: &str, heading: &str) -> Vec<String> {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let rest = &readme[start + heading.len() + 2..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        let line = strip_comment(line).trim_end();
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let command = pending.split_whitespace().collect::<Vec<_>>().join(" ");
        pending.clear();
        if !command.is_empty() {
            commands.push(command);
        }
    }
    commands
}

/// Drops a `# comment` that is outside quotes.
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && (i == 0 || line[..i].ends_with(' ')) => {
                return &line[..i];
            }
            _ => {}
        }
    }
    line
}

/// What cannot run here: building and pushing an image, and whatever needs
/// nodes with a kubelet (rollouts, pods).
fn needs_more_than_an_api_server(command: &str) -> bool {
    [
        "docker ",
        "kubectl -n kube-system rollout status",
        "kubectl run ",
        "kubectl exec ",
    ]
    .iter()
    .any(|p| command.starts_with(p))
}

#[test]
fn readme_commands_are_found() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let commands = section_commands(&readme, "## Install on a cluster");
    for expected in [
        "helm template canal charts/canal",
        "helm install canal charts/canal --namespace kube-system",
        "kubectl get canalnetwork default",
        "helm uninstall canal --namespace kube-system",
    ] {
        assert!(
            commands.iter().any(|c| c.starts_with(expected)),
            "{expected:?} not in {commands:#?}"
        );
    }
    assert_eq!(strip_comment("a '#b' # c"), "a '#b' ");
}

#[tokio::test]
async fn install_on_a_cluster_commands_run_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let commands = section_commands(&readme, "## Install on a cluster");
    let cp = ControlPlane::start().await.expect("control plane");
    let helm = canal_e2e::helm::helm().expect("helm");
    let kubectl = canal_e2e::binaries::Binaries::ensure().unwrap().kubectl;
    let path = std::env::join_paths(
        [helm.parent(), kubectl.parent()]
            .into_iter()
            .flatten()
            .map(Path::to_path_buf)
            .chain(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            )),
    )
    .unwrap();
    let mut ran = Vec::new();
    for command in commands
        .iter()
        .filter(|c| !needs_more_than_an_api_server(c))
    {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", command])
            .current_dir(repo())
            .env("PATH", &path)
            .env("KUBECONFIG", cp.kubeconfig())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README command failed: {command}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ran.push(command.clone());
    }
    assert!(ran.len() >= 5, "ran only {ran:#?}");
}

#[test]
fn helm_template_and_lint_work_without_a_kube_version() {
    let helm = canal_e2e::helm::helm().expect("helm");
    for args in [
        &["template", "canal", "charts/canal"][..],
        &[
            "template",
            "canal",
            "charts/canal",
            "--namespace",
            "kube-system",
        ][..],
        &["lint", "charts/canal", "--strict"][..],
    ] {
        let out = Command::new(&helm)
            .args(args)
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm {args:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // An old version passed explicitly still renders offline: the minimum is
    // checked against the cluster only (templates/kube-version-check.yaml).
    let out = Command::new(&helm)
        .args([
            "template",
            "canal",
            "charts/canal",
            "--kube-version",
            "1.20.0",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success());
}
