//! A new user's first run (issue 11): the README's first command
//! (`scripts/lab up`) from a clean state; the preflight that says in one line
//! per cause what cannot work and how to fix it, before anything starts; a
//! failed `up` that keeps its logs and shows the cause; and UDP truth tables
//! from separate `canal-lab matrix` processes that never reuse each other's
//! flows, so a policy applied between two runs shows up in the second.
//!
//! `.ci/run` runs both README commands on its fresh machine; these tests are
//! what can be checked on a machine that already has everything.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use canal_e2e::Lab;
use canal_e2e::lab::{Matrix, PodOptions, Protocol, StateDir, UpOptions, default_bin_dir};
use support::policy::{apply_policies, wait_enforced};
use support::{canal_lab, canal_lab_ok, leftovers, serial};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fresh(name: &str) -> StateDir {
    let state = StateDir::new(Lab::test_state_dir(name));
    canal_e2e::lab::down(&state);
    state
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn shown(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    )
}

/// `canal-lab up` run as `wrap` says, for the preflight: it must fail within
/// seconds, create nothing, and say what is wrong one line per cause.
fn failing_up(state: &StateDir, wrap: &mut Command) -> Vec<String> {
    let started = Instant::now();
    let out = wrap
        .arg(env!("CARGO_BIN_EXE_canal-lab"))
        .arg("--state-dir")
        .arg(&state.dir)
        .args(["up", "--nodes", "1"])
        .output()
        .expect("canal-lab runs");
    assert!(!out.status.success(), "up must fail: {}", shown(&out));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the preflight took {:?}",
        started.elapsed()
    );
    assert!(
        !state.dir.exists(),
        "a failed preflight must create nothing"
    );
    let lines: Vec<String> = stderr(&out).lines().map(str::to_string).collect();
    for line in &lines {
        assert!(
            line.starts_with("canal-lab: ") && line.matches(": ").count() >= 2,
            "not a one-line cause and fix: {line:?}\n{}",
            shown(&out)
        );
    }
    lines
}

#[test]
fn preflight_refuses_a_user_who_is_not_root() {
    let state = fresh("preflight-user");
    let lines = failing_up(
        &state,
        Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]),
    );
    assert_eq!(
        lines,
        [
            "canal-lab: canal-lab up must run as root (network namespaces, iptables): run it with sudo, or as root"
        ]
    );
}

#[test]
fn preflight_refuses_root_without_the_capabilities_the_lab_uses() {
    // What an unprivileged container gives: root, without CAP_NET_ADMIN and
    // CAP_SYS_ADMIN (nothing would create a namespace or a link).
    let state = fresh("preflight-caps");
    let lines = failing_up(
        &state,
        Command::new("setpriv").args([
            "--inh-caps=-net_admin,-sys_admin",
            "--bounding-set=-net_admin,-sys_admin",
            "--",
        ]),
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("without CAP_NET_ADMIN, CAP_SYS_ADMIN")
            && lines[0].contains("privileged container"),
        "{lines:?}"
    );
}

