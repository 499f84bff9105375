//! Rendering of the overlay's iptables rules (flannel's rule set, canal's
//! chain names) and the pure decision of what `iptables-restore --noflush`
//! input brings a table from its current `iptables-save` listing to the
//! desired one. Rules are rendered exactly as `iptables-save` prints them, so
//! "nothing changed" is a plain comparison.

use ipnet::IpNet;

/// nat chain holding the masquerade rules.
pub const MASQ_CHAIN: &str = "CANAL-MASQ";
/// filter chain accepting pod traffic in FORWARD.
pub const FORWARD_CHAIN: &str = "CANAL-FWD-ALLOW";

/// The rule in POSTROUTING that jumps to [`MASQ_CHAIN`].
pub const MASQ_JUMP: &str =
    "-A POSTROUTING -m comment --comment \"canal: masquerade pod traffic\" -j CANAL-MASQ";
/// The rule in FORWARD that jumps to [`FORWARD_CHAIN`].
pub const FORWARD_JUMP: &str =
    "-A FORWARD -m comment --comment \"canal: accept pod traffic\" -j CANAL-FWD-ALLOW";

/// What the masquerade rules depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasqParams {
    /// clusterCIDR (of one family).
    pub cluster_cidr: IpNet,
    /// This node's pod subnet (of that family).
    pub node_subnet: IpNet,
    /// Add `--random-fully` (iptables >= 1.6.2).
    pub random_fully: bool,
}

/// One table's part of the ruleset: a chain, its rules, and the jump to it
/// from a built-in chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSpec {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// The built-in chain that jumps to ours.
    pub parent: &'static str,
    /// Our chain.
    pub chain: &'static str,
    /// The jump rule, as `iptables-save` prints it.
    pub jump: &'static str,
    /// Our chain's rules (`-A CHAIN ...`), or None: the chain must not exist.
    pub rules: Option<Vec<String>>,
}

/// flannel's masquerade rules (facts 1.7) in [`MASQ_CHAIN`]. C = clusterCIDR,
/// P = node subnet. kube-proxy-marked packets are left to kube-proxy; traffic
/// between pods is never NATed; pod traffic leaving C is masqueraded (not
/// multicast); host traffic to remote pods leaves with the node's address.
pub fn masq_rules(p: &MasqParams) -> Vec<String> {
    let (c, n) = (p.cluster_cidr, p.node_subnet);
    let multicast = match c {
        IpNet::V4(_) => "224.0.0.0/4",
        IpNet::V6(_) => "ff00::/8",
    };
    let random = if p.random_fully {
        " --random-fully"
    } else {
        ""
    };
    vec![
        format!(
            "-A {MASQ_CHAIN} -m comment --comment \"canal: kube-proxy masquerades marked packets\" -m mark --mark 0x4000/0x4000 -j RETURN"
        ),
        format!(
            "-A {MASQ_CHAIN} -s {n} -d {c} -m comment --comment \"canal: pod to pod, no NAT\" -j RETURN"
        ),
        format!(
            "-A {MASQ_CHAIN} -s {c} -d {n} -m comment --comment \"canal: pod to pod, no NAT\" -j RETURN"
        ),
        format!(
            "-A {MASQ_CHAIN} ! -s {c} -d {n} -m comment --comment \"canal: to local pods, no NAT\" -j RETURN"
        ),
        format!(
            "-A {MASQ_CHAIN} -s {c} ! -d {multicast} -m comment --comment \"canal: pod traffic leaving the cluster\" -j MASQUERADE{random}"
        ),
        format!(
            "-A {MASQ_CHAIN} ! -s {c} -d {c} -m comment --comment \"canal: host traffic to remote pods\" -j MASQUERADE{random}"
        ),
    ]
}

/// Rules of [`FORWARD_CHAIN`]: accept traffic from and to clusterCIDR, so a
/// FORWARD policy of DROP does not cut pods off.
pub fn forward_rules(cluster_cidr: IpNet) -> Vec<String> {
    vec![
        format!(
            "-A {FORWARD_CHAIN} -s {cluster_cidr} -m comment --comment \"canal: pod traffic\" -j ACCEPT"
        ),
        format!(
            "-A {FORWARD_CHAIN} -d {cluster_cidr} -m comment --comment \"canal: pod traffic\" -j ACCEPT"
        ),
    ]
}

