//! Kernel names owned by policy enforcement (CONTRACTS.md "Kernel names").
//! Every name is a pure function of its input, so a restarted agent computes
//! the same names and adopts what is already in the kernel.

use canal_crds::names::short_hash;

use super::ruleset::Table;

/// Hooked from FORWARD at position 1.
pub const FORWARD_CHAIN: &str = "CANAL-FORWARD";
/// Hooked from INPUT at position 1.
pub const INPUT_CHAIN: &str = "CANAL-INPUT";
/// raw table, hooked from PREROUTING at position 1: anti-spoofing.
pub const PREROUTING_CHAIN: &str = "CANAL-PREROUTING";
/// security table, hooked from FORWARD at position 1: the fail-closed guard.
pub const GUARD_FORWARD_CHAIN: &str = "CANAL-GUARD-FORWARD";
/// security table, hooked from INPUT at position 1: the fail-closed guard.
pub const GUARD_INPUT_CHAIN: &str = "CANAL-GUARD-INPUT";
/// Egress dispatch: `-i <iface> -g CANAL-FW-<iface>`.
pub const FROM_WL_CHAIN: &str = "CANAL-FROM-WL";
/// Ingress dispatch: `-o <iface> -g CANAL-TW-<iface>`.
pub const TO_WL_CHAIN: &str = "CANAL-TO-WL";
/// Prefix of a pod's ingress chain (to the workload).
pub const TO_ENDPOINT_PREFIX: &str = "CANAL-TW-";
/// Prefix of a pod's egress chain (from the workload).
pub const FROM_ENDPOINT_PREFIX: &str = "CANAL-FW-";
/// Prefix of a policy's ingress chain.
pub const POLICY_INGRESS_PREFIX: &str = "CANAL-PI-";
/// Prefix of a policy's egress chain.
pub const POLICY_EGRESS_PREFIX: &str = "CANAL-PO-";
/// Prefix of every ipset policy enforcement owns.
pub const SET_PREFIX: &str = "canal-";
/// Prefix of temporary sets used to swap a set whose metadata changed.
pub const TEMP_SET_PREFIX: &str = "canal-t-";
/// Host-side interface prefix of pods (`cali+` in iptables).
pub const IFACE_PREFIX: &str = "cali";
/// iptables wildcard for every pod interface.
pub const IFACE_WILDCARD: &str = "cali+";

/// Longest chain name iptables accepts (XT_EXTENSION_MAXNAMELEN - 1 = 28).
pub const MAX_CHAIN_LEN: usize = 28;
/// Longest ipset name (IPSET_MAXNAMELEN - 1 = 31).
pub const MAX_SET_LEN: usize = 31;
/// Longest Linux interface name (IFNAMSIZ - 1).
pub const MAX_IFACE_LEN: usize = 15;

/// Set on a packet once its destination pod's ingress policy allowed it
/// (an ingress policy chain sets it; a pod's not-isolated ingress chain
/// too). Within 0x00ff0000, the bits CONTRACTS.md gives to policy enforcement.
pub const INGRESS_MARK: u32 = 0x0001_0000;
/// Set once the source pod's egress policy allowed the packet.
pub const EGRESS_MARK: u32 = 0x0002_0000;
/// The conntrack mark bit of an established flow policy now denies
/// (`spec.policy.established: Cut`, conntrack.rs): the filter chains drop
/// packets of marked entries before their `established` accept.
pub const CUT_MARK: u32 = 0x0100_0000;
/// The NFLOG group of denied-connection log rules (`spec.policy.logDenied`,
/// flowlog.rs reads it over nfnetlink_log).
pub const DENIED_LOG_GROUP: u16 = 7651;
/// Kernel rate limit of those rules, per pod and direction: per second, burst.
pub const DENIED_LOG_RATE: (u32, u32) = (10, 20);

/// The NFLOG prefix of a denied-connection log rule: `canal-deny:i:<iface>`
/// (ingress) or `canal-deny:e:<iface>` (egress); at most 29 characters.
pub fn denied_log_prefix(iface: &str, ingress: bool) -> String {
    format!("canal-deny:{}:{iface}", if ingress { 'i' } else { 'e' })
}

/// Both verdict marks.
pub const VERDICT_MARKS: u32 = INGRESS_MARK | EGRESS_MARK;

/// Comment prefix of every rule: `canal:<16 hex>` is read back from `iptables-save`.
pub const COMMENT_PREFIX: &str = "canal:";

/// The table of a chain policy enforcement owns, or None when it owns no
/// chain of that name. `CANAL-FWD-ALLOW` and `CANAL-MASQ` belong to the
/// overlay and are deliberately not matched: `CANAL-FW-` needs the dash
/// after `FW`.
pub fn chain_table(name: &str) -> Option<Table> {
    match name {
        PREROUTING_CHAIN => Some(Table::Raw),
        GUARD_FORWARD_CHAIN | GUARD_INPUT_CHAIN => Some(Table::Security),
        _ if is_owned_filter_chain(name) => Some(Table::Filter),
        _ => None,
    }
}

/// Whether policy enforcement owns this chain in `table` (and may delete
/// it when stale).
pub fn is_owned_chain_in(table: Table, name: &str) -> bool {
    chain_table(name) == Some(table)
}

/// Whether policy enforcement owns this chain (in whichever table its name
/// belongs to).
pub fn is_owned_chain(name: &str) -> bool {
    chain_table(name).is_some()
}

