//! The masquerade rules against real iptables in a throwaway network
//! namespace: installed once, not rewritten when right, repaired after a
//! rule is deleted by hand, removed cleanly when masquerade is turned off,
//! and kube-proxy's own POSTROUTING rule is never touched.

mod support;

use canal_agent::masq::render::{FORWARD_JUMP, MASQ_JUMP};
use canal_agent::masq::{Iptables, Masquerade, Outcome, RulesConfig};
use support::Netns;

fn config(masquerade: bool) -> RulesConfig {
    RulesConfig {
        ipv4: Some((
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        )),
        masquerade,
        ipv6: None,
        dataplane: canal_agent::policy::DataplaneChoice::IpTables,
    }
}

fn save(ns: &Netns, table: &str) -> String {
    ns.sh("iptables-save", &["-t", table])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rules_of(save: &str, chain: &str) -> Vec<String> {
    let prefix = format!("-A {chain} ");
    save.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn rules_are_installed_kept_repaired_and_removed() {
    let ns = Netns::new("cmq");
    // kube-proxy got there first.
    ns.sh("iptables", &["-t", "nat", "-N", "KUBE-POSTROUTING"]);
    ns.sh(
        "iptables",
        &["-t", "nat", "-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"],
    );
    let mut masq = Masquerade::new(Iptables::with_prefix(["ip", "netns", "exec", &ns.name]));

    let first = masq.sync(&config(true), false).await.unwrap();
    assert_eq!(first.rewritten, vec!["nat", "filter"]);
    let nat = save(&ns, "nat");
    assert_eq!(
        rules_of(&nat, "POSTROUTING"),
        vec![
            "-A POSTROUTING -j KUBE-POSTROUTING".to_string(),
            MASQ_JUMP.to_string()
        ],
        "appended after kube-proxy's jump:\n{nat}"
    );
    let masq_rules = rules_of(&nat, "CANAL-MASQ");
    assert_eq!(masq_rules.len(), 6, "{nat}");
    assert!(
        masq_rules[4].ends_with("-j MASQUERADE --random-fully"),
        "{nat}"
    );
    let filter = save(&ns, "filter");
    assert_eq!(rules_of(&filter, "FORWARD"), vec![FORWARD_JUMP.to_string()]);
    assert_eq!(rules_of(&filter, "CANAL-FWD-ALLOW").len(), 2);

    // A periodic check of correct tables writes nothing.
    let check = masq.sync(&config(true), true).await.unwrap();
    assert_eq!(check, Outcome::default());

    // Drift: a rule and the jump deleted by hand come back on the next check.
    ns.sh("iptables", &["-t", "nat", "-D", "CANAL-MASQ", "5"]);
    ns.sh(
        "iptables",
        &[
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "canal: accept pod traffic",
            "-j",
            "CANAL-FWD-ALLOW",
        ],
    );
    let repaired = masq.sync(&config(true), true).await.unwrap();
    assert_eq!(repaired.repaired, vec!["nat", "filter"]);
    assert_eq!(save(&ns, "nat"), nat);
    assert_eq!(save(&ns, "filter"), filter);

    // Masquerade off: chain and jump gone, kube-proxy's rule and the
    // FORWARD accept chain stay.
    let off = masq.sync(&config(false), false).await.unwrap();
    assert_eq!(off.rewritten, vec!["nat"]);
    let nat_off = save(&ns, "nat");
    assert!(!nat_off.contains("CANAL-MASQ"), "{nat_off}");
    assert!(nat_off.contains("-A POSTROUTING -j KUBE-POSTROUTING"));
    assert_eq!(save(&ns, "filter"), filter);
    assert_eq!(
        masq.sync(&config(false), true).await.unwrap(),
        Outcome::default()
    );

    // And back on.
    masq.sync(&config(true), false).await.unwrap();
    assert_eq!(save(&ns, "nat"), nat);
}

/// An IPv6-only node (no IPv4 range, issue 14) masquerades IPv6 with
/// ip6tables and writes nothing into iptables; a node that later loses a
/// family loses that family's rules.
#[tokio::test]
async fn an_ipv6_only_node_masquerades_with_ip6tables_alone() {
    let ns = Netns::new("cmq6");
    let v6_only = RulesConfig {
        ipv4: None,
        ipv6: Some((
            "fd00:10:244::/56".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        )),
        ..config(true)
    };
    let mut masq = Masquerade::new(Iptables::with_prefix(["ip", "netns", "exec", &ns.name]));
    let first = masq.sync(&v6_only, false).await.unwrap();
    assert_eq!(first.rewritten, vec!["nat", "filter"]);
    let nat6 = ns.sh("ip6tables-save", &["-t", "nat"]);
    let rules = rules_of(&nat6, "CANAL-MASQ");
    assert!(
        rules
            .iter()
            .any(|r| r.contains("-s fd00:10:244::/56") && r.contains("MASQUERADE")),
        "{nat6}"
    );
    assert!(
        rules_of(&nat6, "POSTROUTING").contains(&MASQ_JUMP.to_string()),
        "{nat6}"
    );
    assert!(
        !save(&ns, "nat").contains("CANAL-MASQ"),
        "nothing in iptables"
    );
    assert_eq!(masq.sync(&v6_only, true).await.unwrap(), Outcome::default());
    // The node becomes IPv4-only: the IPv6 rules go.
    masq.sync(&config(true), false).await.unwrap();
    let nat6 = ns.sh("ip6tables-save", &["-t", "nat"]);
    assert!(!nat6.contains("CANAL-MASQ"), "{nat6}");
    assert!(save(&ns, "nat").contains("CANAL-MASQ"));
}
