//! The output stage's pure parts: how large the pieces of a sharded object
//! may be, how much each member and policy weighs, how a policy too large
//! for one slice is split into parts, and the request bodies (with the
//! size bound enforced at the moment they are built).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use canal_crds::sharding::SLICE_OF_LABEL;
use canal_crds::{
    CompiledPolicy, GroupPolicy, MANAGED_BY_LABEL, MAX_OBJECT_BYTES, PolicyType, Protocol, Rule,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Serialize;
use serde_json::value::RawValue;

use super::fingerprint::{self, Fingerprint, Fp};
use super::index::{Kind, PolicyIndex};

/// Value of the managed-by label on everything the policy controller writes.
pub const MANAGED_BY: &str = "canal-controller";

/// How large the objects canal writes may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// No request body is larger (the bound a test holds every shape to).
    pub max_object_bytes: usize,
    /// A PeerSet holds its members inline up to this many bytes of them;
    /// above, it is a head and slices of at most this much each. Small
    /// slices keep a pod event's write small (the slice that holds the pod
    /// and the head listing the slices are what every agent receives).
    pub peer_set_slice_bytes: u64,
    /// The same for a PolicyGroup's compiled policies.
    pub policy_group_slice_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_object_bytes: MAX_OBJECT_BYTES,
            peer_set_slice_bytes: 16 * 1024,
            policy_group_slice_bytes: 128 * 1024,
        }
    }
}

