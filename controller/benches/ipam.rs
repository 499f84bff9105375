//! Allocator and planning cost at 5,000 Nodes (the Kubernetes scale limit).
//!
//! `cargo bench -p canal-controller --bench ipam`

use std::collections::HashSet;
use std::hint::black_box;

use canal_controller::ipam::Allocator;
use canal_controller::network::state::{NetworkObject, State};
use canal_controller::node_view::NodeView;
use canal_crds::{CanalNetworkSpec, CanalNetworkStatus};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

const NODES: usize = 5_000;

fn cluster() -> IpNet {
    "10.0.0.0/8".parse().unwrap()
}

/// 5,000 holdings with churn behind them: every other Node replaced once.
fn fragmented() -> Allocator {
    let mut a = Allocator::new(cluster(), 24).unwrap();
    for i in 0..NODES {
        a.allocate(&format!("n{i}")).unwrap();
    }
    for i in (0..NODES).step_by(2) {
        a.release(&format!("n{i}"));
        a.allocate(&format!("r{i}")).unwrap();
    }
    a
}

fn allocator(c: &mut Criterion) {
    let names: Vec<String> = (0..NODES).map(|i| format!("n{i}")).collect();
    c.bench_function("allocate 5000 nodes into an empty /8 of /24s", |b| {
        b.iter_batched(
            || Allocator::new(cluster(), 24).unwrap(),
            |mut a| {
                for n in &names {
                    black_box(a.allocate(n).unwrap());
                }
                a
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("free + allocate one node at 5000 held (fragmented)", |b| {
        let mut a = fragmented();
        let mut i = 0usize;
        b.iter(|| {
            let victim = format!("r{}", (i % (NODES / 2)) * 2);
            let subnet = a.release(&victim);
            black_box(a.allocate(&victim).unwrap());
            black_box(subnet);
            i += 1;
        })
    });
    let held: Vec<(String, IpNet)> = fragmented()
        .holdings()
        .map(|(o, s)| (o.to_string(), s))
        .collect();
    c.bench_function("rebuild: claim 5000 existing podCIDRs", |b| {
        b.iter(|| {
            let mut a = Allocator::new(cluster(), 24).unwrap();
            for (o, s) in &held {
                a.claim(o, *s).unwrap();
            }
            a
        })
    });
}

fn node(i: usize) -> NodeView {
    NodeView {
        name: format!("node-{i:05}"),
        uid: Some(format!("uid-{i}")),
        created: Some(Timestamp::from_second(i as i64).unwrap()),
        internal_ip: Some(std::net::Ipv4Addr::from(0xc0a8_0000 + i as u32)),
        ..Default::default()
    }
}

fn network() -> NetworkObject {
    NetworkObject {
        name: "default".into(),
        uid: None,
        generation: Some(1),
        spec: Ok(CanalNetworkSpec::with_cluster_cidr("10.0.0.0/8")),
        status: Some(CanalNetworkStatus::default()),
    }
}

/// A state where all 5,000 Nodes are allocated and annotated.
fn settled() -> State {
    let mut s = State::new();
    s.reset_nodes((0..NODES).map(node).collect());
    s.reset_networks(vec![network()]);
    let plan = s.plan(now(), usize::MAX, &HashSet::new());
    for w in plan.node_writes {
        let mut v = s.node(&w.apply.name).unwrap().clone();
        v.pod_cidr = Some(w.apply.pod_cidr);
        v.pod_cidrs = w.apply.pod_cidrs;
        v.annotations = w.apply.annotations;
        s.apply_node(v);
    }
    s.plan(now(), usize::MAX, &HashSet::new());
    s
}

fn now() -> Time {
    Time(Timestamp::from_second(1_000_000).unwrap())
}

fn planning(c: &mut Criterion) {
    c.bench_function("plan: first allocation of 5000 nodes", |b| {
        b.iter_batched(
            || {
                let mut s = State::new();
                s.reset_nodes((0..NODES).map(node).collect());
                s.reset_networks(vec![network()]);
                s
            },
            |mut s| black_box(s.plan(now(), usize::MAX, &HashSet::new()).node_writes.len()),
            BatchSize::LargeInput,
        )
    });
    let mut s = settled();
    c.bench_function("plan: full resync of 5000 settled nodes (no writes)", |b| {
        b.iter(|| {
            s.mark_all_dirty();
            let p = s.plan(now(), usize::MAX, &HashSet::new());
            assert!(p.node_writes.is_empty());
        })
    });
    let mut s = settled();
    let mut i = 0usize;
    c.bench_function("plan: one Node update at 5000 nodes", |b| {
        b.iter(|| {
            let mut v = s.node(&format!("node-{:05}", i % NODES)).unwrap().clone();
            v.resource_version = Some(i.to_string());
            s.apply_node(v);
            black_box(s.plan(now(), usize::MAX, &HashSet::new()));
            i += 1;
        })
    });
}

criterion_group!(benches, allocator, planning);
criterion_main!(benches);
