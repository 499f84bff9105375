//! `kubectl canal explain` against the conformance truth tables (issue 15):
//! one snapshot of the objects after probing, every probed cell explained
//! in-process through the plugin's library, each verdict compared with what
//! the packets did.

use std::collections::BTreeMap;

use canal_e2e::lab::{Matrix, PodRecord, Protocol};
use kubectl_canal::target::{Dest, PortSpec, Target};
use kubectl_canal::{Snapshot, explain::Explainer, format};

/// The cells where explain's verdict differs from the probe's (or explain
/// failed), as a report; empty when every cell agrees. Each cell is
/// explained towards the address the probe used (`PodRecord::ipv4`, as
/// `probe_all`), so a per-family table explains that family.
pub async fn mismatches(
    client: &kube::Client,
    pods: &[PodRecord],
    observed: &BTreeMap<(u16, Protocol), Matrix>,
) -> String {
    let keys: Vec<String> = pods.iter().map(PodRecord::key).collect();
    let addr: BTreeMap<String, std::net::IpAddr> = pods
        .iter()
        .filter_map(|p| Some((p.key(), std::net::IpAddr::V4(p.ipv4()?))))
        .collect();
    let snap = match Snapshot::fetch(client).await {
        Ok(s) => s,
        Err(e) => return format!("--- explain: reading the objects: {e}\n"),
    };
    let mut explainer = match Explainer::new(&snap) {
        Ok(x) => x,
        Err(e) => return format!("--- explain: {e}\n"),
    };
    let mut out = String::new();
    let mut shown = 0;
    for (&(port, proto), table) in observed {
        let protocol = match proto {
            Protocol::Tcp => canal_crds::Protocol::TCP,
            Protocol::Udp => canal_crds::Protocol::UDP,
            Protocol::Sctp => canal_crds::Protocol::SCTP,
        };
        for from in &keys {
            for to in &keys {
                let Some(probed) = table.get(from, to) else {
                    continue;
                };
                let target = Target {
                    dest: addr
                        .get(to)
                        .map_or(Dest::Pod(to.clone()), |ip| Dest::Ip(*ip)),
                    port: Some(PortSpec::Number(port)),
                    protocol,
                };
                let line = match explainer.explain(from, &target) {
                    Ok(e) if e.allowed == probed => continue,
                    Ok(e) => format!(
                        "probe {}, explain says:\n{}",
                        if probed { "connected" } else { "blocked" },
                        format::explanation(&e)
                    ),
                    Err(e) => format!("explain failed: {e}"),
                };
                shown += 1;
                if shown <= 10 {
                    out.push_str(&format!("--- explain {from} {to}:{port}/{proto}: {line}\n"));
                }
            }
        }
    }
    if shown > 10 {
        out.push_str(&format!("--- explain: {} more cells differ\n", shown - 10));
    }
    out
}
