//! Forged packets from inside a pod, and a capture that sees every packet
//! that reaches one: the attacker and the witness of the anti-spoofing
//! tests (also `canal-lab __spoof`, to try it by hand).
//!
//! The sender writes whole IPv4 packets on a raw socket (`IPPROTO_RAW`,
//! so the header, source address included, is the sender's), UDP
//! datagrams or TCP SYNs built with `etherparse`, each carrying a marker
//! payload `canal-spoof <tag> <n>`. The capture is an `AF_PACKET` socket in
//! the target's namespace: it sees each frame as it arrives on the pod's
//! interface, before the pod's IP stack and whatever a server there would
//! answer, so a delivery cannot go unnoticed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom,
    sendto, setsockopt, socket, sockopt,
};

use crate::Error;
use crate::lab::netns;

/// What a forged packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A UDP datagram.
    Udp,
    /// A TCP SYN (with the marker as data, which a SYN may carry).
    TcpSyn,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s.to_ascii_lowercase().as_str() {
            "udp" => Ok(Kind::Udp),
            "tcp" | "syn" => Ok(Kind::TcpSyn),
            _ => Err(format!("{s:?}: expected udp or tcp")),
        }
    }
}

/// A burst of forged packets.
#[derive(Clone, Copy, Debug)]
pub struct Forged {
    /// The source address written into the packets.
    pub src: Ipv4Addr,
    /// Where they go.
    pub dst: SocketAddrV4,
    /// UDP or TCP SYN.
    pub kind: Kind,
    /// Marker the capture recognizes them by.
    pub tag: u32,
    /// How many (each from its own source port).
    pub count: u32,
}

/// The marker payload of packet `n` of burst `tag`.
pub fn marker(tag: u32, n: u32) -> Vec<u8> {
    format!("canal-spoof {tag:08x} {n}\n").into_bytes()
}

/// Parses [`marker`]: (tag, n).
pub fn parse_marker(payload: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut words = text.strip_prefix("canal-spoof ")?.split_whitespace();
    let tag = u32::from_str_radix(words.next()?, 16).ok()?;
    let n = words.next()?.parse().ok()?;
    Some((tag, n))
}

/// The packet bytes (IPv4 header onwards) of packet `n` of `f`.
pub fn build(f: &Forged, n: u32) -> Vec<u8> {
    let sport = 40_000 + (f.tag % 10_000) as u16 + n as u16;
    let builder = PacketBuilder::ipv4(f.src.octets(), f.dst.ip().octets(), 64);
    let payload = marker(f.tag, n);
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let written = match f.kind {
        Kind::Udp => builder.udp(sport, f.dst.port()).write(&mut out, &payload),
        Kind::TcpSyn => builder
            .tcp(sport, f.dst.port(), 0x0c0a_0000 ^ f.tag ^ n, 64_240)
            .syn()
            .write(&mut out, &payload),
    };
    debug_assert!(written.is_ok());
    out
}

/// Sends `f` from the calling thread's network namespace.
pub fn send_here(f: &Forged) -> std::io::Result<()> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Raw,
    )?;
    let to = SockaddrIn::from(SocketAddrV4::new(*f.dst.ip(), 0));
    for n in 0..f.count {
        use std::os::fd::AsRawFd;
        sendto(fd.as_raw_fd(), &build(f, n), &to, MsgFlags::empty())?;
        // Spread out: the receiving capture's buffer is not the test.
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Sends `f` from inside the namespace `netns` (a pod's).
pub fn send_in(netns: &str, f: Forged) -> Result<(), Error> {
    let name = netns.to_string();
    netns::run_in(netns, move || send_here(&f))?
        .map_err(|e| Error::Io(format!("sending forged packets in {name}"), e))
}

/// Sends the marker of burst `tag` from a socket bound to `src` (an
/// address the sender's namespace holds, say after `ip addr add`; IPv4 or
/// IPv6): `count` UDP datagrams, or TCP connection attempts (their SYNs
/// carry no marker: the capture matches them by source address and port).
pub fn send_bound_in(
    netns: &str,
    src: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
    kind: Kind,
    tag: u32,
    count: u32,
) -> Result<(), Error> {
    let name = netns.to_string();
    let (src, dst) = (src.into(), dst.into());
    netns::run_in(netns, move || -> std::io::Result<()> {
        for n in 0..count {
            let local = SocketAddr::new(src.ip(), src.port() + n as u16);
            match kind {
                Kind::Udp => {
                    let s = std::net::UdpSocket::bind(local)?;
                    s.send_to(&marker(tag, n), dst)?;
                }
                Kind::TcpSyn => {
                    let s = socket2::Socket::new(
                        socket2::Domain::for_address(local),
                        socket2::Type::STREAM,
                        None,
                    )?;
                    s.set_reuse_address(true)?;
                    s.bind(&local.into())?;
                    // Blocked: times out; that is the point.
                    let _ = s.connect_timeout(&dst.into(), Duration::from_millis(100));
                }
            }
        }
        Ok(())
    })?
    .map_err(|e| Error::Io(format!("sending from a bound socket in {name}"), e))
}

/// A packet the capture saw arrive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (0 for other protocols).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// A TCP SYN (without ACK).
    pub syn: bool,
    /// The marker it carried.
    pub marker: Option<(u32, u32)>,
}

/// Decodes a captured Ethernet frame (IPv4 or IPv6, TCP or UDP).
pub fn decode(frame: &[u8]) -> Option<Seen> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst): (IpAddr, IpAddr) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => return None,
    };
    let (sport, dport, syn, payload) = match &p.transport {
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port(), false, u.payload()),
        Some(TransportSlice::Tcp(t)) => (
            t.source_port(),
            t.destination_port(),
            t.syn() && !t.ack(),
            t.payload(),
        ),
        _ => return None,
    };
    Some(Seen {
        src,
        dst,
        sport,
        dport,
        syn,
        marker: parse_marker(payload),
    })
}

