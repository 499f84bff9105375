//! The client side of the echo protocol, run from inside a pod's namespace
//! on a thread of the lab's own (see [`crate::lab::netns::run_in`]).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Error;
use crate::lab::protocol::{self, Protocol};
use crate::lab::{netns, udp_ports};

/// How often a UDP probe is resent while no answer came.
const UDP_RETRY: Duration = Duration::from_millis(200);

/// What one probe observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The echo server answered.
    pub connected: bool,
    /// The source address the server saw (pod IP, or the node's after masquerade).
    pub seen_source: Option<SocketAddr>,
    /// Why not, when not connected (timeout, refused, ...).
    pub detail: String,
    /// Time to the answer or to giving up.
    pub elapsed: Duration,
}

impl ProbeOutcome {
    fn blocked(detail: impl Into<String>, started: Instant) -> ProbeOutcome {
        ProbeOutcome {
            connected: false,
            seen_source: None,
            detail: detail.into(),
            elapsed: started.elapsed(),
        }
    }
}

fn token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Probes `dst` from inside namespace `netns`.
pub fn probe_in(
    netns: &str,
    dst: SocketAddr,
    protocol: Protocol,
    timeout: Duration,
) -> Result<ProbeOutcome, Error> {
    netns::run_in(netns, move || probe_here(dst, protocol, timeout))?
}

/// Probes `dst` from the calling thread's namespace.
pub fn probe_here(
    dst: SocketAddr,
    protocol: Protocol,
    timeout: Duration,
) -> Result<ProbeOutcome, Error> {
    match protocol {
        Protocol::Tcp => Ok(tcp(dst, timeout)),
        Protocol::Udp => Ok(udp(dst, timeout)),
        Protocol::Sctp => Err(Error::Lab(
            "SCTP cannot be probed: this kernel has no SCTP sockets".into(),
        )),
    }
}

fn tcp(dst: SocketAddr, timeout: Duration) -> ProbeOutcome {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut stream = match TcpStream::connect_timeout(&dst, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::TimedOut => {
            return ProbeOutcome::blocked("connect timed out", started);
        }
        Err(e) => return ProbeOutcome::blocked(format!("connect: {e}"), started),
    };
    let token = token();
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let _ = stream.set_read_timeout(Some(remaining));
    let _ = stream.set_write_timeout(Some(remaining));
    if let Err(e) = stream.write_all(format!("{}\n", protocol::probe_request(&token)).as_bytes()) {
        return ProbeOutcome::blocked(format!("sending the probe: {e}"), started);
    }
    let mut reply = Vec::new();
    match stream.take(512).read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) => return ProbeOutcome::blocked(format!("reading the answer: {e}"), started),
    }
    let reply = String::from_utf8_lossy(&reply);
    match protocol::parse_reply(&reply, &token) {
        Some(peer) => ProbeOutcome {
            connected: true,
            seen_source: Some(peer),
            detail: String::new(),
            elapsed: started.elapsed(),
        },
        None => ProbeOutcome::blocked(format!("unexpected answer {reply:?}"), started),
    }
}

fn udp(dst: SocketAddr, timeout: Duration) -> ProbeOutcome {
    let started = Instant::now();
    let deadline = started + timeout;
    let socket = match connected_udp(dst) {
        Ok(s) => s,
        Err(e) => return ProbeOutcome::blocked(format!("socket: {e}"), started),
    };
    let token = token();
    let request = protocol::probe_request(&token);
    let mut buf = [0u8; 512];
    let mut next_send = started;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return ProbeOutcome::blocked("no answer (timed out)", started);
        }
        if now >= next_send {
            match socket.send(request.as_bytes()) {
                Ok(_) => {}
                // An ICMP error for an earlier datagram.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    return ProbeOutcome::blocked("refused (ICMP port unreachable)", started);
                }
                Err(e) => return ProbeOutcome::blocked(format!("send: {e}"), started),
            }
            next_send = now + UDP_RETRY;
        }
        let wait = next_send
            .min(deadline)
            .saturating_duration_since(Instant::now());
        let _ = socket.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        match socket.recv(&mut buf) {
            Ok(n) => {
                let reply = String::from_utf8_lossy(&buf[..n]);
                if let Some(peer) = protocol::parse_reply(&reply, &token) {
                    return ProbeOutcome {
                        connected: true,
                        seen_source: Some(peer),
                        detail: String::new(),
                        elapsed: started.elapsed(),
                    };
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                return ProbeOutcome::blocked("refused (ICMP port unreachable)", started);
            }
            Err(e) => return ProbeOutcome::blocked(format!("recv: {e}"), started),
        }
    }
}

