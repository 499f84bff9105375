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
//!
//! IP families: a connection is of one family, between the source's and
//! the destination's addresses of that family. Selectors match pods in
//! every family; an ipBlock matches only addresses of its own family (an
//! IPv4 block never admits IPv6 traffic, nor an IPv6 block IPv4), as the
//! API documents `cidr` and `except` and as Calico and Cilium enforce it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use canal_crds::{PeerSelector, PortMember};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod as KubePod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};

use crate::Error;
use crate::lab::{Family, Matrix, Protocol};

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
    /// Its addresses, `status.podIPs` order (empty until it has one).
    pub ips: Vec<IpAddr>,
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

    /// Its address of `family`.
    pub fn ip(&self, family: Family) -> Option<IpAddr> {
        crate::lab::family::pick(&self.ips, family)
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
        /// The address the destination sees (its family is the
        /// connection's).
        ip: IpAddr,
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

/// Is `ip` in `cidr` and outside every `except`? `IpNet::contains` of a
/// network of the other family is false: a block never crosses families.
fn in_block(ip: IpAddr, cidr: &str, except: &[String]) -> bool {
    let parse = |c: &str| c.parse::<IpNet>().ok();
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

    /// Does a peer of a rule of a policy in `policy_ns` match `other` in a
    /// connection of `family`?
    fn peer_matches(
        &self,
        peer: &NetworkPolicyPeer,
        policy_ns: &str,
        other: &Source,
        family: Family,
    ) -> bool {
        if let Some(block) = &peer.ip_block {
            let ip = match other {
                Source::Pod(p) => p.ip(family),
                Source::Host { ip, .. } => Some(*ip).filter(|ip| Family::of(ip) == family),
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
    fn ingress_allows(
        &self,
        src: &Source,
        dst: &Pod,
        family: Family,
        port: u16,
        protocol: Protocol,
    ) -> bool {
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
                    Some(from) => from
                        .iter()
                        .any(|peer| self.peer_matches(peer, ns, src, family)),
                };
                peers_ok && Self::ports_match(rule.ports.as_ref(), dst, port, protocol)
            })
        })
    }

    /// Does the source pod's egress admit the connection?
    fn egress_allows(
        &self,
        src: &Pod,
        dst: &Pod,
        family: Family,
        port: u16,
        protocol: Protocol,
    ) -> bool {
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
                        .any(|peer| self.peer_matches(peer, ns, &Source::Pod(dst), family)),
                };
                peers_ok && Self::ports_match(rule.ports.as_ref(), dst, port, protocol)
            })
        })
    }

    /// May `src` open a connection to `dst` on `port`/`protocol` in
    /// `family`? Not when either end has no address of that family (a
    /// host source's address is of the connection's family).
    pub fn allowed(
        &self,
        src: &Source,
        dst: &Pod,
        family: Family,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        let src_has_family = match src {
            Source::Pod(s) => s.ip(family).is_some(),
            Source::Host { ip, .. } => Family::of(ip) == family,
        };
        if !src_has_family || (!dst.host_network && dst.ip(family).is_none()) {
            return false;
        }
        if dst.host_network {
            return true;
        }
        match src {
            Source::Pod(s) if s.key() == dst.key() => true,
            Source::Pod(s) => {
                self.egress_allows(s, dst, family, port, protocol)
                    && self.ingress_allows(src, dst, family, port, protocol)
            }
            // Traffic from a pod's own node is never policed.
            Source::Host { node, .. } if *node == dst.node => true,
            Source::Host { .. } => self.ingress_allows(src, dst, family, port, protocol),
        }
    }

    /// The family of the pods' first addresses (what `canal-lab matrix`
    /// probes unless told otherwise); IPv4 when no pod has an address.
    pub fn primary_family(&self) -> Family {
        self.pods
            .iter()
            .find_map(|p| p.ips.first())
            .map_or(Family::V4, Family::of)
    }

    /// The expected table over `pods` (`ns/name`) for one port and protocol
    /// in the pods' primary family ([`Cluster::primary_family`]).
    pub fn expected(&self, pods: &[String], port: u16, protocol: Protocol) -> Matrix {
        self.expected_in(pods, self.primary_family(), port, protocol)
    }

    /// The expected table over `pods` (`ns/name`) for one port and protocol
    /// in `family`.
    pub fn expected_in(
        &self,
        pods: &[String],
        family: Family,
        port: u16,
        protocol: Protocol,
    ) -> Matrix {
        let mut m = Matrix::filled(pods.iter().cloned(), false);
        for from in pods {
            for to in pods {
                let (Some(src), Some(dst)) = (self.pod(from), self.pod(to)) else {
                    continue;
                };
                m.set(
                    from,
                    to,
                    self.allowed(&Source::Pod(src), dst, family, port, protocol),
                );
            }
        }
        m
    }

    /// The members a PeerSet with `selector` must hold: pod IPs of every
    /// family (sorted, IPv4 first), or for a named-port selector the (IP,
    /// protocol, port) of every address of every matched pod that declares
    /// the name (sorted).
    pub fn peer_set_members(&self, selector: &PeerSelector) -> (Vec<String>, Vec<PortMember>) {
        let mut ips = Vec::new();
        let mut ports = Vec::new();
        for pod in &self.pods {
            if pod.host_network || pod.ips.is_empty() {
                continue;
            }
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
                None => ips.extend(pod.ips.iter().copied()),
                Some(np) => {
                    for (name, protocol, port) in &pod.ports {
                        if name.as_deref() == Some(np.name.as_str())
                            && protocol.as_str() == np.protocol.as_lower().to_uppercase()
                        {
                            ports.extend(pod.ips.iter().map(|ip| PortMember {
                                ip: ip.to_string(),
                                protocol: np.protocol,
                                port: *port,
                            }));
                        }
                    }
                }
            }
        }
        ips.sort();
        ips.dedup();
        let ips = ips.iter().map(IpAddr::to_string).collect();
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
            ips: pod_ips(p),
            node: spec.node_name.unwrap_or_default(),
            ports,
            host_network: spec.host_network.unwrap_or(false),
        }
    }
}

