//! Kernel tests of the nftables element fast path: PeerSet member changes
//! go as one nfnetlink batch (no libnftables cache refresh) and leave the
//! kernel exactly as the script would; a batch the kernel refuses (an
//! element someone else removed first) fails the attempt, and the retry
//! re-reads the kernel and converges. Needs root and nftables.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use canal_agent::policy::nft::NftState;
use canal_agent::policy::nft::render::render as nft_render;
use canal_agent::policy::{
    DataplaneChoice, EnforcementConfig, Exec, PolicyEnforcer, PolicyInputs, PolicyMetrics, model,
};
use canal_crds::{NodePolicySetSpec, PeerSetSpec};
use serde::Deserialize;
use support::netns::{Netns, can_run};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    generation: Option<i64>,
    spec: NodePolicySetSpec,
    #[serde(default)]
    peer_sets: BTreeMap<String, PeerSetSpec>,
}

fn web_mixed() -> PolicyInputs {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/web-mixed.yaml");
    let c: Case = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    PolicyInputs {
        config: EnforcementConfig {
            dataplane: DataplaneChoice::NfTables,
            ..EnforcementConfig::default()
        },
        generation: c.generation,
        spec: c.spec,
        peer_sets: c.peer_sets,
        endpoints_unknown: false,
    }
}

fn assert_kernel_matches(ns: &Netns, inputs: &PolicyInputs) {
    let want = NftState::from_ruleset(&nft_render(&model::build(inputs)));
    let have = NftState::parse("canal", &ns.sh("nft -j list table inet canal")).unwrap();
    assert_eq!(have.chains, want.chains, "chains");
    assert_eq!(have.sets, want.sets, "sets");
}

/// The set holding `ip` in canal's table.
fn set_of(ns: &Netns, ip: &str) -> String {
    let have = NftState::parse("canal", &ns.sh("nft -j list table inet canal")).unwrap();
    have.sets
        .iter()
        .find(|(_, s)| s.elements.contains(ip))
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| panic!("no set holds {ip}"))
}

#[tokio::test]
async fn member_changes_are_one_batch_and_match_the_kernel() {
    assert!(can_run(), "kernel tests need root");
    let ns = Netns::new("pnb-members");
    let run_dir = tempfile::tempdir().unwrap();
    let metrics = PolicyMetrics::unregistered().unwrap();
    let mut e = PolicyEnforcer::new(run_dir.path(), metrics.clone())
        .with_exec(Exec::in_netns(&ns.path).unwrap());
    let mut inputs = web_mixed();
    e.sync(&inputs).await.unwrap();
    assert_eq!(e.nft_batches(), 0, "a new table is a script");
    let ips = &mut inputs.peer_sets.get_mut("ps-frontend").unwrap().ips;
    ips.retain(|ip| ip != "10.244.2.7");
    ips.extend(["10.244.4.4".to_string(), "10.244.4.5".to_string()]);
    let s = e.sync(&inputs).await.unwrap();
    assert_eq!((s.plan.members_added, s.plan.members_removed), (2, 1));
    assert!(s.written_chains.is_empty());
    assert_eq!(e.nft_batches(), 1, "members only: one batch");
    assert_kernel_matches(&ns, &inputs);
    // Many members at once (several messages in one batch).
    let ips = &mut inputs.peer_sets.get_mut("ps-frontend").unwrap().ips;
    ips.extend((0..2500).map(|i| format!("10.245.{}.{}", i / 250, i % 250 + 1)));
    e.sync(&inputs).await.unwrap();
    assert_eq!(e.nft_batches(), 2);
    assert_kernel_matches(&ns, &inputs);
    // A rule change is not members only: the script runs.
    inputs
        .spec
        .policies
        .retain(|p| p.name != "shop/allow-monitoring");
    for ep in &mut inputs.spec.endpoints {
        ep.ingress_policies.retain(|p| p != "shop/allow-monitoring");
    }
    e.sync(&inputs).await.unwrap();
    assert_eq!(e.nft_batches(), 2);
    assert_kernel_matches(&ns, &inputs);
    // A fresh agent adopts the table as the batches left it.
    let mut again = PolicyEnforcer::new(run_dir.path(), PolicyMetrics::unregistered().unwrap())
        .with_exec(Exec::in_netns(&ns.path).unwrap());
    let s = again.sync(&inputs).await.unwrap();
    assert!(!s.applied, "{s:?}");
}

#[tokio::test]
async fn a_refused_batch_is_retried_from_the_kernel_state() {
    assert!(can_run(), "kernel tests need root");
    let ns = Netns::new("pnb-refused");
    let run_dir = tempfile::tempdir().unwrap();
    let metrics = PolicyMetrics::unregistered().unwrap();
    let mut e = PolicyEnforcer::new(run_dir.path(), metrics.clone())
        .with_exec(Exec::in_netns(&ns.path).unwrap());
    let mut inputs = web_mixed();
    e.sync(&inputs).await.unwrap();
    // Someone removes a member behind the agent's back; the agent then
    // removes it too (and adds another): deleting a missing element fails
    // the whole batch, nothing of it is applied.
    let set = set_of(&ns, "10.244.2.7");
    ns.sh(&format!(
        "nft delete element inet canal {set} {{ 10.244.2.7 }}"
    ));
    let ips = &mut inputs.peer_sets.get_mut("ps-frontend").unwrap().ips;
    ips.retain(|ip| ip != "10.244.2.7");
    ips.push("10.244.9.9".into());
    let s = e.sync(&inputs).await.unwrap();
    assert!(s.attempts >= 2, "the first attempt must fail: {s:?}");
    assert_eq!(
        metrics.sync_errors.with_label_values(&["nft"]).get(),
        0,
        "the retry succeeded"
    );
    assert_kernel_matches(&ns, &inputs);
}