/// A UDP socket connected to `dst` from a source port no recent probe of
/// this lab used, in any process ([`udp_ports`]): a datagram that reuses the
/// 5-tuple of an earlier allowed exchange is that conntrack flow and passes
/// a policy created since, which a probe must not mistake for a leak.
fn connected_udp(dst: SocketAddr) -> std::io::Result<UdpSocket> {
    let ports = udp_ports::SourcePorts::for_netns(netns::current().as_deref());
    let mut last = None;
    let any: IpAddr = if dst.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    for _ in 0..64 {
        let port = ports.next().map_err(std::io::Error::other)?;
        match UdpSocket::bind((any, port)) {
            Ok(socket) => {
                socket.connect(dst)?;
                return Ok(socket);
            }
            // Something in this namespace listens there: the next one.
            Err(e) if e.kind() == ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free UDP source port")))
}

/// What a UDP datagram with Don't Fragment set met on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DfOutcome {
    /// It crossed and came back intact.
    Echoed,
    /// The sender was told it is too big (locally, or by an ICMP
    /// fragmentation-needed from the path), with the path MTU it learnt.
    TooBig {
        /// The socket's path MTU after the error.
        path_mtu: Option<u32>,
    },
    /// Nothing came back and no error was reported: silent loss.
    Lost,
}

/// Sends one UDP datagram of `payload` bytes with DF set to the echo server
/// at `dst`, from inside `netns`, and reports what happened.
pub fn udp_df_in(
    netns: &str,
    dst: SocketAddr,
    payload: usize,
    timeout: Duration,
) -> Result<DfOutcome, Error> {
    netns::run_in(netns, move || udp_df_here(dst, payload, timeout))?
}

fn udp_df_here(dst: SocketAddr, payload: usize, timeout: Duration) -> Result<DfOutcome, Error> {
    let socket = connected_udp(dst).map_err(|e| Error::Io(format!("UDP socket to {dst}"), e))?;
    set_pmtudisc_do(&socket, dst.is_ipv6())
        .map_err(|e| Error::Io("setting IP(V6)_MTU_DISCOVER".into(), e))?;
    // Bytes that do not parse as a probe, so the server echoes them.
    let data: Vec<u8> = (0..payload).map(|i| b'a' + (i % 26) as u8).collect();
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match socket.send(&data) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                return Ok(DfOutcome::TooBig {
                    path_mtu: path_mtu(&socket, dst.is_ipv6()),
                });
            }
            Err(e) => return Err(Error::Io(format!("sending {payload} bytes to {dst}"), e)),
        }
        let _ = socket.set_read_timeout(Some(UDP_RETRY));
        match socket.recv(&mut buf) {
            Ok(n) if buf[..n] == data[..] => return Ok(DfOutcome::Echoed),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                return Ok(DfOutcome::TooBig {
                    path_mtu: path_mtu(&socket, dst.is_ipv6()),
                });
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(Error::Io(format!("receiving from {dst}"), e)),
        }
    }
    Ok(DfOutcome::Lost)
}

/// Don't Fragment (IPv4), or no local fragmentation (IPv6, whose routers
/// never fragment): a datagram larger than the path MTU fails with
/// EMSGSIZE instead of leaving in pieces.
fn set_pmtudisc_do(socket: &UdpSocket, v6: bool) -> std::io::Result<()> {
    let (level, name, value) = if v6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    };
    let value: libc::c_int = value;
    // SAFETY: setsockopt on a descriptor we own with a correctly sized value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn path_mtu(socket: &UdpSocket, v6: bool) -> Option<u32> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU)
    };
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a correctly sized local.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value as u32)
}

/// A long-running TCP connection from inside a namespace to an echo server,
/// in byte-echo mode.
pub struct EchoStream {
    /// The connection (its socket stays in the namespace it was made in).
    pub stream: TcpStream,
    /// The source address the server saw.
    pub seen_source: SocketAddr,
}

/// Opens an [`EchoStream`] from inside `netns`.
pub fn open_stream_in(
    netns: &str,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<EchoStream, Error> {
    netns::run_in(netns, move || open_stream_here(dst, timeout))?
}

fn open_stream_here(dst: SocketAddr, timeout: Duration) -> Result<EchoStream, Error> {
    let io = |what: &str, e| Error::Io(format!("{what} (stream to {dst})"), e);
    let mut stream = TcpStream::connect_timeout(&dst, timeout).map_err(|e| io("connecting", e))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| io("setting a timeout", e))?;
    stream
        .write_all(protocol::STREAM_REQUEST.as_bytes())
        .map_err(|e| io("sending the request", e))?;
    // Byte by byte: nothing after the line may be consumed here.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 256 {
        stream
            .read_exact(&mut byte)
            .map_err(|e| io("reading the answer", e))?;
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line);
    let seen_source = line
        .strip_prefix("OK STREAM ")
        .and_then(|peer| peer.parse().ok())
        .ok_or_else(|| Error::Lab(format!("stream to {dst}: unexpected answer {line:?}")))?;
    Ok(EchoStream {
        stream,
        seen_source,
    })
}
