//! What the sharded object model shares between the writer (canal-controller)
//! and every reader (canal-agent, tools): the size bound, versioned
//! references and slice names.
//!
//! Anything that grows with the cluster is split the way EndpointSlices split
//! Endpoints: a *head* object lists its *slices*, each with the hash of the
//! version the head was written against. A reader uses a head only when it
//! holds every listed slice at the listed hash, so it never combines half of
//! a new version with half of an old one; the writer writes slices, then the
//! head, then deletes slices no head lists any more.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// No object canal writes is larger than this, serialized (the whole request
/// body). etcd refuses requests over 1.5 MiB and the API server bodies over
/// 3 MiB by default; 512 KiB keeps a wide margin, so nothing depends on an
/// API server configured with larger limits.
pub const MAX_OBJECT_BYTES: usize = 512 * 1024;

/// Label on every slice: the name of its head, so
/// `kubectl get peersets -l canal.dev/slice-of=<head>` lists a set's slices.
pub const SLICE_OF_LABEL: &str = "canal.dev/slice-of";

/// An object at one version: its name and the hash its spec carries.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct VersionRef {
    /// Object name.
    pub name: String,
    /// The `spec.hash` the object must have for this reference to hold.
    pub hash: String,
}

/// How a 64-bit version hash is written into `spec.hash` and references.
pub fn hash_text(hash: u64) -> String {
    format!("{hash:016x}")
}

/// The slice of `head` that holds the members whose hash starts with the
/// `depth` bits of `prefix` (most significant first): `<head>-s<bits>`.
pub fn slice_name(head: &str, depth: u8, prefix: u64) -> String {
    let mut name = String::with_capacity(head.len() + 2 + usize::from(depth));
    name.push_str(head);
    name.push_str("-s");
    for i in (0..depth).rev() {
        name.push(if prefix >> i & 1 == 1 { '1' } else { '0' });
    }
    name
}

/// The head a slice name belongs to (None: not a slice name).
pub fn head_of_slice(name: &str) -> Option<&str> {
    let (head, bits) = name.rsplit_once("-s")?;
    (!head.is_empty() && !bits.is_empty() && bits.bytes().all(|b| b == b'0' || b == b'1'))
        .then_some(head)
}

/// The (depth, prefix) a slice name encodes.
pub fn slice_prefix(name: &str) -> Option<(u8, u64)> {
    let (_, bits) = name.rsplit_once("-s")?;
    if bits.is_empty() || bits.len() > 63 || !bits.bytes().all(|b| b == b'0' || b == b'1') {
        return None;
    }
    let prefix = u64::from_str_radix(bits, 2).ok()?;
    Some((bits.len() as u8, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_names_round_trip() {
        let n = slice_name("ps-0123456789abcdef", 4, 0b0101);
        assert_eq!(n, "ps-0123456789abcdef-s0101");
        assert_eq!(head_of_slice(&n), Some("ps-0123456789abcdef"));
        assert_eq!(slice_prefix(&n), Some((4, 0b0101)));
        assert_eq!(slice_name("h", 1, 1), "h-s1");
        assert_eq!(head_of_slice("ps-0123456789abcdef"), None);
        assert_eq!(head_of_slice("node-s"), None);
        assert_eq!(head_of_slice("node-s2"), None);
        assert_eq!(hash_text(0xab), "00000000000000ab");
    }
}
