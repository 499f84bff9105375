//! The fast path of the most frequent nftables change, PeerSet members
//! coming and going: when a sync changes nothing but the elements of plain
//! address sets (`ipv4_addr` / `ipv6_addr`, no interval flag, no map), the
//! transaction is sent as one nfnetlink batch of `NEWSETELEM` /
//! `DELSETELEM` messages, bypassing libnftables.
//!
//! Why (measured, README "nftables dataplane"): libnftables 1.0.6 refreshes
//! its cache (tables, chains and sets of every table) before every command
//! because each commit bumps the ruleset generation; at 20,000 rules and 200
//! sets that costs tens of milliseconds per element add, while the batch
//! itself costs the kernel well under a millisecond. Everything else (chains,
//! maps, concatenated or interval sets, new sets) still goes through
//! libnftables, and any failure here makes the enforcer re-read the kernel
//! and run the full script, so this path can only be faster, never different.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::state::NftState;
use crate::policy::nlattr::{NLA_F_NESTED, push_attr};

const NLMSG_HDRLEN: usize = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
/// Elements per message: an attribute's length is 16 bits, and 1,000
/// IPv6 elements (28 bytes each) stay well below it.
const PER_MESSAGE: usize = 1000;

/// Element changes of one set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetDelta {
    /// The set.
    pub set: String,
    /// Addresses to add.
    pub add: Vec<IpAddr>,
    /// Addresses to delete.
    pub delete: Vec<IpAddr>,
}

