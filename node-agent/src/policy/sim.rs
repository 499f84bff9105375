//! Test-only packet walker over a rendered [`Ruleset`]: interprets exactly
//! the iptables vocabulary the renderer emits, so semantic table tests can
//! say "this packet is accepted / dropped" without a kernel. The kernel tests
//! (tests/policy_kernel.rs) check the same ground with real packets.

use std::net::Ipv4Addr;

use canal_crds::Protocol;
use ipnet::Ipv4Net;

use super::ruleset::{IpSet, Ruleset, SetType, Table};

/// Conntrack state of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ct {
    New,
    Established,
    Invalid,
    /// Established, its entry cut by conntrack.rs (ct mark `CUT_MARK`).
    Cut,
}

/// A packet at a filter hook.
#[derive(Clone, Debug)]
pub struct Packet {
    pub hook: &'static str,
    pub iif: Option<String>,
    pub oif: Option<String>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: Protocol,
    pub dport: u16,
    pub ct: Ct,
    /// Whether the source routes back out of `iif` (`-m rpfilter`).
    pub rpf_ok: bool,
}

/// The verdict of canal's chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    /// canal's chains did not decide; the rest of the built-in chain does.
    Continue,
}

enum Flow {
    Accept,
    Drop,
    Return,
}

/// Walks `p` through canal's hooks as the kernel would: raw PREROUTING
/// (for a packet that came in on an interface), then filter, then
/// security on the packet's hook, with one mark across all of them.
pub fn walk(r: &Ruleset, p: &Packet) -> Verdict {
    let mut mark = 0u32;
    if p.iif.is_some() && walk_hook(r, Table::Raw, "PREROUTING", p, &mut mark) == Verdict::Drop {
        return Verdict::Drop;
    }
    let filter = walk_hook(r, Table::Filter, p.hook, p, &mut mark);
    if filter == Verdict::Drop {
        return Verdict::Drop;
    }
    // An ACCEPT ends a table, not the packet's way through the next one.
    match walk_hook(r, Table::Security, p.hook, p, &mut mark) {
        Verdict::Drop => Verdict::Drop,
        _ => filter,
    }
}

/// Walks `p` through the hooks of one built-in chain of one table.
fn walk_hook(r: &Ruleset, table: Table, builtin: &str, p: &Packet, mark: &mut u32) -> Verdict {
    for hook in r
        .hooks
        .iter()
        .filter(|h| h.table == table && h.builtin == builtin)
    {
        match rule(r, &hook.rule.spec, p, mark) {
            Some(Flow::Accept) => return Verdict::Accept,
            Some(Flow::Drop) => return Verdict::Drop,
            _ => {}
        }
    }
    Verdict::Continue
}

fn chain(r: &Ruleset, name: &str, p: &Packet, mark: &mut u32) -> Flow {
    let Some(c) = r.chains.get(name) else {
        panic!("jump to missing chain {name}");
    };
    for rl in c.rules.iter() {
        match rule(r, &rl.spec, p, mark) {
            Some(Flow::Return) => return Flow::Return,
            Some(f @ (Flow::Accept | Flow::Drop)) => return f,
            None => {}
        }
    }
    Flow::Return
}

