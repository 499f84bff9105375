//! The slice of a Node the controller needs, kept instead of the whole
//! object: a real Node carries image lists, conditions and managedFields
//! worth kilobytes, and the controller holds every Node of the cluster.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;

/// What the controller knows about one Node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    /// metadata.name.
    pub name: String,
    /// metadata.uid, for Events.
    pub uid: Option<String>,
    /// metadata.resourceVersion.
    pub resource_version: Option<String>,
    /// metadata.creationTimestamp: waiting Nodes are served oldest first.
    pub created: Option<Timestamp>,
    /// metadata.deletionTimestamp is set.
    pub deleting: bool,
    /// spec.podCIDR as stored.
    pub pod_cidr: Option<String>,
    /// spec.podCIDRs as stored.
    pub pod_cidrs: Vec<String>,
    /// The first IPv4 InternalIP in status.addresses.
    pub internal_ip: Option<Ipv4Addr>,
    /// Every IPv4 InternalIP and ExternalIP in status.addresses, in order
    /// (a Node address inside clusterCIDR is a conflict, whichever kind).
    pub addresses: Vec<(AddressKind, Ipv4Addr)>,
    /// The first IPv6 InternalIP in status.addresses (flannel's
    /// `public-ipv6`).
    pub internal_ipv6: Option<Ipv6Addr>,
    /// Every IPv6 InternalIP and ExternalIP, in order.
    pub addresses_v6: Vec<Ipv6Addr>,
    /// The field manager that wrote the InternalIP (from managedFields),
    /// named in the Event when the overlay address moves.
    pub addresses_writer: Option<String>,
    /// The field manager of flannel's `public-ip-overwrite` annotation.
    pub overwrite_writer: Option<String>,
    /// The Node's flannel annotations (`flannel.alpha.coreos.com/*`) and
    /// canal's own (`canal.dev/*`).
    pub annotations: BTreeMap<String, String>,
    /// What its agent reports (condition CanalNetworkProgrammed).
    pub programmed: Option<crate::network::programmed::Reported>,
}

/// The kind of a Node address that matters to the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressKind {
    /// status.addresses type InternalIP.
    Internal,
    /// status.addresses type ExternalIP.
    External,
}

impl AddressKind {
    /// The status.addresses type.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressKind::Internal => "InternalIP",
            AddressKind::External => "ExternalIP",
        }
    }
}

/// Prefix of the annotations canal-controller writes besides flannel's.
pub const CANAL_ANNOTATION_PREFIX: &str = "canal.dev/";

/// Every pod subnet of a Node (one per family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodCidrs {
    /// spec.podCIDR(s) unset: the Node waits for an allocation.
    Unset,
    /// The subnets, in spec.podCIDRs order.
    Set(Vec<IpNet>),
    /// Set but unusable.
    Invalid {
        /// What the Node shows.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },
}

impl PodCidrs {
    /// The subnet of `cluster`'s family.
    pub fn of_family(&self, cluster: &IpNet) -> Option<IpNet> {
        match self {
            PodCidrs::Set(nets) => nets.iter().find(|n| same_family(n, cluster)).copied(),
            _ => None,
        }
    }
}

/// Both IPv4 or both IPv6.
pub fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

/// The Node's pod subnet as the controller reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodCidr {
    /// spec.podCIDR(s) unset: the Node waits for an allocation.
    Unset,
    /// The IPv4 pod subnet.
    V4(Ipv4Net),
    /// Set, but unusable: the value and why.
    Invalid { value: String, reason: String },
}

impl NodeView {
    /// Extracts the view from a Node.
    pub fn from_node(node: &Node) -> NodeView {
        let meta = &node.metadata;
        let spec = node.spec.as_ref();
        let annotations = meta
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| {
                k.starts_with(canal_crds::annotations::PREFIX)
                    || k.starts_with(CANAL_ANNOTATION_PREFIX)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let addresses: Vec<(AddressKind, Ipv4Addr)> = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|a| {
                let kind = match a.type_.as_str() {
                    "InternalIP" => AddressKind::Internal,
                    "ExternalIP" => AddressKind::External,
                    _ => return None,
                };
                Some((kind, a.address.parse::<Ipv4Addr>().ok()?))
            })
            .collect();
        let mut internal_ipv6 = None;
        let mut addresses_v6 = Vec::new();
        for a in node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
        {
            let internal = a.type_ == "InternalIP";
            if !internal && a.type_ != "ExternalIP" {
                continue;
            }
            if let Ok(ip) = a.address.parse::<Ipv6Addr>() {
                if internal && internal_ipv6.is_none() {
                    internal_ipv6 = Some(ip);
                }
                if !addresses_v6.contains(&ip) {
                    addresses_v6.push(ip);
                }
            }
        }
        let internal_ip = addresses
            .iter()
            .find(|(k, _)| *k == AddressKind::Internal)
            .map(|(_, ip)| *ip);
        NodeView {
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            deleting: meta.deletion_timestamp.is_some(),
            pod_cidr: spec
                .and_then(|s| s.pod_cidr.clone())
                .filter(|s| !s.is_empty()),
            pod_cidrs: spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default(),
            internal_ip,
            addresses,
            internal_ipv6,
            addresses_v6,
            // The manager that set the InternalIP's value owns exactly this
            // field (a changed value changes hands).
            addresses_writer: writer(
                node,
                &[
                    "f:status",
                    "f:addresses",
                    "k:{\"type\":\"InternalIP\"}",
                    "f:address",
                ],
            ),
            overwrite_writer: writer(node, &["f:metadata", "f:annotations", OVERWRITE_FIELD]),
            annotations,
            programmed: crate::network::programmed::Reported::from_node(node),
        }
    }

