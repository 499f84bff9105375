//! `CanalNetwork`: the cluster's pod network. The controller acts on the one
//! named `default`; `kubectl edit canalnetwork default` is how it is tuned.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of the cluster's pod network: the address plan, the overlay
/// backend, NAT, and whether NetworkPolicy is enforced.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "canal.dev",
    version = "v1alpha1",
    kind = "CanalNetwork",
    status = "CanalNetworkStatus",
    shortname = "cnet",
    category = "canal",
    doc = "The cluster's pod network: the pod address plan, the VXLAN overlay and NetworkPolicy enforcement. The controller acts on the one named 'default'.",
    derive = "PartialEq",
    printcolumn(
        name = "ClusterCIDR",
        type_ = "string",
        json_path = ".spec.clusterCIDR"
    ),
    printcolumn(
        name = "SubnetLen",
        type_ = "integer",
        json_path = ".spec.nodeSubnetLength"
    ),
    printcolumn(name = "Backend", type_ = "string", json_path = ".spec.backend.type"),
    printcolumn(
        name = "VNI",
        type_ = "integer",
        json_path = ".spec.backend.vni",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Allocated",
        type_ = "integer",
        json_path = ".status.allocatedSubnets"
    ),
    printcolumn(name = "Free", type_ = "integer", json_path = ".status.freeSubnets"),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.programmed"
    ),
    printcolumn(
        name = "Policy",
        type_ = "string",
        json_path = ".status.policyEnforcement"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.clusterCIDR) || !isCIDR(self.clusterCIDR) || cidr(self.clusterCIDR).ip().family() != 4 || self.nodeSubnetLength > cidr(self.clusterCIDR).prefixLength()"
).message("nodeSubnetLength must be longer than the prefix of clusterCIDR (a /16 cluster needs nodeSubnetLength 17..30)").field_path(".nodeSubnetLength"))]
#[x_kube(validation = crate::validate::one_range_rule())]
#[x_kube(validation = crate::validate::primary_agrees_rule())]
#[x_kube(validation = crate::validate::subnet_length_v4_rule())]
#[x_kube(validation = crate::validate::subnet_length_v6_rule())]
#[x_kube(validation = crate::validate::subnet_count_v6_rule())]
pub struct CanalNetworkSpec {
    /// The range every pod address comes from (flannel's `Network`), as a
    /// network address in CIDR notation, e.g. 10.244.0.0/16 (an IPv6 range
    /// makes an IPv6-only cluster). Each node gets one
    /// subnet of it. Cannot change while subnets are allocated. With
    /// clusterCIDRs it may be left out; when both are set it must equal the
    /// first entry of clusterCIDRs.
    #[serde(
        rename = "clusterCIDR",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    #[schemars(length(min = 4, max = 43))]
    #[x_kube(validation = kube::core::Rule::new(
        "isCIDR(self) && cidr(self).masked() == cidr(self)"
    ).message("clusterCIDR must be a valid network in CIDR notation with no host bits set, e.g. 10.244.0.0/16 or fd00:10:244::/56"))]
    // What can never work, one rule per range so the message names it. The
    // table in `validate.rs` is the one source; a test checks that every
    // entry has its rule here.
    #[x_kube(validation = crate::validate::min_prefix_rule(crate::validate::MIN_PREFIX_V4))]
    #[x_kube(validation = crate::validate::min_prefix_rule_v6(crate::validate::MIN_PREFIX_V6))]
    #[x_kube(validation = crate::validate::reserved_rule(&crate::validate::RESERVED_V6[0]))]
    #[x_kube(validation = crate::validate::reserved_rule(&crate::validate::RESERVED_V6[1]))]
    #[x_kube(validation = crate::validate::reserved_rule(&crate::validate::RESERVED_V6[2]))]
    #[x_kube(validation = crate::validate::reserved_rule(&crate::validate::RESERVED_V6[3]))]
    #[x_kube(validation = crate::validate::reserved_rule(&crate::validate::RESERVED_V4[0]))]
    #[x_kube(validation = crate::validate::reserved_rule(&crate::validate::RESERVED_V4[1]))]
    #[x_kube(validation = crate::validate::reserved_rule(&crate::validate::RESERVED_V4[2]))]
    #[x_kube(validation = crate::validate::reserved_rule(&crate::validate::RESERVED_V4[3]))]
    #[x_kube(validation = crate::validate::reserved_rule(&crate::validate::RESERVED_V4[4]))]
    pub cluster_cidr: String,

    /// Prefix length of each node's pod subnet (flannel's `SubnetLen`), e.g.
    /// 24 gives every node 254 pod addresses. Must be longer than the
    /// clusterCIDR prefix and at most 30. Cannot change while subnets are
    /// allocated.
    #[serde(default = "default_node_subnet_length")]
    #[schemars(range(min = 1, max = 30))]
    pub node_subnet_length: u8,

    /// The pod ranges of a dual-stack or IPv6-only cluster (flannel's
    /// `Network` and `IPv6Network`): one IPv4 range, one IPv6 range, or one
    /// of each, primary first. Nodes get one subnet of each, and
    /// spec.podCIDRs lists them in this order. Empty: clusterCIDR alone.
    /// A range cannot change while subnets of it are allocated.
    #[serde(
        rename = "clusterCIDRs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 2), inner(length(min = 4, max = 43)))]
    #[x_kube(validation = crate::validate::cidrs_shape_rule())]
    #[x_kube(validation = crate::validate::cidrs_families_rule())]
    #[x_kube(validation = crate::validate::cidrs_min_prefix_rule(4, crate::validate::MIN_PREFIX_V4))]
    #[x_kube(validation = crate::validate::cidrs_min_prefix_rule(6, crate::validate::MIN_PREFIX_V6))]
    #[x_kube(validation = crate::validate::cidrs_reserved_rule(&crate::validate::RESERVED_V4[0]))]
    #[x_kube(validation = crate::validate::cidrs_reserved_rule(&crate::validate::RESERVED_V4[1]))]
    #[x_kube(validation = crate::validate::cidrs_reserved_rule(&crate::validate::RESERVED_V4[2]))]
    #[x_kube(validation = crate::validate::cidrs_reserved_rule(&crate::validate::RESERVED_V4[3]))]
    #[x_kube(validation = crate::validate::cidrs_reserved_rule(&crate::validate::RESERVED_V4[4]))]
    #[x_kube(validation = crate::validate::cidrs_reserved_rule(&crate::validate::RESERVED_V6[0]))]
    #[x_kube(validation = crate::validate::cidrs_reserved_rule(&crate::validate::RESERVED_V6[1]))]
    #[x_kube(validation = crate::validate::cidrs_reserved_rule(&crate::validate::RESERVED_V6[2]))]
    #[x_kube(validation = crate::validate::cidrs_reserved_rule(&crate::validate::RESERVED_V6[3]))]
    pub cluster_cidrs: Vec<String>,

    /// Prefix length of each node's IPv6 pod subnet (flannel's
    /// `IPv6SubnetLen`), e.g. 64. Must be longer than the IPv6 cluster
    /// range's prefix, at most 32 bits longer (4 billion nodes) and at most
    /// 126. Cannot change while IPv6 subnets are allocated.
    #[serde(
        rename = "nodeSubnetLengthV6",
        default = "default_node_subnet_length_v6"
    )]
    #[schemars(range(min = 1, max = 126))]
    pub node_subnet_length_v6: u8,

    /// How pod traffic crosses between nodes.
    #[serde(default)]
    pub backend: Backend,

    /// SNAT pod traffic that leaves clusterCIDR to the node's address.
    /// Pod-to-pod traffic is never masqueraded.
    #[serde(default = "default_true")]
    pub masquerade: bool,

    /// Underlay interface whose address carries the overlay (Canal's
    /// `canal_iface`), a Linux interface name such as eth0 or bond0.100.
    /// Empty: the interface of the default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    #[x_kube(validation = crate::validate::interface_rule())]
    pub interface: Option<String>,

    /// What happens to traffic from a pod to its own node after the pod's
    /// egress policy: Accept it, Drop it, or Return it to the node's INPUT
    /// chain for the node's own rules to decide.
    #[serde(default)]
    pub default_endpoint_to_host_action: EndpointToHostAction,

    /// NetworkPolicy enforcement.
    #[serde(default)]
    pub policy: PolicyConfig,
}

