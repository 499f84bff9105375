//! What the compiler needs of Pods, Namespaces and Nodes: small plain
//! structs, converted from the API objects as they arrive so the big
//! objects are dropped at once (the controller never caches whole Pods).

use std::collections::BTreeMap;
use std::net::IpAddr;

use canal_crds::{NamedPort, Protocol};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::jiff::Timestamp;

/// The parts of a Pod that NetworkPolicy depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.nodeName`; None until scheduled.
    pub node: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs` (or `status.podIP`), in status order.
    pub ips: Vec<IpAddr>,
    /// Named container ports.
    pub named_ports: Vec<NamedPort>,
    /// `spec.hostNetwork`: such a pod uses its node's address and is never
    /// a NetworkPolicy endpoint or peer.
    pub host_network: bool,
    /// Phase Succeeded or Failed: the pod has no running containers.
    pub finished: bool,
    /// metadata.uid, for Events about the pod.
    pub uid: Option<String>,
    /// metadata.creationTimestamp: of two pods reporting one IP, the older
    /// holds it.
    pub created: Option<Timestamp>,
    /// metadata.deletionTimestamp is set: a terminating pod yields a
    /// contested IP to a running one (its sandbox may be gone already and
    /// the address handed out again).
    pub terminating: bool,
}

impl PodInfo {
    /// Extracts what NetworkPolicy needs from a Pod.
    pub fn from_pod(pod: &Pod) -> PodInfo {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(list) = status.and_then(|s| s.pod_ips.as_ref()) {
            for ip in list {
                // The API server validates these; anything else is skipped.
                if let Ok(parsed) = ip.ip.parse::<IpAddr>()
                    && !ips.contains(&parsed)
                {
                    ips.push(parsed);
                }
            }
        }
        if ips.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok())
        {
            ips.push(ip);
        }
        let mut named_ports = Vec::new();
        for container in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
            for port in container.ports.iter().flatten() {
                let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) else {
                    continue;
                };
                let protocol = match port.protocol.as_deref() {
                    None => Protocol::TCP,
                    Some(p) => match Protocol::parse(p) {
                        Some(p) => p,
                        None => continue,
                    },
                };
                let Ok(number) = u16::try_from(port.container_port) else {
                    continue;
                };
                if number == 0 {
                    continue;
                }
                named_ports.push(NamedPort {
                    name: name.to_string(),
                    protocol,
                    port: number,
                });
            }
        }
        named_ports.sort();
        named_ports.dedup();
        let phase = status.and_then(|s| s.phase.as_deref());
        PodInfo {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            node: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            named_ports,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(phase, Some("Succeeded") | Some("Failed")),
            uid: pod.metadata.uid.clone(),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            terminating: pod.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// A Namespace's name and labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Name.
    pub name: String,
    /// Labels (the API server sets `kubernetes.io/metadata.name`).
    pub labels: BTreeMap<String, String>,
}

impl NamespaceInfo {
    /// Extracts name and labels.
    pub fn from_namespace(ns: &Namespace) -> NamespaceInfo {
        NamespaceInfo {
            name: ns.metadata.name.clone().unwrap_or_default(),
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        }
    }
}

/// A Node: its NodePolicySet is named after it (and owned, like every
/// generated object, by the CanalNetwork, not by the Node: the controller
/// deletes it when the Node goes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Name.
    pub name: String,
    /// spec.podCIDRs (else spec.podCIDR), parsed: the only addresses its
    /// pods can hold (canal-cni allocates from them).
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeInfo {
    /// Extracts the name and pod subnets.
    pub fn from_node(node: &Node) -> NodeInfo {
        let spec = node.spec.as_ref();
        let listed: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
            Some(list) if !list.is_empty() => list.iter().collect(),
            _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
        };
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            pod_cidrs: listed
                .into_iter()
                .filter_map(|c| c.parse::<IpNet>().ok())
                .map(|c| c.trunc())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn extracts_ips_ports_and_phase() {
        let p = pod(r#"
metadata: {namespace: x, name: a, labels: {pod: a}}
spec:
  nodeName: n1
  containers:
  - name: c
    ports:
    - {name: serve-80-tcp, containerPort: 80}
    - {name: serve-80-udp, containerPort: 80, protocol: UDP}
    - {containerPort: 9000}
  - name: d
    ports:
    - {name: sctp, containerPort: 7, protocol: SCTP}
status:
  phase: Running
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}, {ip: "fd00::5"}]
"#);
        let info = PodInfo::from_pod(&p);
        assert_eq!(info.namespace, "x");
        assert_eq!(info.node.as_deref(), Some("n1"));
        assert_eq!(
            info.ips,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let ports: Vec<(&str, Protocol, u16)> = info
            .named_ports
            .iter()
            .map(|p| (p.name.as_str(), p.protocol, p.port))
            .collect();
        assert_eq!(
            ports,
            vec![
                ("sctp", Protocol::SCTP, 7),
                ("serve-80-tcp", Protocol::TCP, 80),
                ("serve-80-udp", Protocol::UDP, 80)
            ]
        );
        assert!(!info.finished && !info.host_network);
    }

    #[test]
    fn pending_pod_without_ip_and_finished_pods() {
        let p = pod("metadata: {namespace: x, name: a}\nspec: {containers: []}\n");
        let info = PodInfo::from_pod(&p);
        assert!(info.ips.is_empty() && info.node.is_none() && !info.finished);
        let done = pod(
            "metadata: {namespace: x, name: a}\nspec: {containers: [], hostNetwork: true}\nstatus: {phase: Succeeded, podIP: 10.0.0.1}\n",
        );
        let info = PodInfo::from_pod(&done);
        assert!(info.finished && info.host_network);
        assert_eq!(info.ips.len(), 1, "podIP is the fallback for podIPs");
    }

    #[test]
    fn identity_age_and_termination() {
        let p = pod(
            "metadata: {namespace: x, name: a, uid: u1, creationTimestamp: '2026-01-01T00:00:00Z', deletionTimestamp: '2026-01-02T00:00:00Z'}\nspec: {containers: []}\n",
        );
        let info = PodInfo::from_pod(&p);
        assert_eq!(info.uid.as_deref(), Some("u1"));
        assert!(info.created.is_some() && info.terminating);
    }

    #[test]
    fn node_pod_cidrs() {
        let n: Node = serde_yaml::from_str(
            "metadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, 'fd00:1::/64']}\n",
        )
        .unwrap();
        let info = NodeInfo::from_node(&n);
        assert_eq!(info.pod_cidrs.len(), 2);
        let only: Node =
            serde_yaml::from_str("metadata: {name: n2}\nspec: {podCIDR: 10.244.2.0/24}\n").unwrap();
        assert_eq!(
            NodeInfo::from_node(&only).pod_cidrs,
            vec!["10.244.2.0/24".parse::<IpNet>().unwrap()]
        );
        let none: Node = serde_yaml::from_str("metadata: {name: n3}\n").unwrap();
        assert!(NodeInfo::from_node(&none).pod_cidrs.is_empty());
    }
}
