//! Restarts and leader election with the real binary: a controller killed
//! in the middle of a burst of joining Nodes, two replicas sharing a Lease,
//! and a leader that loses its Lease stopping its writes.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use support::*;

const NODE_WRITES: &str = "canal_controller_api_writes_total{resource=\"node\"}";

async fn wait_leader(c: &Controller, want: f64, timeout: Duration) -> Duration {
    let started = Instant::now();
    wait_for(
        &format!("{} to report leader={want}", c.identity),
        timeout,
        || async {
            match c.metric("canal_controller_leader").await {
                Some(v) if v == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    started.elapsed()
}

async fn lease_holder(client: &kube::Client) -> Option<String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    api.get_opt("canal-controller")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test]
async fn a_controller_killed_during_a_burst_of_200_nodes_ends_with_200_distinct_subnets() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.244.0.0/16", 24).await;
    // Leader election on, with a stable identity: a restarted container of
    // the same pod takes its own Lease back at once.
    let mut first = Controller::start_with(&cp, "ctl", &[]);
    wait_leader(&first, 1.0, Duration::from_secs(20)).await;

    let names: Vec<String> = (0..200).map(|i| format!("burst-{i:03}")).collect();
    let started = Instant::now();
    let creator = {
        let client = client.clone();
        let names = names.clone();
        tokio::spawn(async move {
            futures::stream::iter(names.into_iter().enumerate())
                .map(|(i, n)| {
                    let client = client.clone();
                    async move {
                        create_node(
                            &client,
                            &n,
                            &format!("10.1.{}.{}", i / 200, i % 200 + 1),
                            None,
                        )
                        .await;
                    }
                })
                .buffer_unordered(40)
                .collect::<Vec<()>>()
                .await
        })
    };
    // Kill it once it has handed out some subnets, while Nodes keep arriving.
    let allocated_at_kill = wait_for(
        "the first 30 allocations",
        Duration::from_secs(60),
        || async {
            let n = nodes(&client)
                .await
                .values()
                .filter(|n| pod_cidr(n).is_some())
                .count();
            if n >= 30 {
                Ok(n)
            } else {
                Err(format!("{n} allocated"))
            }
        },
    )
    .await;
    first.kill_hard();
    let at_kill = nodes(&client).await.len();
    println!(
        "SIGKILLed the controller with {allocated_at_kill}+ subnets allocated and {at_kill}/200 Nodes created"
    );
    let _second = Controller::start_with(&cp, "ctl", &[]);
    creator.await.unwrap();

    let all = wait_published(&client, &names, Duration::from_secs(120)).await;
    println!(
        "200 Nodes published {:?} after the burst began",
        started.elapsed()
    );
    assert_eq!(all.len(), 200);
    assert_distinct_inside(&all, "10.244.0.0/16");
    let distinct: std::collections::BTreeSet<String> = all.values().filter_map(pod_cidr).collect();
    assert_eq!(distinct.len(), 200);
}

#[tokio::test]
async fn only_the_leader_writes_and_a_standby_takes_over_within_15s_of_a_sigkill() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.244.0.0/16", 24).await;
    let mut a = Controller::start_with(&cp, "replica-a", &[]);
    wait_leader(&a, 1.0, Duration::from_secs(20)).await;
    let b = Controller::start_with(&cp, "replica-b", &[]);
    wait_leader(&b, 0.0, Duration::from_secs(20)).await;
    assert_eq!(lease_holder(&client).await.as_deref(), Some("replica-a"));

    let names: Vec<String> = (0..3).map(|i| format!("n{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        create_node(&client, n, &format!("192.168.90.{}", i + 1), None).await;
    }
    wait_published(&client, &names, Duration::from_secs(30)).await;
    assert!(a.metric(NODE_WRITES).await.unwrap_or(0.0) >= 3.0);
    assert_eq!(
        b.metric(NODE_WRITES).await.unwrap_or(0.0),
        0.0,
        "the standby wrote"
    );
    assert_eq!(b.metric("canal_controller_leader").await, Some(0.0));

    // SIGKILL: the Lease is not released; B must wait for it to expire.
    let killed = Instant::now();
    a.kill_hard();
    create_node(&client, "after-failover", "192.168.90.9", None).await;
    wait_leader(&b, 1.0, Duration::from_secs(20)).await;
    let takeover = killed.elapsed();
    wait_published(&client, &["after-failover".into()], Duration::from_secs(20)).await;
    let served = killed.elapsed();
    println!(
        "standby became leader {takeover:?} after SIGKILL; the new Node was published after {served:?}"
    );
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
    assert_eq!(lease_holder(&client).await.as_deref(), Some("replica-b"));
    assert!(b.metric(NODE_WRITES).await.unwrap_or(0.0) >= 1.0);

    // A graceful stop releases the Lease: the next standby takes over at once.
    let c = Controller::start_with(&cp, "replica-c", &[]);
    wait_leader(&c, 0.0, Duration::from_secs(20)).await;
    let mut b = b;
    let stopped = Instant::now();
    b.stop();
    wait_leader(&c, 1.0, Duration::from_secs(20)).await;
    println!(
        "after SIGTERM of the leader, the standby led within {:?}",
        stopped.elapsed()
    );
    assert!(stopped.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn a_leader_that_loses_its_lease_stops_writing() {
    let _serial = SERIAL.lock().await;
    let cp = cluster().await;
    let client = cp.client();
    apply_network(&cp, "10.244.0.0/16", 24).await;
    let a = Controller::start_with(&cp, "replica-a", &[]);
    wait_leader(&a, 1.0, Duration::from_secs(20)).await;
    create_node(&client, "before", "192.168.91.1", None).await;
    wait_published(&client, &["before".into()], Duration::from_secs(20)).await;

    // Someone else takes the Lease (as after a partition healed too late).
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let mut lease = api.get("canal-controller").await.unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("intruder".into());
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    spec.lease_duration_seconds = Some(10);
    lease.metadata.managed_fields = None;
    api.replace("canal-controller", &PostParams::default(), &lease)
        .await
        .unwrap();
    let lost = wait_leader(&a, 0.0, Duration::from_secs(10)).await;
    println!("the leader noticed the lost Lease within {lost:?}");
    assert!(lost < Duration::from_secs(5));

    // While the intruder's Lease is valid, nothing is allocated.
    create_node(&client, "meanwhile", "192.168.91.2", None).await;
    let writes_when_lost = a.metric(NODE_WRITES).await.unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Observe the effects first, then the leader state: a subnet or a
        // write seen while the replica still reports "not leader" afterwards
        // was made without the Lease.
        let node = nodes(&client).await.remove("meanwhile").unwrap();
        let writes = a.metric(NODE_WRITES).await.unwrap_or(0.0);
        if a.metric("canal_controller_leader").await == Some(1.0) {
            break;
        }
        assert!(pod_cidr(&node).is_none(), "a follower allocated a subnet");
        assert_eq!(writes, writes_when_lost, "a follower wrote a Node");
        assert!(Instant::now() < deadline, "never took the Lease back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The intruder never renews: its Lease expires and A leads again.
    wait_published(&client, &["meanwhile".into()], Duration::from_secs(20)).await;
    assert_eq!(lease_holder(&client).await.as_deref(), Some("replica-a"));
}
