//! Errors that only a log used to show (issue 10, item 5), in the lab with
//! the real canal-controller, canal-agents and kernel: a `backend.mtu` the
//! kernel refuses and an `interface` that exists on no node each reach the
//! user where they look, every agent's /readyz (with the reason), an Event
//! on each Node (once, not every resync), the Node condition
//! CanalNetworkProgrammed=False, and the CanalNetwork Degraded
//! (NodesNotProgrammed, "0 of N nodes programmed", also in `kubectl get`),
//! while pods keep talking and a node added meanwhile still gets routes on
//! every other node. Undoing the change makes everything programmed again.

mod support;

use std::time::{Duration, Instant};

use canal_crds::condition::{DEGRADED, NODE_PROGRAMMED, READY, find, is_true};
use canal_crds::{CanalNetwork, CanalNetworkStatus, DEFAULT_NETWORK_NAME};
use canal_e2e::Lab;
use canal_e2e::lab::{PodOptions, Protocol, UpOptions, names, nodes};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use support::{eventually, serial};

const WAIT: Duration = Duration::from_secs(40);

fn readyz(lab: &Lab, node: &str) -> Result<String, String> {
    let record = lab.node(node).map_err(|e| e.to_string())?;
    nodes::http_get(Some(&record.netns), names::AGENT_METRICS_PORT, "/readyz")
        .map_err(|e| e.to_string())
}

fn metric(lab: &Lab, node: &str, series: &str) -> f64 {
    lab.agent_metrics(node)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn patch_network(lab: &Lab, patch: serde_json::Value) {
    Api::<CanalNetwork>::all(lab.client())
        .patch(
            DEFAULT_NETWORK_NAME,
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .unwrap();
}

async fn network(lab: &Lab) -> CanalNetworkStatus {
    Api::<CanalNetwork>::all(lab.client())
        .get(DEFAULT_NETWORK_NAME)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

/// (status, reason, message) of the Node's CanalNetworkProgrammed condition.
async fn condition(lab: &Lab, node: &str) -> Option<(String, String, String)> {
    let n = Api::<Node>::all(lab.client()).get(node).await.ok()?;
    n.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == NODE_PROGRAMMED)
        .map(|c| {
            (
                c.status,
                c.reason.unwrap_or_default(),
                c.message.unwrap_or_default(),
            )
        })
}

async fn events(lab: &Lab, node: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(lab.client(), "default")
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node)
        })
        .collect()
}

/// Exactly one Event, published once (a republished one gets a series).
async fn assert_one_event(lab: &Lab, node: &str, reason: &str) {
    let found = events(lab, node, reason).await;
    assert_eq!(found.len(), 1, "{reason} about {node}: {found:#?}");
    assert!(
        found[0].series.is_none(),
        "{reason} about {node} was published again: {:?}",
        found[0].series
    );
}

async fn pod_cidr(lab: &Lab, node: &str) -> Option<Ipv4Net> {
    Api::<Node>::all(lab.client())
        .get(node)
        .await
        .ok()?
        .spec?
        .pod_cidr?
        .parse()
        .ok()
}

