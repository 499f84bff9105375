//! ctnetlink (conntrack over netlink) for [`super::conntrack`]: the few
//! messages canal needs (dump a family's table, mark an entry, delete an
//! entry by tuple and id) as pure encoders/decoders over
//! `netlink-packet-core` buffers, like [`super::nfnl`], and a blocking
//! socket for them. No crate covers ctnetlink in Rust today
//! (`netlink-packet-netfilter` has nflog only).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NlasIterator};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::nlattr::{NLA_F_NESTED, push_attr, set_rcvtimeo};

/// `NFNL_SUBSYS_CTNETLINK`.
const SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

// enum ctattr_type / ctattr_tuple / ctattr_ip / ctattr_l4proto
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_ID: u16 = 12;
const CTA_MARK_MASK: u16 = 21;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// `AF_INET`.
pub const AF_INET: u8 = 2;
/// `AF_INET6`.
pub const AF_INET6: u8 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;
/// `IPPROTO_SCTP`.
pub const IPPROTO_SCTP: u8 = 132;

/// One direction of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Source port (0 for protocols without ports).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// A conntrack entry as the dump shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The original direction (who opened the flow).
    pub orig: Tuple,
    /// The reply direction (its source is the destination after DNAT).
    pub reply: Tuple,
    /// conntrack's id of the entry (deletes name it, so a new entry with
    /// the same tuple created meanwhile survives).
    pub id: Option<u32>,
    /// conntrack zone.
    pub zone: Option<u16>,
    /// The entry's ct mark.
    pub mark: u32,
}

// ---- messages -------------------------------------------------------------

