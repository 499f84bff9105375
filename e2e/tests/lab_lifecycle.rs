//! `canal-lab up` and `down` through the CLI: what `up` builds (underlay,
//! internet host, node namespaces, Node objects, the API forwarder), and that
//! `down` leaves nothing behind, also after `up` was killed halfway and after
//! the state directory was deleted by hand.

mod support;

use std::time::{Duration, Instant};

use canal_e2e::Lab;
use canal_e2e::lab::names::INTERNET_HOST;
use canal_e2e::lab::{Protocol, StateDir, netns, probe};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use support::{canal_lab, canal_lab_ok, leftovers, root_links};

const NO_COMPONENTS: [&str; 2] = ["--no-agents", "--no-controller"];

fn fresh(name: &str) -> StateDir {
    let state = StateDir::new(Lab::test_state_dir(name));
    canal_e2e::lab::down(&state);
    state
}

#[tokio::test]
async fn up_builds_the_network_and_down_leaves_nothing_behind() {
    let state = fresh("lifecycle");
    let links_before = root_links();
    let mut args = vec!["up", "--nodes", "2"];
    args.extend(NO_COMPONENTS);
    canal_lab_ok(&state.dir, &args);
    let names = state.names();

    let again = canal_lab(&state.dir, &["up"]);
    assert!(!again.status.success(), "a second up must refuse");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    for ns in [
        names.underlay_netns(),
        names.internet_netns(),
        names.node_netns("node-1"),
        names.node_netns("node-2"),
    ] {
        assert!(netns::exists(&ns), "namespace {ns} missing");
    }
    assert_eq!(
        root_links(),
        links_before,
        "the root namespace's links must not change"
    );

    // Node objects as a kubelet registers them.
    let client = canal_e2e::control_plane::client_from_kubeconfig(&state.kubeconfig())
        .await
        .unwrap();
    let api: Api<Node> = Api::all(client);
    for record in state.nodes().unwrap() {
        let node = api.get(&record.name).await.unwrap();
        let status = node.status.unwrap();
        let internal: Vec<String> = status
            .addresses
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .collect();
        assert_eq!(internal, [record.address.to_string()], "{}", record.name);
        assert!(
            status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            "{} is not Ready",
            record.name
        );
        assert!(names.underlay().contains(&record.address));
    }

    // A node reaches the internet host through its default route, and the
    // host answers from the address that was asked (TCP and UDP).
    let node1 = state.load_node("node-1").unwrap();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let outcome = probe::probe_in(
            &node1.netns,
            (INTERNET_HOST, 80).into(),
            protocol,
            Duration::from_secs(2),
        )
        .unwrap();
        assert!(
            outcome.connected,
            "node-1 -> internet {protocol}: {outcome:?}"
        );
        assert_eq!(
            outcome.seen_source.unwrap().ip(),
            node1.address,
            "the internet host sees the node's underlay address"
        );
    }

    // The API server answers inside a node namespace through the forwarder,
    // with the node's own kubeconfig (what the agent uses).
    let kubectl = canal_e2e::binaries::Binaries::ensure().unwrap().kubectl;
    let out = netns::exec(&node1.netns, &kubectl)
        .arg("--kubeconfig")
        .arg(state.node("node-1").kubeconfig())
        .args(["get", "nodes", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl inside node-1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "node/node-1\nnode/node-2\n"
    );

    let status = canal_lab_ok(&state.dir, &["status"]);
    assert!(status.contains("API forwarder"), "{status}");
    assert!(!status.contains("FAIL"), "{status}");

    canal_lab_ok(&state.dir, &["down"]);
    assert_eq!(leftovers(&state), Vec::<String>::new());
    assert_eq!(root_links(), links_before);
    assert!(!canal_lab(&state.dir, &["status"]).status.success());
}

#[tokio::test]
async fn down_cleans_up_after_up_was_killed_halfway() {
    let state = fresh("crash");
    let names = state.names();
    let mut up = std::process::Command::new(env!("CARGO_BIN_EXE_canal-lab"))
        .arg("--state-dir")
        .arg(&state.dir)
        .args(["up", "--nodes", "3"])
        .args(NO_COMPONENTS)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has made node namespaces (the control plane runs by then).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !netns::exists(&names.node_netns("node-2")) {
        assert!(
            Instant::now() < deadline,
            "up never got to the nodes; state: {:?}",
            leftovers(&state)
        );
        assert!(up.try_wait().unwrap().is_none(), "up ended on its own");
        std::thread::sleep(Duration::from_millis(10));
    }
    up.kill().unwrap();
    up.wait().unwrap();
    assert!(
        !leftovers(&state).is_empty(),
        "the killed up should have left something to clean"
    );

    let refused = canal_lab(&state.dir, &["up"]);
    assert!(
        !refused.status.success(),
        "up must refuse over a crashed lab"
    );

    canal_lab_ok(&state.dir, &["down"]);
    assert_eq!(leftovers(&state), Vec::<String>::new());
    let twice = canal_lab_ok(&state.dir, &["down"]);
    assert!(twice.contains("nothing to remove"), "{twice}");
}

#[tokio::test]
async fn down_finds_leftovers_when_the_state_dir_is_gone() {
    let state = fresh("no-state");
    let mut args = vec!["up", "--nodes", "1"];
    args.extend(NO_COMPONENTS);
    canal_lab_ok(&state.dir, &args);
    std::fs::remove_dir_all(&state.dir).unwrap();
    assert!(
        leftovers(&state).iter().any(|l| l.starts_with("process")),
        "processes should still run"
    );
    canal_lab_ok(&state.dir, &["down"]);
    assert_eq!(leftovers(&state), Vec::<String>::new());
}