/// `status.podIPs` (or `status.podIP` when that is absent), in status
/// order, without duplicates.
fn pod_ips(p: &KubePod) -> Vec<IpAddr> {
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|ip| ip.ip.as_str());
    for ip in listed.chain(status.and_then(|s| s.pod_ip.as_deref())) {
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conformance pod with addresses `ips` (comma separated).
    fn pod(ns: &str, name: &str, ips: &str, node: &str) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: [("pod".to_string(), name.to_string())].into(),
            ips: ips.split(',').map(|ip| ip.parse().unwrap()).collect(),
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
        cluster_of(
            &[
                ("x", "a", "10.244.1.2", "n1"),
                ("x", "b", "10.244.2.2", "n2"),
                ("y", "a", "10.244.1.3", "n1"),
            ],
            policies,
        )
    }

    /// The same pods with an IPv6 address each after the IPv4 one.
    fn dual_cluster(policies: &[&str]) -> Cluster {
        cluster_of(
            &[
                ("x", "a", "10.244.1.2,fd00:10:244:1::2", "n1"),
                ("x", "b", "10.244.2.2,fd00:10:244:2::2", "n2"),
                ("y", "a", "10.244.1.3,fd00:10:244:1::3", "n1"),
            ],
            policies,
        )
    }

    fn cluster_of(pods: &[(&str, &str, &str, &str)], policies: &[&str]) -> Cluster {
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
            pods: pods
                .iter()
                .map(|(ns, name, ips, node)| pod(ns, name, ips, node))
                .collect(),
            policies: policies
                .iter()
                .map(|y| serde_yaml::from_str(y).unwrap())
                .collect(),
        }
    }

    fn allowed(c: &Cluster, from: &str, to: &str, port: u16, proto: Protocol) -> bool {
        allowed_in(c, from, to, Family::V4, port, proto)
    }

    fn allowed_in(
        c: &Cluster,
        from: &str,
        to: &str,
        family: Family,
        port: u16,
        proto: Protocol,
    ) -> bool {
        c.allowed(
            &Source::Pod(c.pod(from).unwrap()),
            c.pod(to).unwrap(),
            family,
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
        assert!(c.allowed(&host("n2", "10.244.2.0"), ya, Family::V4, 80, Protocol::Tcp));
        assert!(!c.allowed(&host("n3", "10.244.3.0"), ya, Family::V4, 80, Protocol::Tcp));
        assert!(
            c.allowed(&host("n1", "10.244.1.0"), ya, Family::V4, 80, Protocol::Tcp),
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

    #[test]
    fn ipv6_blocks_with_128_and_except() {
        let c = dual_cluster(&[
            "metadata: {namespace: x, name: a}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{ipBlock: {cidr: 'fd00:10:244:2::2/128'}}]",
            "metadata: {namespace: y, name: a}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 'fd00:10:244::/56', except: ['fd00:10:244:2::/64']}}]",
        ]);
        assert!(allowed_in(&c, "x/b", "x/a", Family::V6, 80, Protocol::Tcp));
        assert!(!allowed_in(&c, "y/a", "x/a", Family::V6, 80, Protocol::Tcp));
        assert!(
            !allowed_in(&c, "x/b", "x/a", Family::V4, 80, Protocol::Tcp),
            "an IPv6 /128 does not admit the same pod's IPv4 address"
        );
        assert!(allowed_in(&c, "x/a", "y/a", Family::V6, 80, Protocol::Udp));
        assert!(
            !allowed_in(&c, "x/b", "y/a", Family::V6, 80, Protocol::Udp),
            "except"
        );
        assert!(!allowed_in(&c, "x/a", "y/a", Family::V4, 80, Protocol::Udp));
        let host = Source::Host {
            node: "n2",
            ip: "fd00:10:244:2::".parse().unwrap(),
        };
        let ya = c.pod("y/a").unwrap();
        assert!(
            !c.allowed(&host, ya, Family::V6, 80, Protocol::Tcp),
            "except"
        );
        assert!(
            !c.allowed(&host, ya, Family::V4, 80, Protocol::Tcp),
            "a host source has one address, of the connection's family"
        );
    }

    #[test]
    fn a_block_of_one_family_never_opens_the_other_and_selectors_open_both() {
        let c = dual_cluster(&[
            "metadata: {namespace: x, name: v4}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{ipBlock: {cidr: 0.0.0.0/0}}]}]",
            "metadata: {namespace: x, name: v6-out}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: '::/0'}}]}]",
            "metadata: {namespace: y, name: sel}\nspec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}, namespaceSelector: {matchLabels: {ns: x}}}]}]",
        ]);
        assert!(allowed_in(&c, "y/a", "x/a", Family::V4, 80, Protocol::Tcp));
        assert!(!allowed_in(&c, "y/a", "x/a", Family::V6, 80, Protocol::Tcp));
        assert!(allowed_in(&c, "x/b", "y/a", Family::V6, 81, Protocol::Udp));
        assert!(!allowed_in(&c, "x/b", "y/a", Family::V4, 81, Protocol::Udp));
        for family in [Family::V4, Family::V6] {
            assert!(allowed_in(&c, "x/a", "y/a", family, 80, Protocol::Tcp));
            assert!(
                allowed_in(&c, "x/a", "x/a", family, 80, Protocol::Tcp),
                "a pod reaches itself"
            );
        }
        // An IPv4-only cluster has no IPv6 connections at all.
        let v4 = cluster(&[]);
        assert!(!allowed_in(
            &v4,
            "x/a",
            "y/a",
            Family::V6,
            80,
            Protocol::Tcp
        ));
        assert_eq!(v4.primary_family(), Family::V4);
        let keys: Vec<String> = c.pods.iter().map(Pod::key).collect();
        let t = c.expected_in(&keys, Family::V6, 80, Protocol::Tcp);
        assert_eq!(t.get("y/a", "x/a"), Some(false));
        assert_eq!(
            c.expected(&keys, 80, Protocol::Tcp).get("y/a", "x/a"),
            Some(true)
        );
    }

    #[test]
    fn peer_sets_hold_every_family() {
        let c = dual_cluster(&[]);
        let sel: PeerSelector = serde_yaml::from_str("namespace: y").unwrap();
        assert_eq!(
            c.peer_set_members(&sel).0,
            ["10.244.1.3", "fd00:10:244:1::3"]
        );
        let sel: PeerSelector =
            serde_yaml::from_str("namespace: x\nnamedPort: {name: serve-81-tcp, protocol: TCP}")
                .unwrap();
        assert_eq!(
            c.peer_set_members(&sel).1.len(),
            4,
            "two pods, two families"
        );
    }

    #[test]
    fn pod_ips_follow_status_order() {
        let p: KubePod = serde_yaml::from_str(
            "metadata: {name: a, namespace: x}\nstatus:\n  podIP: 'fd00::5'\n  podIPs: [{ip: 'fd00::5'}, {ip: 10.0.0.5}]",
        )
        .unwrap();
        let ips = Pod::from_api(&p).ips;
        assert_eq!(ips.len(), 2);
        assert!(ips[0].is_ipv6(), "IPv6 first, as the status lists it");
        let p: KubePod =
            serde_yaml::from_str("metadata: {name: a, namespace: x}\nstatus: {podIP: 10.0.0.5}")
                .unwrap();
        assert_eq!(
            Pod::from_api(&p).ips.len(),
            1,
            "podIP when podIPs is absent"
        );
    }
}
