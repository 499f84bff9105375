//! The masquerade keeper on nftables and across a dataplane switch, both
//! families, in a throwaway namespace: canal's `inet canal-masq` table
//! holds both families' rules; switching to iptables writes `CANAL-MASQ`
//! into iptables and ip6tables and deletes the table; switching back
//! leaves nothing of canal's in iptables.

mod support;

use canal_agent::masq::{Masquerade, RulesConfig};
use canal_agent::policy::DataplaneChoice;
use support::Netns;

fn config(dataplane: DataplaneChoice, masquerade: bool) -> RulesConfig {
    RulesConfig {
        ipv4: Some((
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        )),
        masquerade,
        ipv6: Some((
            "fd00:10:244::/56".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        )),
        dataplane,
    }
}

fn sh(ns: &Netns, script: &str) -> String {
    ns.sh("sh", &["-c", script])
}

#[tokio::test]
async fn masquerade_on_nftables_both_families_and_switching_leaves_nothing_behind() {
    let ns = Netns::new("cmn");
    let path = std::path::PathBuf::from(format!("/run/netns/{}", ns.name));
    let mut masq = Masquerade::in_netns(&path).unwrap();

    let first = masq
        .sync(&config(DataplaneChoice::NfTables, true), false)
        .await
        .unwrap();
    assert!(first.rewritten.contains(&"nft"), "{first:?}");
    let table = sh(&ns, "nft list table inet canal-masq");
    assert!(
        table.contains("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"),
        "{table}"
    );
    assert!(table.contains("ip6 saddr fd00:10:244::/56"), "{table}");
    assert!(!sh(&ns, "iptables-save; ip6tables-save").contains("CANAL-"));

    // In sync: nothing rewritten; a foreign flush of the table is repaired
    // by the resync's check.
    let again = masq
        .sync(&config(DataplaneChoice::NfTables, true), false)
        .await
        .unwrap();
    assert!(again.rewritten.is_empty(), "{again:?}");
    sh(&ns, "nft flush chain inet canal-masq postrouting");
    let repaired = masq
        .sync(&config(DataplaneChoice::NfTables, true), true)
        .await
        .unwrap();
    assert_eq!(repaired.repaired, vec!["nft"], "{repaired:?}");

    // masquerade: false keeps only the forward accepts.
    masq.sync(&config(DataplaneChoice::NfTables, false), false)
        .await
        .unwrap();
    let table = sh(&ns, "nft list table inet canal-masq");
    assert!(!table.contains("masquerade"), "{table}");

    let to_ipt = masq
        .sync(&config(DataplaneChoice::IpTables, true), false)
        .await
        .unwrap();
    assert!(to_ipt.rewritten.contains(&"nat"), "{to_ipt:?}");
    assert!(
        !ns.output("nft", &["list", "table", "inet", "canal-masq"])
            .status
            .success()
    );
    let v4 = sh(&ns, "iptables-save -t nat");
    let v6 = sh(&ns, "ip6tables-save -t nat");
    assert!(
        v4.contains("-A CANAL-MASQ -s 10.244.0.0/16 ! -d 224.0.0.0/4"),
        "{v4}"
    );
    assert!(
        v6.contains("-A CANAL-MASQ -s fd00:10:244::/56 ! -d ff00::/8"),
        "{v6}"
    );

    masq.sync(&config(DataplaneChoice::NfTables, true), false)
        .await
        .unwrap();
    let all = sh(&ns, "iptables-save; ip6tables-save");
    assert!(!all.contains("CANAL-"), "{all}");
    assert!(
        ns.output("nft", &["list", "table", "inet", "canal-masq"])
            .status
            .success()
    );
}
