//! A small reference model of Kubernetes NetworkPolicy (`networking.k8s.io/v1`),
//! written from the API documentation and independent of canal's compiler:
//! given the cluster (namespaces, pods, policies) it says whether a
//! connection is allowed, which policies isolate a pod, and which pods a
//! PeerSet selector matches. The lab's conformance tests compare real
//! packets with it. Pure: [`Cluster::from_api`] is the only I/O.
//!
//! Semantics (kubernetes.io/docs/concepts/services-networking/network-policies):
//! a pod is isolated for a direction when some policy of its namespace
//! selects it with that type (policyTypes default to Ingress, plus Egress
//! when the policy has egress rules); an isolated direction allows the union
//! of the rules of those policies; a connection needs the source's egress
//! and the destination's ingress to allow it; a pod always reaches itself
//! and its own node reaches it; named ports resolve against the destination
//! pod; a source that is not a pod (a node's address) matches only ipBlocks.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use canal_crds::{PeerSelector, PortMember};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Pod as KubePod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};

use crate::Error;
use crate::lab::{Matrix, Protocol};

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// A pod as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// Its IPv4 address (None until it has one).
    pub ip: Option<Ipv4Addr>,
    /// The node it runs on.
    pub node: String,
    /// Declared container ports: (name, protocol, number).
    pub ports: Vec<(Option<String>, Protocol, u16)>,
    /// `hostNetwork: true` pods are not NetworkPolicy endpoints.
    pub host_network: bool,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The source of a connection.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// A pod.
    Pod(&'a Pod),
    /// A process of a node's host network namespace (or a hostNetwork pod),
    /// seen with address `ip`.
    Host {
        /// The node.
        node: &'a str,
        /// The address the destination sees.
        ip: Ipv4Addr,
    },
}

/// The cluster state the model reasons about.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Namespace labels, by name.
    pub namespaces: BTreeMap<String, Labels>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// NetworkPolicies.
    pub policies: Vec<NetworkPolicy>,
}

/// Does `selector` match `labels`? (An empty selector matches everything;
/// an operator the API would reject matches nothing.)
pub fn selector_matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// `(ingress, egress)` after policyTypes defaulting.
pub fn policy_types(policy: &NetworkPolicy) -> (bool, bool) {
    let spec = policy.spec.clone().unwrap_or_default();
    match spec.policy_types.filter(|t| !t.is_empty()) {
        Some(types) => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        None => (true, spec.egress.is_some_and(|e| !e.is_empty())),
    }
}

