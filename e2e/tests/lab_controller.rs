//! Issue 3's lab: `canal-lab up --nodes 3` registers three Nodes and runs
//! canal-controller; kubectl shows distinct podCIDRs and a Ready network.

mod support;

use std::collections::BTreeSet;

use canal_e2e::Lab;
use canal_e2e::lab::StateDir;
use support::canal_lab_ok;

#[tokio::test]
async fn up_registers_nodes_and_the_controller_allocates_their_subnets() {
    let state = StateDir::new(Lab::test_state_dir("controller"));
    canal_e2e::lab::down(&state);
    // Agents are not needed for this part; the controller is.
    canal_lab_ok(&state.dir, &["up", "--nodes", "3", "--no-agents"]);

    let wide = canal_lab_ok(&state.dir, &["kubectl", "--", "get", "nodes", "-o", "wide"]);
    for record in state.nodes().unwrap() {
        assert!(
            wide.lines()
                .any(|l| l.starts_with(&record.name) && l.contains(&record.address.to_string())),
            "{} with InternalIP {} in:\n{wide}",
            record.name,
            record.address
        );
    }
    let cidrs = canal_lab_ok(
        &state.dir,
        &[
            "kubectl",
            "--",
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.spec.podCIDR}{\"\\n\"}{end}",
        ],
    );
    let distinct: BTreeSet<&str> = cidrs.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(distinct.len(), 3, "three distinct podCIDRs:\n{cidrs}");
    let cluster: ipnet::Ipv4Net = canal_e2e::lab::LAB_CLUSTER_CIDR.parse().unwrap();
    for cidr in &distinct {
        let net: ipnet::Ipv4Net = cidr.parse().unwrap();
        assert!(cluster.contains(&net), "{net} inside {cluster}");
    }

    let ready = canal_lab_ok(
        &state.dir,
        &[
            "kubectl",
            "--",
            "get",
            "canalnetwork",
            "default",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
    );
    assert_eq!(ready, "True");
    let table = canal_lab_ok(&state.dir, &["kubectl", "--", "get", "canalnetwork"]);
    assert!(table.contains("default"), "{table}");

    canal_lab_ok(&state.dir, &["down"]);
    assert_eq!(support::leftovers(&state), Vec::<String>::new());
}
