//! One NetworkPolicy in, its compiled rules out: the `networking.k8s.io/v1`
//! semantics that do not depend on other objects (policyTypes defaulting,
//! which namespaces a peer means, ports, ipBlocks) and the validation that
//! keeps a malformed policy from reaching any node.
//!
//! Peers that select pods become [`PeerKey`]s: the index resolves each
//! distinct key to one shared PeerSet, named after the key's canonical text.

use canal_crds::names::peer_set_name;
use canal_crds::{
    CompiledPolicy, IpBlock, NamedPortRef, Peer, PeerSelector, PortMatch, Protocol, Rule,
};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::intern::{Interner, Sym};
use super::selector::{Selector, SelectorError};

/// Which namespaces a pod peer looks in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerScope {
    /// Only the policy's own namespace (a podSelector without namespaceSelector).
    Namespace(Sym),
    /// Every namespace whose labels match (`{}`: all namespaces).
    Namespaces(Selector),
}

/// A distinct set of peers that the index maintains as one PeerSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerKey {
    /// The IPs of the pods a peer selects.
    Pods {
        /// Where to look.
        scope: PeerScope,
        /// Which pods there; None: all of them.
        pods: Option<Selector>,
    },
    /// (IP, protocol, port) of every pod in the cluster that declares the
    /// named port, so an egress rule resolves the name per destination pod.
    NamedPort {
        /// The container port name.
        name: Sym,
        /// Its protocol.
        protocol: Protocol,
    },
}

impl PeerKey {
    /// Canonical text: equal for equal peers, stable across releases (the
    /// PeerSet name is its hash).
    pub fn canonical_text(&self) -> String {
        let pods = |p: &Option<Selector>| {
            p.as_ref()
                .map(Selector::canonical_text)
                .unwrap_or_else(|| "*".to_string())
        };
        match self {
            PeerKey::Pods {
                scope: PeerScope::Namespace(ns),
                pods: p,
            } => format!("pods;namespace={};pods={}", json(ns), pods(p)),
            PeerKey::Pods {
                scope: PeerScope::Namespaces(sel),
                pods: p,
            } => format!(
                "pods;namespaceSelector={};pods={}",
                sel.canonical_text(),
                pods(p)
            ),
            PeerKey::NamedPort { name, protocol } => {
                format!("namedPort;{}/{}", json(name), protocol.as_lower())
            }
        }
    }

    /// The selector as written into the PeerSet, for people.
    pub fn peer_selector(&self) -> PeerSelector {
        match self {
            PeerKey::Pods { scope, pods } => PeerSelector {
                namespace: match scope {
                    PeerScope::Namespace(ns) => Some(ns.to_string()),
                    PeerScope::Namespaces(_) => None,
                },
                namespace_selector: match scope {
                    PeerScope::Namespace(_) => None,
                    PeerScope::Namespaces(sel) => Some(sel.to_label_selector()),
                },
                pod_selector: pods.as_ref().map(Selector::to_label_selector),
                named_port: None,
            },
            PeerKey::NamedPort { name, protocol } => PeerSelector {
                named_port: Some(NamedPortRef {
                    name: name.to_string(),
                    protocol: *protocol,
                }),
                ..PeerSelector::default()
            },
        }
    }
}

/// A valid NetworkPolicy, compiled.
#[derive(Clone, Debug)]
pub struct PolicyDef {
    /// Which pods of the policy's namespace it applies to.
    pub pod_selector: Selector,
    /// It isolates the pods it selects for ingress.
    pub ingress: bool,
    /// It isolates the pods it selects for egress.
    pub egress: bool,
    /// The rules as the agents receive them (rules only for the directions
    /// the policy isolates).
    pub compiled: CompiledPolicy,
    /// Every distinct PeerSet the rules reference.
    pub peer_sets: Vec<PeerRef>,
}

