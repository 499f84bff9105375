//! The ADD result document, in the shape of the request's CNI version. Pure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use crate::overlay::model::Mac;

/// The pod's gateway: link-local, answered by proxy ARP on the host veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 gateway: the host veth's own link-local address, the
/// EUI-64 one of [`HOST_MAC`] (Calico's), which canal-cni also configures
/// explicitly so it exists whatever the node's `addr_gen_mode`.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// The MAC every host-side veth gets (Calico's).
pub const HOST_MAC: Mac = Mac([0xee; 6]);

/// The pod's gateway of `ip`'s family.
pub fn gateway_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(GATEWAY),
        IpAddr::V6(_) => IpAddr::V6(GATEWAY_V6),
    }
}

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
    /// The pod's addresses, one per family, in the cluster's order.
    pub ips: Vec<IpAddr>,
    /// Interface MTU.
    pub mtu: u32,
}

/// The result for `cni_version`: interfaces [host veth, pod interface], the
/// pod addresses (/32, /128) with their link-local gateways, and a default
/// route per family, in the cluster's family order (the runtime takes the
/// first address as the pod's primary IP).
pub fn add_result(cni_version: &str, w: &Wired, legacy: bool) -> Value {
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    for ip in &w.ips {
        let (prefix, version, default) = match ip {
            IpAddr::V4(_) => (32, "4", "0.0.0.0/0"),
            IpAddr::V6(_) => (128, "6", "::/0"),
        };
        let gateway = gateway_for(*ip).to_string();
        let mut entry = json!({
            "address": format!("{ip}/{prefix}"),
            "gateway": gateway,
            "interface": 1,
        });
        if legacy {
            entry["version"] = json!(version);
        }
        ips.push(entry);
        routes.push(json!({"dst": default, "gw": gateway}));
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
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

/// The pod addresses recorded in a previous result (CHECK).
pub fn prev_ips(prev: &Value) -> Vec<IpAddr> {
    let Some(ips) = prev.get("ips").and_then(Value::as_array) else {
        return Vec::new();
    };
    ips.iter()
        .filter_map(|ip| {
            let addr = ip.get("address")?.as_str()?;
            addr.split('/').next()?.parse().ok()
        })
        .collect()
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
            ips: vec!["10.244.1.5".parse().unwrap()],
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
        assert_eq!(prev_ips(&r), vec!["10.244.1.5".parse::<IpAddr>().unwrap()]);
        assert!(prev_ips(&json!({})).is_empty());
    }

    #[test]
    fn dual_stack_result_has_an_address_and_a_default_route_per_family() {
        let mut w = wired();
        w.ips = vec![
            "fd00:10:244:1::5".parse().unwrap(),
            "10.244.1.5".parse().unwrap(),
        ];
        let r = add_result("1.0.0", &w, false);
        assert_eq!(
            r["ips"],
            json!([
                {"address": "fd00:10:244:1::5/128", "gateway": "fe80::ecee:eeff:feee:eeee", "interface": 1},
                {"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1},
            ])
        );
        assert_eq!(
            r["routes"],
            json!([
                {"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"},
                {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
            ])
        );
        assert_eq!(add_result("0.4.0", &w, true)["ips"][0]["version"], "6");
        assert_eq!(prev_ips(&r), w.ips);
        // The IPv6 gateway is the EUI-64 link-local of the host veth's MAC.
        let mut eui = [0u8; 8];
        eui[..3].copy_from_slice(&HOST_MAC.0[..3]);
        eui[3] = 0xff;
        eui[4] = 0xfe;
        eui[5..].copy_from_slice(&HOST_MAC.0[3..]);
        eui[0] ^= 0x02;
        assert_eq!(&GATEWAY_V6.octets()[8..], &eui);
    }
}
