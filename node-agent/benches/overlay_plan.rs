//! Desired state + diff of the overlay at 1,000 and 5,000 peers: the CPU
//! cost of one sync besides the kernel dump and the netlink writes.
//! `cargo bench -p canal-agent --bench overlay_plan`

use std::net::Ipv4Addr;

use canal_agent::overlay::desired::{self, Desired, LocalNode, OverlayConfig, Peer};
use canal_agent::overlay::diff;
use canal_agent::overlay::model::{
    Dev, Mac, Observed, ObservedFdb, ObservedLink, ObservedNeighbour, ObservedRoute, Underlay,
    VxlanAttrs,
};
use canal_crds::CanalNetworkSpec;
use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use ipnet::Ipv4Net;

fn config() -> OverlayConfig {
    let mut spec = CanalNetworkSpec::with_cluster_cidr("10.0.0.0/8");
    spec.node_subnet_length = 24;
    OverlayConfig::new(&spec.validate().unwrap(), "10.0.0.0/8".parse().unwrap())
}

fn underlay() -> Underlay {
    Underlay {
        index: 2,
        name: "eth0".into(),
        ip: Ipv4Addr::new(172, 16, 0, 1).into(),
        mtu: 1500,
        connected: vec!["172.16.0.0/16".parse().unwrap()],
    }
}

fn local() -> LocalNode {
    LocalNode {
        name: "node-00000".into(),
        subnet: "10.0.0.0/24".parse().unwrap(),
        vtep_mac: Mac(canal_crds::annotations::vtep_mac("node-00000")),
    }
}

fn peers(n: u32) -> Vec<Peer> {
    (1..=n)
        .map(|i| {
            let name = format!("node-{i:05}");
            Peer {
                subnet: Ipv4Net::new(Ipv4Addr::from((10 << 24) | (i << 8)), 24)
                    .unwrap()
                    .into(),
                public_ip: Ipv4Addr::from((172 << 24) | (17 << 16) | i).into(),
                vtep_mac: Mac(canal_crds::annotations::vtep_mac(&name)),
                name,
            }
        })
        .collect()
}

/// What the kernel dump looks like once `d` is programmed.
fn observed(d: &Desired) -> Observed {
    let dev = d.device.as_ref().unwrap();
    Observed {
        device: Some(ObservedLink {
            index: 10,
            name: dev.name.clone(),
            vxlan: Some(VxlanAttrs {
                vni: dev.vni,
                port: dev.port,
                local: Some(dev.local),
                underlay_index: Some(dev.underlay_index),
                learning: false,
            }),
            mac: Some(dev.mac),
            mtu: dev.mtu,
            up: true,
        }),
        stale_devices: vec![],
        addresses: vec![diff::host_net(dev.address)],
        routes: d
            .routes
            .values()
            .map(|r| ObservedRoute {
                route: *r,
                priority: 0,
            })
            .collect(),
        neighbours: d
            .neighbours
            .iter()
            .map(|(ip, mac)| ObservedNeighbour {
                ip: *ip,
                mac: Some(*mac),
                permanent: true,
            })
            .collect(),
        fdb: d
            .fdb
            .iter()
            .map(|(mac, dst)| ObservedFdb {
                mac: *mac,
                dst: Some(*dst),
                permanent: true,
            })
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let cfg = config();
    let (local, underlay) = (local(), underlay());
    let mut group = c.benchmark_group("overlay");
    for n in [1_000u32, 5_000] {
        let peers = peers(n);
        let d = desired::compute(&local, &peers, &cfg, &underlay).unwrap();
        assert_eq!(d.vxlan_peers, n as usize);
        assert!(d.routes.values().all(|r| r.dev == Dev::Overlay));
        let converged = observed(&d);
        // One peer gone and one route deleted by hand: a typical resync.
        let mut drifted = converged.clone();
        drifted.routes.remove(n as usize / 2);

        group.bench_with_input(BenchmarkId::new("desired", n), &peers, |b, peers| {
            b.iter(|| desired::compute(&local, black_box(peers), &cfg, &underlay).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("desired+diff/converged", n),
            &converged,
            |b, observed| {
                b.iter(|| {
                    let d = desired::compute(&local, black_box(&peers), &cfg, &underlay).unwrap();
                    let plan = diff::plan(&d, black_box(observed));
                    assert!(plan.is_empty());
                    plan
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("desired+diff/one-route-drift", n),
            &drifted,
            |b, observed| {
                b.iter(|| {
                    let d = desired::compute(&local, black_box(&peers), &cfg, &underlay).unwrap();
                    let plan = diff::plan(&d, black_box(observed));
                    assert_eq!(plan.len(), 1);
                    plan
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("desired+diff/empty-kernel", n),
            &Observed::default(),
            |b, observed| {
                b.iter(|| {
                    let d = desired::compute(&local, black_box(&peers), &cfg, &underlay).unwrap();
                    diff::plan(&d, black_box(observed))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