    /// Every IPv4 address of the Node (InternalIP and ExternalIP), without
    /// repeats.
    pub fn ipv4_addresses(&self) -> Vec<(AddressKind, Ipv4Addr)> {
        let mut out: Vec<(AddressKind, Ipv4Addr)> = self
            .internal_ip
            .map(|ip| (AddressKind::Internal, ip))
            .into_iter()
            .collect();
        for a in &self.addresses {
            if !out.iter().any(|(_, ip)| *ip == a.1) {
                out.push(*a);
            }
        }
        out
    }

    /// The pod subnet, as flannel's kube subnet manager reads it: the first
    /// IPv4 entry of spec.podCIDRs, else spec.podCIDR.
    pub fn pod_subnet(&self) -> PodCidr {
        let entries: Vec<&String> = if self.pod_cidrs.is_empty() {
            self.pod_cidr.iter().collect()
        } else {
            self.pod_cidrs.iter().collect()
        };
        if entries.is_empty() {
            return PodCidr::Unset;
        }
        let shown = entries
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",");
        for entry in &entries {
            match entry.parse::<IpNet>() {
                Ok(IpNet::V4(net)) if net.trunc() == net => return PodCidr::V4(net),
                Ok(IpNet::V4(net)) => {
                    return PodCidr::Invalid {
                        value: shown,
                        reason: format!("{net} has host bits set (network is {})", net.trunc()),
                    };
                }
                Ok(IpNet::V6(_)) => continue,
                Err(_) => {
                    return PodCidr::Invalid {
                        value: shown,
                        reason: format!("{entry:?} is not a CIDR"),
                    };
                }
            }
        }
        PodCidr::Invalid {
            value: shown,
            reason: "no IPv4 entry (canal's overlay is IPv4)".into(),
        }
    }

    /// Every pod subnet, in spec.podCIDRs order (spec.podCIDR alone when
    /// podCIDRs is empty): what the per-family allocators claim.
    pub fn pod_subnets(&self) -> PodCidrs {
        let entries: Vec<&String> = if self.pod_cidrs.is_empty() {
            self.pod_cidr.iter().collect()
        } else {
            self.pod_cidrs.iter().collect()
        };
        if entries.is_empty() {
            return PodCidrs::Unset;
        }
        let shown = entries
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut out: Vec<IpNet> = Vec::new();
        for entry in &entries {
            let reason = match entry.parse::<IpNet>() {
                Ok(net) if net.trunc() != net => {
                    format!("{net} has host bits set (network is {})", net.trunc())
                }
                Ok(net) if out.iter().any(|o| same_family(o, &net)) => {
                    format!(
                        "more than one {} entry",
                        canal_crds::validate::family_name(&net)
                    )
                }
                Ok(net) => {
                    out.push(net);
                    continue;
                }
                Err(_) => format!("{entry:?} is not a CIDR"),
            };
            return PodCidrs::Invalid {
                value: shown,
                reason,
            };
        }
        PodCidrs::Set(out)
    }

    /// The IPv6 underlay address to publish (first IPv6 InternalIP).
    pub fn ipv6_address(&self) -> Option<IpAddr> {
        self.internal_ipv6.map(IpAddr::V6)
    }

    /// Sort key that serves waiting Nodes oldest first (and decides which
    /// of two Nodes claiming one overlay address keeps it).
    pub fn age_key(&self) -> (Option<Timestamp>, String) {
        (self.created, self.name.clone())
    }
}

/// The managedFields key of flannel's `public-ip-overwrite` annotation.
const OVERWRITE_FIELD: &str = "f:flannel.alpha.coreos.com/public-ip-overwrite";

