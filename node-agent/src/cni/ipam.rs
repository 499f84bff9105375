//! Pod address management from the node's subnets (one per IP family),
//! host-local style: one file per allocated address (IPv4 or IPv6) under
//! `<dataDir>/<network>/`, changed only while holding an exclusive `flock`
//! on `<dir>/lock`, so concurrent ADDs never share an address. The choice
//! of address is a pure function, made per family.
//!
//! A record is `<container id>\n<ifname>\n<host interface>\n` (host-local's
//! first two lines; the third lets GC find the interface to remove). An
//! entry that cannot be read (a directory or symlink named like an
//! address, bytes that are not a record) is skipped with a warning and its
//! address is never handed out: one bad entry must not stop every ADD and
//! DEL on the node, and an address whose owner is unknown is not free.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};

use crate::overlay::family::{self, Family};

/// One recorded allocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allocation {
    /// The address.
    pub ip: IpAddr,
    /// Owner container.
    pub container_id: String,
    /// Owner interface.
    pub ifname: String,
    /// The host-side veth (records written before it was kept have none).
    pub host_if: Option<String>,
}

/// An entry of the store that is not a readable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Its file name (lossy).
    pub name: String,
    /// The address it is named after, if it is: never handed out.
    pub ip: Option<IpAddr>,
    /// Why it cannot be read.
    pub reason: String,
}

/// What the store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The readable records, sorted.
    pub records: Vec<Allocation>,
    /// Entries that are not.
    pub unreadable: Vec<Unreadable>,
}

impl Listing {
    /// Addresses that are not free although no readable record holds them.
    pub fn blocked(&self) -> BTreeSet<IpAddr> {
        self.unreadable.iter().filter_map(|u| u.ip).collect()
    }

    /// One line per unreadable entry, for stderr.
    pub fn warnings(&self, dir: &Path) -> Vec<String> {
        self.unreadable
            .iter()
            .map(|u| {
                let held = if u.ip.is_some() {
                    "; its address stays allocated until the entry is fixed or removed"
                } else {
                    ""
                };
                format!(
                    "canal-cni: skipping IPAM entry {}/{}: {}{held}",
                    dir.display(),
                    u.name,
                    u.reason
                )
            })
            .collect()
    }
}

/// Files of the store that are not records.
fn is_bookkeeping(name: &OsStr) -> bool {
    name == LOCK_FILE
        || name == LAST_FILE
        || name == LAST_FILE_V6
        || name == LOCKS_DIR
        // write_atomic's temporary files.
        || name.as_encoded_bytes().starts_with(b".")
}

/// Parses a record's bytes. Pure.
pub fn parse_record(ip: IpAddr, bytes: &[u8]) -> Result<Allocation, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let mut lines = text.lines().map(str::trim);
    let container_id = lines.next().unwrap_or_default();
    let ifname = lines.next().unwrap_or_default();
    let host_if = lines.next().filter(|l| !l.is_empty());
    if !super::config::valid_container_id(container_id) {
        return Err(format!("{container_id:?} is not a container ID"));
    }
    if !super::config::valid_ifname(ifname) {
        return Err(format!("{ifname:?} is not an interface name"));
    }
    if let Some(h) = host_if
        && !super::config::valid_ifname(h)
    {
        return Err(format!("{h:?} is not an interface name"));
    }
    Ok(Allocation {
        ip,
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
        host_if: host_if.map(str::to_string),
    })
}

/// The addresses pods may get, as integers: the subnet minus its network
/// address (the VXLAN device's), the next one (reserved like host-local's
/// gateway) and the last one (IPv4's broadcast; IPv6 reserves it too, so
/// both families follow one rule).
pub fn usable(subnet: IpNet) -> Option<(u128, u128)> {
    let (network, last) = family::net_bounds(subnet);
    let first = network.checked_add(2)?;
    let last = last.checked_sub(1)?;
    (first <= last).then_some((first, last))
}

/// The address of `family` with this integer value.
fn addr_of(family: Family, bits: u128) -> IpAddr {
    match family {
        // IPv4 bits fit 32 bits: they come from an IPv4 subnet.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(bits).unwrap_or(u32::MAX))),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(bits)),
    }
}

