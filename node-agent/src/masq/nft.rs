//! The overlay's masquerade and forward-accept rules as canal's own
//! nftables table `inet canal-masq` (pure): flannel's rule set of
//! [`super::render::masq_rules`], for every family the node has, in one
//! table (one transaction per change, nothing else touched).
//!
//! ```text
//! chain postrouting (nat hook postrouting priority srcnat)    per family, C = clusterCIDR, N = node subnet
//!     meta mark & 0x4000 == 0x4000 return                     kube-proxy masquerades its own
//!     ip saddr N ip daddr C return; ip saddr C ip daddr N return; ip saddr != C ip daddr N return
//!     ip saddr C ip daddr != 224.0.0.0/4 masquerade fully-random     (IPv6: ff00::/8)
//!     ip saddr != C ip daddr C masquerade fully-random
//! chain forward (filter hook forward priority filter)        ip saddr C accept; ip daddr C accept
//! ```
//!
//! An `accept` here ends only this table's chain: a node whose iptables
//! FORWARD policy drops must allow the pod network itself (as with
//! flannel's nftables mode).

use ipnet::IpNet;

use crate::policy::nft::ruleset::{BaseChain, NftChain, NftRuleset};

/// canal's masquerade table (`inet canal-masq`).
pub const TABLE: &str = "canal-masq";

/// The addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyNets {
    /// clusterCIDR of the family.
    pub cluster: IpNet,
    /// This node's pod subnet of the family.
    pub node: IpNet,
}

fn multicast(n: &IpNet) -> &'static str {
    match n {
        IpNet::V4(_) => "224.0.0.0/4",
        IpNet::V6(_) => "ff00::/8",
    }
}

fn ip(n: &IpNet) -> &'static str {
    match n {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

/// The table for `families`; masquerade rules only when `masquerade`.
pub fn ruleset(families: &[FamilyNets], masquerade: bool) -> NftRuleset {
    let mut r = NftRuleset {
        table: TABLE.to_string(),
        ..NftRuleset::default()
    };
    if masquerade {
        let n = "postrouting";
        let mut c = NftChain {
            base: Some(BaseChain {
                kind: "nat",
                hook: "postrouting",
                priority: 100,
            }),
            ..NftChain::default()
        };
        c.push(
            n,
            "meta mark & 0x00004000 == 0x00004000 return",
            "kube-proxy masquerades marked packets",
        );
        for f in families {
            let (p, cl, nd, mc) = (ip(&f.cluster), f.cluster, f.node, multicast(&f.cluster));
            c.push(
                n,
                format!("{p} saddr {nd} {p} daddr {cl} return"),
                "pod to pod, no NAT",
            );
            c.push(
                n,
                format!("{p} saddr {cl} {p} daddr {nd} return"),
                "pod to pod, no NAT",
            );
            c.push(
                n,
                format!("{p} saddr != {cl} {p} daddr {nd} return"),
                "to local pods, no NAT",
            );
            c.push(
                n,
                format!("{p} saddr {cl} {p} daddr != {mc} masquerade fully-random"),
                "pod traffic leaving the cluster",
            );
            c.push(
                n,
                format!("{p} saddr != {cl} {p} daddr {cl} masquerade fully-random"),
                "host traffic to remote pods",
            );
        }
        r.chains.insert(n.into(), c);
    }
    let n = "forward";
    let mut c = NftChain {
        base: Some(BaseChain {
            kind: "filter",
            hook: "forward",
            priority: 0,
        }),
        ..NftChain::default()
    };
    for f in families {
        let (p, cl) = (ip(&f.cluster), f.cluster);
        c.push(n, format!("{p} saddr {cl} accept"), "pod traffic");
        c.push(n, format!("{p} daddr {cl} accept"), "pod traffic");
    }
    r.chains.insert(n.into(), c);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fam(c: &str, n: &str) -> FamilyNets {
        FamilyNets {
            cluster: c.parse().unwrap(),
            node: n.parse().unwrap(),
        }
    }

    #[test]
    fn both_families_in_one_table_and_no_nat_when_off() {
        let both = [
            fam("10.244.0.0/16", "10.244.1.0/24"),
            fam("fd00:10:244::/56", "fd00:10:244:1::/64"),
        ];
        let r = ruleset(&both, true);
        let post: Vec<&str> = r.chains["postrouting"]
            .rules
            .iter()
            .map(|r| r.spec.as_str())
            .collect();
        assert_eq!(post.len(), 11);
        assert!(
            post.contains(
                &"ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"
            )
        );
        assert!(
            post.contains(
                &"ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random"
            )
        );
        assert_eq!(r.chains["forward"].rules.len(), 4);
        let off = ruleset(&both[..1], false);
        assert!(!off.chains.contains_key("postrouting"));
        assert_eq!(off.chains["forward"].rules.len(), 2);
        assert!(off.script().contains("add chain inet canal-masq forward { type filter hook forward priority 0; policy accept; }"));
    }
}