fn header(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by `finish`
    buf.extend_from_slice(&((SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg: family, version, res_id (big endian)
    buf.extend_from_slice(&[family, 0, 0, 0]);
}

fn finish(buf: &mut [u8]) {
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
}

fn nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let mut v = Vec::new();
    inner(&mut v);
    push_attr(buf, kind | NLA_F_NESTED, &v);
}

/// The dump request of one family's conntrack table; with `marked`, the
/// kernel returns only entries whose mark has those bits (mark, mask).
pub fn dump_request(seq: u32, family: u8, marked: Option<(u32, u32)>) -> Vec<u8> {
    let mut b = Vec::with_capacity(36);
    header(
        &mut b,
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
    );
    if let Some((mark, mask)) = marked {
        push_attr(&mut b, CTA_MARK, &mark.to_be_bytes());
        push_attr(&mut b, CTA_MARK_MASK, &mask.to_be_bytes());
    }
    finish(&mut b);
    b
}

/// The delete request of exactly `e` (its original tuple, id and zone).
pub fn delete_request(seq: u32, e: &Entry) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    header(
        &mut b,
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family_of(e),
    );
    orig_tuple(&mut b, e);
    if let Some(id) = e.id {
        push_attr(&mut b, CTA_ID, &id.to_be_bytes());
    }
    zone(&mut b, e);
    finish(&mut b);
    b
}

/// The request that sets the `mask` bits of `e`'s ct mark to `mark`
/// (an update of the existing entry: no NLM_F_CREATE).
pub fn mark_request(seq: u32, e: &Entry, mark: u32, mask: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    header(
        &mut b,
        IPCTNL_MSG_CT_NEW,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family_of(e),
    );
    orig_tuple(&mut b, e);
    push_attr(&mut b, CTA_MARK, &mark.to_be_bytes());
    push_attr(&mut b, CTA_MARK_MASK, &mask.to_be_bytes());
    zone(&mut b, e);
    finish(&mut b);
    b
}

fn family_of(e: &Entry) -> u8 {
    match e.orig.src {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn zone(b: &mut Vec<u8>, e: &Entry) {
    if let Some(z) = e.zone.filter(|z| *z != 0) {
        push_attr(b, CTA_ZONE, &z.to_be_bytes());
    }
}

fn orig_tuple(b: &mut Vec<u8>, e: &Entry) {
    nested(b, CTA_TUPLE_ORIG, |t| {
        nested(t, CTA_TUPLE_IP, |ip| match (e.orig.src, e.orig.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                push_attr(ip, CTA_IP_V4_SRC, &s.octets());
                push_attr(ip, CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                push_attr(ip, CTA_IP_V6_SRC, &v6(s).octets());
                push_attr(ip, CTA_IP_V6_DST, &v6(d).octets());
            }
        });
        nested(t, CTA_TUPLE_PROTO, |p| {
            push_attr(p, CTA_PROTO_NUM, &[e.orig.proto]);
            push_attr(p, CTA_PROTO_SRC_PORT, &e.orig.sport.to_be_bytes());
            push_attr(p, CTA_PROTO_DST_PORT, &e.orig.dport.to_be_bytes());
        });
    });
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

/// What one receive buffer held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// Entries decoded.
    pub entries: Vec<Entry>,
    /// NLMSG_ERROR codes (0: an ack), in order.
    pub errors: Vec<i32>,
    /// The dump ended.
    pub done: bool,
    /// Messages that did not decode.
    pub malformed: usize,
}

/// Decodes one receive buffer of ctnetlink replies.
pub fn parse(buf: &[u8]) -> Reply {
    let mut out = Reply::default();
    let mut at = 0;
    while at < buf.len() {
        let Ok(msg) = NetlinkBuffer::new_checked(&buf[at..]) else {
            out.malformed += 1;
            break;
        };
        let len = msg.length() as usize;
        if len < 16 {
            out.malformed += 1;
            break;
        }
        let payload = msg.payload();
        match msg.message_type() {
            NLMSG_DONE => out.done = true,
            NLMSG_ERROR if payload.len() >= 4 => {
                let mut code = [0u8; 4];
                code.copy_from_slice(&payload[..4]);
                out.errors.push(i32::from_ne_bytes(code));
            }
            t if t >> 8 == SUBSYS_CTNETLINK && payload.len() >= 4 => {
                match parse_entry(&payload[4..]) {
                    Some(e) => out.entries.push(e),
                    None => out.malformed += 1,
                }
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    out
}

fn parse_entry(attrs: &[u8]) -> Option<Entry> {
    let (mut orig, mut reply, mut id, mut zone, mut mark) = (None, None, None, None, 0);
    for nla in NlasIterator::new(attrs) {
        let nla = nla.ok()?;
        let v = nla.value();
        match nla.kind() & NLA_TYPE_MASK {
            CTA_TUPLE_ORIG => orig = parse_tuple(v),
            CTA_TUPLE_REPLY => reply = parse_tuple(v),
            CTA_ID if v.len() >= 4 => id = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
            CTA_ZONE if v.len() >= 2 => zone = Some(u16::from_be_bytes([v[0], v[1]])),
            CTA_MARK if v.len() >= 4 => mark = u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
            _ => {}
        }
    }
    Some(Entry {
        orig: orig?,
        reply: reply?,
        id,
        zone,
        mark,
    })
}

fn parse_tuple(attrs: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for nla in NlasIterator::new(attrs) {
        let nla = nla.ok()?;
        match nla.kind() & NLA_TYPE_MASK {
            CTA_TUPLE_IP => {
                for a in NlasIterator::new(nla.value()) {
                    let a = a.ok()?;
                    let v = a.value();
                    let ip = match v.len() {
                        4 => IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
                        16 => {
                            let mut o = [0u8; 16];
                            o.copy_from_slice(v);
                            IpAddr::V6(Ipv6Addr::from(o))
                        }
                        _ => continue,
                    };
                    match a.kind() & NLA_TYPE_MASK {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in NlasIterator::new(nla.value()) {
                    let a = a.ok()?;
                    let v = a.value();
                    match (a.kind() & NLA_TYPE_MASK, v.len()) {
                        (CTA_PROTO_NUM, 1..) => proto = Some(v[0]),
                        (CTA_PROTO_SRC_PORT, 2..) => sport = u16::from_be_bytes([v[0], v[1]]),
                        (CTA_PROTO_DST_PORT, 2..) => dport = u16::from_be_bytes([v[0], v[1]]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        sport,
        dport,
    })
}

/// A ctnetlink socket (blocking, 2 s receive timeout).
pub struct Conn {
    socket: Socket,
    seq: u32,
}

impl Conn {
    /// Opens one in the calling thread's namespace.
    pub fn open() -> io::Result<Conn> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        set_rcvtimeo(&socket, Duration::from_secs(2))?;
        Ok(Conn { socket, seq: 1 })
    }

    /// Every entry of `family` (`AF_INET` / `AF_INET6`), or only those
    /// with the `marked` (mark, mask) bits.
    pub fn dump(&mut self, family: u8, marked: Option<(u32, u32)>) -> io::Result<Vec<Entry>> {
        self.seq += 1;
        self.socket
            .send(&dump_request(self.seq, family, marked), 0)?;
        let mut entries = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self.socket.recv(&mut &mut buf[..], 0)?;
            let r = parse(&buf[..n]);
            entries.extend(r.entries);
            if let Some(&code) = r.errors.iter().find(|c| **c != 0) {
                return Err(io::Error::from_raw_os_error(-code));
            }
            if r.done || n == 0 {
                return Ok(entries);
            }
        }
    }

    /// Deletes `e`; Ok(true) when deleted or already gone.
    pub fn delete(&mut self, e: &Entry) -> io::Result<bool> {
        self.seq += 1;
        let req = delete_request(self.seq, e);
        self.acked(&req)
    }

    /// Sets the `mask` bits of `e`'s mark; Ok(true) when done or the entry is gone.
    pub fn mark(&mut self, e: &Entry, mark: u32, mask: u32) -> io::Result<bool> {
        self.seq += 1;
        let req = mark_request(self.seq, e, mark, mask);
        self.acked(&req)
    }

    fn acked(&mut self, req: &[u8]) -> io::Result<bool> {
        self.socket.send(req, 0)?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self.socket.recv(&mut &mut buf[..], 0)?;
            let r = parse(&buf[..n]);
            if let Some(&code) = r.errors.first() {
                // ENOENT: it ended (or was replaced) meanwhile: nothing to cut.
                return Ok(code == 0 || code == -libc::ENOENT);
            }
            if n == 0 {
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            sport,
            dport,
        }
    }

    fn entry(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Entry {
        Entry {
            orig: tuple(src, dst, proto, sport, dport),
            reply: tuple(dst, src, proto, dport, sport),
            id: Some(7),
            zone: None,
            mark: 0x0100_0001,
        }
    }

    /// A kernel-shaped IPCTNL_MSG_CT_NEW message of `e` (as a dump sends it).
    fn dump_message(e: &Entry) -> Vec<u8> {
        let mut b = Vec::new();
        header(&mut b, 0, 2 /* NLM_F_MULTI */, 1, AF_INET);
        for (kind, t) in [(CTA_TUPLE_ORIG, e.orig), (CTA_TUPLE_REPLY, e.reply)] {
            nested(&mut b, kind, |n| {
                nested(n, CTA_TUPLE_IP, |ip| {
                    let (IpAddr::V4(s), IpAddr::V4(d)) = (t.src, t.dst) else {
                        unreachable!()
                    };
                    push_attr(ip, CTA_IP_V4_SRC, &s.octets());
                    push_attr(ip, CTA_IP_V4_DST, &d.octets());
                });
                nested(n, CTA_TUPLE_PROTO, |p| {
                    push_attr(p, CTA_PROTO_NUM, &[t.proto]);
                    push_attr(p, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
                    push_attr(p, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
                });
            });
        }
        push_attr(&mut b, CTA_MARK, &e.mark.to_be_bytes());
        push_attr(&mut b, CTA_ID, &e.id.unwrap().to_be_bytes());
        finish(&mut b);
        b
    }

    #[test]
    fn dump_messages_decode_and_done_ends_the_dump() {
        let e = entry("10.244.1.2", "10.244.2.3", IPPROTO_TCP, 40000, 80);
        let mut buf = dump_message(&e);
        buf.extend(dump_message(&entry(
            "10.0.0.1",
            "10.0.0.2",
            IPPROTO_UDP,
            5,
            53,
        )));
        let mut done = Vec::new();
        header(&mut done, 0, 0, 1, AF_INET);
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        finish(&mut done);
        buf.extend(done);
        let r = parse(&buf);
        assert!(r.done);
        assert_eq!(r.malformed, 0);
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[0], e);
    }

    #[test]
    fn delete_requests_name_the_tuple_and_id() {
        let e = entry("10.244.1.2", "10.244.2.3", IPPROTO_TCP, 40000, 80);
        let b = delete_request(9, &e);
        assert_eq!(
            u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(
            u16::from_ne_bytes(b[4..6].try_into().unwrap()),
            (SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
        );
        // The original tuple decodes back from the request's attributes.
        let mut orig = None;
        let mut id = None;
        for nla in NlasIterator::new(&b[20..]) {
            let nla = nla.unwrap();
            match nla.kind() & NLA_TYPE_MASK {
                CTA_TUPLE_ORIG => orig = parse_tuple(nla.value()),
                CTA_ID => id = Some(u32::from_be_bytes(nla.value().try_into().unwrap())),
                _ => {}
            }
        }
        assert_eq!(orig, Some(e.orig));
        assert_eq!(id, Some(7));
    }

    #[test]
    fn mark_requests_update_only_the_masked_bits() {
        let e = entry("fd00::2", "fd00::3", IPPROTO_UDP, 5000, 53);
        let b = mark_request(3, &e, 0x0100_0000, 0x0100_0000);
        assert_eq!(b[16], AF_INET6);
        let flags = u16::from_ne_bytes(b[6..8].try_into().unwrap());
        assert_eq!(flags & 0x400, 0, "no NLM_F_CREATE: an update of the entry");
        let mut seen = Vec::new();
        for nla in NlasIterator::new(&b[20..]) {
            let nla = nla.unwrap();
            seen.push(nla.kind() & NLA_TYPE_MASK);
            if nla.kind() & NLA_TYPE_MASK == CTA_TUPLE_ORIG {
                assert_eq!(parse_tuple(nla.value()), Some(e.orig));
            }
        }
        assert_eq!(seen, vec![CTA_TUPLE_ORIG, CTA_MARK, CTA_MARK_MASK]);
    }
}