/// The overlay between nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// `vxlan` encapsulates pod traffic in VXLAN between nodes; `host-gw`
    /// routes it directly via node addresses (all nodes on one L2 segment).
    #[serde(rename = "type", default)]
    pub type_: BackendType,

    /// VXLAN network identifier (1..16777215). The device is `flannel.<vni>`.
    #[serde(default = "default_vni")]
    #[schemars(range(min = 1, max = 16_777_215))]
    pub vni: u32,

    /// UDP port of the VXLAN tunnel (flannel and the Linux kernel default to 8472).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,

    /// With VXLAN, route directly (no encapsulation) to nodes on the same L2
    /// segment as this node.
    #[serde(default)]
    pub direct_routing: bool,

    /// MTU of the overlay device and pod interfaces. 0 derives it from the
    /// underlay interface (its MTU minus 50 for VXLAN), which is almost always right.
    #[serde(default)]
    #[schemars(range(min = 0, max = 65535))]
    #[x_kube(validation = kube::core::Rule::new("self == 0 || self >= 576")
        .message("backend.mtu must be 0 (derive from the underlay) or at least 576"))]
    pub mtu: u32,
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            type_: BackendType::default(),
            vni: default_vni(),
            port: default_port(),
            direct_routing: false,
            mtu: 0,
        }
    }
}

