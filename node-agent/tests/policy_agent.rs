//! The real canal-agent enforcing NetworkPolicy from the API: a real
//! kube-apiserver, the agent in a throwaway node namespace, and a
//! NodePolicySet and PeerSets written by hand (exactly what canal-controller
//! writes). Proves: the agent is not ready and touches nothing until its
//! NodePolicySet exists; it then programs it (read back with iptables-save
//! and ipset in the namespace), writes the handshake files, reports
//! observedGeneration + Enforced + counts in the status and becomes ready;
//! a PeerSet member change reaches the kernel; a PeerSet that becomes
//! referenced after its watch event went by is fetched; a restart adopts
//! the kernel state with no restore and no status write; a rule deleted by
//! hand is repaired by the drift check (with an Event); `policy.enabled:
//! false` removes everything and says so in the status, and re-enabling
//! restores it.

mod support;

use std::time::Duration;

use canal_crds::condition::{ENFORCED, find};
use canal_crds::{
    CanalNetwork, CanalNetworkSpec, CompiledPolicy, Endpoint, NodePolicySet, NodePolicySetSpec,
    Peer, PeerSelector, PeerSet, PeerSetSpec, PortMatch, Protocol, Rule,
};
use canal_e2e::{ControlPlane, install};
use kube::api::{Api, Patch, PatchParams};
use support::cluster::{NodeNs, create_node, node_ns};
use support::{Child, wait_until, wait_until_async};

const NODE: &str = "pol-node";
const WRITER: &str = "canal-controller-policy";

fn iface(ns: &str, pod: &str) -> String {
    canal_crds::names::veth_name(ns, pod)
}

fn peer_set(ips: &[&str]) -> PeerSetSpec {
    PeerSetSpec {
        selector: PeerSelector {
            namespace: Some("x".into()),
            ..PeerSelector::default()
        },
        member_count: ips.len() as u32,
        ips: ips.iter().map(|s| s.to_string()).collect(),
        ports: vec![],
    }
}

/// Pod x/a (10.244.1.5) isolated for ingress by x/allow, which admits TCP 80
/// from each PeerSet in `sets`; pod x/b (10.244.1.6) not isolated.
fn node_policy(sets: &[&str]) -> NodePolicySetSpec {
    NodePolicySetSpec {
        endpoints: vec![
            Endpoint {
                namespace: "x".into(),
                pod: "a".into(),
                interface: iface("x", "a"),
                ips: vec!["10.244.1.5".into()],
                ingress_policies: vec!["x/allow".into()],
                ..Endpoint::default()
            },
            Endpoint {
                namespace: "x".into(),
                pod: "b".into(),
                interface: iface("x", "b"),
                ips: vec!["10.244.1.6".into()],
                ..Endpoint::default()
            },
        ],
        policies: vec![CompiledPolicy {
            name: "x/allow".into(),
            ingress: vec![Rule {
                peers: Some(
                    sets.iter()
                        .map(|s| Peer {
                            peer_set: Some(s.to_string()),
                            ip_block: None,
                        })
                        .collect(),
                ),
                ports: vec![PortMatch {
                    protocol: Protocol::TCP,
                    port: Some(80),
                    end_port: None,
                    named_port: None,
                    named_port_set: None,
                }],
            }],
            egress: vec![],
        }],
    }
}

async fn apply_peer_set(client: &kube::Client, name: &str, spec: PeerSetSpec) {
    let api: Api<PeerSet> = Api::all(client.clone());
    api.patch(
        name,
        &PatchParams::apply(WRITER).force(),
        &Patch::Apply(PeerSet::new(name, spec)),
    )
    .await
    .unwrap();
}

/// Applies the NodePolicySet; returns its generation.
async fn apply_nps(client: &kube::Client, spec: NodePolicySetSpec) -> i64 {
    let api: Api<NodePolicySet> = Api::all(client.clone());
    api.patch(
        NODE,
        &PatchParams::apply(WRITER).force(),
        &Patch::Apply(NodePolicySet::new(NODE, spec)),
    )
    .await
    .unwrap()
    .metadata
    .generation
    .unwrap()
}

async fn set_policy_enabled(client: &kube::Client, enabled: bool) {
    let api: Api<CanalNetwork> = Api::all(client.clone());
    api.patch(
        canal_crds::DEFAULT_NETWORK_NAME,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"policy": {"enabled": enabled}}})),
    )
    .await
    .unwrap();
}

