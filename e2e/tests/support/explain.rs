//! `kubectl canal explain` against the conformance truth tables (issue 15):
//! one snapshot of the objects after probing, every probed cell explained
//! in-process through the plugin's library, each verdict compared with what
//! the packets did, in every family the lab probed.

use std::collections::BTreeMap;

use canal_e2e::lab::{Matrix, PodRecord, Protocol};

use super::policy::Table;
use kubectl_canal::target::{Dest, PortSpec, Target};
use kubectl_canal::{Snapshot, explain::Explainer, format};

/// The cells where explain's verdict differs from the probe's (or explain
/// failed), as a report; empty when every cell agrees. Each cell is
/// explained towards the address the probe used (the destination pod's
/// address of the table's family, as `probe_all`).
pub async fn mismatches(
    client: &kube::Client,
    pods: &[PodRecord],
    observed: &BTreeMap<Table, Matrix>,
) -> String {
    let keys: Vec<String> = pods.iter().map(PodRecord::key).collect();
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
    for (&(family, port, proto), table) in observed {
        let addr: BTreeMap<String, std::net::IpAddr> = pods
            .iter()
            .filter_map(|p| Some((p.key(), p.ip(family)?)))
            .collect();
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
                    out.push_str(&format!(
                        "--- explain {family} {from} {to}:{port}/{proto}: {line}\n"
                    ));
                }
            }
        }
    }
    if shown > 10 {
        out.push_str(&format!("--- explain: {} more cells differ\n", shown - 10));
    }
    out
}
