//! Loopback ports for processes the lab starts (etcd, kube-apiserver, the
//! controller's metrics).
//!
//! A port found by binding port 0 comes from the kernel's ephemeral range,
//! the same range every outgoing connection takes its source port from. Between
//! finding the port and the server binding it, any client on the machine
//! (kube-apiserver's own etcd connections, another test's kubelet) may be
//! given it as a source port, and the server then fails with "address
//! already in use". CI saw exactly that. Ports here are taken from outside
//! the ephemeral range, so no outgoing connection can take them, and are
//! never handed out twice by one process, so parallel tests do not race each
//! other for them.

use std::collections::HashSet;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::Error;

/// Lowest port considered: below it live well-known services.
const FLOOR: u16 = 10_000;
/// How many candidates to try before giving up.
const ATTEMPTS: usize = 512;

/// Ports outside the kernel's ephemeral range `lo..=hi`: the larger of the
/// ranges below and above it, or `None` when neither has room.
pub fn non_ephemeral_range(lo: u16, hi: u16) -> Option<RangeInclusive<u16>> {
    let below = (lo > FLOOR).then(|| FLOOR..=lo - 1);
    let above = (hi < u16::MAX).then(|| hi.saturating_add(1).max(FLOOR)..=u16::MAX);
    let width = |r: &Option<RangeInclusive<u16>>| {
        r.as_ref()
            .map_or(0, |r| u32::from(*r.end()) - u32::from(*r.start()) + 1)
    };
    let best = if width(&below) >= width(&above) {
        below
    } else {
        above
    };
    best.filter(|r| r.end() - r.start() >= 64)
}

/// Parses `/proc/sys/net/ipv4/ip_local_port_range` ("32768\t60999").
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A free loopback TCP port outside the ephemeral range, not handed out
/// before by this process. Falls back to a kernel-chosen port when the
/// machine's ephemeral range leaves no room.
pub fn free_loopback_port() -> Result<u16, Error> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| parse_port_range(&t))
        .and_then(|(lo, hi)| non_ephemeral_range(lo, hi));
    let Some(range) = range else {
        return kernel_chosen();
    };
    let width = u64::from(*range.end() - *range.start()) + 1;
    // Different processes start at different places, so two test binaries
    // (or a test and `canal-lab up`) rarely probe the same ports.
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 20);
    let mut taken = handed_out()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for i in 0..ATTEMPTS as u64 {
        // A stride coprime with most widths walks the range without
        // clustering next to ports other processes chose.
        let offset = (seed.wrapping_add(i.wrapping_mul(7_919))) % width;
        let port = *range.start() + offset as u16;
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    drop(taken);
    kernel_chosen()
}

fn kernel_chosen() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Io("finding a free loopback port".into(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_range_leaves_the_ports_below_it() {
        assert_eq!(non_ephemeral_range(32_768, 60_999), Some(10_000..=32_767));
    }

    #[test]
    fn a_range_starting_low_leaves_the_ports_above_it() {
        assert_eq!(non_ephemeral_range(1_024, 40_000), Some(40_001..=65_535));
    }

    #[test]
    fn no_room_means_none() {
        assert_eq!(non_ephemeral_range(1_024, 65_535), None);
        assert_eq!(non_ephemeral_range(10_001, 65_500), None);
    }

    #[test]
    fn parses_the_proc_file_and_refuses_nonsense() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32_768, 60_999)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x y"), None);
        assert_eq!(parse_port_range(""), None);
    }

    #[test]
    fn concurrent_callers_never_get_the_same_port() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..50)
                        .map(|_| free_loopback_port().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for t in threads {
            for port in t.join().unwrap() {
                assert!(seen.insert(port), "port {port} handed out to two callers");
            }
        }
        assert_eq!(seen.len(), 200);
    }

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_never_repeat() {
        let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| parse_port_range(&t))
            .unwrap_or((32_768, 60_999));
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let port = free_loopback_port().unwrap();
            assert!(seen.insert(port), "port {port} handed out twice");
            if non_ephemeral_range(lo, hi).is_some() {
                assert!(!(lo..=hi).contains(&port), "{port} is ephemeral");
            }
        }
    }
}
