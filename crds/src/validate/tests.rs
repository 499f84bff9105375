use super::*;

fn spec(cidr: &str, len: u8) -> CanalNetworkSpec {
    CanalNetworkSpec {
        node_subnet_length: len,
        ..CanalNetworkSpec::with_cluster_cidr(cidr)
    }
}

#[test]
fn accepts_defaults() {
    let cfg = spec("10.244.0.0/16", 24).validate().unwrap();
    assert_eq!(cfg.total_subnets(), 256);
    assert_eq!(cfg.port, 8472);
    assert_eq!(cfg.vni, 1);
    assert_eq!(cfg.mtu, None);
}

#[test]
fn rejects_bad_cidrs_and_lengths() {
    assert!(matches!(
        spec("10.244.0.0", 24).validate(),
        Err(SpecError::ClusterCidrInvalid { .. })
    ));
    assert!(matches!(
        spec("fd00::/64", 24).validate(),
        Err(SpecError::SubnetLengthV6 { .. })
    ));
    assert_eq!(
        spec("10.244.1.0/16", 24).validate(),
        Err(SpecError::ClusterCidrHostBits {
            value: "10.244.1.0/16".into(),
            network: "10.244.0.0/16".into()
        })
    );
    assert!(matches!(
        spec("10.244.0.0/16", 16).validate(),
        Err(SpecError::SubnetLength { .. })
    ));
    assert!(matches!(
        spec("10.244.0.0/16", 31).validate(),
        Err(SpecError::SubnetLength { .. })
    ));
    assert!(spec("10.244.0.0/16", 30).validate().is_ok());
}

#[test]
fn refuses_ranges_that_can_never_hold_pods() {
    for (cidr, range) in [
        ("127.0.0.0/8", "127.0.0.0/8"),
        ("127.1.0.0/16", "127.0.0.0/8"),
        ("0.0.0.0/8", "0.0.0.0/8"),
        ("169.254.0.0/16", "169.254.0.0/16"),
        ("169.254.1.0/24", "169.254.0.0/16"),
        ("169.0.0.0/8", "169.254.0.0/16"),
        ("224.0.0.0/4", "224.0.0.0/4"),
        ("239.1.0.0/16", "224.0.0.0/4"),
        ("240.0.0.0/4", "240.0.0.0/4"),
        ("255.255.255.0/24", "240.0.0.0/4"),
    ] {
        match spec(cidr, 30).validate() {
            Err(SpecError::ClusterCidrReserved { range: r, value }) => {
                assert_eq!((r.cidr, value.as_str()), (range, cidr));
            }
            other => panic!("{cidr}: expected overlap with {range}, got {other:?}"),
        }
    }
    let msg = spec("169.254.0.0/16", 24)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("169.254.1.1"), "{msg}");
    // Neighbours of the reserved ranges are fine.
    for ok in [
        "126.0.0.0/8",
        "128.0.0.0/8",
        "169.253.0.0/16",
        "223.0.0.0/8",
        "1.0.0.0/8",
    ] {
        assert!(spec(ok, 24).validate().is_ok(), "{ok}");
    }
}

#[test]
fn refuses_absurdly_wide_ranges() {
    for wide in ["10.0.0.0/7", "64.0.0.0/3", "32.0.0.0/3"] {
        let e = spec(wide, 24).validate().unwrap_err();
        assert!(
            matches!(e, SpecError::ClusterCidrTooWide { min: 8, .. }),
            "{wide}: {e:?}"
        );
        assert!(e.to_string().contains("/8 or longer"), "{e}");
    }
    assert!(spec("10.0.0.0/8", 24).validate().is_ok());
    // Wide and reserved: the reserved range is the better reason.
    for both in ["0.0.0.0/1", "0.0.0.0/0", "128.0.0.0/1"] {
        assert!(
            matches!(
                spec(both, 24).validate(),
                Err(SpecError::ClusterCidrReserved { .. })
            ),
            "{both}"
        );
    }
}

