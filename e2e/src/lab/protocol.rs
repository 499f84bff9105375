//! The lab's echo protocol, spoken between `probe` and the echo server each
//! pod runs. A probe proves the whole path both ways and learns the source
//! address the server saw (masquerade or not):
//!
//! - TCP: the client sends `PROBE <token>\n`, the server answers
//!   `OK <token> <peer ip:port>\n` and closes. `STREAM\n` instead makes the
//!   server answer `OK STREAM <peer>\n` and then echo every byte until EOF
//!   (long-running connections for restart tests).
//! - UDP: a datagram `PROBE <token>` gets `OK <token> <peer ip:port>`; any
//!   other datagram is echoed back unchanged (MTU tests).
//!
//! Pure: no I/O.

use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A transport protocol of a pod port. The lab serves and probes TCP and
/// UDP; SCTP ports can be declared on Pods (for NetworkPolicy rendering) but
/// this kernel has no SCTP sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP (declared only).
    Sctp,
}

impl Protocol {
    /// `TCP`, `UDP`, `SCTP` as Kubernetes spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!("protocol {s:?}: expected TCP, UDP or SCTP")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const PROBE: &str = "PROBE";
const OK: &str = "OK";
/// The request that turns a TCP connection into a byte echo.
pub const STREAM_REQUEST: &str = "STREAM\n";

/// The probe request carrying `token` (no newline for UDP; TCP adds one).
pub fn probe_request(token: &str) -> String {
    format!("{PROBE} {token}")
}

/// What the echo server answers to one request line or datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send this reply (probe answers).
    Reply(String),
    /// TCP: start echoing bytes after sending this line.
    Stream(String),
    /// UDP: echo the datagram unchanged.
    Echo,
    /// Close without answering.
    Close,
}

/// The server's answer to `request` from `peer` (one TCP line without its
/// newline, or one UDP datagram as text).
pub fn answer(request: &str, peer: SocketAddr, tcp: bool) -> Answer {
    let request = request.trim_end_matches(['\r', '\n']);
    if let Some(token) = request
        .strip_prefix(PROBE)
        .and_then(|r| r.strip_prefix(' '))
        && !token.is_empty()
        && !token.contains(char::is_whitespace)
    {
        return Answer::Reply(format!("{OK} {token} {peer}"));
    }
    if tcp && request == STREAM_REQUEST.trim_end() {
        return Answer::Stream(format!("{OK} STREAM {peer}"));
    }
    if tcp { Answer::Close } else { Answer::Echo }
}

/// The peer address a reply reports, if it answers the probe `token`.
pub fn parse_reply(reply: &str, token: &str) -> Option<SocketAddr> {
    let mut parts = reply.trim_end_matches(['\r', '\n']).split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(OK), Some(t), Some(peer), None) if t == token => peer.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "10.244.1.5:40000".parse().unwrap()
    }

    #[test]
    fn probes_round_trip() {
        let req = probe_request("t42");
        let Answer::Reply(reply) = answer(&format!("{req}\n"), peer(), true) else {
            panic!("a probe gets a reply");
        };
        assert_eq!(parse_reply(&reply, "t42"), Some(peer()));
        assert_eq!(parse_reply(&reply, "t43"), None, "another probe's reply");
        let Answer::Reply(udp) = answer(&req, peer(), false) else {
            panic!("a UDP probe gets a reply");
        };
        assert_eq!(parse_reply(&udp, "t42"), Some(peer()));
    }

    #[test]
    fn other_requests() {
        assert_eq!(
            answer("STREAM", peer(), true),
            Answer::Stream("OK STREAM 10.244.1.5:40000".into())
        );
        assert_eq!(answer("STREAM", peer(), false), Answer::Echo);
        assert_eq!(answer("GET / HTTP/1.1", peer(), true), Answer::Close);
        assert_eq!(answer("PROBE ", peer(), true), Answer::Close);
        assert_eq!(answer("PROBE a b", peer(), true), Answer::Close);
        assert_eq!(answer("xxxx", peer(), false), Answer::Echo);
        assert_eq!(parse_reply("OK t 1.2.3.4:5 extra", "t"), None);
        assert_eq!(parse_reply("NO t 1.2.3.4:5", "t"), None);
    }

    #[test]
    fn protocols_parse_any_case() {
        assert_eq!("tcp".parse::<Protocol>(), Ok(Protocol::Tcp));
        assert_eq!("UDP".parse::<Protocol>(), Ok(Protocol::Udp));
        assert!("icmp".parse::<Protocol>().is_err());
        assert_eq!(Protocol::Sctp.to_string(), "SCTP");
    }
}
