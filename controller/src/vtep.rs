//! What the controller writes on a Node: its pod subnet and flannel's VTEP
//! annotations, derived from the Node and the network config. Pure.
//!
//! The write is a server-side apply under one field manager, so it always
//! carries every field the controller owns: a field left out of an apply is
//! a field given up (and deleted when nobody else owns it). spec.podCIDR is
//! immutable once set, so when the Node already has one the apply repeats it
//! verbatim (co-owning an equal value never conflicts) and never tries to
//! change it.

use std::collections::BTreeMap;

use canal_crds::NetworkConfig;
use canal_crds::annotations::{self, BackendData};
use ipnet::IpNet;
use serde_json::json;

use crate::network::addresses::{Overlay, PREVIOUS_PUBLIC_IP, PUBLIC_IP_CHANGED_AT};
use crate::node_view::NodeView;

/// Everything the controller owns on one Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeApply {
    /// The Node.
    pub name: String,
    /// spec.podCIDR.
    pub pod_cidr: String,
    /// spec.podCIDRs.
    pub pod_cidrs: Vec<String>,
    /// flannel's annotations.
    pub annotations: BTreeMap<String, String>,
}

/// flannel's annotations for `node` under `config`, with the overlay
/// address decided by [`crate::network::addresses::decide`]: `public-ip` is
/// left out while there is none (agents skip such a peer), and canal's
/// record of the last address move is carried along (an apply that left it
/// out would delete it).
pub fn desired_annotations(
    node: &NodeView,
    config: &NetworkConfig,
    overlay: &Overlay,
) -> BTreeMap<String, String> {
    desired_family_annotations(node, config, overlay, config.ipv4().is_some(), false)
}

/// flannel's annotations for the families the Node takes part in: the
/// IPv4 ones (`backend-data`, `public-ip`) when `v4`, the IPv6 ones
/// (`backend-v6-data` with the MAC of `flannel-v6.<VNI>`, `public-ipv6`)
/// when `v6`, like flannel's kube subnet manager with EnableIPv4/EnableIPv6.
pub fn desired_family_annotations(
    node: &NodeView,
    config: &NetworkConfig,
    overlay: &Overlay,
    v4: bool,
    v6: bool,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert(
        annotations::BACKEND_TYPE.to_string(),
        config.backend.as_str().to_string(),
    );
    for (on, key, mac) in [
        (
            v4,
            annotations::BACKEND_DATA,
            annotations::vtep_mac(&node.name),
        ),
        (
            v6,
            annotations::BACKEND_V6_DATA,
            annotations::vtep_mac_v6(&node.name),
        ),
    ] {
        if !on {
            continue;
        }
        let data = BackendData {
            vni: config.vni,
            vtep_mac: annotations::format_mac(mac),
        };
        // Serializing a struct of a u32 and a String cannot fail.
        out.insert(
            key.to_string(),
            serde_json::to_string(&data).unwrap_or_default(),
        );
    }
    out.insert(
        annotations::KUBE_SUBNET_MANAGER.to_string(),
        "true".to_string(),
    );
    if let Some(ip) = overlay.public_ip.as_ref().filter(|_| v4) {
        out.insert(annotations::PUBLIC_IP.to_string(), ip.clone());
    }
    if let Some(ip) = overlay.public_ipv6.as_ref().filter(|_| v6) {
        out.insert(annotations::PUBLIC_IPV6.to_string(), ip.clone());
    }
    if let Some((previous, at)) = &overlay.history {
        out.insert(PREVIOUS_PUBLIC_IP.to_string(), previous.clone());
        out.insert(PUBLIC_IP_CHANGED_AT.to_string(), at.clone());
    }
    out
}

/// The complete apply for `node` holding `subnets` (one per family of the
/// cluster it has, in the cluster's order).
pub fn desired(
    node: &NodeView,
    subnets: &[IpNet],
    config: &NetworkConfig,
    overlay: &Overlay,
) -> NodeApply {
    let (pod_cidr, pod_cidrs) = match &node.pod_cidr {
        // Immutable once set: repeat what is stored.
        Some(existing) => {
            let list = if node.pod_cidrs.is_empty() {
                vec![existing.clone()]
            } else {
                node.pod_cidrs.clone()
            };
            (existing.clone(), list)
        }
        None => {
            let list: Vec<String> = subnets.iter().map(ToString::to_string).collect();
            (list.first().cloned().unwrap_or_default(), list)
        }
    };
    // A family takes part when the cluster has it and the Node a subnet of it.
    let has = |v6: bool| {
        subnets.iter().any(|s| matches!(s, IpNet::V6(_)) == v6)
            && config
                .ranges
                .iter()
                .any(|r| matches!(r.cidr, IpNet::V6(_)) == v6)
    };
    NodeApply {
        name: node.name.clone(),
        pod_cidr,
        pod_cidrs,
        annotations: desired_family_annotations(node, config, overlay, has(false), has(true)),
    }
}