/// Records every TCP/UDP packet (IPv4 or IPv6) arriving in one namespace
/// until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// `PACKET_OUTGOING`: a frame this namespace sent (not one it received).
const PACKET_OUTGOING: u8 = 4;

impl Capture {
    /// Starts capturing in `netns`; returns once the socket is open.
    pub fn start(netns: &str) -> Result<Capture, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let (stop, seen, name) = (stop.clone(), seen.clone(), netns.to_string());
            std::thread::spawn(move || {
                let open = || -> Result<std::os::fd::OwnedFd, Error> {
                    netns::enter(&name)?;
                    let io = |e: nix::Error| Error::Io(format!("capture in {name}"), e.into());
                    let fd = socket(
                        AddressFamily::Packet,
                        SockType::Raw,
                        SockFlag::SOCK_CLOEXEC,
                        SockProtocol::EthAll,
                    )
                    .map_err(io)?;
                    setsockopt(&fd, sockopt::RcvBuf, &(8 << 20)).map_err(io)?;
                    let tv = nix::sys::time::TimeVal::new(0, 100_000);
                    setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(io)?;
                    Ok(fd)
                };
                let fd = match open() {
                    Ok(fd) => {
                        let _ = ready_tx.send(Ok(()));
                        fd
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    use std::os::fd::AsRawFd;
                    let Ok((n, from)) = recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) else {
                        continue;
                    };
                    if from.is_some_and(|a| a.pkttype() == PACKET_OUTGOING) {
                        continue;
                    }
                    if let Some(s) = decode(&buf[..n]) {
                        seen.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                    }
                }
            })
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Capture {
                stop,
                seen,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Lab("the capture thread ended early".into())),
        }
    }

    /// Everything seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops and returns everything seen.
    pub fn stop(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_decode_with_their_marker() {
        let f = Forged {
            src: "10.244.1.9".parse().unwrap(),
            dst: "10.244.2.3:80".parse().unwrap(),
            kind: Kind::TcpSyn,
            tag: 0xabcd,
            count: 1,
        };
        for kind in [Kind::Udp, Kind::TcpSyn] {
            let ip = build(&Forged { kind, ..f }, 3);
            // The capture sees Ethernet frames: prepend a header.
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&[0x08, 0x00]);
            frame.extend_from_slice(&ip);
            let seen = decode(&frame).unwrap();
            assert_eq!(seen.src, f.src);
            assert_eq!(seen.dport, 80);
            assert_eq!(seen.syn, kind == Kind::TcpSyn);
            assert_eq!(seen.marker, Some((0xabcd, 3)));
        }
        assert_eq!(parse_marker(b"hello"), None);
    }

    #[test]
    fn ipv6_frames_decode_too() {
        let mut ip = Vec::new();
        PacketBuilder::ipv6(
            "fd00:10:244:1::9"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            "fd00:10:244:2::3"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            64,
        )
        .udp(47_000, 80)
        .write(&mut ip, &marker(7, 1))
        .unwrap();
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x86, 0xdd]);
        frame.extend_from_slice(&ip);
        let seen = decode(&frame).unwrap();
        assert_eq!(seen.src, "fd00:10:244:1::9".parse::<IpAddr>().unwrap());
        assert_eq!((seen.sport, seen.dport), (47_000, 80));
        assert_eq!(seen.marker, Some((7, 1)));
    }
}