/// The canal lines of the node's filter table and its canal ipsets.
fn policy_state(node: &NodeNs) -> String {
    let iptables = node.ns.sh("iptables-save", &["-t", "filter"]);
    let ipsets = node.ns.sh("ipset", &["save"]);
    // A set's hash seed (initval) is random at creation; order is not kept.
    let mut sets: Vec<&str> = ipsets
        .lines()
        .filter(|l| l.contains(" canal-"))
        .map(|l| l.split(" initval ").next().unwrap_or(l))
        .collect();
    sets.sort_unstable();
    iptables
        .lines()
        .filter(|l| l.contains("CANAL-") && !l.contains("CANAL-FWD-ALLOW"))
        .chain(sets)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the agent reports `generation` programmed and Enforced=True;
/// returns the status.
async fn wait_enforced(
    client: &kube::Client,
    generation: i64,
    agent: &Child,
) -> canal_crds::NodePolicySetStatus {
    let api: Api<NodePolicySet> = Api::all(client.clone());
    wait_until_async(
        &format!("NodePolicySet {NODE} generation {generation} enforced"),
        Duration::from_secs(30),
        || async {
            let nps = api.get(NODE).await.map_err(|e| e.to_string())?;
            let status = nps.status.clone().unwrap_or_default();
            let enforced = find(&status.conditions, ENFORCED).is_some_and(|c| c.status == "True");
            if status.observed_generation == Some(generation) && enforced {
                Ok(status)
            } else {
                Err(format!(
                    "status {status:?}\nagent log:\n{}",
                    agent.log_tail(20)
                ))
            }
        },
    )
    .await
}

/// Ok when `now` equals `want`, else the lines that differ.
fn same_state(want: &str, now: String) -> Result<(), String> {
    if now == want {
        return Ok(());
    }
    let missing: Vec<&str> = want
        .lines()
        .filter(|l| !now.lines().any(|n| n == *l))
        .collect();
    let extra: Vec<&str> = now
        .lines()
        .filter(|l| !want.lines().any(|w| w == *l))
        .collect();
    Err(format!(
        "missing:\n{}\nunexpected:\n{}",
        missing.join("\n"),
        extra.join("\n")
    ))
}

fn endpoint_file(node: &NodeNs, ns: &str, pod: &str) -> Option<String> {
    std::fs::read_to_string(node.run_dir.join("endpoints").join(iface(ns, pod))).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_programs_its_node_policy_set_reports_status_adopts_on_restart_and_follows_config() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    install::install_crds(&client).await.unwrap();
    // This test reads iptables and ipset (policy_nft.rs covers nftables).
    let mut spec = CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16");
    spec.policy.dataplane = canal_crds::PolicyDataplane::IPTables;
    install::apply_default_network(&client, spec).await.unwrap();
    create_node(&client, NODE, "10.244.1.0/24", "192.168.93.11").await;
    let node = node_ns(
        &cp,
        dir.path(),
        NODE,
        "192.168.93.11",
        "10.244.1.0/24",
        None,
    );
    let drift = ["--policy-resync-interval=1s"];
    let mut agent = node.start_agent_with(dir.path(), "1", &drift);

    // No NodePolicySet yet: the overlay is up, policy waits and touches nothing.
    wait_until("the overlay programmed", Duration::from_secs(30), || {
        node.run_dir
            .join("network.json")
            .exists()
            .then_some(())
            .ok_or_else(|| agent.log_tail(20))
    });
    let readyz = support::http_get_in(&node.ns, support::cluster::METRICS_PORT, "/readyz");
    let readyz = readyz.unwrap();
    assert!(
        readyz.starts_with("HTTP/1.1 503") && readyz.ends_with("waiting for policy"),
        "not ready before the first policy sync: {readyz}"
    );
    assert_eq!(
        policy_state(&node),
        "",
        "nothing programmed without a NodePolicySet"
    );
    assert!(!node.run_dir.join("policy-enabled").exists());

    // The controller writes PeerSets first, then the NodePolicySet.
    apply_peer_set(&client, "ps-b", peer_set(&["10.244.2.7"])).await;
    apply_peer_set(&client, "ps-unrelated", peer_set(&["10.244.9.9"])).await;
    let g1 = apply_nps(&client, node_policy(&["ps-b"])).await;
    let status = wait_enforced(&client, g1, &agent).await;
    assert_eq!(status.endpoints, Some(2));
    assert!(status.rules.unwrap() > 10, "{status:?}");
    assert_eq!(
        status.sets,
        Some(2),
        "only the referenced PeerSet, and the anti-spoofing set: {status:?}"
    );
    let cond = find(&status.conditions, ENFORCED).unwrap();
    assert_eq!(cond.reason, "Programmed");
    assert_eq!(cond.observed_generation, Some(g1));
    wait_until("agent ready", Duration::from_secs(10), || node.ready());
    let state = policy_state(&node);
    let tw = format!("CANAL-TW-{}", iface("x", "a"));
    for want in [
        "canal policy\" -j CANAL-FORWARD",
        &format!(":{tw}"),
        "10.244.2.7",
    ] {
        assert!(state.contains(want), "kernel lacks {want:?}:\n{state}");
    }
    assert!(
        !state.contains("10.244.9.9"),
        "unreferenced PeerSet programmed:\n{state}"
    );
    assert!(node.run_dir.join("policy-enabled").exists());
    assert_eq!(
        endpoint_file(&node, "x", "a").as_deref().map(str::trim),
        Some(&*g1.to_string())
    );
    assert!(endpoint_file(&node, "x", "b").is_some());

    // A PeerSet member change is applied.
    apply_peer_set(&client, "ps-b", peer_set(&["10.244.2.7", "10.244.3.8"])).await;
    wait_until("new member in the kernel", Duration::from_secs(10), || {
        let s = policy_state(&node);
        s.contains("10.244.3.8").then_some(()).ok_or(s)
    });
    wait_until("realization metric", Duration::from_secs(5), || {
        node.metric("canal_policy_programming_duration_seconds_count{object=\"peer_set\"}")
            .filter(|n| *n >= 1.0)
            .ok_or_else(|| "no peer_set sample yet".to_string())
    });

    // A PeerSet written before the NodePolicySet that starts naming it
    // (the agent dropped it then) is fetched and programmed.
    apply_peer_set(&client, "ps-c", peer_set(&["10.244.4.9"])).await;
    let g2 = apply_nps(&client, node_policy(&["ps-b", "ps-c"])).await;
    let status = wait_enforced(&client, g2, &agent).await;
    assert_eq!(status.sets, Some(3));
    let state = policy_state(&node);
    assert!(state.contains("10.244.4.9"), "{state}");
    assert!(
        node.metric("canal_policy_peer_set_fetches_total{result=\"found\"}") >= Some(1.0),
        "ps-c came through a GET"
    );

    // Restart: the new agent adopts the kernel state: no restore, no flush,
    // no status write; the handshake files stay.
    let before = policy_state(&node);
    let nps_api: Api<NodePolicySet> = Api::all(client.clone());
    let version = nps_api.get(NODE).await.unwrap().metadata.resource_version;
    agent.kill();
    agent = node.start_agent_with(dir.path(), "2", &drift);
    wait_until("restarted agent ready", Duration::from_secs(30), || {
        node.ready()
            .map_err(|e| format!("{e}\n{}", agent.log_tail(20)))
    });
    assert_eq!(
        node.metric("canal_policy_agent_syncs_total{result=\"success\",trigger=\"change\"}"),
        Some(1.0)
    );
    for tool in ["iptables", "ipset"] {
        assert_eq!(
            node.metric(&format!("canal_policy_restores_total{{tool=\"{tool}\"}}")),
            Some(0.0),
            "the restart rewrote {tool}:\n{}",
            agent.log_tail(20)
        );
    }
    assert_eq!(
        node.metric("canal_policy_status_writes_total{result=\"success\"}"),
        Some(0.0),
        "the status was already right"
    );
    assert_eq!(policy_state(&node), before);
    assert_eq!(
        nps_api.get(NODE).await.unwrap().metadata.resource_version,
        version
    );
    assert!(endpoint_file(&node, "x", "a").is_some());

    // Drift: a rule deleted by hand is back within a drift check (1 s here).
    node.ns.sh("iptables", &["-F", &tw]);
    wait_until("drift repaired", Duration::from_secs(10), || {
        same_state(&before, policy_state(&node))
    });
    assert!(node.metric("canal_policy_drift_repairs_total{object=\"chain\"}") >= Some(1.0));
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    wait_until_async(
        "a PolicyDriftRepaired Event",
        Duration::from_secs(10),
        || async {
            let list = events
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("PolicyDriftRepaired")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(NODE)
                })
                .then_some(())
                .ok_or_else(|| format!("{} events, none PolicyDriftRepaired", list.items.len()))
        },
    )
    .await;

    // policy.enabled: false removes every chain, hook, set and handshake
    // file but anti-spoofing's (raw table, hash:net,iface sets).
    set_policy_enabled(&client, false).await;
    wait_until("policy removed", Duration::from_secs(20), || {
        let s = policy_state(&node);
        let antispoof = [canal_agent::policy::antispoof::assigned_set_name(
            canal_agent::policy::model::Family::V4,
        )];
        let left_over = s
            .lines()
            .any(|l| !antispoof.iter().any(|n| l.contains(&format!(" {n} "))));
        (!left_over && !s.is_empty()).then_some(()).ok_or(s)
    });
    assert!(!node.run_dir.join("policy-enabled").exists());
    assert!(endpoint_file(&node, "x", "a").is_none());
    wait_until_async("status says disabled", Duration::from_secs(10), || async {
        let nps = nps_api.get(NODE).await.map_err(|e| e.to_string())?;
        let status = nps.status.unwrap_or_default();
        find(&status.conditions, ENFORCED)
            .filter(|c| c.status == "False" && c.reason == "PolicyDisabled")
            .map(|_| ())
            .ok_or_else(|| format!("{status:?}"))
    })
    .await;
    set_policy_enabled(&client, true).await;
    wait_until("policy restored", Duration::from_secs(20), || {
        same_state(&before, policy_state(&node))
    });
    wait_enforced(&client, g2, &agent).await;
    assert!(node.ready().is_ok());
    if std::env::var_os("CANAL_TEST_SHOW_LOGS").is_some() {
        eprintln!("{}", agent.log_tail(200));
    }
}