/// The nat part: masquerade rules, or none when masquerade is off.
pub fn nat_spec(params: Option<&MasqParams>) -> ChainSpec {
    ChainSpec {
        table: "nat",
        parent: "POSTROUTING",
        chain: MASQ_CHAIN,
        jump: MASQ_JUMP,
        rules: params.map(masq_rules),
    }
}

/// The filter part: the FORWARD accept chain, or none.
pub fn filter_spec(cluster_cidr: Option<IpNet>) -> ChainSpec {
    ChainSpec {
        table: "filter",
        parent: "FORWARD",
        chain: FORWARD_CHAIN,
        jump: FORWARD_JUMP,
        rules: cluster_cidr.map(forward_rules),
    }
}

/// Our chain as found in an `iptables-save -t <table>` listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The chain is declared.
    pub exists: bool,
    /// Its rules, in order.
    pub rules: Vec<String>,
    /// Rules of the parent chain that jump to ours, in order.
    pub jumps: Vec<String>,
}

/// Reads our chain out of an `iptables-save` listing of its table.
pub fn find(save: &str, spec: &ChainSpec) -> Found {
    let declared = format!(":{} ", spec.chain);
    let rule_prefix = format!("-A {} ", spec.chain);
    let parent_prefix = format!("-A {} ", spec.parent);
    let jump_suffix = format!("-j {}", spec.chain);
    let mut found = Found::default();
    for line in save.lines().map(str::trim_end) {
        if line.starts_with(&declared) {
            found.exists = true;
        } else if line.starts_with(&rule_prefix) {
            found.rules.push(line.to_string());
        } else if line.starts_with(&parent_prefix)
            && (line.ends_with(&jump_suffix) || line.contains(&format!("{jump_suffix} ")))
        {
            found.jumps.push(line.to_string());
        }
    }
    found
}

