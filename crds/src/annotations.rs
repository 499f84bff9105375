//! flannel's Node annotation keys and values, which canal-controller writes
//! and canal-agent reads, so existing flannel tooling keeps working.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// flannel's annotation prefix.
pub const PREFIX: &str = "flannel.alpha.coreos.com/";
/// Backend type ("vxlan" or "host-gw").
pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// Backend data: `{"VNI":1,"VtepMAC":"..."}`.
pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
/// IPv6 backend data, same shape: the MAC of `flannel-v6.<VNI>`.
pub const BACKEND_V6_DATA: &str = "flannel.alpha.coreos.com/backend-v6-data";
/// The node's underlay (VTEP) address.
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// The node's IPv6 underlay (VTEP) address.
pub const PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
/// Set by a person to publish another address than the InternalIP (NAT).
pub const PUBLIC_IP_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
/// The same for the IPv6 address.
pub const PUBLIC_IPV6_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ipv6-overwrite";
/// "true": the node takes part in the overlay.
pub const KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

/// The value of [`BACKEND_DATA`], with flannel's Go field names.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BackendData {
    /// VXLAN network identifier.
    #[serde(rename = "VNI")]
    pub vni: u32,
    /// MAC address of the node's VXLAN device, `aa:bb:cc:dd:ee:ff`.
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

/// The VTEP MAC of a node: a locally administered unicast address derived
/// from the node name, so it never changes across agent restarts or
/// reboots (flannel's random MAC left stale ARP/FDB entries on peers).
pub fn vtep_mac(node_name: &str) -> [u8; 6] {
    derived_mac(&format!("canal-vtep/{node_name}"))
}

/// The VTEP MAC of a node's IPv6 device `flannel-v6.<VNI>`, derived like
/// [`vtep_mac`] from another seed: the two devices of a dual-stack node are
/// two VTEPs and must not share a MAC (a peer's two FDBs would still be
/// apart, but a bridge or switch learning both would flap).
pub fn vtep_mac_v6(node_name: &str) -> [u8; 6] {
    derived_mac(&format!("canal-vtep-v6/{node_name}"))
}

fn derived_mac(seed: &str) -> [u8; 6] {
    let digest = Sha256::digest(seed.as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_stable_local_unicast() {
        let a = vtep_mac("node-1");
        assert_eq!(a, vtep_mac("node-1"));
        assert_ne!(a, vtep_mac("node-2"));
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
        let v6 = vtep_mac_v6("node-1");
        assert_eq!(v6, vtep_mac_v6("node-1"));
        assert_ne!(v6, a, "the IPv6 VTEP has its own MAC");
        assert_eq!(v6[0] & 0x03, 0x02, "local unicast");
    }

    #[test]
    fn mac_text_round_trips() {
        let mac = vtep_mac("n");
        assert_eq!(parse_mac(&format_mac(mac)), Some(mac));
        assert_eq!(
            parse_mac("AA:bb:cc:dd:ee:ff"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        );
        assert_eq!(parse_mac("aa:bb:cc:dd:ee"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
        assert_eq!(parse_mac("zz:bb:cc:dd:ee:ff"), None);
    }

    #[test]
    fn backend_data_uses_flannel_field_names() {
        let data = BackendData {
            vni: 1,
            vtep_mac: "0a:00:00:00:00:01".into(),
        };
        assert_eq!(
            serde_json::to_string(&data).unwrap(),
            r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"}"#
        );
    }
}