fn policy_name(p: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

fn in_block(ip: Ipv4Addr, cidr: &str, except: &[String]) -> bool {
    let parse = |c: &str| c.parse::<Ipv4Net>().ok();
    parse(cidr).is_some_and(|n| n.contains(&ip))
        && !except
            .iter()
            .any(|e| parse(e).is_some_and(|n| n.contains(&ip)))
}

impl Cluster {
    /// Reads namespaces, pods and NetworkPolicies from the API server.
    pub async fn from_api(client: &kube::Client) -> Result<Cluster, Error> {
        let lp = ListParams::default();
        let namespaces = Api::<Namespace>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| Error::Kube("listing Namespaces".into(), e))?
            .items
            .into_iter()
            .map(|n| {
                (
                    n.metadata.name.unwrap_or_default(),
                    n.metadata.labels.unwrap_or_default(),
                )
            })
            .collect();
        let pods = Api::<KubePod>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| Error::Kube("listing Pods".into(), e))?
            .items
            .iter()
            .map(Pod::from_api)
            .collect();
        let policies = Api::<NetworkPolicy>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| Error::Kube("listing NetworkPolicies".into(), e))?
            .items;
        Ok(Cluster {
            namespaces,
            pods,
            policies,
        })
    }

    /// A pod by `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.key() == key)
    }

    fn ns_labels(&self, ns: &str) -> Labels {
        self.namespaces.get(ns).cloned().unwrap_or_default()
    }

    fn selects(policy: &NetworkPolicy, pod: &Pod) -> bool {
        !pod.host_network
            && policy.metadata.namespace.as_deref() == Some(pod.namespace.as_str())
            && policy
                .spec
                .as_ref()
                .and_then(|s| s.pod_selector.as_ref())
                .is_none_or(|sel| selector_matches(sel, &pod.labels))
    }

    /// Names (`ns/name`, sorted) of the policies isolating `pod` for
    /// (ingress, egress).
    pub fn isolation(&self, pod: &Pod) -> (Vec<String>, Vec<String>) {
        let mut ingress = Vec::new();
        let mut egress = Vec::new();
        for p in self.policies.iter().filter(|p| Self::selects(p, pod)) {
            let (i, e) = policy_types(p);
            if i {
                ingress.push(policy_name(p));
            }
            if e {
                egress.push(policy_name(p));
            }
        }
        ingress.sort();
        egress.sort();
        (ingress, egress)
    }

    /// Does a peer of a rule of a policy in `policy_ns` match `other`?
    fn peer_matches(&self, peer: &NetworkPolicyPeer, policy_ns: &str, other: &Source) -> bool {
        if let Some(block) = &peer.ip_block {
            let ip = match other {
                Source::Pod(p) => p.ip,
                Source::Host { ip, .. } => Some(*ip),
            };
            return ip.is_some_and(|ip| {
                in_block(ip, &block.cidr, block.except.as_deref().unwrap_or_default())
            });
        }
        let Source::Pod(pod) = other else {
            // Selectors match pods only.
            return false;
        };
        if pod.host_network {
            return false;
        }
        let ns_ok = match &peer.namespace_selector {
            None => pod.namespace == policy_ns,
            Some(sel) => selector_matches(sel, &self.ns_labels(&pod.namespace)),
        };
        let pod_ok = peer
            .pod_selector
            .as_ref()
            .is_none_or(|sel| selector_matches(sel, &pod.labels));
        ns_ok && pod_ok
    }

    /// Does a rule's port list admit `port`/`protocol` on destination `dst`?
    fn ports_match(
        ports: Option<&Vec<NetworkPolicyPort>>,
        dst: &Pod,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        let Some(ports) = ports.filter(|p| !p.is_empty()) else {
            return true;
        };
        ports.iter().any(|p| {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            if proto != protocol.as_str() {
                return false;
            }
            match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => match p.end_port {
                    Some(end) => (*n..=end).contains(&i32::from(port)),
                    None => *n == i32::from(port),
                },
                Some(IntOrString::String(name)) => dst.ports.iter().any(|(n, pr, num)| {
                    n.as_deref() == Some(name.as_str()) && *pr == protocol && *num == port
                }),
            }
        })
    }

    /// Does the destination's ingress admit the connection?
    fn ingress_allows(&self, src: &Source, dst: &Pod, port: u16, protocol: Protocol) -> bool {
        let isolating: Vec<&NetworkPolicy> = self
            .policies
            .iter()
            .filter(|p| Self::selects(p, dst) && policy_types(p).0)
            .collect();
        if isolating.is_empty() {
            return true;
        }
        isolating.iter().any(|p| {
            let ns = p.metadata.namespace.as_deref().unwrap_or_default();
            let spec = p.spec.clone().unwrap_or_default();
            spec.ingress.iter().flatten().any(|rule| {
                let peers_ok = match rule.from.as_ref().filter(|f| !f.is_empty()) {
                    None => true,
                    Some(from) => from.iter().any(|peer| self.peer_matches(peer, ns, src)),
                };
                peers_ok && Self::ports_match(rule.ports.as_ref(), dst, port, protocol)
            })
        })
    }

    /// Does the source pod's egress admit the connection?
    fn egress_allows(&self, src: &Pod, dst: &Pod, port: u16, protocol: Protocol) -> bool {
        let isolating: Vec<&NetworkPolicy> = self
            .policies
            .iter()
            .filter(|p| Self::selects(p, src) && policy_types(p).1)
            .collect();
        if isolating.is_empty() {
            return true;
        }
        isolating.iter().any(|p| {
            let ns = p.metadata.namespace.as_deref().unwrap_or_default();
            let spec = p.spec.clone().unwrap_or_default();
            spec.egress.iter().flatten().any(|rule| {
                let peers_ok = match rule.to.as_ref().filter(|t| !t.is_empty()) {
                    None => true,
                    Some(to) => to
                        .iter()
                        .any(|peer| self.peer_matches(peer, ns, &Source::Pod(dst))),
                };
                peers_ok && Self::ports_match(rule.ports.as_ref(), dst, port, protocol)
            })
        })
    }

    /// May `src` open a connection to `dst` on `port`/`protocol`?
    pub fn allowed(&self, src: &Source, dst: &Pod, port: u16, protocol: Protocol) -> bool {
        if dst.host_network {
            return true;
        }
        match src {
            Source::Pod(s) if s.key() == dst.key() => true,
            Source::Pod(s) => {
                self.egress_allows(s, dst, port, protocol)
                    && self.ingress_allows(src, dst, port, protocol)
            }
            // Traffic from a pod's own node is never policed.
            Source::Host { node, .. } if *node == dst.node => true,
            Source::Host { .. } => self.ingress_allows(src, dst, port, protocol),
        }
    }

    /// The expected table over `pods` (`ns/name`) for one port and protocol.
    pub fn expected(&self, pods: &[String], port: u16, protocol: Protocol) -> Matrix {
        let mut m = Matrix::filled(pods.iter().cloned(), false);
        for from in pods {
            for to in pods {
                let (Some(src), Some(dst)) = (self.pod(from), self.pod(to)) else {
                    continue;
                };
                m.set(
                    from,
                    to,
                    self.allowed(&Source::Pod(src), dst, port, protocol),
                );
            }
        }
        m
    }

    /// The members a PeerSet with `selector` must hold: pod IPs (sorted), or
    /// for a named-port selector the (IP, protocol, port) of every matched
    /// pod that declares the name (sorted).
    pub fn peer_set_members(&self, selector: &PeerSelector) -> (Vec<String>, Vec<PortMember>) {
        let mut ips = Vec::new();
        let mut ports = Vec::new();
        for pod in &self.pods {
            let Some(ip) = pod.ip.filter(|_| !pod.host_network) else {
                continue;
            };
            let ns_ok = match (&selector.namespace, &selector.namespace_selector) {
                (Some(ns), _) => pod.namespace == *ns,
                (None, Some(sel)) => selector_matches(sel, &self.ns_labels(&pod.namespace)),
                (None, None) => true,
            };
            let pod_ok = selector
                .pod_selector
                .as_ref()
                .is_none_or(|sel| selector_matches(sel, &pod.labels));
            if !(ns_ok && pod_ok) {
                continue;
            }
            match &selector.named_port {
                None => ips.push(ip.to_string()),
                Some(np) => {
                    for (name, protocol, port) in &pod.ports {
                        if name.as_deref() == Some(np.name.as_str())
                            && protocol.as_str() == np.protocol.as_lower().to_uppercase()
                        {
                            ports.push(PortMember {
                                ip: ip.to_string(),
                                protocol: np.protocol,
                                port: *port,
                            });
                        }
                    }
                }
            }
        }
        ips.sort_by_key(|ip| ip.parse::<Ipv4Addr>().ok());
        ips.dedup();
        ports.sort();
        ports.dedup();
        (ips, ports)
    }
}