impl Limits {
    /// A policy larger than this is split into parts: half a slice, so
    /// parts pack into slices without one part filling a slice alone.
    pub fn policy_part_bytes(&self) -> usize {
        usize::try_from(self.policy_group_slice_bytes / 2)
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// Bytes of JSON an IP member takes in a slice (`"10.0.0.1",`).
pub fn ip_weight(ip: IpAddr) -> u64 {
    display_len(ip) + 3
}

/// Bytes of JSON a named-port member takes
/// (`{"ip":"10.0.0.1","protocol":"TCP","port":8080},`).
pub fn port_weight(ip: IpAddr, protocol: Protocol, port: u16) -> u64 {
    let proto = match protocol {
        Protocol::TCP | Protocol::UDP => 3,
        Protocol::SCTP => 4,
    };
    display_len(ip) + proto + display_len(port) + 32
}

fn display_len(v: impl std::fmt::Display) -> u64 {
    struct Count(u64);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len() as u64;
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing into a counter cannot fail.
    let _ = write!(c, "{v}");
    c.0
}

/// Serialized length of a value without building the string.
fn json_len<T: Serialize>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Plain data serializes; a failure only makes the estimate small, and
    // the size check on the real body still holds.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// What a whole policy serializes as (the same bytes as its one
/// [`GroupPolicy`] part), without copying its rules.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WholeView<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    policy_types: &'a [PolicyType],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    ingress: &'a [Rule],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    egress: &'a [Rule],
}

fn types_of(ingress: bool, egress: bool) -> Vec<PolicyType> {
    let mut types = Vec::new();
    if ingress {
        types.push(PolicyType::Ingress);
    }
    if egress {
        types.push(PolicyType::Egress);
    }
    types
}

/// The keys of a compiled policy's parts (see [`group_parts`]); a policy
/// that fits in one part (nearly all) is measured without being copied.
pub fn policy_part_keys(
    compiled: &CompiledPolicy,
    ingress: bool,
    egress: bool,
    part_bytes: usize,
    policy_fp: Fingerprint,
) -> smallvec::SmallVec<[PartKey; 1]> {
    let types = types_of(ingress, egress);
    let whole = json_len(&WholeView {
        name: &compiled.name,
        policy_types: &types,
        ingress: &compiled.ingress,
        egress: &compiled.egress,
    });
    if whole <= part_bytes {
        return smallvec::smallvec![PartKey {
            position: part_position(&compiled.name, 0),
            weight: whole as u64 + 1,
            content: Fp::new("part").fp(policy_fp).u64(0).finish(),
        }];
    }
    part_keys(
        &group_parts(compiled, ingress, egress, part_bytes),
        policy_fp,
    )
}

/// The compiled policy as a PolicyGroup holds it: one part, or, when its
/// JSON is larger than `part_bytes`, several, each with a subset of its
/// rules (a rule with many peers is split by peers; every rule allows
/// traffic on its own, so the union of the parts is the policy). A single
/// peer larger than `part_bytes` makes a part of its own.
pub fn group_parts(
    compiled: &CompiledPolicy,
    ingress: bool,
    egress: bool,
    part_bytes: usize,
) -> Vec<GroupPolicy> {
    let types = types_of(ingress, egress);
    let whole = GroupPolicy {
        name: compiled.name.clone(),
        policy_types: types.clone(),
        part: 0,
        ingress: compiled.ingress.clone(),
        egress: compiled.egress.clone(),
    };
    if json_len(&whole) <= part_bytes {
        return vec![whole];
    }
    let empty = GroupPolicy {
        ingress: Vec::new(),
        egress: Vec::new(),
        ..whole.clone()
    };
    // The rule lists' own brackets and keys come on top of the rules.
    let overhead = json_len(&empty) + r#","ingress":[],"egress":[]"#.len();
    let room = part_bytes.saturating_sub(overhead).max(1);
    let mut parts: Vec<GroupPolicy> = vec![empty.clone()];
    let mut used = 0usize;
    for (is_egress, rules) in [(false, &compiled.ingress), (true, &compiled.egress)] {
        for rule in rules {
            for piece in split_rule(rule, room) {
                let len = json_len(&piece) + 1;
                if used > 0 && used + len > room {
                    parts.push(GroupPolicy {
                        part: parts.len() as u32,
                        ..empty.clone()
                    });
                    used = 0;
                }
                used += len;
                let last = parts.last_mut().expect("parts starts non-empty");
                if is_egress {
                    last.egress.push(piece);
                } else {
                    last.ingress.push(piece);
                }
            }
        }
    }
    parts
}

/// A rule as pieces of at most `room` bytes: the rule itself, or its peers
/// in chunks with the same ports.
fn split_rule(rule: &Rule, room: usize) -> Vec<Rule> {
    let Some(peers) = rule.peers.as_ref().filter(|p| p.len() > 1) else {
        return vec![rule.clone()];
    };
    if json_len(rule) <= room {
        return vec![rule.clone()];
    }
    let bare = Rule {
        peers: Some(Vec::new()),
        ports: rule.ports.clone(),
    };
    let overhead = json_len(&bare);
    let mut out = vec![bare.clone()];
    let mut used = overhead;
    for peer in peers {
        let len = json_len(peer) + 1;
        let current = out
            .last()
            .and_then(|r| r.peers.as_ref())
            .map_or(0, Vec::len);
        if current > 0 && used + len > room {
            out.push(bare.clone());
            used = overhead;
        }
        used += len;
        if let Some(list) = out.last_mut().and_then(|r| r.peers.as_mut()) {
            list.push(peer.clone());
        }
    }
    out
}

/// Where a part sits and what it weighs, kept per policy so the index can
/// place it without serializing it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartKey {
    /// Position in the group's slices (a hash of the name and part number).
    pub position: u128,
    /// Bytes of JSON.
    pub weight: u64,
    /// Content fingerprint (the policy's and the part's).
    pub content: Fingerprint,
}

/// The keys of a policy's parts (`policy_fp` fingerprints its content).
pub fn part_keys(
    parts: &[GroupPolicy],
    policy_fp: Fingerprint,
) -> smallvec::SmallVec<[PartKey; 1]> {
    parts
        .iter()
        .map(|p| PartKey {
            position: part_position(&p.name, p.part),
            weight: json_len(p) as u64 + 1,
            content: Fp::new("part")
                .fp(policy_fp)
                .u64(u64::from(p.part))
                .finish(),
        })
        .collect()
}

/// Position of a part: by name, so a policy keeps its slice when its rules change.
pub fn part_position(name: &str, part: u32) -> u128 {
    Fp::new("part-position")
        .str(name)
        .u64(u64::from(part))
        .finish()
}

