//! The denied-connection log (`spec.policy.logDenied`): with it on, each
//! isolated pod's chain logs the packets it is about to drop to NFLOG group
//! [`DENIED_LOG_GROUP`] (rate-limited in the rule), and the agent reads
//! them over nfnetlink_log and writes one structured `tracing` line each:
//!
//! ```text
//! INFO canal_agent::policy::flowlog: denied connection src=10.244.2.5 dst=10.244.1.3 protocol=TCP port=80 direction=ingress endpoint=x/c policies=["x/deny-c"]
//! ```
//!
//! The agent limits itself too ([`LINES_PER_SECOND`] a node), counting what
//! it suppresses. The payload is decoded here, pure, from the first 128
//! bytes of the packet (IP header and ports).

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkBuffer, NlasIterator};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use prometheus::{IntCounterVec, Opts, Registry};
use tracing::{info, warn};

use super::model::{Isolation, NodeModel};
pub use super::names::DENIED_LOG_GROUP;

/// Most lines the agent writes per second (the rest is counted as suppressed).
pub const LINES_PER_SECOND: u32 = 100;

/// `NFNL_SUBSYS_ULOG`.
const SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One denied packet as the log rule saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6` or the protocol number.
    pub protocol: String,
    /// Destination port (0 without one).
    pub port: u16,
    /// `ingress` / `egress`.
    pub direction: &'static str,
    /// The pod's interface (from the rule's prefix).
    pub interface: String,
}

/// The pods and their isolating policies, by interface: (pod, ingress, egress).
pub type Endpoints = BTreeMap<String, (String, Vec<String>, Vec<String>)>;

/// The endpoint table of `model`.
pub fn endpoints(model: &NodeModel) -> Endpoints {
    let list = |i: &Isolation| match i {
        Isolation::By(p) => p.clone(),
        Isolation::Open => Vec::new(),
    };
    model
        .endpoints
        .iter()
        .map(|(iface, e)| {
            (
                iface.clone(),
                (e.pod.clone(), list(&e.ingress), list(&e.egress)),
            )
        })
        .collect()
}

/// The bind request for `group` (copy 128 bytes of each packet).
pub fn bind_request(seq: u32, group: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&((SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, version 0, res_id = the group (big endian).
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&group.to_be_bytes());
    let mut attr = |kind: u16, value: &[u8]| {
        b.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(value);
        while !b.len().is_multiple_of(4) {
            b.push(0);
        }
    };
    attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
    // struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; }
    let mut mode = 128u32.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    attr(NFULA_CFG_MODE, &mode);
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_ne_bytes());
    b
}

/// The denied packets in one receive buffer (other messages skipped).
pub fn parse(buf: &[u8]) -> Vec<Denied> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let Ok(msg) = NetlinkBuffer::new_checked(&buf[at..]) else {
            break;
        };
        let len = msg.length() as usize;
        if len < 16 {
            break;
        }
        let payload = msg.payload();
        if msg.message_type() == (SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET && payload.len() >= 4 {
            let (mut prefix, mut packet) = (None, None);
            for nla in NlasIterator::new(&payload[4..]).flatten() {
                match nla.kind() & NLA_TYPE_MASK {
                    NFULA_PREFIX => {
                        let v = nla.value();
                        let end = v.iter().position(|c| *c == 0).unwrap_or(v.len());
                        prefix = std::str::from_utf8(&v[..end]).ok().map(str::to_string);
                    }
                    NFULA_PAYLOAD => packet = Some(nla.value().to_vec()),
                    _ => {}
                }
            }
            if let (Some(prefix), Some(packet)) = (prefix, packet)
                && let Some(d) = decode(&prefix, &packet)
            {
                out.push(d);
            }
        }
        at += (len + 3) & !3;
    }
    out
}

/// A packet logged with `prefix` (`canal-deny:i:<iface>`), from its IP header.
pub fn decode(prefix: &str, p: &[u8]) -> Option<Denied> {
    let rest = prefix.strip_prefix("canal-deny:")?;
    let (dir, iface) = rest.split_once(':')?;
    let direction = match dir {
        "i" => "ingress",
        "e" => "egress",
        _ => return None,
    };
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            (
                Ipv4Addr::new(p[12], p[13], p[14], p[15]).into(),
                Ipv4Addr::new(p[16], p[17], p[18], p[19]).into(),
                p[9],
                p.get(ihl..).unwrap_or_default(),
            )
        }
        6 if p.len() >= 40 => {
            let a = |o: usize| -> Option<Ipv6Addr> {
                let b: [u8; 16] = p.get(o..o + 16)?.try_into().ok()?;
                Some(Ipv6Addr::from(b))
            };
            (a(8)?.into(), a(24)?.into(), p[6], &p[40..])
        }
        _ => return None,
    };
    let protocol = match proto {
        6 => "TCP".to_string(),
        17 => "UDP".to_string(),
        132 => "SCTP".to_string(),
        1 => "ICMP".to_string(),
        58 => "ICMPv6".to_string(),
        n => n.to_string(),
    };
    let port = match (proto, l4) {
        (6 | 17 | 132, [_, _, hi, lo, ..]) => u16::from_be_bytes([*hi, *lo]),
        _ => 0,
    };
    Some(Denied {
        src,
        dst,
        protocol,
        port,
        direction,
        interface: iface.to_string(),
    })
}

/// Lines written and suppressed.
pub static LINES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "canal_policy_denied_log_lines_total",
            "Denied-connection log lines (spec.policy.logDenied), by result: logged, or suppressed by the agent's own limit.",
        ),
        &["result"],
    )
    .unwrap_or_else(|e| unreachable!("static metric options are valid: {e}"))
});

/// Registers the log's metric.
pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
    registry.register(Box::new(LINES.clone()))?;
    for r in ["logged", "suppressed"] {
        LINES.with_label_values(&[r]);
    }
    Ok(())
}

/// One logged line: the packet, the pod, its isolating policies.
pub type Line = (Denied, String, Vec<String>);

/// The last lines logged in this process, newest last (tests).
pub static RECENT: LazyLock<Mutex<Vec<Line>>> = LazyLock::new(Mutex::default);

/// The reader of one node's log group; stops when dropped.
#[derive(Debug)]
pub struct FlowLog {
    stop: Arc<AtomicBool>,
    endpoints: Arc<Mutex<Endpoints>>,
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl FlowLog {
    /// Binds the log group in the namespace at `netns` (None: ours) and
    /// starts reading it on a thread of its own.
    pub fn start(netns: Option<&Path>) -> io::Result<FlowLog> {
        let stop = Arc::new(AtomicBool::new(false));
        let endpoints = Arc::new(Mutex::new(Endpoints::new()));
        let (s, e, ns) = (
            stop.clone(),
            endpoints.clone(),
            netns.map(Path::to_path_buf),
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("canal-flowlog".into())
            .spawn(move || {
                let socket = open(ns.as_deref());
                let socket = match socket {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                read_loop(&socket, &s, &e);
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the log reader ended"))??;
        Ok(FlowLog { stop, endpoints })
    }

    /// The pods and policies the lines name (after each sync).
    pub fn set_endpoints(&self, e: Endpoints) {
        *self.endpoints.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
}

fn open(netns: Option<&Path>) -> io::Result<Socket> {
    if let Some(path) = netns {
        let file = std::fs::File::open(path)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    }
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    {
        use nix::sys::socket::{setsockopt, sockopt};
        use nix::sys::time::TimeVal;
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the fd belongs to `s`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 500_000))
            .map_err(io::Error::from)?;
    }
    s.send(&bind_request(1, DENIED_LOG_GROUP), 0)?;
    let mut buf = vec![0u8; 4096];
    let n = s.recv(&mut &mut buf[..], 0)?;
    // The ack: NLMSG_ERROR with 0, or the error (EBUSY: bound by another).
    if let Ok(m) = NetlinkBuffer::new_checked(&buf[..n])
        && m.message_type() == 2
        && m.payload().len() >= 4
    {
        let code = i32::from_ne_bytes(m.payload()[..4].try_into().unwrap_or_default());
        if code != 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
    }
    Ok(s)
}

fn read_loop(socket: &Socket, stop: &AtomicBool, endpoints: &Mutex<Endpoints>) {
    let mut buf = vec![0u8; 1 << 16];
    let (mut window, mut written) = (Instant::now(), 0u32);
    while !stop.load(Ordering::SeqCst) {
        let n = match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            // ENOBUFS: the kernel dropped some; carry on.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
            Err(e) => {
                warn!("reading the denied-connection log: {e}");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        for d in parse(&buf[..n]) {
            if window.elapsed() >= Duration::from_secs(1) {
                (window, written) = (Instant::now(), 0);
            }
            if written >= LINES_PER_SECOND {
                LINES.with_label_values(&["suppressed"]).inc();
                continue;
            }
            written += 1;
            let (pod, policies) = {
                let e = endpoints.lock().unwrap_or_else(|p| p.into_inner());
                match e.get(&d.interface) {
                    Some((pod, ing, eg)) => (
                        pod.clone(),
                        if d.direction == "ingress" {
                            ing.clone()
                        } else {
                            eg.clone()
                        },
                    ),
                    None => (String::new(), Vec::new()),
                }
            };
            info!(
                src = %d.src,
                dst = %d.dst,
                protocol = %d.protocol,
                port = d.port,
                direction = %d.direction,
                endpoint = %pod,
                policies = ?policies,
                "denied connection"
            );
            LINES.with_label_values(&["logged"]).inc();
            let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() >= 256 {
                recent.remove(0);
            }
            recent.push((d, pod, policies));
        }
    }
}

/// Runs the reader while `spec.policy.logDenied` is on.
#[derive(Debug, Default)]
pub struct DeniedLog {
    reader: Option<FlowLog>,
    netns: Option<PathBuf>,
    failed: bool,
}

impl DeniedLog {
    /// After each programmed sync: start, feed or stop the reader.
    pub fn programmed(&mut self, model: &NodeModel, netns: Option<&Path>) {
        if !model.log_denied || !model.enabled {
            self.reader = None;
            self.failed = false;
            return;
        }
        if self.reader.is_none() || self.netns.as_deref() != netns {
            self.reader = None;
            match FlowLog::start(netns) {
                Ok(r) => {
                    self.reader = Some(r);
                    self.failed = false;
                }
                Err(e) => {
                    // Logged once per failure streak; the rules stay in place.
                    if !self.failed {
                        warn!(
                            group = DENIED_LOG_GROUP,
                            "cannot read the denied-connection log: {e}"
                        );
                    }
                    self.failed = true;
                }
            }
            self.netns = netns.map(Path::to_path_buf);
        }
        if let Some(r) = &self.reader {
            r.set_endpoints(endpoints(model));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    #[test]
    fn packets_decode_with_their_prefix() {
        let d = decode(
            "canal-deny:i:cali00000000d01",
            &ipv4_tcp([10, 244, 2, 5], [10, 244, 1, 3], 80),
        )
        .unwrap();
        assert_eq!(d.src, "10.244.2.5".parse::<IpAddr>().unwrap());
        assert_eq!(d.dst, "10.244.1.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            (d.protocol.as_str(), d.port, d.direction),
            ("TCP", 80, "ingress")
        );
        assert_eq!(d.interface, "cali00000000d01");
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"fd00::3".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
        let d = decode("canal-deny:e:calia", &v6).unwrap();
        assert_eq!(
            (d.protocol.as_str(), d.port, d.direction),
            ("UDP", 53, "egress")
        );
        assert!(decode("other:i:x", &v6).is_none());
        assert!(decode("canal-deny:i:x", &[0x45, 0]).is_none());
    }

    #[test]
    fn the_bind_request_names_the_group() {
        let b = bind_request(1, DENIED_LOG_GROUP);
        assert_eq!(
            u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_be_bytes([b[18], b[19]]), DENIED_LOG_GROUP);
    }
}