#[test]
fn interface_names_follow_the_kernel() {
    for bad in [
        "a b/c",
        "a b",
        "a/b",
        "eth0:1",
        ".",
        "..",
        "tab\there",
        "nl\n",
        "vt\u{b}x",
        "sixteen-bytes-xx",
        "ä123456789abcde",
    ] {
        let mut s = spec("10.244.0.0/16", 24);
        s.interface = Some(bad.into());
        assert!(
            matches!(s.validate(), Err(SpecError::Interface { .. })),
            "{bad:?} accepted"
        );
    }
    for good in [
        "eth0",
        "ens5",
        "bond0.100",
        "fifteen-bytes-x",
        "wg-ä",
        "...",
    ] {
        let mut s = spec("10.244.0.0/16", 24);
        s.interface = Some(good.into());
        assert!(s.validate().is_ok(), "{good:?} refused");
    }
    let mut s = spec("10.244.0.0/16", 24);
    s.interface = Some(String::new());
    assert_eq!(
        s.validate().unwrap().interface,
        None,
        "empty = default route"
    );
    s.interface = Some("a b/c".into());
    let msg = s.validate().unwrap_err().to_string();
    assert!(
        msg.contains("\"a b/c\"") && msg.contains("whitespace"),
        "{msg}"
    );
}

#[test]
fn ipv6_table_is_ready_for_cluster_cidrs() {
    for (net, range) in [
        ("::1/128", "::1/128"),
        ("fe80::/64", "fe80::/10"),
        ("ff02::/16", "ff00::/8"),
        ("::/0", "::/128"),
    ] {
        let r = reserved_overlap(net.parse().unwrap()).map(|r| r.cidr);
        assert_eq!(r, Some(range), "{net}");
    }
    assert_eq!(reserved_overlap("fd00:10::/56".parse().unwrap()), None);
    assert!(is_unusable_node_address("127.0.0.1".parse().unwrap()));
    assert!(is_unusable_node_address("255.255.255.255".parse().unwrap()));
    assert!(is_unusable_node_address("fe80::1".parse().unwrap()));
    assert!(!is_unusable_node_address("192.168.1.10".parse().unwrap()));
}

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[test]
fn every_reserved_range_has_its_cel_rule() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_string(&crate::CanalNetwork::crd()).unwrap();
    for r in &RESERVED_V4 {
        let rule = reserved_rule(r).rule;
        assert!(
            crd.contains(&serde_json::to_string(&rule).unwrap()),
            "no CEL rule for {}",
            r.cidr
        );
        assert!(crd.contains(&json(&reserved_message(r))), "{}", r.cidr);
    }
    assert!(crd.contains(&json(&min_prefix_message(MIN_PREFIX_V4))));
    assert!(crd.contains(&json(INTERFACE_MESSAGE)));
}

fn dual(cidrs: &[&str]) -> CanalNetworkSpec {
    CanalNetworkSpec::with_cluster_cidrs(cidrs)
}

#[test]
fn cluster_cidrs_one_range_per_family_primary_first() {
    let c = dual(&["10.244.0.0/16", "fd00:10:244::/56"])
        .validate()
        .unwrap();
    assert_eq!(
        c.cluster_cidrs(),
        vec![
            "10.244.0.0/16".parse::<IpNet>().unwrap(),
            "fd00:10:244::/56".parse().unwrap()
        ]
    );
    assert_eq!(c.ranges[1].subnet_len, 64);
    assert_eq!(c.ranges[1].total_subnets(), 256);
    assert_eq!(c.ipv4().map(|r| r.1), Some(24));
    let c = dual(&["fd00:10:244::/56", "10.244.0.0/16"])
        .validate()
        .unwrap();
    assert_eq!(c.ranges[0].family_name(), "IPv6");
    // IPv6-only, through clusterCIDRs or clusterCIDR alone.
    let c = dual(&["fd00:10:244::/56"]).validate().unwrap();
    assert_eq!(c.ipv4(), None);
    let c = spec("fd00:10:244::/56", 24).validate().unwrap();
    assert_eq!(c.ipv6().map(|r| r.1), Some(64));
    // Only clusterCIDRs (clusterCIDR unset).
    let mut only = dual(&["10.244.0.0/16", "fd00::/48"]);
    only.cluster_cidr.clear();
    assert_eq!(only.validate().unwrap().ranges.len(), 2);
    only.cluster_cidrs.clear();
    assert_eq!(only.validate(), Err(SpecError::NoClusterCidr));
}