/// Overlay backend type.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackendType {
    /// VXLAN encapsulation (flannel's default for Canal).
    #[default]
    #[serde(rename = "vxlan")]
    Vxlan,
    /// Plain routes via node addresses; needs every node on one L2 segment.
    #[serde(rename = "host-gw")]
    HostGw,
}

impl BackendType {
    /// The value written to flannel's `backend-type` annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
        }
    }
}

/// What happens to traffic from a pod to its own node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EndpointToHostAction {
    /// Accept it (Canal's default; kubelet, DNS on the node and node-local services work).
    #[default]
    Accept,
    /// Drop it.
    Drop,
    /// Return to the node's INPUT chain so the node's own rules decide.
    Return,
}

/// NetworkPolicy enforcement settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyConfig {
    /// Enforce Kubernetes NetworkPolicy on every node. When false, no filter
    /// rules are installed and every pod is reachable.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// What programs NetworkPolicy and masquerade on each node: Auto (the
    /// default: nftables where the kernel and tools support it and the node
    /// is not already committed to iptables-legacy), NFTables or IPTables.
    /// A live change moves every node over with no window in which denied
    /// traffic passes, and leaves nothing behind in the other.
    #[serde(default)]
    pub dataplane: PolicyDataplane,
    /// What a change that denies a flow does to connections conntrack
    /// already holds: Cut (the default) deletes exactly the conntrack
    /// entries the new policy denies, so the deny also ends established
    /// TCP connections and UDP flows; Keep leaves them until conntrack
    /// forgets them. Allowed flows are never cut.
    #[serde(default)]
    pub established: EstablishedFlows,
    /// Log denied connections: each node's agent writes one structured log
    /// line per denied connection attempt (source, destination, port,
    /// direction, the pod's isolating policies), rate-limited in the kernel
    /// (10 per second per pod and direction, bursts of 20) and in the agent.
    /// Off by default: the denied-packet metrics are always on.
    #[serde(default)]
    pub log_denied: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            enabled: true,
            dataplane: PolicyDataplane::Auto,
            established: EstablishedFlows::Cut,
            log_denied: false,
        }
    }
}

/// `spec.policy.dataplane`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyDataplane {
    /// nftables where the node supports it, else iptables.
    #[default]
    Auto,
    /// canal's own nftables table (`inet canal`).
    NFTables,
    /// iptables and ipset, through the node's iptables backend.
    IPTables,
}

/// `spec.policy.established`: established flows when a change denies them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EstablishedFlows {
    /// Delete the conntrack entries of flows the new policy denies.
    #[default]
    Cut,
    /// Leave established flows alone until conntrack forgets them.
    Keep,
}