/// What ADD should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The container+interface already has this address (repeated ADD).
    Existing(IpAddr),
    /// The container already has another interface on this network.
    OtherInterface(String),
    /// Take this free address.
    New(IpAddr),
    /// No free address.
    Exhausted,
}

/// Another interface `container_id` has on this network, if any.
pub fn other_interface(
    allocations: &[Allocation],
    container_id: &str,
    ifname: &str,
) -> Option<String> {
    allocations
        .iter()
        .find(|a| a.container_id == container_id && a.ifname != ifname)
        .map(|a| a.ifname.clone())
}

/// Decides the address of `subnet`'s family for `container_id`/`ifname`:
/// its existing one, or round-robin the next free one after `last` (so a
/// released address is not handed out again at once), never one in
/// `blocked`. A container gets one interface per network. The work is
/// bounded by the number of taken addresses, not the subnet's size (an
/// IPv6 /64 has 2^64).
pub fn decide(
    subnet: IpNet,
    allocations: &[Allocation],
    blocked: &BTreeSet<IpAddr>,
    container_id: &str,
    ifname: &str,
    last: Option<IpAddr>,
) -> Decision {
    if let Some(other) = other_interface(allocations, container_id, ifname) {
        return Decision::OtherInterface(other);
    }
    if let Some(a) = allocations
        .iter()
        .find(|a| a.container_id == container_id && a.ifname == ifname && subnet.contains(&a.ip))
    {
        return Decision::Existing(a.ip);
    }
    let Some((first, end)) = usable(subnet) else {
        return Decision::Exhausted;
    };
    let family = Family::of_net(&subnet);
    let of_family = |ip: &IpAddr| Family::of_addr(ip) == family;
    let taken: BTreeSet<u128> = allocations
        .iter()
        .map(|a| a.ip)
        .chain(blocked.iter().copied())
        .filter(of_family)
        .map(family::addr_bits)
        .collect();
    let start = last
        .filter(of_family)
        .map(family::addr_bits)
        .filter(|l| (first..=end).contains(l))
        .map(|l| if l == end { first } else { l + 1 })
        .unwrap_or(first);
    let count = end - first + 1;
    // At most taken.len() + 1 steps: every step but the last hits a taken
    // address.
    (0..count)
        .map(|i| first + (start - first + i) % count)
        .find(|ip| !taken.contains(ip))
        .map(|ip| Decision::New(addr_of(family, ip)))
        .unwrap_or(Decision::Exhausted)
}

/// The IPAM store failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct StoreError {
    /// What was being done.
    pub action: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

/// The allocation directory of one network.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// The store while its lock is held; dropping it releases the lock.
pub struct Locked<'a> {
    store: &'a Store,
    _lock: Flock<File>,
}

const LOCK_FILE: &str = "lock";
const LAST_FILE: &str = "last_reserved_ip";
const LAST_FILE_V6: &str = "last_reserved_ip.v6";

fn last_file(family: Family) -> &'static str {
    match family {
        Family::V4 => LAST_FILE,
        Family::V6 => LAST_FILE_V6,
    }
}
const LOCKS_DIR: &str = "locks";

