//! End-to-end scale figure: a real kube-apiserver, the real controller
//! binary, 1,000 Nodes registered at once. Prints the time until every Node
//! has a podCIDR and its flannel annotations, and the controller's memory.
//!
//! `cargo bench -p canal-controller --bench scale` (NODES=N to change the count)

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use support::*;

fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_else(|| "?".into())
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let count: usize = std::env::var("NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.0.0.0/12", 24).await;
    let controller = Controller::start(&cp, "bench");
    wait_for(
        "the controller's metrics",
        Duration::from_secs(20),
        || async {
            controller
                .metric("canal_controller_leader")
                .await
                .ok_or_else(|| "no metrics yet".to_string())
        },
    )
    .await;
    let pid = controller.pid().expect("controller pid");
    println!(
        "controller idle: VmRSS {}, VmHWM {}",
        proc_status(pid, "VmRSS:"),
        proc_status(pid, "VmHWM:")
    );

    let names: Vec<String> = (0..count).map(|i| format!("node-{i:05}")).collect();
    let started = Instant::now();
    let creator = {
        let client = client.clone();
        let names = names.clone();
        tokio::spawn(async move {
            futures::stream::iter(names.into_iter().enumerate())
                .map(|(i, n)| {
                    let client = client.clone();
                    async move {
                        let ip = format!("10.100.{}.{}", i / 250, i % 250 + 1);
                        create_node(&client, &n, &ip, None).await;
                    }
                })
                .buffer_unordered(50)
                .collect::<Vec<()>>()
                .await;
            started.elapsed()
        })
    };
    let all = wait_for(
        &format!("{count} Nodes published"),
        Duration::from_secs(600),
        || async {
            let all = nodes(&client).await;
            let done = names
                .iter()
                .filter(|n| all.get(*n).is_some_and(is_published))
                .count();
            if done == count {
                Ok(all)
            } else {
                Err(format!("{done}/{count} published"))
            }
        },
    )
    .await;
    let published = started.elapsed();
    let created = creator.await.expect("creator task");
    assert_distinct_inside(&all, "10.0.0.0/12");

    let writes = controller
        .metric("canal_controller_api_writes_total{resource=\"node\"}")
        .await;
    let plan_sum = controller
        .metric("canal_controller_plan_duration_seconds_sum")
        .await;
    let plan_count = controller
        .metric("canal_controller_plan_duration_seconds_count")
        .await;
    println!(
        "{count} Nodes: all created after {created:.2?}, all with podCIDR + annotations after {published:.2?}"
    );
    println!(
        "node writes: {writes:?}; planning passes: {plan_count:?} taking {plan_sum:?} s in total"
    );
    println!(
        "controller after: VmRSS {}, VmHWM {}",
        proc_status(pid, "VmRSS:"),
        proc_status(pid, "VmHWM:")
    );

    // A restart relists everything and writes nothing.
    drop(controller);
    let restarted_at = Instant::now();
    let restarted = Controller::start(&cp, "bench-restart");
    wait_for(
        "the restarted controller to know every Node",
        Duration::from_secs(120),
        || async {
            match restarted.metric("canal_controller_nodes").await {
                Some(n) if n as usize == count => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    create_node(&client, "after-restart", "10.101.0.1", None).await;
    wait_published(&client, &["after-restart".into()], Duration::from_secs(60)).await;
    let rpid = restarted.pid().expect("pid");
    println!(
        "restart with {count} Nodes: serving a new Node {:.2?} after start; node writes {:?}; VmRSS {}, VmHWM {}",
        restarted_at.elapsed(),
        restarted
            .metric("canal_controller_api_writes_total{resource=\"node\"}")
            .await,
        proc_status(rpid, "VmRSS:"),
        proc_status(rpid, "VmHWM:")
    );
}
