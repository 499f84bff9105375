//! Kernel tests of how the agent notices that someone else changed its
//! firewall, in throwaway network namespaces: nf_tables notifications name
//! foreign changes and never the agent's own writes (a sync under a watch is
//! silent); the ipset header check sees `ipset flush`/`add`; on an
//! iptables-legacy setup the table-size check sees a flush; a competing
//! `iptables-restore` loop rewriting canal's chain does not make syncs fail;
//! the anti-spoofing counters reach the metric. Needs root, iptables (nft
//! and legacy) and ipset.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use canal_agent::policy::firewall::concerns_policy;
use canal_agent::policy::watch::{Change, FirewallWatch, ipset_headers};
use canal_agent::policy::{
    DataplaneChoice, EnforcementConfig, Exec, PolicyEnforcer, PolicyInputs, PolicyMetrics, Tools,
};
use canal_crds::{Endpoint, NodePolicySetSpec};
use support::netns::{Netns, can_run};
use tokio::sync::broadcast;

fn inputs() -> PolicyInputs {
    PolicyInputs {
        config: EnforcementConfig {
            dataplane: DataplaneChoice::IpTables,
            ..EnforcementConfig::default()
        },
        generation: Some(1),
        spec: NodePolicySetSpec {
            endpoints: (1..=3)
                .map(|i| Endpoint {
                    namespace: "x".into(),
                    pod: format!("p{i}"),
                    interface: format!("cali0000000000{i}"),
                    ips: vec![format!("10.244.1.{i}")],
                    ingress_policies: if i == 1 {
                        vec!["x/deny".into()]
                    } else {
                        vec![]
                    },
                    ..Endpoint::default()
                })
                .collect(),
            policies: vec![canal_crds::CompiledPolicy {
                name: "x/deny".into(),
                ingress: vec![],
                egress: vec![],
            }],
        },
        peer_sets: BTreeMap::new(),
        endpoints_unknown: false,
    }
}

fn enforcer(ns: &Netns, run_dir: &Path) -> (PolicyEnforcer, PolicyMetrics) {
    let metrics = PolicyMetrics::unregistered().unwrap();
    let e =
        PolicyEnforcer::new(run_dir, metrics.clone()).with_exec(Exec::in_netns(&ns.path).unwrap());
    (e, metrics)
}

/// The changes received within `wait` that concern policy.
async fn drain(rx: &mut broadcast::Receiver<Change>, wait: Duration) -> Vec<Change> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(c)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        if concerns_policy(&c) {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn notifications_name_foreign_changes_and_never_our_own() {
    assert!(can_run(), "needs root and iptables/ipset");
    let ns = Netns::new("pd-watch");
    let run_dir = tempfile::tempdir().unwrap();
    let watch = FirewallWatch::start(Some(&ns.path)).unwrap();
    let mut rx = watch.subscribe();
    let (mut e, _) = enforcer(&ns, run_dir.path());
    let s = e.sync(&inputs()).await.unwrap();
    assert!(s.applied);
    // A cold sync wrote three tables: not one notification is "foreign".
    let own = drain(&mut rx, Duration::from_millis(300)).await;
    assert!(
        own.is_empty(),
        "our own writes reported as foreign: {own:?}"
    );

    let t0 = Instant::now();
    ns.sh("iptables -D FORWARD 1");
    let foreign = drain(&mut rx, Duration::from_millis(300)).await;
    assert!(
        foreign.iter().any(|c| matches!(c, Change::Nft { table, chain: Some(ch), .. } if table == "filter" && ch == "FORWARD")),
        "{foreign:?}"
    );
    eprintln!(
        "hook deleted: noticed (first of {}) within {:?}",
        foreign.len(),
        t0.elapsed()
    );
    // The repair is ours again: silent.
    let repaired = e.check_drift().await.unwrap().unwrap();
    assert_eq!(repaired.plan.hooks_fixed, 1);
    let own = drain(&mut rx, Duration::from_millis(300)).await;
    assert!(own.is_empty(), "{own:?}");
    // Someone else's chain and table elsewhere are not policy's business.
    ns.sh("iptables -t nat -N KUBE-X && iptables -N KUBE-FORWARD");
    let other = drain(&mut rx, Duration::from_millis(300)).await;
    assert!(other.is_empty(), "{other:?}");
    ns.sh("iptables -t raw -F");
    let raw = drain(&mut rx, Duration::from_millis(300)).await;
    assert!(!raw.is_empty(), "a flushed raw table must be noticed");
}

#[tokio::test]
async fn ipset_headers_show_flushes_and_additions() {
    assert!(can_run(), "needs root and iptables/ipset");
    let ns = Netns::new("pd-ipset");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, _) = enforcer(&ns, run_dir.path());
    e.sync(&inputs()).await.unwrap();
    let headers = ipset_headers(Some(&ns.path)).unwrap();
    let ours: Vec<_> = headers
        .iter()
        .filter(|h| h.name.starts_with("canal-"))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "the assigned (address, interface) set: {headers:?}"
    );
    assert!(
        ours.iter()
            .all(|h| h.elements == Some(3) && h.set_type == "hash:net,iface")
    );
    assert!(!e.sets_drifted().await.unwrap(), "nothing changed yet");
    let name = ours[0].name.clone();
    ns.sh(&format!("ipset flush {name}"));
    assert!(e.sets_drifted().await.unwrap(), "a flush");
    e.check_drift().await.unwrap();
    assert!(!e.sets_drifted().await.unwrap(), "repaired");
    ns.sh(&format!("ipset add {name} 10.9.9.9,cali0000000000f"));
    assert!(e.sets_drifted().await.unwrap(), "an added member");
}

