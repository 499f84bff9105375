//! Stable names derived from Kubernetes objects. They must never change for
//! the same input: a restart that renamed an interface or a set would disrupt
//! established pod traffic.

use sha1::{Digest, Sha1};
use sha2::Sha256;

/// Prefix of every pod's host-side interface (Calico's scheme).
pub const VETH_PREFIX: &str = "cali";

/// Host-side interface of a pod: `cali` + the first 11 hex characters of
/// SHA-1("<namespace>.<pod>"), 15 characters, as Calico names it.
pub fn veth_name(namespace: &str, pod: &str) -> String {
    let digest = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    let mut name = String::with_capacity(15);
    name.push_str(VETH_PREFIX);
    name.push_str(&hex::encode(digest)[..11]);
    name
}

/// A short stable hash (16 hex characters of SHA-256) of `input`.
pub fn short_hash(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    hex::encode(&digest[..8])
}

/// Name of the PeerSet for a canonical selector text.
pub fn peer_set_name(canonical_selector: &str) -> String {
    format!("ps-{}", short_hash(canonical_selector))
}

/// The VXLAN device for a VNI, as flannel names it.
pub fn vxlan_device(vni: u32) -> String {
    format!("flannel.{vni}")
}

/// The IPv6 VXLAN device for a VNI, as flannel names it.
pub fn vxlan_device_v6(vni: u32) -> String {
    format!("flannel-v6.{vni}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_name_matches_calico() {
        // SHA-1("default.nginx") = 3a2e... ; Calico takes the first 11 hex chars.
        let name = veth_name("default", "nginx");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with("cali"));
        let digest = hex::encode(Sha1::digest(b"default.nginx"));
        assert_eq!(&name[4..], &digest[..11]);
        assert_ne!(
            veth_name("default", "nginx"),
            veth_name("default", "nginx2")
        );
    }

    #[test]
    fn peer_set_names_are_stable_and_short() {
        let a = peer_set_name("ns=x;pod=a");
        assert_eq!(a, peer_set_name("ns=x;pod=a"));
        assert_ne!(a, peer_set_name("ns=x;pod=b"));
        assert_eq!(a.len(), 19);
    }
}