impl Store {
    /// `<data_dir>/<network>`.
    pub fn new(data_dir: &Path, network: &str) -> Store {
        Store {
            dir: data_dir.join(network),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the per-attachment locks live.
    pub fn locks_dir(&self) -> PathBuf {
        self.dir.join(LOCKS_DIR)
    }

    fn err(
        &self,
        action: &'static str,
        path: PathBuf,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        move |source| StoreError {
            action,
            path,
            source,
        }
    }

    /// Takes the exclusive lock (blocking until other ADD/DEL are done).
    pub fn lock(&self) -> Result<Locked<'_>, StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(self.err("creating", self.dir.clone()))?;
        let path = self.dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(self.err("opening", path.clone()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| StoreError {
            action: "locking",
            path,
            source: std::io::Error::from(errno),
        })?;
        Ok(Locked {
            store: self,
            _lock: lock,
        })
    }
}

impl Locked<'_> {
    /// Every entry: the readable records and what could not be read.
    pub fn listing(&self) -> Result<Listing, StoreError> {
        let dir = &self.store.dir;
        let entries = std::fs::read_dir(dir).map_err(self.store.err("listing", dir.clone()))?;
        let mut out = Listing::default();
        for entry in entries {
            let entry = entry.map_err(self.store.err("listing", dir.clone()))?;
            let name = entry.file_name();
            if is_bookkeeping(&name) {
                continue;
            }
            let lossy = name.to_string_lossy().into_owned();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
                out.unreadable.push(Unreadable {
                    name: lossy,
                    ip: None,
                    reason: "not named like an address".into(),
                });
                continue;
            };
            let unreadable = |reason: String| Unreadable {
                name: lossy.clone(),
                ip: Some(ip),
                reason,
            };
            let path = entry.path();
            // Not followed: a symlink is not a record canal wrote.
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => {}
                Ok(m) => {
                    let kind = if m.is_dir() {
                        "a directory"
                    } else {
                        "not a regular file"
                    };
                    out.unreadable.push(unreadable(format!("is {kind}")));
                    continue;
                }
                Err(e) => {
                    out.unreadable.push(unreadable(e.to_string()));
                    continue;
                }
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| parse_record(ip, &bytes))
            {
                Ok(record) => out.records.push(record),
                Err(reason) => out.unreadable.push(unreadable(reason)),
            }
        }
        out.records.sort();
        Ok(out)
    }

    /// The readable records.
    pub fn allocations(&self) -> Result<Vec<Allocation>, StoreError> {
        Ok(self.listing()?.records)
    }

    /// The last address of `family` handed out.
    pub fn last_reserved(&self, family: Family) -> Option<IpAddr> {
        std::fs::read_to_string(self.store.dir.join(last_file(family)))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .filter(|ip| Family::of_addr(ip) == family)
    }

    /// Records `ip` for the container+interface and its host veth, and
    /// remembers it as the last address handed out.
    pub fn reserve(
        &self,
        ip: IpAddr,
        container_id: &str,
        ifname: &str,
        host_if: &str,
    ) -> Result<(), StoreError> {
        self.write_record(ip, container_id, ifname, host_if)?;
        let last = self.store.dir.join(last_file(Family::of_addr(&ip)));
        let mut f = File::create(&last).map_err(self.store.err("writing", last.clone()))?;
        f.write_all(ip.to_string().as_bytes())
            .map_err(self.store.err("writing", last))?;
        Ok(())
    }

    /// Writes the record of `ip` (atomically: readers see the old record
    /// or the new one).
    pub fn write_record(
        &self,
        ip: IpAddr,
        container_id: &str,
        ifname: &str,
        host_if: &str,
    ) -> Result<(), StoreError> {
        let path = self.store.dir.join(ip.to_string());
        let content = format!("{container_id}\n{ifname}\n{host_if}\n");
        crate::runfiles::write_atomic(&path, content.as_bytes(), 0o644).map_err(|e| StoreError {
            action: "writing",
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Releases the addresses of the container+interface; returns them.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        self.release_if(container_id, ifname, |_| true)
    }

    /// Releases the container+interface's addresses of `family` except
    /// `keep`; returns them.
    pub fn release_family(
        &self,
        container_id: &str,
        ifname: &str,
        family: Family,
        keep: Option<IpAddr>,
    ) -> Result<Vec<IpAddr>, StoreError> {
        self.release_if(container_id, ifname, |ip| {
            Family::of_addr(&ip) == family && Some(ip) != keep
        })
    }

    fn release_if(
        &self,
        container_id: &str,
        ifname: &str,
        which: impl Fn(IpAddr) -> bool,
    ) -> Result<Vec<IpAddr>, StoreError> {
        let mut released = Vec::new();
        for a in self.allocations()? {
            if a.container_id == container_id && a.ifname == ifname && which(a.ip) {
                self.remove(a.ip)?;
                released.push(a.ip);
            }
        }
        Ok(released)
    }

    /// Removes one allocation record.
    pub fn remove(&self, ip: IpAddr) -> Result<(), StoreError> {
        let path = self.store.dir.join(ip.to_string());
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError {
                action: "removing",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn bits(s: &str) -> u128 {
        family::addr_bits(ip(s))
    }

    fn alloc(i: &str, c: &str) -> Allocation {
        Allocation {
            ip: ip(i),
            container_id: c.into(),
            ifname: "eth0".into(),
            host_if: None,
        }
    }

    fn none() -> BTreeSet<IpAddr> {
        BTreeSet::new()
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        assert_eq!(
            usable(net("10.244.1.0/24")),
            Some((bits("10.244.1.2"), bits("10.244.1.254")))
        );
        assert_eq!(
            usable(net("10.244.1.0/30")),
            Some((bits("10.244.1.2"), bits("10.244.1.2")))
        );
        assert_eq!(usable(net("10.244.1.0/31")), None);
        assert_eq!(
            decide(net("10.244.1.0/24"), &[], &none(), "c", "eth0", None),
            Decision::New(ip("10.244.1.2"))
        );
    }

    #[test]
    fn repeated_add_gets_the_same_address() {
        let a = [alloc("10.244.1.7", "c1")];
        assert_eq!(
            decide(net("10.244.1.0/24"), &a, &none(), "c1", "eth0", None),
            Decision::Existing(ip("10.244.1.7"))
        );
        // A container gets one interface per network.
        assert_eq!(
            decide(net("10.244.1.0/24"), &a, &none(), "c1", "net1", None),
            Decision::OtherInterface("eth0".into())
        );
        // After a subnet change the old address does not count.
        assert_eq!(
            decide(net("10.244.9.0/24"), &a, &none(), "c1", "eth0", None),
            Decision::New(ip("10.244.9.2"))
        );
    }

    #[test]
    fn round_robin_after_the_last_and_wraps() {
        let a = [alloc("10.244.1.2", "c1")];
        assert_eq!(
            decide(
                net("10.244.1.0/24"),
                &a,
                &none(),
                "c2",
                "eth0",
                Some(ip("10.244.1.9"))
            ),
            Decision::New(ip("10.244.1.10"))
        );
        assert_eq!(
            decide(
                net("10.244.1.0/24"),
                &a,
                &none(),
                "c2",
                "eth0",
                Some(ip("10.244.1.254"))
            ),
            Decision::New(ip("10.244.1.3"))
        );
        assert_eq!(
            decide(
                net("10.244.1.0/24"),
                &a,
                &none(),
                "c2",
                "eth0",
                Some(ip("192.168.0.1"))
            ),
            Decision::New(ip("10.244.1.3"))
        );
    }

    #[test]
    fn full_subnet_is_exhausted() {
        let a = [alloc("10.244.1.2", "c1")];
        assert_eq!(
            decide(net("10.244.1.0/30"), &a, &none(), "c2", "eth0", None),
            Decision::Exhausted
        );
    }

    proptest! {
        #[test]
        fn never_hands_out_a_taken_or_reserved_address(
            prefix in 24u8..=30,
            taken in proptest::collection::btree_set(0u32..256, 0..300),
            unreadable in proptest::collection::btree_set(0u32..256, 0..40),
            last in proptest::option::of(0u32..256),
        ) {
            let subnet = IpNet::new(ip("10.244.1.0"), prefix).unwrap();
            let base = u32::from(ipnet::Ipv4Net::new("10.244.1.0".parse().unwrap(), prefix).unwrap().network());
            let size = 1u32 << (32 - prefix);
            let at = |o: u32| IpAddr::V4(Ipv4Addr::from(base + o));
            let allocations: Vec<_> = taken
                .iter()
                .filter(|o| **o < size)
                .map(|o| alloc(&at(*o).to_string(), &format!("c{o}")))
                .collect();
            let blocked: BTreeSet<IpAddr> = unreadable
                .iter()
                .filter(|o| **o < size)
                .map(|o| at(*o))
                .collect();
            let last = last.filter(|l| *l < size).map(at);
            match decide(subnet, &allocations, &blocked, "new", "eth0", last) {
                Decision::New(a) => {
                    let o = (family::addr_bits(a) - u128::from(base)) as u32;
                    prop_assert!(o >= 2 && o < size - 1, "{a} reserved");
                    prop_assert!(!allocations.iter().any(|x| x.ip == a), "{a} taken");
                    prop_assert!(!blocked.contains(&a), "{a} unreadable");
                }
                Decision::Exhausted => {
                    let free = (2..size - 1)
                        .filter(|o| !taken.contains(o) && !unreadable.contains(o))
                        .count();
                    prop_assert_eq!(free, 0);
                }
                other => prop_assert!(false, "{other:?}: no allocation of this container"),
            }
        }
    }

    #[test]
    fn store_records_and_releases_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "k8s-pod-network");
        let locked = store.lock().unwrap();
        assert!(locked.allocations().unwrap().is_empty());
        locked
            .reserve(ip("10.244.1.2"), "c1", "eth0", "cali1")
            .unwrap();
        locked
            .reserve(ip("10.244.1.3"), "c2", "eth0", "cali2")
            .unwrap();
        assert_eq!(locked.last_reserved(Family::V4), Some(ip("10.244.1.3")));
        assert_eq!(locked.last_reserved(Family::V6), None);
        let with_host = |i, c, h: &str| Allocation {
            host_if: Some(h.into()),
            ..alloc(i, c)
        };
        assert_eq!(
            locked.allocations().unwrap(),
            vec![
                with_host("10.244.1.2", "c1", "cali1"),
                with_host("10.244.1.3", "c2", "cali2")
            ]
        );
        assert_eq!(
            locked.release("c1", "eth0").unwrap(),
            vec![ip("10.244.1.2")]
        );
        assert!(locked.release("c1", "eth0").unwrap().is_empty());
        assert_eq!(locked.allocations().unwrap().len(), 1);
    }

    #[test]
    fn blocked_addresses_are_never_handed_out() {
        let blocked: BTreeSet<IpAddr> = [ip("10.244.1.2"), ip("10.244.1.3")].into();
        assert_eq!(
            decide(net("10.244.1.0/24"), &[], &blocked, "c", "eth0", None),
            Decision::New(ip("10.244.1.4"))
        );
        let all: BTreeSet<IpAddr> = [ip("10.244.1.2")].into();
        assert_eq!(
            decide(net("10.244.1.0/30"), &[], &all, "c", "eth0", None),
            Decision::Exhausted
        );
    }

    #[test]
    fn records_parse_strictly() {
        let a = ip("10.244.1.2");
        assert_eq!(
            parse_record(a, b"c1\neth0\ncali0123456789a\n").unwrap(),
            Allocation {
                ip: a,
                container_id: "c1".into(),
                ifname: "eth0".into(),
                host_if: Some("cali0123456789a".into()),
            }
        );
        // host-local's two-line records and canal's older ones.
        assert_eq!(parse_record(a, b"c1\r\neth0").unwrap().host_if, None);
        for bad in [
            &b""[..],
            b"\n",
            b"c1",
            b"c1\n\n",
            b"\xff\xfe\n",
            b"../x\neth0",
            b"c1\na:b",
            b"c1\neth0\na b",
        ] {
            assert!(parse_record(a, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unreadable_entries_are_listed_apart_and_block_their_address() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "net");
        let locked = store.lock().unwrap();
        locked
            .reserve(ip("10.244.1.9"), "good", "eth0", "cali9")
            .unwrap();
        let d = store.dir();
        std::fs::create_dir(d.join("10.244.1.2")).unwrap();
        std::fs::write(d.join("10.244.1.3"), b"\xff\xfe").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.join("10.244.1.4")).unwrap();
        std::fs::write(d.join(OsStr::from_bytes(b"\xffjunk")), "x").unwrap();
        std::fs::write(d.join(".10.244.1.5.tmp-1"), "partial").unwrap();
        std::fs::create_dir_all(store.locks_dir()).unwrap();
        let listing = locked.listing().unwrap();
        assert_eq!(listing.records.len(), 1);
        assert_eq!(
            listing.blocked(),
            [ip("10.244.1.2"), ip("10.244.1.3"), ip("10.244.1.4")].into()
        );
        assert_eq!(listing.unreadable.len(), 4, "{listing:?}");
        let warnings = listing.warnings(d).join("\n");
        assert!(
            warnings.contains("10.244.1.2: is a directory"),
            "{warnings}"
        );
        assert!(warnings.contains("not UTF-8"), "{warnings}");
        assert!(
            !warnings.contains(".10.244.1.5.tmp-1"),
            "temporary files are bookkeeping"
        );
        assert_eq!(
            locked.release("good", "eth0").unwrap(),
            vec![ip("10.244.1.9")]
        );
    }

    #[test]
    fn ipv6_addresses_come_from_the_ipv6_subnet_and_each_family_is_apart() {
        let v6 = net("fd00:10:244:1::/64");
        assert_eq!(
            usable(v6),
            Some((
                bits("fd00:10:244:1::2"),
                bits("fd00:10:244:1:ffff:ffff:ffff:fffe")
            ))
        );
        let a = [
            alloc("10.244.1.2", "c1"),
            alloc("fd00:10:244:1::2", "c1"),
            alloc("fd00:10:244:1::3", "c2"),
        ];
        // Repeated ADD: each family's own record.
        assert_eq!(
            decide(v6, &a, &none(), "c1", "eth0", None),
            Decision::Existing(ip("fd00:10:244:1::2"))
        );
        assert_eq!(
            decide(net("10.244.1.0/24"), &a, &none(), "c1", "eth0", None),
            Decision::Existing(ip("10.244.1.2"))
        );
        // A new container gets the first free one of each family; an IPv4
        // record never counts against the IPv6 subnet, nor an IPv4 last.
        assert_eq!(
            decide(v6, &a, &none(), "c3", "eth0", Some(ip("10.244.1.9"))),
            Decision::New(ip("fd00:10:244:1::4"))
        );
        assert_eq!(
            decide(net("10.244.1.0/24"), &a, &none(), "c3", "eth0", None),
            Decision::New(ip("10.244.1.3"))
        );
        // Round robin after the last IPv6 one, wrapping at the end of a /64
        // without walking 2^64 addresses.
        assert_eq!(
            decide(
                v6,
                &a,
                &none(),
                "c3",
                "eth0",
                Some(ip("fd00:10:244:1:ffff:ffff:ffff:fffe"))
            ),
            Decision::New(ip("fd00:10:244:1::4"))
        );
        let small = net("fd00:10:244:1::/126");
        let full = [alloc("fd00:10:244:1::2", "x")];
        assert_eq!(
            decide(small, &full, &none(), "c9", "eth0", None),
            Decision::Exhausted
        );
    }

    #[test]
    fn ipv6_records_live_next_to_ipv4_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "net");
        let locked = store.lock().unwrap();
        locked
            .reserve(ip("10.244.1.2"), "c1", "eth0", "cali1")
            .unwrap();
        locked
            .reserve(ip("fd00:10:244:1::2"), "c1", "eth0", "cali1")
            .unwrap();
        locked
            .reserve(ip("fd00:10:244:1::3"), "c2", "eth0", "cali2")
            .unwrap();
        assert_eq!(locked.last_reserved(Family::V4), Some(ip("10.244.1.2")));
        assert_eq!(
            locked.last_reserved(Family::V6),
            Some(ip("fd00:10:244:1::3"))
        );
        let listing = locked.listing().unwrap();
        assert_eq!(listing.records.len(), 3);
        assert!(listing.unreadable.is_empty(), "{listing:?}");
        assert_eq!(
            locked
                .release_family("c1", "eth0", Family::V6, None)
                .unwrap(),
            vec![ip("fd00:10:244:1::2")]
        );
        assert_eq!(locked.allocations().unwrap().len(), 2);
        assert_eq!(
            locked.release("c1", "eth0").unwrap(),
            vec![ip("10.244.1.2")]
        );
    }
}