#[tokio::test]
async fn legacy_tables_are_checked_by_their_size() {
    assert!(can_run(), "needs root and iptables/ipset");
    let ns = Netns::new("pd-legacy");
    let run_dir = tempfile::tempdir().unwrap();
    let (e, _) = enforcer(&ns, run_dir.path());
    let mut e = e.with_tools(Tools {
        iptables_restore: "iptables-legacy-restore".into(),
        iptables_save: "iptables-legacy-save".into(),
        ..Tools::default()
    });
    assert_eq!(
        e.backend().await.unwrap(),
        canal_agent::policy::watch::Backend::Legacy
    );
    assert!(
        !e.legacy_tables_changed().await.unwrap(),
        "first call: baseline"
    );
    e.sync(&inputs()).await.unwrap();
    assert!(
        !e.legacy_tables_changed().await.unwrap(),
        "our own sync is the baseline"
    );
    ns.sh("iptables-legacy -F CANAL-TO-WL");
    assert!(e.legacy_tables_changed().await.unwrap(), "a flushed chain");
    assert!(!e.legacy_tables_changed().await.unwrap(), "reported once");
    let s = e.check_drift().await.unwrap().unwrap();
    assert_eq!(s.written_chains, vec!["CANAL-TO-WL"]);
    assert!(
        !e.legacy_tables_changed().await.unwrap(),
        "the repair is ours"
    );
    assert!(
        ns.sh("iptables-legacy-save -t security")
            .contains("CANAL-GUARD-FORWARD")
    );
}

#[tokio::test]
async fn a_competing_restore_loop_does_not_make_syncs_fail() {
    assert!(can_run(), "needs root and iptables/ipset");
    let ns = Netns::new("pd-compete");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, m) = enforcer(&ns, run_dir.path());
    let mut inp = inputs();
    e.sync(&inp).await.unwrap();
    // Another program rewrites canal's chains as fast as it can, for 3 s.
    let mut hostile = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh"])
        .args([
            "-c",
            "end=$(($(date +%s%N)+3000000000)); while [ $(date +%s%N) -lt $end ]; do \
             printf '*filter\\n:CANAL-FORWARD - [0:0]\\n-A CANAL-FORWARD -j ACCEPT\\n:CANAL-TO-WL - [0:0]\\nCOMMIT\\n' | iptables-restore --noflush; done",
        ])
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut syncs = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        // Input changes and drift checks, interleaved with the rewrites.
        inp.spec.endpoints[2].ips = vec![format!("10.244.1.{}", 10 + syncs % 50)];
        e.sync(&inp)
            .await
            .expect("a sync failed under a competing restore loop");
        e.check_drift()
            .await
            .expect("a drift check failed under a competing restore loop");
        syncs += 1;
    }
    hostile.wait().unwrap();
    let repaired = e.check_drift().await.unwrap().unwrap();
    eprintln!(
        "{syncs} syncs and drift checks under the loop, {} restore failures retried",
        m.restore_failures.with_label_values(&["iptables"]).get()
    );
    assert!(repaired.full);
    assert!(
        !e.check_drift().await.unwrap().unwrap().applied,
        "in sync afterwards"
    );
    assert_eq!(
        m.sync_errors.with_label_values(&["iptables_restore"]).get(),
        0
    );
}

#[tokio::test]
async fn spoofed_packet_counters_reach_the_metric() {
    assert!(can_run(), "needs root and iptables/ipset");
    let ns = Netns::new("pd-count");
    let run_dir = tempfile::tempdir().unwrap();
    let (mut e, m) = enforcer(&ns, run_dir.path());
    e.sync(&inputs()).await.unwrap();
    let rpf = || m.spoofed_packets.with_label_values(&["rpf"]).get();
    e.record_spoof_counters().await.unwrap();
    assert_eq!(rpf(), 0);
    // A pod interface whose forged packets fail the reverse-path check.
    let pod = Netns::new("pd-count-pod");
    ns.sh(&format!(
        "ip link add cali00000000001 address ee:ee:ee:ee:ee:ee type veth peer name eth0 netns {} \
         && ip link set cali00000000001 up && ip route add 10.244.1.1/32 dev cali00000000001",
        pod.name
    ));
    pod.sh(
        "ip addr add 10.244.1.1/32 dev eth0 && ip link set eth0 up && ip route add default dev eth0 \
         && ip neigh replace 10.244.1.2 lladdr ee:ee:ee:ee:ee:ee dev eth0 nud permanent",
    );
    // p1 forging p2's address: the route to 10.244.1.3 is not via p1's interface.
    use canal_e2e::lab::spoof::{Forged, Kind, send_in};
    let forged = Forged {
        src: "10.244.1.3".parse().unwrap(),
        dst: "10.244.1.2:80".parse().unwrap(),
        kind: Kind::Udp,
        tag: 1,
        count: 4,
    };
    send_in(&pod.name, forged).unwrap();
    e.record_spoof_counters().await.unwrap();
    assert!(rpf() >= 4, "counted {}", rpf());
    let now = rpf();
    e.record_spoof_counters().await.unwrap();
    assert_eq!(rpf(), now, "no new drops, no new counts");
}
