//! The netlink pieces every hand-written netfilter client here shares
//! (`nfnl`, `ctnetlink`, `nft::netlink`, `watch`): one attribute encoder
//! and the receive timeout, so the encodings cannot drift apart.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use netlink_sys::Socket;

/// Marks an attribute as holding nested attributes.
pub const NLA_F_NESTED: u16 = 0x8000;

/// Appends one attribute (length, type, value) padded to 4 bytes.
pub fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize((buf.len() + 3) & !3, 0);
}

/// Bounds every receive on `s`, so a lost answer is an error, not a hang.
pub fn set_rcvtimeo(s: &Socket, d: Duration) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    use nix::sys::time::TimeVal;
    let tv = TimeVal::new(d.as_secs() as _, d.subsec_micros() as _);
    setsockopt(&s.as_fd(), sockopt::ReceiveTimeout, &tv).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut buf = Vec::new();
        push_attr(&mut buf, 3, &[1, 2, 3, 4, 5]);
        assert_eq!(buf.len(), 12);
        assert_eq!(
            &buf[..4],
            &[9u16.to_ne_bytes(), 3u16.to_ne_bytes()].concat()[..]
        );
        assert_eq!(&buf[4..9], &[1, 2, 3, 4, 5]);
        assert_eq!(&buf[9..], &[0, 0, 0]);
        push_attr(&mut buf, 4, &[]);
        assert_eq!(buf.len(), 16);
    }
}