/// None: continue with the next rule.
fn rule(r: &Ruleset, spec: &str, p: &Packet, mark: &mut u32) -> Option<Flow> {
    let t: Vec<&str> = spec.split_whitespace().collect();
    let mut i = 0;
    let mut proto: Option<Protocol> = None;
    // `!` before a match option inverts it.
    let mut negate = false;
    let matched = |ok: bool, negate: &mut bool| {
        let ok = ok != *negate;
        *negate = false;
        ok
    };
    while i < t.len() {
        match t[i] {
            "!" => {
                negate = true;
                i += 1;
            }
            "-i" => {
                if !matched(iface_match(t[i + 1], p.iif.as_deref()), &mut negate) {
                    return None;
                }
                i += 2;
            }
            "-o" => {
                if !matched(iface_match(t[i + 1], p.oif.as_deref()), &mut negate) {
                    return None;
                }
                i += 2;
            }
            "-s" | "-d" => {
                let net: Ipv4Net = t[i + 1]
                    .parse()
                    .or_else(|_| t[i + 1].parse::<Ipv4Addr>().map(Ipv4Net::from))
                    .expect("address");
                let ip = if t[i] == "-s" { p.src } else { p.dst };
                if !matched(net.contains(&ip), &mut negate) {
                    return None;
                }
                i += 2;
            }
            "-p" => {
                let want = match t[i + 1] {
                    "tcp" => Protocol::TCP,
                    "udp" => Protocol::UDP,
                    "sctp" => Protocol::SCTP,
                    other => panic!("protocol {other}"),
                };
                if p.proto != want {
                    return None;
                }
                proto = Some(want);
                i += 2;
            }
            "--dport" => {
                assert!(proto.is_some(), "--dport without -p: {spec}");
                if !port_list_match(t[i + 1], p.dport) {
                    return None;
                }
                i += 2;
            }
            "-m" => match t[i + 1] {
                "multiport" => {
                    assert_eq!(t[i + 2], "--dports");
                    assert!(proto.is_some(), "multiport without -p: {spec}");
                    if !port_list_match(t[i + 3], p.dport) {
                        return None;
                    }
                    i += 4;
                }
                "set" => {
                    let mut j = i + 2;
                    if t[j] == "!" {
                        negate = true;
                        j += 1;
                    }
                    assert_eq!(t[j], "--match-set");
                    let set = r
                        .sets
                        .get(t[j + 1])
                        .unwrap_or_else(|| panic!("missing set {}", t[j + 1]));
                    if !matched(set_match(set, t[j + 2], p), &mut negate) {
                        return None;
                    }
                    i = j + 3;
                }
                "conntrack" => {
                    let mut j = i + 2;
                    if t[j] == "!" {
                        negate = true;
                        j += 1;
                    }
                    assert_eq!(t[j], "--ctstate");
                    let states: Vec<&str> = t[j + 1].split(',').collect();
                    let have = match p.ct {
                        Ct::New => "NEW",
                        Ct::Established | Ct::Cut => "ESTABLISHED",
                        Ct::Invalid => "INVALID",
                    };
                    if !matched(states.contains(&have), &mut negate) {
                        return None;
                    }
                    i = j + 2;
                }
                "mark" => {
                    let mut j = i + 2;
                    if t[j] == "!" {
                        negate = true;
                        j += 1;
                    }
                    assert_eq!(t[j], "--mark");
                    let (v, m) = value_mask(t[j + 1]);
                    if !matched(*mark & m == v, &mut negate) {
                        return None;
                    }
                    i = j + 2;
                }
                "connmark" => {
                    assert_eq!(t[i + 2], "--mark");
                    let (v, m) = value_mask(t[i + 3]);
                    let ctmark = match p.ct {
                        Ct::Cut => super::names::CUT_MARK,
                        _ => 0,
                    };
                    if !matched(ctmark & m == v, &mut negate) {
                        return None;
                    }
                    i += 4;
                }
                "rpfilter" => {
                    assert_eq!(t[i + 2], "--invert");
                    if p.rpf_ok {
                        return None;
                    }
                    i += 3;
                }
                other => panic!("match module {other} in {spec}"),
            },
            "-j" => {
                return Some(match t[i + 1] {
                    "ACCEPT" => Flow::Accept,
                    "DROP" => Flow::Drop,
                    "RETURN" => Flow::Return,
                    "MARK" => {
                        assert_eq!(t[i + 2], "--set-xmark");
                        let (v, m) = value_mask(t[i + 3]);
                        *mark = (*mark & !m) ^ v;
                        return None;
                    }
                    target => match chain(r, target, p, mark) {
                        Flow::Return => return None,
                        f => f,
                    },
                });
            }
            "-g" => {
                // goto: the chain's RETURN goes back to our caller.
                return Some(chain(r, t[i + 1], p, mark));
            }
            other => panic!("token {other} in {spec}"),
        }
    }
    None
}

fn iface_match(pattern: &str, iface: Option<&str>) -> bool {
    let Some(iface) = iface else { return false };
    match pattern.strip_suffix('+') {
        Some(prefix) => iface.starts_with(prefix),
        None => iface == pattern,
    }
}

fn port_list_match(list: &str, port: u16) -> bool {
    list.split(',').any(|item| match item.split_once(':') {
        Some((a, b)) => (a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()).contains(&port),
        None => item.parse::<u16>().unwrap() == port,
    })
}

fn value_mask(s: &str) -> (u32, u32) {
    let (v, m) = s.split_once('/').expect("value/mask");
    let hex = |x: &str| u32::from_str_radix(x.trim_start_matches("0x"), 16).unwrap();
    (hex(v), hex(m))
}

fn set_match(set: &IpSet, dir: &str, p: &Packet) -> bool {
    match (set.set_type, dir) {
        (SetType::HashNet, "src" | "dst") => {
            let ip = if dir == "src" { p.src } else { p.dst };
            // ipset semantics: the most specific matching entry decides; nomatch entries exclude.
            let mut best: Option<(u8, bool)> = None;
            for m in set.members.iter() {
                let (net, nomatch) = match m.strip_suffix(" nomatch") {
                    Some(n) => (n, true),
                    None => (m.as_str(), false),
                };
                let net: Ipv4Net = net
                    .parse()
                    .or_else(|_| net.parse::<Ipv4Addr>().map(Ipv4Net::from))
                    .unwrap();
                if net.contains(&ip) && best.is_none_or(|(len, _)| net.prefix_len() > len) {
                    best = Some((net.prefix_len(), nomatch));
                }
            }
            matches!(best, Some((_, false)))
        }
        (SetType::HashIpPort, "dst,dst") => {
            let member = format!("{},{}:{}", p.dst, p.proto.as_lower(), p.dport);
            set.members.contains(&member)
        }
        (SetType::HashNetIface, "src,src") => {
            let Some(iif) = p.iif.as_deref() else {
                return false;
            };
            set.members.iter().any(|m| {
                let (net, iface) = m.split_once(',').expect("net,iface");
                let net: Ipv4Net = net
                    .parse()
                    .or_else(|_| net.parse::<Ipv4Addr>().map(Ipv4Net::from))
                    .unwrap();
                iface == iif && net.contains(&p.src)
            })
        }
        (t, d) => panic!("set type {t:?} with direction {d}"),
    }
}