/// The element changes that turn `known` into `desired` when they are all
/// that differs and every changed set is a plain address set; None when
/// anything else differs (libnftables runs the script then).
pub fn element_only_delta(known: &NftState, desired: &NftState) -> Option<Vec<SetDelta>> {
    if !known.exists
        || !desired.exists
        || known.table != desired.table
        || known.chains != desired.chains
        || known.sets.len() != desired.sets.len()
    {
        return None;
    }
    let mut out = Vec::new();
    for (name, want) in &desired.sets {
        let have = known.sets.get(name)?;
        if have.key_type != want.key_type
            || have.data != want.data
            || have.interval != want.interval
        {
            return None;
        }
        if std::sync::Arc::ptr_eq(&have.elements, &want.elements) || have.elements == want.elements
        {
            continue;
        }
        let family_v4 = match (want.key_type.as_str(), want.data, want.interval) {
            ("ipv4_addr", None, false) => true,
            ("ipv6_addr", None, false) => false,
            _ => return None,
        };
        let parse = |set: &BTreeSet<String>, other: &BTreeSet<String>| -> Option<Vec<IpAddr>> {
            set.difference(other)
                .map(|e| {
                    let ip: IpAddr = e.parse().ok()?;
                    (ip.is_ipv4() == family_v4).then_some(ip)
                })
                .collect()
        };
        out.push(SetDelta {
            set: name.clone(),
            add: parse(&want.elements, &have.elements)?,
            delete: parse(&have.elements, &want.elements)?,
        });
    }
    Some(out)
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Starts a nested attribute; returns its offset for [`end_nested`].
fn begin_nested(buf: &mut Vec<u8>, kind: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

fn end_nested(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Appends one netlink message (header, nfgenmsg, attributes from `body`).
fn message(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let at = buf.len();
    buf.extend_from_slice(&[0; NLMSG_HDRLEN]);
    buf[at + 4..at + 6].copy_from_slice(&kind.to_ne_bytes());
    buf[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
    buf[at + 8..at + 12].copy_from_slice(&seq.to_ne_bytes());
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    body(buf);
    buf.resize(align(buf.len()), 0);
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
}

fn addr_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// One batch: begin, the element messages (each asking for an ack), end.
/// Returns the bytes and the sequence numbers that must be acknowledged.
pub fn batch(table: &str, deltas: &[SetDelta], first_seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut buf = Vec::new();
    let mut seq = first_seq;
    let mut acked = Vec::new();
    message(
        &mut buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    // Deletions first, as libnftables orders a script's `delete element`
    // before its `add element` (plan order): the same address never both.
    for (op, flags, pick) in [
        (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK, true),
        (
            NFT_MSG_NEWSETELEM,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            false,
        ),
    ] {
        for d in deltas {
            let elems = if pick { &d.delete } else { &d.add };
            for chunk in elems.chunks(PER_MESSAGE) {
                seq += 1;
                acked.push(seq);
                let kind = (NFNL_SUBSYS_NFTABLES << 8) | op;
                message(&mut buf, kind, flags, seq, NFPROTO_INET, 0, |b| {
                    push_attr(b, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
                    push_attr(b, NFTA_SET_ELEM_LIST_SET, &cstr(&d.set));
                    let list = begin_nested(b, NFTA_SET_ELEM_LIST_ELEMENTS);
                    for ip in chunk {
                        let elem = begin_nested(b, NFTA_LIST_ELEM);
                        let key = begin_nested(b, NFTA_SET_ELEM_KEY);
                        push_attr(b, NFTA_DATA_VALUE, &addr_bytes(ip));
                        end_nested(b, key);
                        end_nested(b, elem);
                    }
                    end_nested(b, list);
                });
            }
        }
    }
    seq += 1;
    message(
        &mut buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    (buf, acked)
}

/// What the kernel answered: (sequence number, errno; 0 = ack) per
/// `NLMSG_ERROR` message in `buf`.
pub fn parse_acks(buf: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = word(at) as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if kind == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 + NLMSG_HDRLEN {
            let errno = word(at + NLMSG_HDRLEN) as i32;
            // The original header follows the errno; its seq is ours.
            let seq = word(at + NLMSG_HDRLEN + 4 + 8);
            out.push((seq, errno));
        } else if kind == NLMSG_DONE {
            break;
        }
        at += align(len);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::nft::state::SetState;
    use std::sync::Arc;

    fn state(sets: &[(&str, &str, bool, &[&str])]) -> NftState {
        NftState {
            table: "canal".into(),
            exists: true,
            chains: Default::default(),
            sets: sets
                .iter()
                .map(|(n, t, interval, e)| {
                    (
                        n.to_string(),
                        SetState {
                            key_type: t.to_string(),
                            data: None,
                            interval: *interval,
                            elements: Arc::new(e.iter().map(|s| s.to_string()).collect()),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn only_member_changes_of_address_sets_take_the_fast_path() {
        let a = state(&[("ps4-a", "ipv4_addr", false, &["10.0.0.1", "10.0.0.2"])]);
        let b = state(&[("ps4-a", "ipv4_addr", false, &["10.0.0.2", "10.0.0.3"])]);
        let d = element_only_delta(&a, &b).expect("element-only");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].add, vec!["10.0.0.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(d[0].delete, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(element_only_delta(&a, &a), Some(vec![]));
        // An interval set, a new set, a type change, a chain: the script.
        let i1 = state(&[("blk", "ipv4_addr", true, &["10.0.0.0/8"])]);
        let i2 = state(&[("blk", "ipv4_addr", true, &["10.0.0.0/9"])]);
        assert_eq!(element_only_delta(&i1, &i2), None);
        let more = state(&[
            ("ps4-a", "ipv4_addr", false, &["10.0.0.1"]),
            ("ps4-b", "ipv4_addr", false, &[]),
        ]);
        assert_eq!(element_only_delta(&a, &more), None);
        let v6 = state(&[("ps4-a", "ipv6_addr", false, &["fd00::1"])]);
        assert_eq!(element_only_delta(&a, &v6), None);
        let mut chained = b.clone();
        chained.chains.insert("x".into(), Default::default());
        assert_eq!(element_only_delta(&a, &chained), None);
        // An element that is not an address of the set's family.
        let odd = state(&[("ps4-a", "ipv4_addr", false, &["fd00::1"])]);
        assert_eq!(element_only_delta(&a, &odd), None);
        let absent = NftState::absent("canal");
        assert_eq!(element_only_delta(&absent, &b), None);
    }

    #[test]
    fn a_batch_is_begin_messages_end_with_acks_asked() {
        let d = vec![SetDelta {
            set: "ps4-a".into(),
            add: vec!["10.0.0.3".parse().unwrap()],
            delete: vec!["10.0.0.1".parse().unwrap()],
        }];
        let (buf, acked) = batch("canal", &d, 100);
        assert_eq!(acked, vec![101, 102]);
        // Walk the messages: types and lengths add up.
        let mut at = 0;
        let mut kinds = vec![];
        while at < buf.len() {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            kinds.push(u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap()));
            at += len;
        }
        assert_eq!(at, buf.len());
        assert_eq!(
            kinds,
            vec![
                NFNL_MSG_BATCH_BEGIN,
                (10 << 8) | NFT_MSG_DELSETELEM,
                (10 << 8) | NFT_MSG_NEWSETELEM,
                NFNL_MSG_BATCH_END
            ]
        );
        assert!(buf.windows(4).any(|w| w == [10, 0, 0, 3]));
    }

    #[test]
    fn acks_are_read_from_error_messages() {
        let mut buf = Vec::new();
        for (seq, errno) in [(7u32, 0i32), (8, -17)] {
            let mut m = vec![0u8; 16 + 4 + 16];
            m[0..4].copy_from_slice(&(36u32).to_ne_bytes());
            m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m[16..20].copy_from_slice(&errno.to_ne_bytes());
            m[20 + 8..20 + 12].copy_from_slice(&seq.to_ne_bytes());
            buf.extend(m);
        }
        assert_eq!(parse_acks(&buf), vec![(7, 0), (8, -17)]);
    }
}
