//! `NodePolicySet`: everything one node's agent needs to enforce
//! NetworkPolicy: its local endpoints and the compiled policies that select
//! them. Peers are references to shared `PeerSet`s or literal CIDRs, so a pod
//! coming or going elsewhere in the cluster never rewrites this object.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The compiled NetworkPolicy of one node (object name = node name).
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "canal.dev",
    version = "v1alpha1",
    kind = "NodePolicySet",
    status = "NodePolicySetStatus",
    shortname = "nps",
    category = "canal",
    doc = "NetworkPolicy compiled for one node by canal-controller: the node's pods and the policy rules that apply to them. Named after the node; programmed by that node's canal-agent.",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Endpoints", type_ = "integer", json_path = ".status.endpoints"),
    printcolumn(name = "Rules", type_ = "integer", json_path = ".status.rules"),
    printcolumn(name = "Dataplane", type_ = "string", json_path = ".status.dataplane"),
    printcolumn(
        name = "Generation",
        type_ = "integer",
        json_path = ".metadata.generation"
    ),
    printcolumn(
        name = "Programmed",
        type_ = "integer",
        json_path = ".status.observedGeneration"
    ),
    printcolumn(
        name = "Enforced",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Enforced\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodePolicySetSpec {
    /// Pods on this node that are NetworkPolicy endpoints (hostNetwork pods
    /// are not). Every local pod is listed, isolated or not, so the agent can
    /// drop traffic for an interface it does not know yet.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Policies that select at least one endpoint of this node, compiled.
    #[serde(default)]
    pub policies: Vec<CompiledPolicy>,
}

/// A pod on this node.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Host-side interface of the pod (`cali` + 11 hex characters).
    pub interface: String,
    /// Pod IPs; empty until the CNI plugin has assigned one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// The pod's named container ports, for ingress rules that name a port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPort>,
    /// Policies (`namespace/name`) that isolate this pod for ingress. Empty:
    /// not isolated, all ingress allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_policies: Vec<String>,
    /// Policies (`namespace/name`) that isolate this pod for egress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_policies: Vec<String>,
}

/// A named container port of a pod.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct NamedPort {
    /// The port's name.
    pub name: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its number.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

/// One NetworkPolicy, compiled.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct CompiledPolicy {
    /// `namespace/name` of the NetworkPolicy.
    pub name: String,
    /// Ingress allow rules (applied when the policy isolates for ingress).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    /// Egress allow rules (applied when the policy isolates for egress).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
}

/// An allow rule: traffic matches when it matches one of `peers` (or peers
/// is absent) and one of `ports` (or ports is empty).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources (ingress) or destinations (egress). Absent: any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<Peer>>,
    /// Ports. Empty: every port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMatch>,
}

/// One peer: a shared PeerSet of pod addresses, or a CIDR block.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// Name of a PeerSet whose members are the peer's pod IPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_set: Option<String>,
    /// A literal block of addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// `cidr` minus every `except`.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct IpBlock {
    /// The block, in CIDR notation.
    pub cidr: String,
    /// Sub-blocks of cidr that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// A port or port range of one protocol.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct PortMatch {
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// A port number; absent with no namedPort means every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Last port of an inclusive range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    /// A container port name, resolved against each destination pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_port: Option<String>,
    /// For egress named ports: the PeerSet of (IP, protocol, port) of every pod
    /// that declares the name. Ingress named ports resolve against the node's
    /// own endpoints (their namedPorts) instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_port_set: Option<String>,
}

/// An IP protocol NetworkPolicy can name.
#[derive(
    JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum Protocol {
    /// TCP (the NetworkPolicy default).
    #[default]
    TCP,
    /// UDP.
    UDP,
    /// SCTP.
    SCTP,
}

impl Protocol {
    /// The name iptables and ipset use.
    pub fn as_lower(self) -> &'static str {
        match self {
            Protocol::TCP => "tcp",
            Protocol::UDP => "udp",
            Protocol::SCTP => "sctp",
        }
    }

    /// Parses the Kubernetes spelling ("TCP", "UDP", "SCTP").
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::TCP),
            "UDP" => Some(Protocol::UDP),
            "SCTP" => Some(Protocol::SCTP),
            _ => None,
        }
    }
}

/// What the node's agent has programmed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodePolicySetStatus {
    /// The metadata.generation the agent has programmed into the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Enforced: the rules of observedGeneration are in the kernel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Local endpoints programmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<u32>,
    /// iptables or nftables rules programmed for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<u32>,
    /// ipsets (or nftables sets and maps) programmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sets: Option<u32>,
    /// The dataplane that programs them: iptables or nftables
    /// (`spec.policy.dataplane` of the CanalNetwork, resolved on the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<String>,
}
