//! Golden tests of the rendered `iptables-restore` / `ipset restore` text for
//! representative NodePolicySets (inputs in tests/golden/*.yaml). Regenerate
//! after an intended change with `UPDATE_GOLDEN=1 cargo test -p canal-agent
//! --test policy_golden` and review the diff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use canal_agent::policy::{EnforcementConfig, PolicyInputs, RenderCache, render, render_with};
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

fn load(case: &str) -> PolicyInputs {
    let input = std::fs::read_to_string(golden_dir().join(format!("{case}.yaml"))).unwrap();
    let c: Case = serde_yaml::from_str(&input).unwrap();
    PolicyInputs {
        config: EnforcementConfig {
            enabled: c.config.enabled,
            endpoint_to_host: c.config.endpoint_to_host,
        },
        generation: c.generation,
        spec: c.spec,
        peer_sets: c.peer_sets,
        endpoints_unknown: false,
    }
}

fn check(case: &str) {
    let dir = golden_dir();
    let inputs = load(case);
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

/// The agent renders with a cache kept between syncs; whatever changes, the
/// result must equal a fresh render.
#[test]
fn cached_render_equals_fresh_render() {
    let mut inputs = load("web-mixed");
    let mut cache = RenderCache::default();
    let mut step = |inputs: &PolicyInputs, what: &str| {
        assert_eq!(
            render_with(inputs, &mut cache),
            render(inputs),
            "after: {what}"
        );
    };
    step(&inputs, "cold");
    step(&inputs, "unchanged");
    inputs.spec.endpoints[0].named_ports[0].port = 8081;
    step(&inputs, "a local named port changed");
    inputs
        .peer_sets
        .get_mut("ps-frontend")
        .unwrap()
        .ips
        .push("10.244.9.9".into());
    step(&inputs, "a PeerSet member added");
    inputs.spec.policies[0].ingress[0].ports.pop();
    step(&inputs, "a policy's ports changed");
    inputs.peer_sets.remove("ps-db-pg");
    step(&inputs, "a named-port PeerSet went missing");
    inputs.spec.policies.retain(|p| p.name != "shop/db");
    step(&inputs, "a policy removed");
    inputs.config.enabled = false;
    step(&inputs, "disabled");
    inputs.config.enabled = true;
    step(&inputs, "enabled again");
}