#[test]
fn preflight_names_the_package_of_every_missing_tool_and_go() {
    // A machine with iproute2 only, no Go, and no control plane built yet.
    let state = fresh("preflight-tools");
    let tools = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        which("ip").expect("ip is installed"),
        tools.path().join("ip"),
    )
    .unwrap();
    let empty_cache = tempfile::tempdir().unwrap();
    let mut env = Command::new("env");
    env.arg(format!("PATH={}", tools.path().display()))
        .arg(format!("CANAL_CACHE_DIR={}", empty_cache.path().display()));
    let lines = failing_up(&state, &mut env);
    for expected in [
        "canal-lab: iptables is not on PATH: apt-get install iptables",
        "canal-lab: iptables-restore is not on PATH: apt-get install iptables",
        "canal-lab: ipset is not on PATH: apt-get install ipset",
        "canal-lab: bridge is not on PATH: apt-get install iproute2",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected:?} missing in {lines:#?}"
        );
    }
    let go: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("Go is not on PATH"))
        .collect();
    assert_eq!(go.len(), 1, "{lines:#?}");
    assert!(go[0].contains("https://go.dev/dl/"), "{}", go[0]);
    // The kernel checks still ran (ip is there) and passed: no other line.
    assert!(
        lines.iter().all(|l| l.contains("is not on PATH")),
        "{lines:#?}"
    );
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A bin dir with canal's real binaries, except that canal-agent runs with
/// a PATH that has neither iptables nor ipset (the machine of issue 11,
/// after the preflight: the agent cannot program NetworkPolicy).
fn bin_dir_with_crippled_agent() -> tempfile::TempDir {
    let real = default_bin_dir();
    let dir = tempfile::tempdir().unwrap();
    for bin in ["canal-lab", "canal-controller", "canal-cni"] {
        std::os::unix::fs::symlink(real.join(bin), dir.path().join(bin)).unwrap();
    }
    let tools = dir.path().join("no-netfilter-tools");
    std::fs::create_dir(&tools).unwrap();
    let agent = dir.path().join("canal-agent");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\nPATH={} exec {} \"$@\"\n",
            tools.display(),
            real.join("canal-agent").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn a_failed_up_keeps_its_logs_and_shows_why() {
    let _serial = serial().await;
    let state = fresh("failed-up");
    let bins = bin_dir_with_crippled_agent();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_canal-lab"))
        .env("CANAL_BIN_DIR", bins.path())
        .arg("--state-dir")
        .arg(&state.dir)
        .args(["up", "--nodes", "1", "--timeout", "8"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", shown(&out));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let agent_log = state.node("node-1").agent().log();
    for expected in [
        "timed out waiting for the lab to be programmed after 8s".to_string(),
        "canal-agent on node-1: node-1: agent /readyz says".to_string(),
        format!("  log: {}", agent_log.display()),
        format!("the logs stay in {}", state.dir.display()),
    ] {
        assert!(err.contains(&expected), "{expected:?} missing:\n{err}");
    }
    // The agent's own error lines, which name the missing tool.
    let cause: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("  | "))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            (l.contains("iptables") || l.contains("ipset")) && l.contains("error")
        })
        .collect();
    assert!(!cause.is_empty(), "no error line names the tool:\n{err}");
    // Healthy components are not in the report.
    for healthy in ["etcd:", "kube-apiserver:", "API forwarder:"] {
        assert!(
            !err.lines().any(|l| l.starts_with(healthy)),
            "{healthy} reported:\n{err}"
        );
    }

    // Files kept, nothing running, no namespace left.
    assert!(agent_log.is_file());
    assert!(state.up_failed_file().is_file());
    let running: Vec<String> = leftovers(&state)
        .into_iter()
        .filter(|l| !l.starts_with("directory"))
        .collect();
    assert_eq!(running, Vec::<String>::new());
    let status = canal_lab(&state.dir, &["status"]);
    assert!(!status.status.success());
    assert!(stderr(&status).contains("no lab at"), "{}", shown(&status));

    // `up` again starts afresh over the kept logs; `down` removes everything.
    canal_lab_ok(
        &state.dir,
        &["up", "--nodes", "1", "--no-agents", "--no-controller"],
    );
    assert!(!agent_log.exists(), "the old logs went with the new up");
    canal_lab_ok(&state.dir, &["down"]);
    assert_eq!(leftovers(&state), Vec::<String>::new());

    // And a failed up's directory alone is removed by `down`.
    let out = Command::new(env!("CARGO_BIN_EXE_canal-lab"))
        .env("CANAL_BIN_DIR", bins.path())
        .arg("--state-dir")
        .arg(&state.dir)
        .args(["up", "--nodes", "1", "--timeout", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", shown(&out));
    assert!(state.dir.exists());
    let down = canal_lab_ok(&state.dir, &["down"]);
    assert!(down.contains(&state.dir.display().to_string()), "{down}");
    assert_eq!(leftovers(&state), Vec::<String>::new());
}

fn cli_matrix(state: &StateDir) -> Matrix {
    let json = canal_lab_ok(
        &state.dir,
        &[
            "matrix",
            "--protocol",
            "UDP",
            "--port",
            "80",
            "--json",
            "--timeout-ms",
            "1000",
        ],
    );
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    Matrix::from_json(&value).unwrap()
}

/// Issue 11: every `canal-lab` process started its UDP source ports at the
/// same port, so a second `matrix` reused the first one's 5-tuples, which
/// conntrack rightly treats as the established flows of the first run: the
/// pairs a policy applied in between denies showed as connected. Several
/// runs on each side, so that runs that pair pods and ports differently
/// also meet.
#[tokio::test]
async fn udp_matrix_runs_in_separate_processes_see_a_policy_applied_between_them() {
    let _serial = serial().await;
    let lab = Lab::up(
        Lab::test_state_dir("udp-processes"),
        UpOptions {
            nodes: 2,
            ..UpOptions::default()
        },
    )
    .await
    .unwrap();
    lab.add_pods(vec![
        PodOptions::new("x", "a", "node-1").label("pod", "a"),
        PodOptions::new("x", "b", "node-2").label("pod", "b"),
        PodOptions::new("x", "c", "node-1").label("pod", "c"),
    ])
    .await
    .unwrap();
    wait_enforced(&lab, Duration::from_secs(30)).await;
    let pods: Vec<String> = lab.pods().unwrap().iter().map(|p| p.key()).collect();
    let all = Matrix::filled(pods.clone(), true);
    for run in 0..2 {
        let before = cli_matrix(lab.state());
        assert_eq!(before, all, "run {run}:\n{}", Matrix::report(&all, &before));
    }

    apply_policies(
        &lab.client(),
        "metadata: {namespace: x, name: a-isolated}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}\n",
    )
    .await;
    let model = wait_enforced(&lab, Duration::from_secs(30)).await;
    let expected = model.expected(&pods, 80, Protocol::Udp);
    assert_eq!(expected.get("x/b", "x/a"), Some(false));
    assert_eq!(expected.get("x/c", "x/a"), Some(false));
    // Within the 30 s conntrack timeout of the first runs' flows.
    for run in 0..3 {
        let after = cli_matrix(lab.state());
        assert_eq!(
            after,
            expected,
            "run {run} after the policy:\n{}",
            Matrix::report(&expected, &after)
        );
    }
}

/// The README's first command on a machine that has everything: it checks,
/// installs nothing, builds nothing new, says what it does with the time,
/// and brings the lab up; `scripts/lab down` removes it.
#[tokio::test]
async fn scripts_lab_up_is_the_first_command_and_down_removes_everything() {
    let _serial = serial().await;
    let state = fresh("scripts-lab");
    let lab = |args: &[&str]| {
        let mut cmd = Command::new(repo().join("scripts/lab"));
        // As from a person's shell: without the variables cargo sets for a
        // test (build scripts such as ring's rerun when they change, so the
        // nested `cargo build` would rebuild half the tree).
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR")
                || key == "CARGO"
                || key == "OUT_DIR"
            {
                cmd.env_remove(key.as_ref());
            }
        }
        cmd.arg("--state-dir")
            .arg(&state.dir)
            .args(args)
            .output()
            .unwrap()
    };
    let out = lab(&["up", "--nodes", "2"]);
    assert!(out.status.success(), "{}", shown(&out));
    let err = stderr(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for step in [
        "==> [+",
        "] Debian packages: all ",
        "] building canal: cargo build --workspace --bins",
        "] preflight: canal-lab preflight",
        "] test control plane",
        "] canal-lab --state-dir",
        "s] control plane: etcd and kube-apiserver",
        "s] waiting until every node is programmed",
    ] {
        assert!(err.contains(step), "{step:?} missing:\n{err}");
    }
    assert!(stdout.contains("preflight ok"), "{stdout}");
    assert!(
        stdout.contains("build.sh: k8s-v1.37.2 present in"),
        "{stdout}"
    );
    assert!(stdout.contains("lab up in"), "{stdout}");
    let status = canal_lab_ok(&state.dir, &["status"]);
    assert!(!status.contains("FAIL"), "{status}");

    let out = lab(&["down"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(leftovers(&state), Vec::<String>::new());
}
