//! A deliberately plain evaluator of `networking.k8s.io/v1` NetworkPolicy,
//! written straight from the API documentation and sharing no code with
//! the compiler: is a new connection from pod A to pod B on port P allowed?

use std::collections::BTreeMap;

use canal_crds::Protocol;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::World;
use crate::policy::input::PodInfo;

pub fn allowed(world: &World, src: &PodInfo, dst: &PodInfo, port: u16, proto: Protocol) -> bool {
    direction_allows(world, src, dst, port, proto, Dir::Egress)
        && direction_allows(world, src, dst, port, proto, Dir::Ingress)
}

/// The peers and ports of one rule.
type RuleRef<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Ingress,
    Egress,
}

fn direction_allows(
    world: &World,
    src: &PodInfo,
    dst: &PodInfo,
    port: u16,
    proto: Protocol,
    dir: Dir,
) -> bool {
    // The pod whose policies apply, and the pod at the other end.
    let (subject, other) = match dir {
        Dir::Egress => (src, dst),
        Dir::Ingress => (dst, src),
    };
    let applicable: Vec<&NetworkPolicy> = world
        .policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(subject.namespace.as_str()))
        .filter(|p| {
            let spec = p.spec.as_ref().unwrap();
            selector_matches(
                &spec.pod_selector.clone().unwrap_or_default(),
                &subject.labels,
            )
        })
        .filter(|p| has_type(p, dir))
        .collect();
    if applicable.is_empty() {
        return true; // not isolated in this direction
    }
    applicable.iter().any(|p| {
        let spec = p.spec.as_ref().unwrap();
        let policy_ns = p.metadata.namespace.as_deref().unwrap();
        let rules: Vec<RuleRef<'_>> = match dir {
            Dir::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Dir::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        rules.iter().any(|(peers, ports)| {
            let peer_ok = match peers {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list
                    .iter()
                    .any(|peer| peer_matches(world, peer, policy_ns, other)),
            };
            let port_ok = match ports {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list.iter().any(|pp| port_matches(pp, dst, port, proto)),
            };
            peer_ok && port_ok
        })
    })
}

fn has_type(p: &NetworkPolicy, dir: Dir) -> bool {
    let spec = p.spec.as_ref().unwrap();
    let types: Vec<String> = match &spec.policy_types {
        Some(t) if !t.is_empty() => t.clone(),
        _ => {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".to_string());
            }
            t
        }
    };
    types.iter().any(|t| match dir {
        Dir::Ingress => t == "Ingress",
        Dir::Egress => t == "Egress",
    })
}

fn peer_matches(world: &World, peer: &NetworkPolicyPeer, policy_ns: &str, other: &PodInfo) -> bool {
    if let Some(block) = &peer.ip_block {
        let ip = other.ips[0];
        let cidr: IpNet = block.cidr.parse().unwrap();
        return cidr.contains(&ip)
            && !block
                .except
                .iter()
                .flatten()
                .any(|e| e.parse::<IpNet>().unwrap().contains(&ip));
    }
    let ns_ok = match &peer.namespace_selector {
        None => other.namespace == policy_ns,
        Some(sel) => {
            let ns_labels = world
                .namespaces
                .iter()
                .find(|n| n.name == other.namespace)
                .map(|n| n.labels.clone())
                .unwrap_or_default();
            selector_matches(sel, &ns_labels)
        }
    };
    let pod_ok = match &peer.pod_selector {
        None => true,
        Some(sel) => selector_matches(sel, &other.labels),
    };
    ns_ok && pod_ok
}

fn port_matches(pp: &NetworkPolicyPort, dst: &PodInfo, port: u16, proto: Protocol) -> bool {
    let want = pp.protocol.as_deref().unwrap_or("TCP");
    let proto_name = match proto {
        Protocol::TCP => "TCP",
        Protocol::UDP => "UDP",
        Protocol::SCTP => "SCTP",
    };
    if want != proto_name {
        return false;
    }
    match &pp.port {
        None => true,
        Some(IntOrString::Int(n)) => match pp.end_port {
            None => i32::from(port) == *n,
            Some(end) => *n <= i32::from(port) && i32::from(port) <= end,
        },
        // A named port means that name on the destination pod.
        Some(IntOrString::String(name)) => dst
            .named_ports
            .iter()
            .any(|np| &np.name == name && np.protocol == proto && np.port == port),
    }
}

fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let ml_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let me_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => panic!("reference evaluator given operator {other}"),
        }
    });
    ml_ok && me_ok
}
