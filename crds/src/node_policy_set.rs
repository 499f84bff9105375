//! `NodePolicySet`: everything one node's agent needs to enforce
//! NetworkPolicy: its local endpoints and references to the shared
//! PolicyGroups (compiled policies) that select them. Peers are references to
//! shared `PeerSet`s or literal CIDRs, so a pod coming or going elsewhere in
//! the cluster never rewrites this object, and a policy selecting pods on
//! 5,000 nodes is written once, not once per node.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::sharding::VersionRef;

/// The spec of a NodePolicySet object (object name = node name): the
/// node's pods and references to the shared, content-hashed PolicyGroups
/// whose compiled policies select them. The node's complete policy (what
/// the agent enforces) is [`NodePolicySetSpec`], assembled by
/// [`crate::assemble`] from this object and the PolicyGroups it names.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "canal.dev",
    version = "v1alpha1",
    kind = "NodePolicySet",
    root = "NodePolicySetSchema",
    status = "NodePolicySetStatus",
    shortname = "nps",
    category = "canal",
    doc = "NetworkPolicy compiled for one node by canal-controller: the node's pods and the PolicyGroups (shared compiled policies) that apply to them. Named after the node; programmed by that node's canal-agent.",
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
        name = "Published",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Published\")].status",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodePolicySetObjectSpec {
    /// Pods on this node that are NetworkPolicy endpoints (hostNetwork pods
    /// are not). Every local pod is listed, isolated or not, so the agent can
    /// drop traffic for an interface it does not know yet.
    #[serde(default)]
    pub endpoints: Vec<NodeEndpoint>,
    /// The PolicyGroups the endpoints name, each at the version (spec.hash)
    /// this object was written against. The agent programs this object only
    /// once it holds every one of them at that version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_groups: Vec<VersionRef>,
    /// Compiled policies written inline (objects written by hand or by
    /// tools; canal-controller writes policyGroups instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<CompiledPolicy>,
}

crate::root::custom_resource_root!(
    /// A NodePolicySet object: [`NodePolicySetObjectSpec`] and the agent's status.
    NodePolicySet,
    twin = NodePolicySetSchema,
    spec = NodePolicySetObjectSpec,
    status = NodePolicySetStatus
);

/// A pod on this node as the object lists it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct NodeEndpoint {
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
    /// PolicyGroups (names, each listed in spec.policyGroups) whose
    /// policies select this pod; their policyTypes say for which directions
    /// they isolate it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_groups: Vec<String>,
    /// Inline policies (`namespace/name`, in spec.policies) that isolate
    /// this pod for ingress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_policies: Vec<String>,
    /// Inline policies that isolate this pod for egress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_policies: Vec<String>,
}

impl From<Endpoint> for NodeEndpoint {
    fn from(e: Endpoint) -> NodeEndpoint {
        NodeEndpoint {
            namespace: e.namespace,
            pod: e.pod,
            interface: e.interface,
            ips: e.ips,
            named_ports: e.named_ports,
            policy_groups: Vec::new(),
            ingress_policies: e.ingress_policies,
            egress_policies: e.egress_policies,
        }
    }
}

/// Everything inline: the form people write by hand.
impl From<NodePolicySetSpec> for NodePolicySetObjectSpec {
    fn from(s: NodePolicySetSpec) -> NodePolicySetObjectSpec {
        NodePolicySetObjectSpec {
            endpoints: s.endpoints.into_iter().map(NodeEndpoint::from).collect(),
            policy_groups: Vec::new(),
            policies: s.policies,
        }
    }
}

/// The complete compiled NetworkPolicy of one node, as its agent enforces
/// it: every local endpoint with the policies that isolate it, and those
/// policies' rules. Assembled from a NodePolicySet and the PolicyGroups it
/// names ([`crate::assemble::assemble_node`]); peers are PeerSet names.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodePolicySetSpec {
    /// Pods on this node that are NetworkPolicy endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Policies that select at least one endpoint of this node, compiled,
    /// one per name.
    #[serde(default)]
    pub policies: Vec<CompiledPolicy>,
}

/// A pod on this node, with the policies that isolate it (the assembled view).
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
    /// `Enforced` (written by the agent): the rules of observedGeneration
    /// are in the kernel. `Published` (written by canal-controller, only
    /// after a problem): False while an object this node needs cannot be
    /// written, with the reason; the node keeps the rules it has. A map
    /// keyed by type, so each writer owns only its own conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
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
    /// What the agent found when it last compared the kernel with what it
    /// programmed on request (annotation [`VERIFY_REQUEST_ANNOTATION`],
    /// `kubectl canal explain --verify`), and its latest drift repairs.
    /// Only this node's agent may write it (the agent admission policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Boxed: rarely set, and it would double the size of every status.
    pub kernel: Option<Box<KernelCheck>>,
}

/// The annotation on a NodePolicySet that asks its agent to compare the
/// kernel with what it programmed now; the value is an opaque request id,
/// echoed in `status.kernel.request` with the result.
pub const VERIFY_REQUEST_ANNOTATION: &str = "canal.dev/verify-request";

/// The agent's answer to the latest verify request.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KernelCheck {
    /// The request id answered (the annotation's value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// When the kernel was read for it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
    /// The NodePolicySet generation programmed at that time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// The dataplane read (iptables or nftables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<String>,
    /// The kernel held everything programmed when read.
    #[serde(default)]
    pub held: bool,
    /// What was missing or changed when read (repaired at once), or why the
    /// kernel could not be read or repaired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
    /// The latest drift repairs, newest first (at most 5), whatever found them
    /// (a firewall change notification, the periodic check, a request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repairs: Vec<DriftRepair>,
}

/// One repair of state changed outside the agent.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DriftRepair {
    /// When it was repaired (RFC 3339).
    pub repaired_at: String,
    /// What triggered the check: notification, periodic or request.
    pub found_by: String,
    /// What was written back (counts).
    pub changes: String,
    /// Chains rewritten (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<String>,
}