/// A PeerSet a policy references.
#[derive(Clone, Debug)]
pub struct PeerRef {
    /// Object name (a hash of the canonical text).
    pub name: String,
    /// What it selects.
    pub key: PeerKey,
    /// Fingerprint of the canonical text (identifies `key`).
    pub key_fp: u128,
}

/// Where in a policy something is, formatted only when reporting a problem.
#[derive(Clone, Copy)]
struct At {
    section: &'static str,
    rule: usize,
    list: &'static str,
    item: usize,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spec.{}[{}].{}[{}]",
            self.section, self.rule, self.list, self.item
        )
    }
}

/// Why a policy is skipped: every problem found, for the Event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct InvalidPolicy {
    /// One line per problem, each naming the field.
    pub problems: Vec<String>,
}

/// Compiles `np`, or lists everything wrong with it.
pub fn compile(interner: &mut Interner, np: &NetworkPolicy) -> Result<PolicyDef, InvalidPolicy> {
    let namespace = np.metadata.namespace.clone().unwrap_or_default();
    let name = np.metadata.name.clone().unwrap_or_default();
    let namespace_sym = interner.intern(&namespace);
    let mut c = Compiler {
        interner,
        namespace: namespace_sym,
        problems: Vec::new(),
        peer_sets: Vec::new(),
    };
    let default_spec = Default::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);

    // An absent podSelector is the empty one: every pod of the namespace.
    let pod_selector = match Selector::parse(
        c.interner,
        spec.pod_selector.as_ref().unwrap_or(&Default::default()),
    ) {
        Ok(s) => Some(s),
        Err(e) => {
            c.problems.push(format!("spec.podSelector: {e}"));
            None
        }
    };

    let egress_rules = spec.egress.as_deref().unwrap_or_default();
    let ingress_rules = spec.ingress.as_deref().unwrap_or_default();
    let (ingress, egress) = match spec.policy_types.as_deref() {
        None | Some([]) => (true, !egress_rules.is_empty()),
        Some(types) => {
            let (mut i, mut e) = (false, false);
            for (n, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => i = true,
                    "Egress" => e = true,
                    other => c.problems.push(format!(
                        "spec.policyTypes[{n}]: {other:?} is neither Ingress nor Egress"
                    )),
                }
            }
            (i, e)
        }
    };

    let mut compiled = CompiledPolicy {
        name: format!("{namespace}/{name}"),
        ingress: Vec::new(),
        egress: Vec::new(),
    };
    if ingress {
        for (n, rule) in ingress_rules.iter().enumerate() {
            let at = At {
                section: "ingress",
                rule: n,
                list: "from",
                item: 0,
            };
            if let Some(r) = c.rule(at, rule.from.as_deref(), rule.ports.as_deref(), false) {
                compiled.ingress.push(r);
            }
        }
    }
    if egress {
        for (n, rule) in egress_rules.iter().enumerate() {
            let at = At {
                section: "egress",
                rule: n,
                list: "to",
                item: 0,
            };
            if let Some(r) = c.rule(at, rule.to.as_deref(), rule.ports.as_deref(), true) {
                compiled.egress.push(r);
            }
        }
    }

    match pod_selector {
        Some(pod_selector) if c.problems.is_empty() => Ok(PolicyDef {
            pod_selector,
            ingress,
            egress,
            compiled,
            peer_sets: c.peer_sets,
        }),
        _ => Err(InvalidPolicy {
            problems: c.problems,
        }),
    }
}

struct Compiler<'a> {
    interner: &'a mut Interner,
    namespace: Sym,
    problems: Vec<String>,
    peer_sets: Vec<PeerRef>,
}