/// True when the Node already shows everything in `apply`, so no write is needed.
pub fn is_current(node: &NodeView, apply: &NodeApply) -> bool {
    node.pod_cidr.as_deref() == Some(apply.pod_cidr.as_str())
        && node.pod_cidrs == apply.pod_cidrs
        && apply
            .annotations
            .iter()
            .all(|(k, v)| node.annotations.get(k) == Some(v))
}

/// True when the Node has never been published to the overlay by a
/// kube subnet manager (used to tell an adoption from a routine update).
pub fn is_unpublished(node: &NodeView) -> bool {
    node.annotations
        .get(annotations::KUBE_SUBNET_MANAGER)
        .is_none_or(|v| v != "true")
}

/// The server-side apply body for `apply`.
pub fn apply_body(apply: &NodeApply) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": apply.name, "annotations": apply.annotations},
        "spec": {"podCIDR": apply.pod_cidr, "podCIDRs": apply.pod_cidrs},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_crds::{BackendType, CanalNetworkSpec};

    fn config() -> NetworkConfig {
        CanalNetworkSpec::with_cluster_cidr("10.244.0.0/16")
            .validate()
            .unwrap()
    }

    fn node(name: &str) -> NodeView {
        NodeView {
            name: name.into(),
            internal_ip: Some("192.168.7.3".parse().unwrap()),
            ..Default::default()
        }
    }

    fn subnet() -> IpNet {
        "10.244.3.0/24".parse().unwrap()
    }

    /// What the address rules decide for a plain Node: its InternalIP.
    fn overlay(n: &NodeView) -> Overlay {
        Overlay {
            public_ip: n.internal_ip.map(|ip| ip.to_string()),
            ..Overlay::default()
        }
    }

    fn desired(n: &NodeView, subnet: IpNet, config: &NetworkConfig) -> NodeApply {
        super::desired(n, &[subnet], config, &overlay(n))
    }

    fn dual() -> NetworkConfig {
        CanalNetworkSpec::with_cluster_cidrs(&["10.244.0.0/16", "fd00:10:244::/56"])
            .validate()
            .unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn dual_stack_nodes_get_both_families_in_the_clusters_order() {
        let n = node("worker-1");
        let mut o = overlay(&n);
        o.public_ipv6 = Some("fd00:1::3".into());
        let subnets = [net("10.244.3.0/24"), net("fd00:10:244:3::/64")];
        let a = super::desired(&n, &subnets, &dual(), &o);
        assert_eq!(a.pod_cidr, "10.244.3.0/24");
        assert_eq!(a.pod_cidrs, vec!["10.244.3.0/24", "fd00:10:244:3::/64"]);
        let mac6 = annotations::format_mac(annotations::vtep_mac_v6("worker-1"));
        assert_eq!(
            a.annotations[annotations::BACKEND_V6_DATA],
            format!(r#"{{"VNI":1,"VtepMAC":"{mac6}"}}"#)
        );
        assert_ne!(
            a.annotations[annotations::BACKEND_V6_DATA],
            a.annotations[annotations::BACKEND_DATA],
            "the two VTEPs never share a MAC"
        );
        assert_eq!(a.annotations[annotations::PUBLIC_IPV6], "fd00:1::3");
        assert_eq!(a.annotations[annotations::PUBLIC_IP], "192.168.7.3");
        assert_eq!(a.annotations.len(), 6);

        // IPv6 primary: podCIDR is the IPv6 one.
        let v6first = CanalNetworkSpec::with_cluster_cidrs(&["fd00:10:244::/56", "10.244.0.0/16"])
            .validate()
            .unwrap();
        let a = super::desired(&n, &[subnets[1], subnets[0]], &v6first, &o);
        assert_eq!(a.pod_cidr, "fd00:10:244:3::/64");

        // IPv6-only: no IPv4 annotations at all (flannel without EnableIPv4).
        let v6only = CanalNetworkSpec::with_cluster_cidrs(&["fd00:10:244::/56"])
            .validate()
            .unwrap();
        let a = super::desired(&n, &subnets[1..], &v6only, &o);
        assert!(!a.annotations.contains_key(annotations::BACKEND_DATA));
        assert!(!a.annotations.contains_key(annotations::PUBLIC_IP));
        assert!(a.annotations.contains_key(annotations::BACKEND_V6_DATA));
        assert_eq!(a.pod_cidrs, vec!["fd00:10:244:3::/64"]);

        // A Node that kept only its IPv4 podCIDR in a dual-stack cluster:
        // repeated verbatim, no IPv6 annotations (its peers skip it in IPv6).
        let mut old = node("old");
        old.pod_cidr = Some("10.244.9.0/24".into());
        old.pod_cidrs = vec!["10.244.9.0/24".into()];
        let a = super::desired(&old, &[net("10.244.9.0/24")], &dual(), &o);
        assert_eq!(a.pod_cidrs, vec!["10.244.9.0/24"]);
        assert!(!a.annotations.contains_key(annotations::BACKEND_V6_DATA));
        assert!(!a.annotations.contains_key(annotations::PUBLIC_IPV6));
    }

    fn desired_annotations(n: &NodeView, config: &NetworkConfig) -> BTreeMap<String, String> {
        super::desired_annotations(n, config, &overlay(n))
    }

    #[test]
    fn derives_flannel_annotations() {
        let n = node("worker-1");
        let a = desired(&n, subnet(), &config());
        let mac = annotations::format_mac(annotations::vtep_mac("worker-1"));
        assert_eq!(a.pod_cidr, "10.244.3.0/24");
        assert_eq!(a.pod_cidrs, vec!["10.244.3.0/24"]);
        assert_eq!(a.annotations[annotations::BACKEND_TYPE], "vxlan");
        assert_eq!(
            a.annotations[annotations::BACKEND_DATA],
            format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)
        );
        assert_eq!(a.annotations[annotations::PUBLIC_IP], "192.168.7.3");
        assert_eq!(a.annotations[annotations::KUBE_SUBNET_MANAGER], "true");
        assert_eq!(a.annotations.len(), 4);
    }

    #[test]
    fn the_overlay_decision_is_published_with_its_history() {
        let n = node("n");
        let mut o = overlay(&n);
        o.history = Some(("192.168.7.2".into(), "2026-01-01T00:00:00Z".into()));
        let a = super::desired_annotations(&n, &config(), &o);
        assert_eq!(a[annotations::PUBLIC_IP], "192.168.7.3");
        assert_eq!(a[PREVIOUS_PUBLIC_IP], "192.168.7.2");
        assert_eq!(a[PUBLIC_IP_CHANGED_AT], "2026-01-01T00:00:00Z");
        let none = super::desired_annotations(&n, &config(), &Overlay::default());
        assert!(!none.contains_key(annotations::PUBLIC_IP));
        assert_eq!(none.len(), 3);
    }

    #[test]
    fn config_changes_reach_the_annotations() {
        let n = node("n");
        let mut cfg = config();
        cfg.vni = 42;
        cfg.backend = BackendType::HostGw;
        let a = desired_annotations(&n, &cfg);
        assert!(a[annotations::BACKEND_DATA].starts_with(r#"{"VNI":42,"#));
        assert_eq!(a[annotations::BACKEND_TYPE], "host-gw");
        // Fields the agents read from the CanalNetwork itself do not churn Nodes.
        let mut other = config();
        other.port = 4789;
        other.mtu = Some(1400);
        other.masquerade = false;
        assert_eq!(
            desired_annotations(&n, &other),
            desired_annotations(&n, &config())
        );
    }

    #[test]
    fn an_existing_pod_cidr_is_repeated_verbatim() {
        let mut n = node("n");
        n.pod_cidr = Some("10.244.9.0/24".into());
        n.pod_cidrs = vec!["10.244.9.0/24".into(), "fd00:9::/64".into()];
        let a = desired(&n, "10.244.9.0/24".parse().unwrap(), &config());
        assert_eq!(a.pod_cidr, "10.244.9.0/24");
        assert_eq!(a.pod_cidrs, n.pod_cidrs);
    }

    #[test]
    fn writes_only_when_something_differs() {
        let mut n = node("n");
        let a = desired(&n, subnet(), &config());
        assert!(!is_current(&n, &a));
        assert!(is_unpublished(&n));
        n.pod_cidr = Some(a.pod_cidr.clone());
        n.pod_cidrs = a.pod_cidrs.clone();
        n.annotations = a.annotations.clone();
        assert!(is_current(&n, &desired(&n, subnet(), &config())));
        assert!(!is_unpublished(&n));
        // Unrelated flannel keys on the Node do not matter.
        n.annotations
            .insert(annotations::PUBLIC_IP_OVERWRITE.into(), String::new());
        assert!(is_current(&n, &desired(&n, subnet(), &config())));
        n.internal_ip = Some("192.168.7.4".parse().unwrap());
        assert!(!is_current(&n, &desired(&n, subnet(), &config())));
    }

    #[test]
    fn apply_body_is_a_node_apply_patch() {
        let body = apply_body(&desired(&node("n"), subnet(), &config()));
        assert_eq!(body["kind"], "Node");
        assert_eq!(body["spec"]["podCIDRs"][0], "10.244.3.0/24");
        assert_eq!(
            body["metadata"]["annotations"][annotations::KUBE_SUBNET_MANAGER],
            "true"
        );
    }
}