/// The field manager whose managedFields entry covers `path` (the most
/// recent one when several do).
fn writer(node: &Node, path: &[&str]) -> Option<String> {
    node.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            let mut v = m.fields_v1.as_ref().map(|f| &f.0);
            for key in path {
                v = v.and_then(|v| v.get(*key));
            }
            v.is_some()
        })
        .max_by_key(|m| m.time.as_ref().map(|t| t.0))
        .and_then(|m| m.manager.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(v: serde_json::Value) -> NodeView {
        NodeView::from_node(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn extracts_what_the_controller_needs() {
        let v = node(json!({
            "metadata": {"name": "n1", "uid": "u", "resourceVersion": "7",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "annotations": {"flannel.alpha.coreos.com/public-ip": "1.2.3.4", "other": "x"}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "InternalIP", "address": "192.168.1.10"}]}
        }));
        assert_eq!(v.name, "n1");
        assert_eq!(v.internal_ip, Some("192.168.1.10".parse().unwrap()));
        assert_eq!(v.annotations.len(), 1, "only flannel keys are kept");
        assert_eq!(
            v.pod_subnet(),
            PodCidr::V4("10.244.1.0/24".parse().unwrap())
        );
        assert!(v.created.is_some());
    }

    #[test]
    fn reads_every_node_address_and_who_wrote_it() {
        let v = node(json!({
            "metadata": {"name": "n1",
                "annotations": {"canal.dev/previous-public-ip": "1.1.1.1",
                                "flannel.alpha.coreos.com/public-ip-overwrite": "2.2.2.2"},
                "managedFields": [
                    {"manager": "kubelet", "operation": "Update", "time": "2026-01-02T00:00:00Z",
                     "fieldsV1": {"f:status": {"f:addresses": {"k:{\"type\":\"Hostname\"}": {"f:address": {}}}}}},
                    {"manager": "kubectl-patch", "operation": "Update", "time": "2026-01-02T00:00:00Z",
                     "fieldsV1": {"f:status": {"f:addresses": {"k:{\"type\":\"InternalIP\"}": {"f:address": {}}}}}},
                    {"manager": "kubectl-annotate", "operation": "Update", "time": "2026-01-01T00:00:00Z",
                     "fieldsV1": {"f:metadata": {"f:annotations": {"f:flannel.alpha.coreos.com/public-ip-overwrite": {}}}}}]},
            "status": {"addresses": [
                {"type": "ExternalIP", "address": "203.0.113.5"},
                {"type": "InternalIP", "address": "192.168.1.10"},
                {"type": "InternalIP", "address": "192.168.1.11"},
                {"type": "Hostname", "address": "n1"}]}
        }));
        assert_eq!(v.internal_ip, Some("192.168.1.10".parse().unwrap()));
        assert_eq!(
            v.ipv4_addresses(),
            vec![
                (AddressKind::Internal, "192.168.1.10".parse().unwrap()),
                (AddressKind::External, "203.0.113.5".parse().unwrap()),
                (AddressKind::Internal, "192.168.1.11".parse().unwrap()),
            ]
        );
        assert_eq!(v.addresses_writer.as_deref(), Some("kubectl-patch"));
        assert_eq!(v.overwrite_writer.as_deref(), Some("kubectl-annotate"));
        assert_eq!(v.annotations.len(), 2, "flannel and canal keys are kept");
    }

    #[test]
    fn reads_every_family_of_pod_subnets() {
        let mut v = NodeView::default();
        assert_eq!(v.pod_subnets(), PodCidrs::Unset);
        v.pod_cidr = Some("fd00::/64".into());
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(v.pod_subnets(), PodCidrs::Set(vec![n("fd00::/64")]));
        v.pod_cidrs = vec!["fd00::/64".into(), "10.0.1.0/24".into()];
        let got = v.pod_subnets();
        assert_eq!(got, PodCidrs::Set(vec![n("fd00::/64"), n("10.0.1.0/24")]));
        assert_eq!(got.of_family(&n("10.0.0.0/8")), Some(n("10.0.1.0/24")));
        assert_eq!(got.of_family(&n("fd00::/8")), Some(n("fd00::/64")));
        v.pod_cidrs = vec!["fd00::/64".into(), "fd01::/64".into()];
        assert!(
            matches!(v.pod_subnets(), PodCidrs::Invalid { reason, .. } if reason.contains("more than one IPv6"))
        );
        v.pod_cidrs = vec!["fd00::1/64".into()];
        assert!(
            matches!(v.pod_subnets(), PodCidrs::Invalid { reason, .. } if reason.contains("host bits"))
        );
    }

    #[test]
    fn reads_pod_subnets_like_flannel() {
        let mut v = NodeView::default();
        assert_eq!(v.pod_subnet(), PodCidr::Unset);
        v.pod_cidr = Some("10.0.0.0/24".into());
        assert_eq!(v.pod_subnet(), PodCidr::V4("10.0.0.0/24".parse().unwrap()));
        v.pod_cidrs = vec!["fd00::/64".into(), "10.0.1.0/24".into()];
        assert_eq!(v.pod_subnet(), PodCidr::V4("10.0.1.0/24".parse().unwrap()));
        v.pod_cidrs = vec!["fd00::/64".into()];
        assert!(
            matches!(v.pod_subnet(), PodCidr::Invalid { reason, .. } if reason.contains("IPv4"))
        );
        v.pod_cidrs = vec!["10.0.1.7/24".into()];
        assert!(
            matches!(v.pod_subnet(), PodCidr::Invalid { reason, .. } if reason.contains("host bits"))
        );
        v.pod_cidrs = vec!["garbage".into()];
        assert!(matches!(v.pod_subnet(), PodCidr::Invalid { .. }));
    }
}