impl Compiler<'_> {
    fn rule(
        &mut self,
        at: At,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
        egress: bool,
    ) -> Option<Rule> {
        let before = self.problems.len();
        let peers = match peers {
            None | Some([]) => None,
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .filter_map(|(item, p)| self.peer(At { item, ..at }, p))
                    .collect::<Vec<_>>(),
            ),
        };
        let mut matches = Vec::new();
        for (item, port) in ports.unwrap_or_default().iter().enumerate() {
            let at = At {
                list: "ports",
                item,
                ..at
            };
            if let Some(m) = self.port(at, port, egress) {
                matches.push(m);
            }
        }
        (self.problems.len() == before).then_some(Rule {
            peers,
            ports: matches,
        })
    }

    fn peer(&mut self, at: At, peer: &NetworkPolicyPeer) -> Option<Peer> {
        if let Some(block) = &peer.ip_block {
            if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
                self.problems.push(format!(
                    "{at}: ipBlock cannot be combined with podSelector or namespaceSelector"
                ));
                return None;
            }
            return self.ip_block(at, &block.cidr, block.except.as_deref().unwrap_or_default());
        }
        let pods = match &peer.pod_selector {
            None => None,
            Some(sel) => match Selector::parse(self.interner, sel) {
                Ok(s) if s.is_everything() => None,
                Ok(s) => Some(s),
                Err(e) => return self.selector_problem(at, "podSelector", e),
            },
        };
        let scope = match &peer.namespace_selector {
            None if peer.pod_selector.is_none() => {
                self.problems.push(format!(
                    "{at}: a peer needs a podSelector, a namespaceSelector or an ipBlock"
                ));
                return None;
            }
            None => PeerScope::Namespace(self.namespace.clone()),
            Some(sel) => match Selector::parse(self.interner, sel) {
                Ok(s) => PeerScope::Namespaces(s),
                Err(e) => return self.selector_problem(at, "namespaceSelector", e),
            },
        };
        let name = self.reference(PeerKey::Pods { scope, pods });
        Some(Peer {
            peer_set: Some(name),
            ip_block: None,
        })
    }

    fn selector_problem(&mut self, at: At, field: &str, e: SelectorError) -> Option<Peer> {
        self.problems.push(format!("{at}.{field}: {e}"));
        None
    }

    fn ip_block(&mut self, at: At, cidr: &str, except: &[String]) -> Option<Peer> {
        let net = match cidr.parse::<IpNet>() {
            Ok(n) => n.trunc(),
            Err(_) => {
                self.problems.push(format!(
                    "{at}.ipBlock.cidr: {cidr:?} is not an address block in CIDR notation"
                ));
                return None;
            }
        };
        let mut out = Vec::with_capacity(except.len());
        for (n, e) in except.iter().enumerate() {
            match e.parse::<IpNet>() {
                Ok(x) if net.contains(&x.trunc()) => out.push(x.trunc().to_string()),
                Ok(_) => self.problems.push(format!(
                    "{at}.ipBlock.except[{n}]: {e:?} is not inside cidr {net}"
                )),
                Err(_) => self.problems.push(format!(
                    "{at}.ipBlock.except[{n}]: {e:?} is not an address block in CIDR notation"
                )),
            }
        }
        out.sort();
        out.dedup();
        Some(Peer {
            peer_set: None,
            ip_block: Some(IpBlock {
                cidr: net.to_string(),
                except: out,
            }),
        })
    }

    fn port(&mut self, at: At, port: &NetworkPolicyPort, egress: bool) -> Option<PortMatch> {
        let protocol = match port.protocol.as_deref() {
            None => Protocol::TCP,
            Some(p) => match Protocol::parse(p) {
                Some(p) => p,
                None => {
                    self.problems
                        .push(format!("{at}.protocol: {p:?} is not TCP, UDP or SCTP"));
                    return None;
                }
            },
        };
        let mut m = PortMatch {
            protocol,
            port: None,
            end_port: None,
            named_port: None,
            named_port_set: None,
        };
        match &port.port {
            None => {
                if port.end_port.is_some() {
                    self.problems
                        .push(format!("{at}.endPort: needs a numeric port"));
                    return None;
                }
            }
            Some(IntOrString::Int(n)) => {
                let Some(first) = port_number(*n) else {
                    self.problems
                        .push(format!("{at}.port: {n} is not between 1 and 65535"));
                    return None;
                };
                m.port = Some(first);
                if let Some(end) = port.end_port {
                    match port_number(end) {
                        Some(last) if last >= first => m.end_port = Some(last),
                        _ => {
                            self.problems.push(format!(
                                "{at}.endPort: {end} must be between port {first} and 65535"
                            ));
                            return None;
                        }
                    }
                }
            }
            Some(IntOrString::String(name)) => {
                if port.end_port.is_some() {
                    self.problems.push(format!(
                        "{at}.endPort: not allowed with the named port {name:?}"
                    ));
                    return None;
                }
                if name.is_empty() {
                    self.problems.push(format!("{at}.port: empty port name"));
                    return None;
                }
                m.named_port = Some(name.clone());
                if egress {
                    let name = self.interner.intern(name);
                    m.named_port_set = Some(self.reference(PeerKey::NamedPort { name, protocol }));
                }
            }
        }
        Some(m)
    }

    /// Records a PeerSet reference and returns its name.
    fn reference(&mut self, key: PeerKey) -> String {
        if let Some(r) = self.peer_sets.iter().find(|r| r.key == key) {
            return r.name.clone();
        }
        let text = key.canonical_text();
        let name = peer_set_name(&text);
        self.peer_sets.push(PeerRef {
            name: name.clone(),
            key,
            key_fp: super::fingerprint::of_str(&text),
        });
        name
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(yaml: &str) -> NetworkPolicy {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn compile_yaml(yaml: &str) -> Result<PolicyDef, InvalidPolicy> {
        compile(&mut Interner::default(), &np(yaml))
    }

    #[test]
    fn policy_types_default_like_the_api_server() {
        // (spec, ingress, egress)
        let table = [
            ("podSelector: {}", true, false),
            ("podSelector: {}\negress: [{}]", true, true),
            ("podSelector: {}\negress: []", true, false),
            ("podSelector: {}\npolicyTypes: [Egress]", false, true),
            ("podSelector: {}\npolicyTypes: []\negress: [{}]", true, true),
            (
                "podSelector: {}\npolicyTypes: [Ingress]\negress: [{}]",
                true,
                false,
            ),
        ];
        for (spec, i, e) in table {
            let def = compile_yaml(&format!(
                "metadata: {{namespace: x, name: p}}\nspec:\n  {}",
                spec.replace('\n', "\n  ")
            ))
            .unwrap();
            assert_eq!((def.ingress, def.egress), (i, e), "{spec}");
            if !e {
                assert!(def.compiled.egress.is_empty(), "{spec}: egress rules kept");
            }
        }
    }

    #[test]
    fn peers_resolve_to_namespaces_as_the_api_says() {
        let def = compile_yaml(
            r#"
metadata: {namespace: x, name: p}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    - namespaceSelector: {matchLabels: {ns: y}}
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: c}}
    - namespaceSelector: {}
    - podSelector: {}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
  - {}
"#,
        )
        .unwrap();
        let texts: Vec<String> = def
            .peer_sets
            .iter()
            .map(|r| r.key.canonical_text())
            .collect();
        assert_eq!(
            texts,
            vec![
                r#"pods;namespace="x";pods={"pod" In ("b")}"#,
                r#"pods;namespaceSelector={"ns" In ("y")};pods=*"#,
                r#"pods;namespaceSelector={"ns" In ("y")};pods={"pod" In ("c")}"#,
                r#"pods;namespaceSelector={};pods=*"#,
                r#"pods;namespace="x";pods=*"#,
            ]
        );
        let rule = &def.compiled.ingress[0];
        let peers = rule.peers.as_ref().unwrap();
        assert_eq!(peers.len(), 6);
        assert_eq!(
            peers[0].peer_set.as_deref(),
            Some(def.peer_sets[0].name.as_str())
        );
        assert_eq!(
            peers[5].ip_block,
            Some(IpBlock {
                cidr: "10.0.0.0/8".into(),
                except: vec!["10.1.0.0/16".into()]
            })
        );
        assert_eq!(
            def.compiled.ingress[1],
            Rule::default(),
            "empty rule = allow all"
        );
        assert_eq!(def.compiled.name, "x/p");
    }

    #[test]
    fn ports_numeric_ranges_named_and_protocols() {
        let def = compile_yaml(
            r#"
metadata: {namespace: x, name: p}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - ports: [{port: 80}, {port: 8000, endPort: 8080, protocol: UDP}, {port: http}, {protocol: SCTP}]
  egress:
  - ports: [{port: dns, protocol: UDP}, {port: dns, protocol: UDP}]
"#,
        )
        .unwrap();
        let ing = &def.compiled.ingress[0].ports;
        assert_eq!(ing[0].port, Some(80));
        assert_eq!(ing[0].protocol, Protocol::TCP);
        assert_eq!((ing[1].port, ing[1].end_port), (Some(8000), Some(8080)));
        assert_eq!(ing[1].protocol, Protocol::UDP);
        assert_eq!(ing[2].named_port.as_deref(), Some("http"));
        assert_eq!(ing[2].named_port_set, None, "ingress resolves on the node");
        assert_eq!((ing[3].protocol, ing[3].port), (Protocol::SCTP, None));
        let eg = &def.compiled.egress[0].ports;
        let set = eg[0].named_port_set.clone().unwrap();
        assert_eq!(eg[1].named_port_set.as_deref(), Some(set.as_str()));
        assert_eq!(
            def.peer_sets.len(),
            1,
            "one shared set per name and protocol"
        );
        assert_eq!(
            def.peer_sets[0].key.canonical_text(),
            r#"namedPort;"dns"/udp"#
        );
        assert_eq!(
            def.peer_sets[0].key.peer_selector().named_port,
            Some(NamedPortRef {
                name: "dns".into(),
                protocol: Protocol::UDP
            })
        );
    }

    #[test]
    fn invalid_policies_list_every_problem() {
        let err = compile_yaml(
            r#"
metadata: {namespace: x, name: p}
spec:
  podSelector: {matchExpressions: [{key: a, operator: Foo, values: [x]}]}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.1/33}}, {ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]
    ports: [{port: http, endPort: 90}, {port: 0}, {port: 90, endPort: 80}, {protocol: ICMP}]
  egress:
  - to: [{}]
"#,
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "spec.podSelector: matchExpressions key \"a\": operator \"Foo\"",
            "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.1/33\"",
            "spec.ingress[0].from[1].ipBlock.except[0]: \"11.0.0.0/8\" is not inside cidr 10.0.0.0/8",
            "spec.ingress[0].ports[0].endPort: not allowed with the named port \"http\"",
            "spec.ingress[0].ports[1].port: 0 is not between 1 and 65535",
            "spec.ingress[0].ports[2].endPort: 80 must be between port 90 and 65535",
            "spec.ingress[0].ports[3].protocol: \"ICMP\"",
            "spec.egress[0].to[0]: a peer needs",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
        assert_eq!(err.problems.len(), 8, "{text}");
    }

    #[test]
    fn host_bits_in_a_legacy_cidr_are_masked() {
        let def = compile_yaml(
            "metadata: {namespace: x, name: p}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.1/8, except: [10.1.2.3/16]}}]}]\n",
        )
        .unwrap();
        let block = def.compiled.ingress[0].peers.as_ref().unwrap()[0]
            .ip_block
            .clone()
            .unwrap();
        assert_eq!(block.cidr, "10.0.0.0/8");
        assert_eq!(block.except, vec!["10.1.0.0/16".to_string()]);
    }
}