/// The `iptables-restore --noflush` input that turns `found` into `spec`,
/// or None when the table is already right. Declaring our chain flushes it,
/// so its rules are rewritten as one block; the jump is appended only when
/// missing, and duplicate or outdated jumps are deleted.
pub fn plan(found: &Found, spec: &ChainSpec) -> Option<String> {
    let exact_jumps = found.jumps.iter().filter(|j| *j == spec.jump).count();
    let stray_jumps: Vec<&String> = found.jumps.iter().filter(|j| *j != spec.jump).collect();
    let delete = |rule: &str| format!("-D {}", &rule[3..]);
    let mut out = format!("*{}\n", spec.table);
    match &spec.rules {
        Some(rules) => {
            if found.exists && found.rules == *rules && exact_jumps == 1 && stray_jumps.is_empty() {
                return None;
            }
            out.push_str(&format!(":{} - [0:0]\n", spec.chain));
            for rule in rules {
                out.push_str(rule);
                out.push('\n');
            }
            for stray in stray_jumps {
                out.push_str(&delete(stray));
                out.push('\n');
            }
            for _ in 1..exact_jumps {
                out.push_str(&delete(spec.jump));
                out.push('\n');
            }
            if exact_jumps == 0 {
                out.push_str(spec.jump);
                out.push('\n');
            }
        }
        None => {
            if !found.exists && found.jumps.is_empty() {
                return None;
            }
            for jump in &found.jumps {
                out.push_str(&delete(jump));
                out.push('\n');
            }
            out.push_str(&format!(":{} - [0:0]\n", spec.chain));
            out.push_str(&format!("-X {}\n", spec.chain));
        }
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Whether an `iptables --version` line names a version with
/// `--random-fully` (1.6.2 or later).
pub fn supports_random_fully(version_output: &str) -> bool {
    let Some(v) = version_output
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
    else {
        return false;
    };
    let nums: Vec<u32> = v
        .split('.')
        .map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0)
        })
        .collect();
    let get = |i: usize| nums.get(i).copied().unwrap_or(0);
    (get(0), get(1), get(2)) >= (1, 6, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> MasqParams {
        MasqParams {
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            node_subnet: "10.244.1.0/24".parse().unwrap(),
            random_fully: true,
        }
    }

    const GOLDEN_NAT: &str = include_str!("testdata/nat-fresh.restore");
    const GOLDEN_FILTER: &str = include_str!("testdata/filter-fresh.restore");
    const GOLDEN_NAT_OFF: &str = include_str!("testdata/nat-off.restore");
    const SAVE_PROGRAMMED: &str = include_str!("testdata/nat-programmed.save");

    #[test]
    fn fresh_nat_table_gets_the_chain_and_the_jump() {
        let spec = nat_spec(Some(&params()));
        let text = plan(
            &find("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n", &spec),
            &spec,
        );
        assert_eq!(text.as_deref(), Some(GOLDEN_NAT));
    }

    #[test]
    fn fresh_filter_table_gets_the_forward_chain() {
        let spec = filter_spec(Some(params().cluster_cidr));
        assert_eq!(
            plan(&Found::default(), &spec).as_deref(),
            Some(GOLDEN_FILTER)
        );
    }

    #[test]
    fn programmed_table_needs_nothing() {
        let spec = nat_spec(Some(&params()));
        let found = find(SAVE_PROGRAMMED, &spec);
        assert!(found.exists);
        assert_eq!(found.rules.len(), 6);
        assert_eq!(found.jumps, vec![MASQ_JUMP.to_string()]);
        assert_eq!(plan(&found, &spec), None);
    }

    #[test]
    fn a_changed_rule_rewrites_the_chain_but_keeps_the_jump() {
        let spec = nat_spec(Some(&params()));
        let save = SAVE_PROGRAMMED.replace("10.244.1.0/24", "10.244.7.0/24");
        let text = plan(&find(&save, &spec), &spec).unwrap();
        assert!(text.contains(":CANAL-MASQ - [0:0]\n"));
        assert!(text.contains("-s 10.244.1.0/24 -d 10.244.0.0/16"));
        assert!(
            !text.contains("-A POSTROUTING"),
            "jump already there:\n{text}"
        );
    }

    #[test]
    fn duplicate_and_outdated_jumps_are_removed() {
        let spec = nat_spec(Some(&params()));
        let save = SAVE_PROGRAMMED.replace(
            MASQ_JUMP,
            &format!("{MASQ_JUMP}\n{MASQ_JUMP}\n-A POSTROUTING -s 10.0.0.0/8 -j CANAL-MASQ"),
        );
        let text = plan(&find(&save, &spec), &spec).unwrap();
        assert_eq!(text.matches("-D POSTROUTING").count(), 2, "{text}");
        assert!(text.contains("-D POSTROUTING -s 10.0.0.0/8 -j CANAL-MASQ\n"));
        assert!(!text.contains("-A POSTROUTING"));
    }

    #[test]
    fn masquerade_off_removes_jump_and_chain() {
        let spec = nat_spec(None);
        let text = plan(&find(SAVE_PROGRAMMED, &spec), &spec);
        assert_eq!(text.as_deref(), Some(GOLDEN_NAT_OFF));
        assert_eq!(plan(&Found::default(), &spec), None, "already gone");
    }

    #[test]
    fn random_fully_is_left_out_when_unsupported() {
        let mut p = params();
        p.random_fully = false;
        assert!(masq_rules(&p).iter().all(|r| !r.contains("random")));
        assert!(supports_random_fully("iptables v1.8.9 (nf_tables)"));
        assert!(supports_random_fully("iptables v1.6.2"));
        assert!(!supports_random_fully("iptables v1.6.1"));
        assert!(!supports_random_fully("iptables v1.4.21"));
        assert!(!supports_random_fully("garbage"));
    }

    #[test]
    fn chain_names_fit_iptables_limits() {
        assert!(MASQ_CHAIN.len() <= 28 && FORWARD_CHAIN.len() <= 28);
    }
}
