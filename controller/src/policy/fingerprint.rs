//! 128-bit fingerprints that decide whether an object must be written.
//!
//! The index fingerprints each desired object from its own compact state,
//! without building the object (a node whose pods are selected by 10,000
//! policies would otherwise cost 10,000 strings per pod just to compare).
//! When the controller writes an object it stores two fingerprints in an
//! annotation: that desired-state fingerprint and a hash of the spec as
//! written. On every watch event the spec is hashed again: if it still
//! matches, nobody changed the object since and the desired fingerprint in
//! the annotation is what the cluster holds; if not, the object was edited
//! behind the controller's back and is rewritten. So after a restart the
//! controller knows, without rendering anything, which objects are current.

use std::fmt;
use std::net::IpAddr;

use canal_crds::Protocol;
use serde::Serialize;
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

/// A fingerprint.
pub type Fingerprint = u128;

/// The annotation that records what the controller wrote.
pub const ANNOTATION: &str = "canal.dev/fingerprint";

/// Bumped whenever rendering changes, so objects written by an older
/// release are rewritten once.
const VERSION: &str = "canal-policy-v1";

/// A streaming fingerprint builder.
pub struct Fp(Xxh3);

impl Fp {
    /// Starts a fingerprint of one kind of thing (the kind is hashed too).
    pub fn new(kind: &str) -> Fp {
        let mut h = Xxh3::new();
        h.update(VERSION.as_bytes());
        h.update(&[0xff]);
        h.update(kind.as_bytes());
        h.update(&[0xff]);
        Fp(h)
    }

    /// Adds a string (terminated by 0xff, which UTF-8 never contains).
    pub fn str(&mut self, s: &str) -> &mut Fp {
        self.0.update(s.as_bytes());
        self.0.update(&[0xff]);
        self
    }

    /// Adds an optional string.
    pub fn opt_str(&mut self, s: Option<&str>) -> &mut Fp {
        match s {
            Some(s) => self.u64(1).str(s),
            None => self.u64(0),
        }
    }

    /// Adds the `Display` text of a value, as [`Fp::str`] would.
    pub fn display(&mut self, d: impl fmt::Display) -> &mut Fp {
        struct W<'a>(&'a mut Xxh3);
        impl fmt::Write for W<'_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                self.0.update(s.as_bytes());
                Ok(())
            }
        }
        // Writing into a hasher cannot fail.
        let _ = fmt::write(&mut W(&mut self.0), format_args!("{d}"));
        self.0.update(&[0xff]);
        self
    }

    /// Adds a number.
    pub fn u64(&mut self, v: u64) -> &mut Fp {
        self.0.update(&v.to_le_bytes());
        self
    }

    /// Adds another fingerprint.
    pub fn fp(&mut self, v: Fingerprint) -> &mut Fp {
        self.0.update(&v.to_le_bytes());
        self
    }

    /// The fingerprint.
    pub fn finish(&self) -> Fingerprint {
        self.0.digest128()
    }
}

impl std::hash::Hasher for Fp {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        // Only the 128-bit `Fp::finish` is used; this satisfies the trait.
        self.0.digest128() as u64
    }
}

/// Fingerprint of any value through its `Hash` impl (every field, by
/// construction). Stable for one build of the controller; a new build may
/// fingerprint differently, which costs one rewrite of each object.
pub fn hashed<T: std::hash::Hash + ?Sized>(kind: &str, value: &T) -> Fingerprint {
    let mut h = Fp::new(kind);
    value.hash(&mut h);
    Fp::finish(&h)
}

/// Fingerprint of a string on its own (a policy name in a list).
pub fn of_str(s: &str) -> Fingerprint {
    xxh3_128(s.as_bytes())
}

/// The hash of one PeerSet member IP. A set's fingerprint is the wrapping
/// sum over its distinct members, so adding or removing one is O(1).
pub fn ip_member(ip: IpAddr) -> Fingerprint {
    let mut buf = [0u8; 18];
    let n = encode_ip(ip, &mut buf);
    xxh3_128(&buf[..n])
}

/// The hash of one (IP, protocol, port) member of a named-port set.
pub fn port_member(ip: IpAddr, protocol: Protocol, port: u16) -> Fingerprint {
    let mut buf = [0u8; 21];
    let n = encode_ip(ip, &mut buf);
    buf[n] = protocol as u8;
    buf[n + 1..n + 3].copy_from_slice(&port.to_be_bytes());
    xxh3_128(&buf[..n + 3])
}

fn encode_ip(ip: IpAddr, buf: &mut [u8]) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            buf[0] = 4;
            buf[1..5].copy_from_slice(&v4.octets());
            5
        }
        IpAddr::V6(v6) => {
            buf[0] = 6;
            buf[1..17].copy_from_slice(&v6.octets());
            17
        }
    }
}

/// Hash of an object's spec exactly as serialized.
pub fn content<T: Serialize>(spec: &T) -> Fingerprint {
    match serde_json::to_vec(spec) {
        Ok(bytes) => of_bytes(&bytes),
        // Plain data always serializes; a failure just means "unknown".
        Err(_) => 0,
    }
}

/// Hash of serialized bytes (what [`content`] hashes).
pub fn of_bytes(bytes: &[u8]) -> Fingerprint {
    xxh3_128(bytes)
}

/// The annotation value: desired-state fingerprint and content hash.
pub fn annotation_value(desired: Fingerprint, content: Fingerprint) -> String {
    format!("{desired:032x}.{content:032x}")
}

/// What the cluster holds, judged from an observed object: the desired
/// fingerprint recorded in its annotation when the spec is unchanged since
/// the controller wrote it, else None (unknown: rewrite it).
pub fn observed(annotation: Option<&str>, spec_content: Fingerprint) -> Option<Fingerprint> {
    let (desired, content) = annotation?.split_once('.')?;
    let desired = u128::from_str_radix(desired, 16).ok()?;
    let content = u128::from_str_radix(content, 16).ok()?;
    (content == spec_content).then_some(desired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_delimited() {
        let a = Fp::new("t").str("ab").str("c").finish();
        let b = Fp::new("t").str("a").str("bc").finish();
        assert_ne!(a, b);
        let c = Fp::new("t")
            .display("ab")
            .display(format_args!("c"))
            .finish();
        assert_eq!(a, c);
        assert_ne!(Fp::new("t").finish(), Fp::new("u").finish());
    }

    #[test]
    fn members_differ_by_family_protocol_and_port() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "::a00:1".parse().unwrap();
        assert_ne!(ip_member(v4), ip_member(v6));
        assert_ne!(
            port_member(v4, Protocol::TCP, 80),
            port_member(v4, Protocol::UDP, 80)
        );
        assert_ne!(
            port_member(v4, Protocol::TCP, 80),
            port_member(v4, Protocol::TCP, 81)
        );
    }

    #[test]
    fn annotation_round_trip_and_tamper_detection() {
        let spec = vec!["a", "b"];
        let value = annotation_value(42, content(&spec));
        assert_eq!(observed(Some(&value), content(&spec)), Some(42));
        assert_eq!(observed(Some(&value), content(&vec!["a"])), None);
        assert_eq!(observed(None, content(&spec)), None);
        assert_eq!(observed(Some("garbage"), content(&spec)), None);
    }
}
