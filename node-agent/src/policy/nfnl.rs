//! The nfnetlink messages the firewall watch reads and writes, as pure
//! functions over bytes (no sockets): nf_tables change notifications
//! (multicast group `NFNLGRP_NFTABLES`) and ipset set-header dumps. Headers
//! and attributes are walked with `netlink-packet-core`'s buffers; only the
//! few attributes canal needs are decoded.

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NlaBuffer, NlasIterator,
    parse_string, parse_u32_be,
};

use super::nlattr::push_attr;

/// `NFNL_SUBSYS_NFTABLES`.
const SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_SUBSYS_IPSET`.
const SUBSYS_IPSET: u16 = 6;
/// `NFNLGRP_NFTABLES`: the multicast group of nf_tables changes.
pub const GROUP_NFTABLES: u32 = 7;
/// Size of `struct nfgenmsg` (family, version, res_id).
const NFGENMSG_LEN: usize = 4;

// enum nf_tables_msg_types
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
// Attributes: NFTA_{TABLE,CHAIN,RULE,SET,SET_ELEM_LIST}_TABLE / NAME are 1;
// the chain's name is NFTA_CHAIN_NAME (3), a rule's chain NFTA_RULE_CHAIN (2).
const NFTA_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_GEN_PROC_PID: u16 = 2;

// ipset
const IPSET_CMD_LIST: u16 = 7;
const IPSET_PROTOCOL: u8 = 7;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_TYPENAME: u16 = 3;
const IPSET_ATTR_FLAGS: u16 = 6;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_ELEMENTS: u16 = 24;
const IPSET_FLAG_LIST_HEADER: u32 = 1 << 2;

/// `NFPROTO_IPV4`: the family of iptables-nft's tables.
pub const FAMILY_IPV4: u8 = 2;
/// `NFPROTO_IPV6`: ip6tables-nft's tables.
pub const FAMILY_IPV6: u8 = 10;
/// `NFPROTO_INET`: canal's own nftables tables.
pub const FAMILY_INET: u8 = 1;

/// What kind of nf_tables object a notification is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    /// A table (created, flushed with its contents or deleted).
    Table,
    /// A chain.
    Chain,
    /// A rule.
    Rule,
    /// An nf_tables set or element (not ipset).
    Set,
    /// The end of a transaction (`NFT_MSG_NEWGEN`).
    Generation,
}

/// One nf_tables change notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// Netlink port of the socket that committed the change (the
    /// committing process's pid as its own pid namespace sees it, for a
    /// socket bound automatically).
    pub portid: u32,
    /// The object.
    pub object: Object,
    /// `NFPROTO_*` family of the table.
    pub family: u8,
    /// The table's name.
    pub table: Option<String>,
    /// The chain's name, for chain and rule changes.
    pub chain: Option<String>,
    /// The committing process (global pid), for [`Object::Generation`].
    pub proc_pid: Option<u32>,
}

/// The result of reading one receive buffer of the notification socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The notifications, in order.
    pub notifications: Vec<Notification>,
    /// Bytes that did not decode (counted, never fatal).
    pub malformed: usize,
}

/// Decodes the nf_tables notifications in `buf` (one `recv`), skipping
/// other messages.
pub fn parse_notifications(buf: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    for msg in messages(buf, &mut out.malformed) {
        let (kind, portid, payload) = msg;
        if kind >> 8 != SUBSYS_NFTABLES || payload.len() < NFGENMSG_LEN {
            continue;
        }
        let object = match kind & 0xff {
            NFT_MSG_NEWTABLE | NFT_MSG_DELTABLE => Object::Table,
            NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN => Object::Chain,
            NFT_MSG_NEWRULE | NFT_MSG_DELRULE => Object::Rule,
            NFT_MSG_NEWSET | NFT_MSG_DELSET | NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM => {
                Object::Set
            }
            NFT_MSG_NEWGEN => Object::Generation,
            _ => continue,
        };
        let family = payload[0];
        let mut n = Notification {
            portid,
            object,
            family,
            table: None,
            chain: None,
            proc_pid: None,
        };
        for nla in NlasIterator::new(&payload[NFGENMSG_LEN..]) {
            let Ok(nla) = nla else {
                out.malformed += 1;
                break;
            };
            match (object, nla.kind()) {
                (Object::Generation, NFTA_GEN_PROC_PID) => {
                    n.proc_pid = parse_u32_be(nla.value()).ok();
                }
                (Object::Generation, _) => {}
                (_, NFTA_TABLE) => n.table = parse_string(nla.value()).ok(),
                (Object::Chain, NFTA_CHAIN_NAME) | (Object::Rule, NFTA_RULE_CHAIN) => {
                    n.chain = parse_string(nla.value()).ok();
                }
                _ => {}
            }
        }
        out.notifications.push(n);
    }
    out
}

/// The netlink messages of `buf`: (type, port id, payload).
fn messages<'a>(buf: &'a [u8], malformed: &mut usize) -> Vec<(u16, u32, &'a [u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let Ok(msg) = NetlinkBuffer::new_checked(&buf[at..]) else {
            *malformed += 1;
            break;
        };
        let len = msg.length() as usize;
        if len < 16 {
            *malformed += 1;
            break;
        }
        out.push((msg.message_type(), msg.port_number(), msg.payload()));
        // Messages are 4-byte aligned.
        at += (len + 3) & !3;
    }
    out
}

/// One ipset as its header shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetHeader {
    /// Its name.
    pub name: String,
    /// Its type (`hash:net`, ...).
    pub set_type: String,
    /// Number of entries (kernels since 4.17 report it).
    pub elements: Option<u32>,
}

/// An ipset dump that failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DumpError {
    /// The kernel answered with an error code.
    #[error("the kernel refused the ipset list request (errno {0})")]
    Errno(i32),
}

/// The request for every set's header (`ipset list -terse`, without members).
pub fn ipset_headers_request(seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    push_attr(&mut attrs, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    push_attr(
        &mut attrs,
        IPSET_ATTR_FLAGS,
        &IPSET_FLAG_LIST_HEADER.to_be_bytes(),
    );
    let len = 16 + NFGENMSG_LEN + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&((SUBSYS_IPSET << 8) | IPSET_CMD_LIST).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0 (what the ipset tool sends).
    msg.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    msg.extend_from_slice(&attrs);
    msg
}

/// Decodes one receive buffer of an ipset header dump into `sets`;
/// returns whether the dump is complete (`NLMSG_DONE` seen).
pub fn parse_ipset_headers(buf: &[u8], sets: &mut Vec<SetHeader>) -> Result<bool, DumpError> {
    let mut malformed = 0;
    for (kind, _, payload) in messages(buf, &mut malformed) {
        if kind == NLMSG_DONE {
            return Ok(true);
        }
        if kind == NLMSG_ERROR {
            let code = payload
                .get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .unwrap_or(-1);
            if code != 0 {
                return Err(DumpError::Errno(-code));
            }
            continue;
        }
        if kind != ((SUBSYS_IPSET << 8) | IPSET_CMD_LIST) || payload.len() < NFGENMSG_LEN {
            continue;
        }
        let mut header = SetHeader {
            name: String::new(),
            set_type: String::new(),
            elements: None,
        };
        for nla in NlasIterator::new(&payload[NFGENMSG_LEN..]).flatten() {
            match nla.kind() {
                IPSET_ATTR_SETNAME => header.name = parse_string(nla.value()).unwrap_or_default(),
                IPSET_ATTR_TYPENAME => {
                    header.set_type = parse_string(nla.value()).unwrap_or_default()
                }
                IPSET_ATTR_DATA => header.elements = nested_u32(&nla, IPSET_ATTR_ELEMENTS),
                _ => {}
            }
        }
        if !header.name.is_empty() {
            sets.push(header);
        }
    }
    Ok(false)
}

fn nested_u32(nla: &NlaBuffer<&[u8]>, kind: u16) -> Option<u32> {
    NlasIterator::new(nla.value())
        .flatten()
        .find(|n| n.kind() == kind)
        .and_then(|n| parse_u32_be(n.value()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, flags: u16, portid: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&portid.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize((m.len() + 3) & !3, 0);
        m
    }

    fn nft(family: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut p = vec![family, 0, 0, 0];
        for (k, v) in attrs {
            push_attr(&mut p, *k, v);
        }
        p
    }

    #[test]
    fn rule_chain_table_and_generation_notifications_decode() {
        let mut buf = nlmsg(
            (SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE,
            0,
            4242,
            &nft(
                FAMILY_IPV4,
                &[
                    (1, b"filter\0"),
                    (2, b"FORWARD\0"),
                    (3, &[0, 0, 0, 0, 0, 0, 0, 7]),
                ],
            ),
        );
        buf.extend(nlmsg(
            (SUBSYS_NFTABLES << 8) | NFT_MSG_DELCHAIN,
            0,
            4242,
            &nft(FAMILY_IPV4, &[(1, b"raw\0"), (3, b"CANAL-PREROUTING\0")]),
        ));
        buf.extend(nlmsg(
            (SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE,
            0,
            4242,
            &nft(1, &[(1, b"canal\0")]),
        ));
        buf.extend(nlmsg(
            (SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN,
            0,
            4242,
            &nft(
                0,
                &[
                    (1, &9u32.to_be_bytes()),
                    (2, &77u32.to_be_bytes()),
                    (3, b"iptables\0"),
                ],
            ),
        ));
        // Not nf_tables (a conntrack event): skipped.
        buf.extend(nlmsg(1 << 8, 0, 1, &[2, 0, 0, 0]));
        let parsed = parse_notifications(&buf);
        assert_eq!(parsed.malformed, 0);
        let n = &parsed.notifications;
        assert_eq!(n.len(), 4, "{n:?}");
        assert_eq!(
            (n[0].object, n[0].portid, n[0].family),
            (Object::Rule, 4242, FAMILY_IPV4)
        );
        assert_eq!(
            (n[0].table.as_deref(), n[0].chain.as_deref()),
            (Some("filter"), Some("FORWARD"))
        );
        assert_eq!(n[1].chain.as_deref(), Some("CANAL-PREROUTING"));
        assert_eq!((n[2].object, n[2].chain.as_deref()), (Object::Table, None));
        assert_eq!((n[3].object, n[3].proc_pid), (Object::Generation, Some(77)));
    }

    #[test]
    fn truncated_buffers_are_counted_not_fatal() {
        let buf = nlmsg(
            (SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
            0,
            1,
            &nft(2, &[(1, b"filter\0")]),
        );
        let parsed = parse_notifications(&buf[..buf.len() - 6]);
        assert!(parsed.notifications.is_empty());
        assert_eq!(parsed.malformed, 1);
    }

    #[test]
    fn ipset_header_dump_decodes_names_types_and_counts() {
        let req = ipset_headers_request(5);
        assert_eq!(
            req.len() as u32,
            u32::from_ne_bytes(req[..4].try_into().unwrap())
        );
        let mut data = Vec::new();
        push_attr(&mut data, 18, &1024u32.to_be_bytes()); // hashsize
        push_attr(&mut data, IPSET_ATTR_ELEMENTS, &3u32.to_be_bytes());
        let mut payload = vec![2, 0, 0, 0];
        push_attr(&mut payload, IPSET_ATTR_PROTOCOL, &[7]);
        push_attr(&mut payload, IPSET_ATTR_SETNAME, b"canal-0123\0");
        push_attr(&mut payload, IPSET_ATTR_TYPENAME, b"hash:net\0");
        let nested = (IPSET_ATTR_DATA | netlink_packet_core::NLA_F_NESTED).to_ne_bytes();
        let data_len = ((4 + data.len()) as u16).to_ne_bytes();
        payload.extend_from_slice(&data_len);
        payload.extend_from_slice(&nested);
        payload.extend_from_slice(&data);
        let mut buf = nlmsg((SUBSYS_IPSET << 8) | IPSET_CMD_LIST, 2, 0, &payload);
        let mut sets = Vec::new();
        assert_eq!(parse_ipset_headers(&buf, &mut sets), Ok(false));
        buf = nlmsg(NLMSG_DONE, 2, 0, &[0, 0, 0, 0]);
        assert_eq!(parse_ipset_headers(&buf, &mut sets), Ok(true));
        assert_eq!(
            sets,
            vec![SetHeader {
                name: "canal-0123".into(),
                set_type: "hash:net".into(),
                elements: Some(3),
            }]
        );
        let err = nlmsg(NLMSG_ERROR, 0, 0, &(-1i32).to_ne_bytes());
        assert_eq!(
            parse_ipset_headers(&err, &mut sets),
            Err(DumpError::Errno(1))
        );
    }
}