#[test]
fn cluster_cidrs_refuse_what_cannot_work() {
    for (cidrs, what) in [
        (&["10.244.0.0/16", "10.245.0.0/16"][..], "families"),
        (&["fd00::/48", "fd01::/48"][..], "families"),
        (&["10.0.0.0/16", "fd00::/48", "10.1.0.0/16"][..], "families"),
        (&["fe80::/48"][..], "reserved"),
        (&["10.244.0.0/16", "ff00::/48"][..], "reserved"),
        (&["10.244.0.0/16", "::1/128"][..], "reserved"),
        (&["fd00::/16"][..], "wide"),
        (&["fd00::1/64"][..], "host bits"),
        (&["fd00::/120"][..], "v6 length"),
        (&["fd00::/24"][..], "wide"),
    ] {
        let e = dual(cidrs).validate().unwrap_err();
        let ok = match what {
            "families" => matches!(e, SpecError::ClusterCidrFamilies { .. }),
            "reserved" => matches!(e, SpecError::ClusterCidrReserved { .. }),
            "wide" => matches!(e, SpecError::ClusterCidrTooWide { min: 32, .. }),
            "host bits" => matches!(e, SpecError::ClusterCidrHostBits { .. }),
            _ => matches!(e, SpecError::SubnetLengthV6 { .. }),
        };
        assert!(ok, "{cidrs:?}: expected {what}, got {e:?}");
    }
    // /32 with /64 subnets is 2^32 subnets: the limit.
    let mut s = dual(&["2001:db8::/32"]);
    assert_eq!(s.validate().unwrap().ranges[0].total_subnets(), 1 << 32);
    s.node_subnet_length_v6 = 65;
    assert_eq!(
        s.validate(),
        Err(SpecError::SubnetLengthV6 {
            value: 65,
            cluster_prefix: 32
        })
    );
    s.node_subnet_length_v6 = 127;
    assert!(s.validate().is_err());
    // The IPv4 subnet length is checked against the IPv4 entry.
    let mut s = dual(&["fd00::/48", "10.244.0.0/16"]);
    s.cluster_cidr = "fd00::/48".into();
    s.node_subnet_length = 16;
    assert!(matches!(s.validate(), Err(SpecError::SubnetLength { .. })));
    // clusterCIDR must agree with the first entry (textual forms may differ).
    let mut s = dual(&["10.244.0.0/16", "fd00::/48"]);
    s.cluster_cidr = "10.245.0.0/16".into();
    assert!(matches!(
        s.validate(),
        Err(SpecError::PrimaryDisagrees { .. })
    ));
    let mut s = dual(&["fd00:0::/48", "10.244.0.0/16"]);
    s.cluster_cidr = "fd00::/48".into();
    assert!(s.validate().is_ok());
    s.cluster_cidr = "10.244.0.0/16".into();
    assert!(matches!(
        s.validate(),
        Err(SpecError::PrimaryDisagrees { .. })
    ));
}

#[test]
fn every_cidrs_rule_is_in_the_crd() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_string(&crate::CanalNetwork::crd()).unwrap();
    for r in RESERVED_V4.iter().chain(&RESERVED_V6) {
        for rule in [reserved_rule(r), cidrs_reserved_rule(r)] {
            assert!(
                crd.contains(&serde_json::to_string(&rule.rule).unwrap()),
                "no CEL rule for {}",
                r.cidr
            );
        }
    }
    for m in [
        CIDRS_SHAPE_MESSAGE,
        CIDRS_FAMILIES_MESSAGE,
        ONE_RANGE_MESSAGE,
        PRIMARY_AGREES_MESSAGE,
        SUBNET_V4_MESSAGE,
        SUBNET_V6_MESSAGE,
        SUBNET_COUNT_V6_MESSAGE,
    ] {
        assert!(crd.contains(&json(m)), "{m}");
    }
    assert!(crd.contains(&json(&min_prefix_message_family(6, MIN_PREFIX_V6))));
}

#[test]
fn rejects_bad_backend_numbers() {
    let mut s = spec("10.244.0.0/16", 24);
    s.backend.vni = 0;
    assert_eq!(s.validate(), Err(SpecError::Vni { value: 0 }));
    s.backend.vni = 16_777_216;
    assert!(s.validate().is_err());
    s.backend.vni = 16_777_215;
    s.backend.port = 70000;
    assert_eq!(s.validate(), Err(SpecError::Port { value: 70000 }));
    s.backend.port = 4789;
    s.backend.mtu = 100;
    assert_eq!(s.validate(), Err(SpecError::Mtu { value: 100 }));
    s.backend.mtu = 1400;
    assert_eq!(s.validate().unwrap().mtu, Some(1400));
}
