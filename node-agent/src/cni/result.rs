//! The ADD result document, in the shape of the request's CNI version. Pure.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::overlay::model::Mac;

/// The pod's gateway: link-local, answered by proxy ARP on the host veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The MAC every host-side veth gets (Calico's).
pub const HOST_MAC: Mac = Mac([0xee; 6]);

/// What ADD set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wired {
    /// Host-side interface.
    pub host_if: String,
    /// Its MAC.
    pub host_mac: Mac,
    /// Pod-side interface (CNI_IFNAME).
    pub ifname: String,
    /// Its MAC.
    pub pod_mac: Mac,
    /// CNI_NETNS.
    pub sandbox: String,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Interface MTU.
    pub mtu: u32,
}

/// The result for `cni_version`: interfaces [host veth, pod interface], the
/// pod address as /32 with the link-local gateway, and the default route.
pub fn add_result(cni_version: &str, w: &Wired, legacy: bool) -> Value {
    let mut ip = json!({
        "address": format!("{}/32", w.ip),
        "gateway": GATEWAY.to_string(),
        "interface": 1,
    });
    if legacy {
        ip["version"] = json!("4");
    }
    let mut pod_if = json!({
        "name": w.ifname,
        "mac": w.pod_mac.to_string(),
        "sandbox": w.sandbox,
    });
    let mut host_if = json!({"name": w.host_if, "mac": w.host_mac.to_string()});
    if cni_version == "1.1.0" {
        pod_if["mtu"] = json!(w.mtu);
        host_if["mtu"] = json!(w.mtu);
    }
    json!({
        "cniVersion": cni_version,
        "interfaces": [host_if, pod_if],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY.to_string()}],
        "dns": {},
    })
}

/// The pod address recorded in a previous result (CHECK), if any.
pub fn prev_ip(prev: &Value) -> Option<Ipv4Addr> {
    prev.get("ips")?.as_array()?.iter().find_map(|ip| {
        let addr = ip.get("address")?.as_str()?;
        addr.split('/').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wired() -> Wired {
        Wired {
            host_if: "cali0123456789a".into(),
            host_mac: HOST_MAC,
            ifname: "eth0".into(),
            pod_mac: Mac([2, 0, 0, 0, 0, 9]),
            sandbox: "/var/run/netns/p1".into(),
            ip: "10.244.1.5".parse().unwrap(),
            mtu: 1450,
        }
    }

    #[test]
    fn result_1_0_0() {
        assert_eq!(
            add_result("1.0.0", &wired(), false),
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "cali0123456789a", "mac": "ee:ee:ee:ee:ee:ee"},
                    {"name": "eth0", "mac": "02:00:00:00:00:09", "sandbox": "/var/run/netns/p1"},
                ],
                "ips": [{"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
                "dns": {},
            })
        );
    }

    #[test]
    fn legacy_results_carry_the_ip_version_and_1_1_the_mtu() {
        let r = add_result("0.4.0", &wired(), true);
        assert_eq!(r["ips"][0]["version"], "4");
        assert_eq!(r["cniVersion"], "0.4.0");
        let r = add_result("1.1.0", &wired(), false);
        assert_eq!(r["interfaces"][1]["mtu"], 1450);
        assert_eq!(prev_ip(&r), Some("10.244.1.5".parse().unwrap()));
        assert_eq!(prev_ip(&json!({})), None);
    }
}
