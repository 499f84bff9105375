//! Golden tests of the rendered `iptables-restore` / `ipset restore` text for
//! representative NodePolicySets (inputs in tests/golden/*.yaml). Regenerate
//! after an intended change with `UPDATE_GOLDEN=1 cargo test -p canal-agent
//! --test policy_golden` and review the diff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use canal_agent::policy::{EnforcementConfig, PolicyInputs, render};
use canal_crds::{EndpointToHostAction, NodePolicySetSpec, PeerSetSpec};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    config: Config,
    generation: Option<i64>,
    spec: NodePolicySetSpec,
    #[serde(default)]
    peer_sets: BTreeMap<String, PeerSetSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    enabled: bool,
    endpoint_to_host: EndpointToHostAction,
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check(case: &str) {
    let dir = golden_dir();
    let input = std::fs::read_to_string(dir.join(format!("{case}.yaml"))).unwrap();
    let c: Case = serde_yaml::from_str(&input).unwrap();
    let inputs = PolicyInputs {
        config: EnforcementConfig {
            enabled: c.config.enabled,
            endpoint_to_host: c.config.endpoint_to_host,
        },
        generation: c.generation,
        spec: c.spec,
        peer_sets: c.peer_sets,
    };
    let out = render(&inputs);
    assert!(
        out.warnings.is_empty(),
        "{case}: unexpected warnings {:?}",
        out.warnings
    );
    let r = &out.ruleset;
    let actual = format!(
        "# iptables-restore --noflush\n{}# ipset restore\n{}",
        if r.chains.is_empty() && r.hooks.is_empty() {
            String::new()
        } else {
            r.iptables_restore_text()
        },
        r.ipset_restore_text()
    );
    let path = dir.join(format!("{case}.golden"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    if expected != actual {
        let diff: Vec<String> = expected
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (e, a))| e != a)
            .take(10)
            .map(|(i, (e, a))| format!("line {}:\n  expected: {e}\n  observed: {a}", i + 1))
            .collect();
        panic!(
            "{case}: rendered text differs from {} ({} vs {} lines)\n{}",
            path.display(),
            expected.lines().count(),
            actual.lines().count(),
            diff.join("\n")
        );
    }
}

#[test]
fn golden_web_mixed() {
    check("web-mixed");
}

#[test]
fn golden_empty_enabled() {
    check("empty-enabled");
}

#[test]
fn golden_host_drop() {
    check("host-drop");
}

#[test]
fn golden_disabled() {
    check("disabled");
}
