//! What the network state reports: the assessment behind the CanalNetwork
//! status, the status writes, and the texts Events and conditions use.

use canal_crds::{CanalNetworkStatus, NetworkConfig};
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;

impl State {
    pub(super) fn assessment(&self, generation: Option<i64>) -> Assessment {
        let families: Vec<ActivePlan> = self
            .allocs
            .iter()
            .map(|a| ActivePlan {
                cluster_cidr: a.cluster(),
                node_subnet_length: a.subnet_len(),
                total: a.total(),
                allocated: a.allocated(),
                free: a.free(),
            })
            .collect();
        Assessment {
            generation,
            invalid_spec: self.invalid_spec.clone(),
            refused: self.refused.first().cloned(),
            active: families.first().cloned(),
            families,
            waiting: self.waiting.iter().map(|(_, n)| n.clone()).collect(),
            conflicts: self
                .conflicts
                .iter()
                .chain(
                    self.gaps
                        .iter()
                        .filter(|(n, _)| !self.conflicts.contains_key(*n)),
                )
                .map(|(n, why)| (n.clone(), why.clone()))
                .collect(),
            programmed: Some(super::super::programmed::summarize(self.nodes.values())),
            address_conflicts: self
                .address_conflicts
                .iter()
                .map(|(n, why)| (n.clone(), why.clone()))
                .collect(),
        }
    }

    pub(super) fn status_writes(&mut self, now: Time) -> Vec<StatusWrite> {
        let mut writes = Vec::new();
        let names: Vec<String> = self.networks.keys().cloned().collect();
        for name in names {
            let entry = &self.networks[&name];
            let existing = entry
                .object
                .status
                .clone()
                .or_else(|| entry.written.clone())
                .unwrap_or_default();
            let generation = entry.object.generation;
            let derived = if name == canal_crds::DEFAULT_NETWORK_NAME {
                status::derive(&self.assessment(generation), &existing, now.clone())
            } else {
                status::ignored(generation, &existing, now.clone())
            };
            let reason = status::reason(&derived).map(str::to_string);
            let announce = reason != entry.announced;
            if derived != status::owned_part(&existing) {
                writes.push(StatusWrite {
                    name: name.clone(),
                    status: derived.clone(),
                });
            }
            if announce {
                if let Some(r) = &reason {
                    let message = canal_crds::condition::find(
                        &derived.conditions,
                        canal_crds::condition::DEGRADED,
                    )
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                    self.notices.push(Notice {
                        subject: self.network_subject(&name),
                        warning: true,
                        reason: degraded_reason(r),
                        action: "ReconcileNetwork",
                        note: message,
                    });
                }
                if let Some(entry) = self.networks.get_mut(&name) {
                    entry.announced = reason;
                }
            }
        }
        writes
    }
}

/// The plans a status records, primary first: activeClusterCIDRs with the
/// subnet length of each family, else activeClusterCIDR alone.
pub(super) fn recorded_plans(s: &CanalNetworkStatus) -> Vec<(IpNet, u8)> {
    let texts: Vec<&str> = if s.active_cluster_cidrs.is_empty() {
        s.active_cluster_cidr.as_deref().into_iter().collect()
    } else {
        s.active_cluster_cidrs.iter().map(String::as_str).collect()
    };
    texts
        .into_iter()
        .filter_map(|t| {
            let cidr = t.parse::<IpNet>().ok()?;
            let len = match cidr {
                IpNet::V4(_) => s.active_node_subnet_length?,
                IpNet::V6(_) => s.active_node_subnet_length_v6?,
            };
            Some((cidr, len))
        })
        .collect()
}

/// Maps a Degraded reason to the static string Events need.
fn degraded_reason(reason: &str) -> &'static str {
    match reason {
        status::INVALID_SPEC => status::INVALID_SPEC,
        status::LIVE_CHANGE_REFUSED => status::LIVE_CHANGE_REFUSED,
        status::CONFLICT => status::CONFLICT,
        status::SUBNET_EXHAUSTED => status::SUBNET_EXHAUSTED,
        status::IGNORED => status::IGNORED,
        status::NODES_NOT_PROGRAMMED => status::NODES_NOT_PROGRAMMED,
        _ => "Degraded",
    }
}

/// Human-readable list of live settings that differ.
pub(super) fn changed_fields(old: &NetworkConfig, new: &NetworkConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name} {a} -> {b}"));
        }
    };
    field(
        "backend.type",
        old.backend.as_str().into(),
        new.backend.as_str().into(),
    );
    field("backend.vni", old.vni.to_string(), new.vni.to_string());
    field("backend.port", old.port.to_string(), new.port.to_string());
    field(
        "backend.directRouting",
        old.direct_routing.to_string(),
        new.direct_routing.to_string(),
    );
    field(
        "backend.mtu",
        old.mtu.unwrap_or(0).to_string(),
        new.mtu.unwrap_or(0).to_string(),
    );
    field(
        "masquerade",
        old.masquerade.to_string(),
        new.masquerade.to_string(),
    );
    field(
        "interface",
        old.interface.clone().unwrap_or_default(),
        new.interface.clone().unwrap_or_default(),
    );
    field(
        "defaultEndpointToHostAction",
        format!("{:?}", old.endpoint_to_host),
        format!("{:?}", new.endpoint_to_host),
    );
    field(
        "policy.enabled",
        old.policy_enabled.to_string(),
        new.policy_enabled.to_string(),
    );
    field(
        "policy.dataplane",
        format!("{:?}", old.policy_dataplane),
        format!("{:?}", new.policy_dataplane),
    );
    out
}