fn is_owned_filter_chain(name: &str) -> bool {
    matches!(
        name,
        FORWARD_CHAIN | INPUT_CHAIN | FROM_WL_CHAIN | TO_WL_CHAIN
    ) || [
        TO_ENDPOINT_PREFIX,
        FROM_ENDPOINT_PREFIX,
        POLICY_INGRESS_PREFIX,
        POLICY_EGRESS_PREFIX,
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// Whether policy enforcement owns this ipset.
pub fn is_owned_set(name: &str) -> bool {
    name.starts_with(SET_PREFIX)
}

/// A pod's ingress chain, `CANAL-TW-<iface>` (24 characters at most).
pub fn to_endpoint_chain(iface: &str) -> String {
    format!("{TO_ENDPOINT_PREFIX}{iface}")
}

/// A pod's egress chain, `CANAL-FW-<iface>`.
pub fn from_endpoint_chain(iface: &str) -> String {
    format!("{FROM_ENDPOINT_PREFIX}{iface}")
}

/// A policy's ingress chain: `CANAL-PI-` + 16 hex characters of a hash of
/// `namespace/name` (25 characters).
pub fn policy_ingress_chain(policy: &str) -> String {
    format!(
        "{POLICY_INGRESS_PREFIX}{}",
        short_hash(&format!("policy:{policy}"))
    )
}

/// A policy's egress chain, `CANAL-PO-<hash>`.
pub fn policy_egress_chain(policy: &str) -> String {
    format!(
        "{POLICY_EGRESS_PREFIX}{}",
        short_hash(&format!("policy:{policy}"))
    )
}

/// A set name: `canal-` + 16 hex characters of a hash of what the set holds
/// (its kind, its type and its identity), 22 characters. The type is part of
/// the hash so a set never changes type under the same name.
pub fn set_name(kind: &str, set_type: &str, id: &str) -> String {
    format!(
        "{SET_PREFIX}{}",
        short_hash(&format!("{kind}:{set_type}:{id}"))
    )
}

/// The temporary set used to swap in a replacement for `set`.
pub fn temp_set_name(set: &str) -> String {
    format!("{TEMP_SET_PREFIX}{}", short_hash(&format!("temp:{set}")))
}

/// Whether `iface` is a pod interface name the dispatch chains can match:
/// `cali` + at most 11 characters of `[A-Za-z0-9_.-]`.
pub fn is_valid_endpoint_iface(iface: &str) -> bool {
    iface.len() > IFACE_PREFIX.len()
        && iface.len() <= MAX_IFACE_LEN
        && iface.starts_with(IFACE_PREFIX)
        && iface
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_kernel_limits_and_are_stable() {
        let iface = canal_crds::names::veth_name("default", "nginx");
        assert!(to_endpoint_chain(&iface).len() <= MAX_CHAIN_LEN);
        assert!(from_endpoint_chain(&iface).len() <= MAX_CHAIN_LEN);
        let long = format!("{}/{}", "n".repeat(63), "p".repeat(253));
        assert_eq!(policy_ingress_chain(&long).len(), 25);
        assert_eq!(policy_ingress_chain("x/a"), policy_ingress_chain("x/a"));
        assert_ne!(policy_ingress_chain("x/a"), policy_ingress_chain("x/b"));
        assert_ne!(
            policy_ingress_chain("x/a")[9..],
            policy_egress_chain("x/b")[9..]
        );
        let s = set_name("peer", "hash:net", "ps-0123456789abcdef");
        assert_eq!(s.len(), 22);
        assert!(s.len() <= MAX_SET_LEN && temp_set_name(&s).len() <= MAX_SET_LEN);
        assert_ne!(s, set_name("peer", "hash:ip,port", "ps-0123456789abcdef"));
    }

    #[test]
    fn ownership_excludes_overlay_chains() {
        for owned in [
            "CANAL-FORWARD",
            "CANAL-INPUT",
            "CANAL-FROM-WL",
            "CANAL-TO-WL",
            "CANAL-TW-cali1234567890a",
            "CANAL-FW-cali1234567890a",
            "CANAL-PI-0123456789abcdef",
            "CANAL-PO-0123456789abcdef",
        ] {
            assert!(is_owned_chain(owned), "{owned}");
            assert!(is_owned_chain_in(Table::Filter, owned), "{owned}");
        }
        assert_eq!(chain_table(PREROUTING_CHAIN), Some(Table::Raw));
        assert_eq!(chain_table(GUARD_FORWARD_CHAIN), Some(Table::Security));
        assert!(!is_owned_chain_in(Table::Filter, GUARD_INPUT_CHAIN));
        for name in [PREROUTING_CHAIN, GUARD_FORWARD_CHAIN, GUARD_INPUT_CHAIN] {
            assert!(name.len() <= MAX_CHAIN_LEN);
        }
        for foreign in [
            "CANAL-FWD-ALLOW",
            "CANAL-MASQ",
            "FORWARD",
            "cali-FORWARD",
            "KUBE-FORWARD",
        ] {
            assert!(!is_owned_chain(foreign), "{foreign}");
        }
    }

    #[test]
    fn iface_validation() {
        assert!(is_valid_endpoint_iface("cali1234567890a"));
        assert!(!is_valid_endpoint_iface("cali1234567890ab"));
        assert!(!is_valid_endpoint_iface("cali"));
        assert!(!is_valid_endpoint_iface("eth0"));
        assert!(!is_valid_endpoint_iface("cali\"; -j ACCEPT"));
        assert!(!is_valid_endpoint_iface("cali+"));
    }
}