impl Pod {
    /// The model's view of a Pod object.
    pub fn from_api(p: &KubePod) -> Pod {
        let spec = p.spec.clone().unwrap_or_default();
        let ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|cp| {
                let protocol = cp.protocol.as_deref().unwrap_or("TCP").parse().ok()?;
                Some((
                    cp.name.clone(),
                    protocol,
                    u16::try_from(cp.container_port).ok()?,
                ))
            })
            .collect();
        Pod {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            labels: p.metadata.labels.clone().unwrap_or_default(),
            ip: p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            node: spec.node_name.unwrap_or_default(),
            ports,
            host_network: spec.host_network.unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ip: &str, node: &str) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: [("pod".to_string(), name.to_string())].into(),
            ip: Some(ip.parse().unwrap()),
            node: node.into(),
            ports: vec![
                (Some("serve-80-tcp".into()), Protocol::Tcp, 80),
                (Some("serve-81-tcp".into()), Protocol::Tcp, 81),
                (Some("serve-80-udp".into()), Protocol::Udp, 80),
                (Some("serve-81-udp".into()), Protocol::Udp, 81),
            ],
            host_network: false,
        }
    }

    fn cluster(policies: &[&str]) -> Cluster {
        Cluster {
            namespaces: [
                (
                    "x".to_string(),
                    [("ns".to_string(), "x".to_string())].into(),
                ),
                (
                    "y".to_string(),
                    [("ns".to_string(), "y".to_string())].into(),
                ),
            ]
            .into(),
            pods: vec![
                pod("x", "a", "10.244.1.2", "n1"),
                pod("x", "b", "10.244.2.2", "n2"),
                pod("y", "a", "10.244.1.3", "n1"),
            ],
            policies: policies
                .iter()
                .map(|y| serde_yaml::from_str(y).unwrap())
                .collect(),
        }
    }

    fn allowed(c: &Cluster, from: &str, to: &str, port: u16, proto: Protocol) -> bool {
        c.allowed(
            &Source::Pod(c.pod(from).unwrap()),
            c.pod(to).unwrap(),
            port,
            proto,
        )
    }

    #[test]
    fn no_policy_allows_everything_and_deny_all_isolates_one_namespace() {
        let c = cluster(&[]);
        assert!(allowed(&c, "x/a", "y/a", 80, Protocol::Tcp));
        let c = cluster(&["metadata: {namespace: x, name: deny}\nspec: {podSelector: {}}"]);
        assert!(!allowed(&c, "y/a", "x/a", 80, Protocol::Tcp));
        assert!(!allowed(&c, "x/b", "x/a", 80, Protocol::Udp));
        assert!(
            allowed(&c, "x/a", "y/a", 80, Protocol::Tcp),
            "egress not isolated"
        );
        assert!(
            allowed(&c, "x/a", "x/a", 80, Protocol::Tcp),
            "a pod reaches itself"
        );
        assert_eq!(c.isolation(c.pod("x/a").unwrap()).0, ["x/deny"]);
        assert!(c.isolation(c.pod("y/a").unwrap()).0.is_empty());
    }

    #[test]
    fn peers_ports_and_named_ports() {
        let c = cluster(&[
            "metadata: {namespace: x, name: p}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [a]}]}}]\n    ports: [{port: serve-81-udp, protocol: UDP}, {port: 80, endPort: 80}]",
        ]);
        assert!(allowed(&c, "y/a", "x/a", 81, Protocol::Udp));
        assert!(allowed(&c, "y/a", "x/a", 80, Protocol::Tcp));
        assert!(!allowed(&c, "y/a", "x/a", 81, Protocol::Tcp));
        assert!(!allowed(&c, "y/a", "x/a", 80, Protocol::Udp));
        assert!(
            !allowed(&c, "x/b", "x/a", 80, Protocol::Tcp),
            "x is not ns=y"
        );
    }

    #[test]
    fn egress_ip_blocks_and_host_sources() {
        let c = cluster(&[
            "metadata: {namespace: x, name: e}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.244.1.0/24, except: [10.244.1.3/32]}}]",
            "metadata: {namespace: y, name: i}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.244.2.0/32}}]",
        ]);
        assert!(allowed(&c, "x/b", "x/a", 80, Protocol::Tcp));
        assert!(!allowed(&c, "x/b", "y/a", 80, Protocol::Tcp), "except");
        let ya = c.pod("y/a").unwrap();
        let host = |node, ip: &str| Source::Host {
            node,
            ip: ip.parse().unwrap(),
        };
        assert!(c.allowed(&host("n2", "10.244.2.0"), ya, 80, Protocol::Tcp));
        assert!(!c.allowed(&host("n3", "10.244.3.0"), ya, 80, Protocol::Tcp));
        assert!(
            c.allowed(&host("n1", "10.244.1.0"), ya, 80, Protocol::Tcp),
            "its own node"
        );
        assert_eq!(
            policy_types(&c.policies[0]),
            (false, true),
            "explicit Egress only"
        );
    }

    #[test]
    fn selector_operators() {
        let labels: Labels = [("a".to_string(), "1".to_string())].into();
        let sel = |y: &str| -> LabelSelector { serde_yaml::from_str(y).unwrap() };
        assert!(selector_matches(&sel("{}"), &labels));
        assert!(selector_matches(
            &sel("matchExpressions: [{key: a, operator: Exists}]"),
            &labels
        ));
        assert!(!selector_matches(
            &sel("matchExpressions: [{key: a, operator: DoesNotExist}]"),
            &labels
        ));
        assert!(selector_matches(
            &sel("matchExpressions: [{key: b, operator: NotIn, values: [x]}]"),
            &labels
        ));
        assert!(!selector_matches(
            &sel("matchExpressions: [{key: a, operator: NotIn, values: ['1']}]"),
            &labels
        ));
    }

    #[test]
    fn peer_set_members_follow_the_selector() {
        let c = cluster(&[]);
        let sel: PeerSelector = serde_yaml::from_str(
            "namespaceSelector: {matchLabels: {ns: x}}\nnamedPort: {name: serve-80-udp, protocol: UDP}",
        )
        .unwrap();
        let (ips, ports) = c.peer_set_members(&sel);
        assert!(ips.is_empty());
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].port, 80);
        let sel: PeerSelector = serde_yaml::from_str("namespace: y").unwrap();
        assert_eq!(c.peer_set_members(&sel).0, ["10.244.1.3"]);
    }
}