/// Observed state of the pod network, written by the controller.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanalNetworkStatus {
    /// The metadata.generation the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready: the spec is applied. Degraded: something stops it, with a
    /// reason such as InvalidSpec, SubnetExhausted, Conflict or Ignored.
    /// PolicyPublished (the policy controller's, only after a problem):
    /// False while an object some nodes need cannot be written. A map keyed
    /// by type, so each controller owns only its own conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The clusterCIDR in effect. Differs from spec.clusterCIDR while a
    /// change that cannot be applied live is refused.
    #[serde(
        default,
        rename = "activeClusterCIDR",
        skip_serializing_if = "Option::is_none"
    )]
    pub active_cluster_cidr: Option<String>,

    /// The nodeSubnetLength in effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_node_subnet_length: Option<u8>,

    /// The pod ranges in effect, primary first (one per family). Differs
    /// from the spec while a change that cannot be applied live is refused.
    #[serde(
        default,
        rename = "activeClusterCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub active_cluster_cidrs: Vec<String>,

    /// The nodeSubnetLengthV6 in effect (IPv6 clusters).
    #[serde(
        default,
        rename = "activeNodeSubnetLengthV6",
        skip_serializing_if = "Option::is_none"
    )]
    pub active_node_subnet_length_v6: Option<u8>,

    /// Node subnets per family of the ranges in effect, primary first
    /// (totalSubnets, allocatedSubnets and freeSubnets count the primary
    /// family).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub family_subnets: Vec<FamilySubnets>,

    /// Node subnets clusterCIDR holds in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_subnets: Option<u64>,

    /// Node subnets assigned to Nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_subnets: Option<u64>,

    /// Node subnets still free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_subnets: Option<u64>,

    /// Nodes waiting for a subnet because clusterCIDR is exhausted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_nodes: Option<u64>,

    /// The pod network as the agents report it (their Nodes' condition
    /// CanalNetworkProgrammed), e.g. "2/3 nodes".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed: Option<String>,

    /// Nodes whose agent reports the pod network fully programmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed_nodes: Option<u32>,

    /// Nodes counted for `programmed` (every Node not being deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_nodes: Option<u32>,

    /// NetworkPolicy enforcement across nodes, e.g. "3/3 nodes".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_enforcement: Option<String>,

    /// Nodes whose agent has programmed the latest NodePolicySet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_enforced_nodes: Option<u32>,

    /// Nodes that have a NodePolicySet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_nodes: Option<u32>,
}

/// Node subnets of one family of the ranges in effect.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FamilySubnets {
    /// IPv4 or IPv6.
    pub family: String,
    /// The range in effect.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    /// Subnets the range holds in total.
    pub total: u64,
    /// Subnets assigned to Nodes.
    pub allocated: u64,
    /// Subnets still free.
    pub free: u64,
}

fn default_node_subnet_length() -> u8 {
    24
}
fn default_node_subnet_length_v6() -> u8 {
    64
}
fn default_vni() -> u32 {
    1
}
fn default_port() -> u32 {
    8472
}
fn default_true() -> bool {
    true
}

impl CanalNetwork {
    /// The pod ranges in force, primary first: status.activeClusterCIDRs,
    /// else status.activeClusterCIDR with the spec's other families, else
    /// the spec's ranges. Entries that do not parse are left out.
    pub fn pod_ranges(&self) -> Vec<ipnet::IpNet> {
        let parse = |t: &str| t.parse::<ipnet::IpNet>().ok();
        let spec: Vec<ipnet::IpNet> = self
            .spec
            .range_texts()
            .into_iter()
            .filter_map(parse)
            .collect();
        let status = self.status.as_ref();
        if let Some(s) = status.filter(|s| !s.active_cluster_cidrs.is_empty()) {
            return s
                .active_cluster_cidrs
                .iter()
                .filter_map(|t| parse(t))
                .collect();
        }
        match status
            .and_then(|s| s.active_cluster_cidr.as_deref())
            .and_then(parse)
        {
            Some(primary) => std::iter::once(primary)
                .chain(
                    spec.into_iter()
                        .filter(|c| c.addr().is_ipv4() != primary.addr().is_ipv4()),
                )
                .collect(),
            None => spec,
        }
    }
}

impl CanalNetworkSpec {
    /// A spec with every default and the given pod ranges (primary first),
    /// as `clusterCIDRs` with `clusterCIDR` set to the first.
    pub fn with_cluster_cidrs(cidrs: &[&str]) -> Self {
        CanalNetworkSpec {
            cluster_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            ..CanalNetworkSpec::with_cluster_cidr(cidrs.first().copied().unwrap_or_default())
        }
    }

    /// A spec with every default and the given cluster CIDR.
    ///
    /// (Also see [`CanalNetwork::pod_ranges`] for the ranges in force.)
    pub fn with_cluster_cidr(cluster_cidr: &str) -> Self {
        CanalNetworkSpec {
            cluster_cidr: cluster_cidr.to_string(),
            node_subnet_length: default_node_subnet_length(),
            cluster_cidrs: Vec::new(),
            node_subnet_length_v6: default_node_subnet_length_v6(),
            backend: Backend::default(),
            masquerade: true,
            interface: None,
            default_endpoint_to_host_action: EndpointToHostAction::default(),
            policy: PolicyConfig::default(),
        }
    }
}