/// Why an object was not written.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Building the request body failed.
    #[error("encoding the object: {0}")]
    Json(#[from] serde_json::Error),
    /// The object is larger than canal writes.
    #[error(
        "{kind} {name} would be {bytes} bytes, over the {limit}-byte limit canal holds every object to"
    )]
    TooLarge {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// Its serialized size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

/// A server-side apply body, serialized once, and the desired-state
/// fingerprint it carries.
#[derive(Debug)]
pub struct Outgoing {
    /// The request body.
    pub body: Box<RawValue>,
    /// Desired-state fingerprint (for `mark_written`).
    pub fingerprint: Fingerprint,
}

/// The ownerReference every generated object carries: the CanalNetwork
/// `default` (no blockOwnerDeletion, which would need update rights on it).
pub fn owner_reference(uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: format!("{}/{}", canal_crds::GROUP, canal_crds::VERSION),
        kind: "CanalNetwork".into(),
        name: canal_crds::DEFAULT_NETWORK_NAME.into(),
        uid: uid.to_string(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// Metadata of a generated object: name, labels (managed-by; the head, on a
/// slice) and the owner.
pub fn object_metadata(name: &str, slice_of: Option<&str>, owner: &OwnerReference) -> ObjectMeta {
    let mut labels = BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())]);
    if let Some(head) = slice_of {
        labels.insert(SLICE_OF_LABEL.to_string(), head.to_string());
    }
    ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Serializes the spec once: its hash (for the annotation) and the request
/// body come from the same bytes. Refuses bodies over `limit`.
pub fn encode<S: Serialize>(
    kind: &'static str,
    mut metadata: ObjectMeta,
    spec: &S,
    fingerprint: Fingerprint,
    limit: usize,
) -> Result<Outgoing, EncodeError> {
    let spec_json = serde_json::to_string(spec)?;
    let content = fingerprint::of_bytes(spec_json.as_bytes());
    metadata.annotations = Some(BTreeMap::from([(
        fingerprint::ANNOTATION.to_string(),
        fingerprint::annotation_value(fingerprint, content),
    )]));
    let name = metadata.name.clone().unwrap_or_default();
    let metadata = serde_json::to_string(&metadata)?;
    let mut body = String::with_capacity(spec_json.len() + metadata.len() + 80);
    // Writing into a String cannot fail.
    let _ = write!(
        body,
        r#"{{"apiVersion":"{}/{}","kind":"{kind}","metadata":{metadata},"spec":{spec_json}}}"#,
        canal_crds::GROUP,
        canal_crds::VERSION,
    );
    if body.len() > limit {
        return Err(EncodeError::TooLarge {
            kind,
            name,
            bytes: body.len(),
            limit,
        });
    }
    Ok(Outgoing {
        body: RawValue::from_string(body)?,
        fingerprint,
    })
}

/// Renders and encodes one object as the controller writes it (None: it
/// should not exist).
pub fn encode_object(
    index: &PolicyIndex,
    kind: Kind,
    name: &str,
    owner: &OwnerReference,
) -> Option<Result<Outgoing, EncodeError>> {
    let limit = index.limits().max_object_bytes;
    match kind {
        Kind::PeerSet => index.render_peer_set(name).map(|r| {
            let meta = object_metadata(name, r.spec.slice_of.as_deref(), owner);
            encode("PeerSet", meta, &r.spec, r.fingerprint, limit)
        }),
        Kind::PolicyGroup => index.render_policy_group(name).map(|r| {
            let meta = object_metadata(name, r.spec.slice_of.as_deref(), owner);
            encode("PolicyGroup", meta, &r.spec, r.fingerprint, limit)
        }),
        Kind::NodePolicySet => index.render_node_policy_set(name).map(|r| {
            let meta = object_metadata(name, None, owner);
            encode("NodePolicySet", meta, &r.spec, r.fingerprint, limit)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canal_crds::{IpBlock, Peer, PortMatch};

    fn block(i: usize) -> Peer {
        Peer {
            peer_set: None,
            ip_block: Some(IpBlock {
                cidr: format!("10.{}.{}.0/24", i / 256, i % 256),
                except: vec![],
            }),
        }
    }

    #[test]
    fn weights_are_the_bytes_of_json() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(ip_weight(ip), r#""10.0.0.1","#.len() as u64);
        let m = canal_crds::PortMember {
            ip: "10.0.0.1".into(),
            protocol: Protocol::TCP,
            port: 8080,
        };
        assert_eq!(
            port_weight(ip, Protocol::TCP, 8080),
            serde_json::to_string(&m).unwrap().len() as u64 + 1
        );
    }

    #[test]
    fn a_large_policy_is_split_into_parts_that_add_up_to_it() {
        let compiled = CompiledPolicy {
            name: "x/big".into(),
            ingress: vec![
                Rule {
                    peers: Some((0..3000).map(block).collect()),
                    ports: vec![PortMatch {
                        protocol: Protocol::TCP,
                        port: Some(443),
                        end_port: None,
                        named_port: None,
                        named_port_set: None,
                    }],
                },
                Rule::default(),
            ],
            egress: vec![Rule {
                peers: Some((0..10).map(block).collect()),
                ports: vec![],
            }],
        };
        let parts = group_parts(&compiled, true, true, 16 * 1024);
        assert!(parts.len() > 5, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.part as usize, i);
            assert_eq!(p.name, "x/big");
            assert_eq!(p.policy_types, [PolicyType::Ingress, PolicyType::Egress]);
            assert!(json_len(p) <= 16 * 1024, "part {i}: {}", json_len(p));
        }
        // Every peer is in exactly one ingress piece with the rule's ports.
        let peers: Vec<&Peer> = parts
            .iter()
            .flat_map(|p| p.ingress.iter())
            .filter(|r| !r.ports.is_empty())
            .flat_map(|r| r.peers.iter().flatten())
            .collect();
        assert_eq!(peers.len(), 3000);
        assert!(parts.iter().any(|p| p.ingress.contains(&Rule::default())));
        let egress: usize = parts
            .iter()
            .flat_map(|p| p.egress.iter())
            .map(|r| r.peers.as_ref().map_or(0, Vec::len))
            .sum();
        assert_eq!(egress, 10);
        // Small policies stay whole.
        let small = group_parts(&CompiledPolicy::default(), true, false, 16 * 1024);
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].policy_types, [PolicyType::Ingress]);
        let keys = part_keys(&parts, 7);
        assert_eq!(keys.len(), parts.len());
        assert_ne!(keys[0].position, keys[1].position);
        assert_eq!(policy_part_keys(&compiled, true, true, 16 * 1024, 7), keys);
        let one = CompiledPolicy {
            name: "x/small".into(),
            ingress: vec![Rule::default()],
            egress: vec![],
        };
        assert_eq!(
            policy_part_keys(&one, true, false, 16 * 1024, 7),
            part_keys(&group_parts(&one, true, false, 16 * 1024), 7),
            "the fast path measures exactly what the parts would weigh"
        );
    }

    #[test]
    fn bodies_over_the_limit_are_refused_when_built() {
        let owner = owner_reference("u1");
        let spec = serde_json::json!({"ips": vec!["10.0.0.1"; 10]});
        let ok = encode(
            "PeerSet",
            object_metadata("ps-1", None, &owner),
            &spec,
            1,
            4096,
        )
        .unwrap();
        assert!(ok.body.get().contains(r#""kind":"PeerSet""#));
        match encode(
            "PeerSet",
            object_metadata("ps-1", None, &owner),
            &spec,
            1,
            100,
        ) {
            Err(EncodeError::TooLarge { bytes, limit, .. }) => {
                assert_eq!(limit, 100);
                assert!(bytes > 100);
            }
            other => panic!("{other:?}"),
        }
        let meta = object_metadata("ps-1-s0", Some("ps-1"), &owner);
        assert_eq!(meta.labels.unwrap()[SLICE_OF_LABEL], "ps-1");
    }
}