/// Every agent of `nodes` reports the fault: /readyz 503 naming it, the
/// condition False with `reason`, one Event; and the CanalNetwork Degraded.
async fn assert_reported(lab: &Lab, node_names: &[String], reason: &str, needle: &str) {
    for node in node_names {
        eventually(
            &format!("{node}'s /readyz failing with {needle:?}"),
            WAIT,
            || async {
                let r = readyz(lab, node)?;
                if r.contains(" 503 ") && r.contains(needle) {
                    Ok(())
                } else {
                    Err(r)
                }
            },
        )
        .await;
        let message = eventually(
            &format!("{node}: {NODE_PROGRAMMED}=False ({reason})"),
            WAIT,
            || async {
                match condition(lab, node).await {
                    Some((s, r, m)) if s == "False" && r == reason => Ok(m),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        assert!(message.contains(needle), "{message}");
        eventually(&format!("an Event {reason} about {node}"), WAIT, || async {
            if events(lab, node, reason).await.is_empty() {
                Err("none yet".to_string())
            } else {
                Ok(())
            }
        })
        .await;
        assert_one_event(lab, node, reason).await;
    }
    let total = node_names.len();
    let message = eventually(
        &format!("CanalNetwork Degraded with 0 of {total} nodes programmed"),
        WAIT,
        || async {
            let s = network(lab).await;
            let degraded = find(&s.conditions, DEGRADED).cloned();
            match degraded {
                Some(d)
                    if d.status == "True"
                        && d.reason == "NodesNotProgrammed"
                        && d.message
                            .starts_with(&format!("0 of {total} nodes programmed"))
                        && !is_true(&s.conditions, READY) =>
                {
                    Ok(d.message)
                }
                other => Err(format!("{other:?} programmed {:?}", s.programmed)),
            }
        },
    )
    .await;
    assert!(message.contains(&format!("({reason}: ")), "{message}");
    assert_eq!(
        network(lab).await.programmed,
        Some(format!("0/{total} nodes"))
    );
}

/// Everything is programmed again: conditions True, /readyz ok, Ready.
async fn assert_programmed(lab: &Lab, node_names: &[String]) {
    for node in node_names {
        eventually(&format!("{node} programmed again"), WAIT, || async {
            match condition(lab, node).await {
                Some((s, r, _)) if s == "True" && r == "Programmed" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let r = readyz(lab, node).unwrap();
        assert!(r.contains(" 200 "), "{node}: {r}");
    }
    let total = node_names.len();
    eventually(
        "CanalNetwork Ready, every node programmed",
        WAIT,
        || async {
            let s = network(lab).await;
            if is_true(&s.conditions, READY)
                && s.programmed == Some(format!("{total}/{total} nodes"))
            {
                Ok(())
            } else {
                Err(format!("{:?} {:#?}", s.programmed, s.conditions))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_refused_mtu_or_a_missing_interface_reaches_the_user_and_stops_nothing_else() {
    let _serial = serial().await;
    let started = Instant::now();
    let lab = Lab::up(
        Lab::test_state_dir("errors"),
        UpOptions {
            nodes: 3,
            ..UpOptions::default()
        },
    )
    .await
    .expect("lab comes up");
    lab.add_pods(vec![
        PodOptions::new("x", "a", "node-1"),
        PodOptions::new("x", "b", "node-2"),
    ])
    .await
    .unwrap();
    let mut node_names: Vec<String> = lab.nodes().unwrap().into_iter().map(|n| n.name).collect();
    node_names.sort();

    let faults = [
        (
            "backend.mtu 65535",
            json!({"spec": {"backend": {"mtu": 65535}}}),
            json!({"spec": {"backend": {"mtu": 0}}}),
            "MTURejected",
            "65535",
            "node-4",
        ),
        (
            "interface nosuch0",
            json!({"spec": {"interface": "nosuch0"}}),
            json!({"spec": {"interface": null}}),
            "UnderlayUnavailable",
            "nosuch0",
            "node-5",
        ),
    ];
    for (i, (what, fault, undo, reason, needle, new_node)) in faults.into_iter().enumerate() {
        let t = Instant::now();
        patch_network(&lab, fault).await;
        assert_reported(&lab, &node_names, reason, needle).await;
        eprintln!(
            "{what}: reported on every node and the CanalNetwork in {} ms",
            t.elapsed().as_millis()
        );
        let out = lab
            .kubectl()
            .unwrap()
            .args(["get", "canalnetwork", DEFAULT_NETWORK_NAME])
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("PROGRAMMED")
                && table.contains(&format!("0/{} nodes", node_names.len())),
            "kubectl get canalnetwork:\n{table}"
        );
        // Pods keep talking across nodes.
        let probe = lab.probe("x/a", "x/b", 80, Protocol::Tcp).await.unwrap();
        assert!(
            probe.connected,
            "x/a -> x/b during {what}: {}",
            probe.detail
        );

        if i == 0 {
            // Two periodic resyncs later, still one Event per node.
            let series = "canal_syncs_total{result=\"error\",trigger=\"resync\"}";
            let before = metric(&lab, "node-1", series);
            eventually("two more failing resyncs on node-1", WAIT, || async {
                let now = metric(&lab, "node-1", series);
                if now >= before + 2.0 {
                    Ok(())
                } else {
                    Err(format!("{now} (was {before})"))
                }
            })
            .await;
            for node in &node_names {
                assert_one_event(&lab, node, reason).await;
            }
        }

        // A node added meanwhile gets routes on every other node; the lab
        // waits for it to be fully programmed, which only happens once the
        // fault is undone below.
        let others = node_names.clone();
        let checks = async {
            let cidr = eventually(&format!("{new_node}'s podCIDR"), WAIT, || async {
                pod_cidr(&lab, new_node).await.ok_or("none yet".to_string())
            })
            .await;
            for other in &others {
                eventually(&format!("{other}'s route to {new_node}"), WAIT, || async {
                    let snap = lab.kernel(other).map_err(|e| e.to_string())?;
                    snap.route_to(cidr)
                        .map(drop)
                        .ok_or(format!("no route to {cidr}"))
                })
                .await;
            }
            let mut all = others.clone();
            all.push(new_node.to_string());
            eventually(
                &format!("{new_node} reported not programmed too"),
                WAIT,
                || async {
                    let s = network(&lab).await;
                    let d = find(&s.conditions, DEGRADED).map(|d| d.message.clone());
                    match d {
                        Some(m)
                            if m.starts_with(&format!("0 of {} nodes programmed", all.len())) =>
                        {
                            Ok(())
                        }
                        other => Err(format!("{other:?}")),
                    }
                },
            )
            .await;
            eprintln!("{what}: {new_node} routed from every other node; undoing the fault");
            patch_network(&lab, undo).await;
        };
        let (added, ()) = tokio::join!(lab.add_node(new_node), checks);
        added.unwrap_or_else(|e| panic!("{new_node} is programmed once {what} is undone: {e}"));
        node_names.push(new_node.to_string());
        assert_programmed(&lab, &node_names).await;
        assert!(
            !events(&lab, "node-1", "NetworkProgrammed").await.is_empty(),
            "a Normal Event when programmed again"
        );
        eprintln!("{what}: whole round {} ms", t.elapsed().as_millis());
    }
    let probe = lab.probe("x/a", "x/b", 80, Protocol::Tcp).await.unwrap();
    assert!(probe.connected, "{}", probe.detail);
    eprintln!("test took {:.1}s", started.elapsed().as_secs_f64());
}
