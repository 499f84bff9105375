//! Pod address management from the node subnet, host-local style: one file
//! per allocated address under `<dataDir>/<network>/`, changed only while
//! holding an exclusive `flock` on `<dir>/lock`, so concurrent ADDs never
//! share an address. The choice of address is a pure function.
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
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};

/// One recorded allocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allocation {
    /// The address.
    pub ip: Ipv4Addr,
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
    pub ip: Option<Ipv4Addr>,
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
    pub fn blocked(&self) -> BTreeSet<Ipv4Addr> {
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
        || name == LOCKS_DIR
        // write_atomic's temporary files.
        || name.as_encoded_bytes().starts_with(b".")
}

/// Parses a record's bytes. Pure.
pub fn parse_record(ip: Ipv4Addr, bytes: &[u8]) -> Result<Allocation, String> {
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

/// The addresses pods may get: the subnet minus its network address (the
/// VXLAN device's), the next one (reserved like host-local's gateway) and
/// the broadcast address.
pub fn usable(subnet: Ipv4Net) -> Option<(u32, u32)> {
    let first = u32::from(subnet.network()).checked_add(2)?;
    let last = u32::from(subnet.broadcast()).checked_sub(1)?;
    (first <= last).then_some((first, last))
}

/// What ADD should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The container+interface already has this address (repeated ADD).
    Existing(Ipv4Addr),
    /// The container already has another interface on this network.
    OtherInterface(String),
    /// Take this free address.
    New(Ipv4Addr),
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

/// Decides the address for `container_id`/`ifname`: its existing one, or
/// round-robin the next free one after `last` (so a released address is not
/// handed out again at once), never one in `blocked`. A container gets one
/// interface per network.
pub fn decide(
    subnet: Ipv4Net,
    allocations: &[Allocation],
    blocked: &BTreeSet<Ipv4Addr>,
    container_id: &str,
    ifname: &str,
    last: Option<Ipv4Addr>,
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
    let taken: BTreeSet<u32> = allocations
        .iter()
        .map(|a| a.ip)
        .chain(blocked.iter().copied())
        .map(u32::from)
        .collect();
    let start = last
        .map(u32::from)
        .filter(|l| (first..=end).contains(l))
        .map(|l| if l == end { first } else { l + 1 })
        .unwrap_or(first);
    let count = end - first + 1;
    (0..count)
        .map(|i| first + (start - first + i) % count)
        .find(|ip| !taken.contains(ip))
        .map(|ip| Decision::New(Ipv4Addr::from(ip)))
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
            let Some(ip) = name.to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
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

    /// The last address handed out.
    pub fn last_reserved(&self) -> Option<Ipv4Addr> {
        std::fs::read_to_string(self.store.dir.join(LAST_FILE))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    /// Records `ip` for the container+interface and its host veth, and
    /// remembers it as the last address handed out.
    pub fn reserve(
        &self,
        ip: Ipv4Addr,
        container_id: &str,
        ifname: &str,
        host_if: &str,
    ) -> Result<(), StoreError> {
        self.write_record(ip, container_id, ifname, host_if)?;
        let last = self.store.dir.join(LAST_FILE);
        let mut f = File::create(&last).map_err(self.store.err("writing", last.clone()))?;
        f.write_all(ip.to_string().as_bytes())
            .map_err(self.store.err("writing", last))?;
        Ok(())
    }

    /// Writes the record of `ip` (atomically: readers see the old record
    /// or the new one).
    pub fn write_record(
        &self,
        ip: Ipv4Addr,
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
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<Ipv4Addr>, StoreError> {
        let mut released = Vec::new();
        for a in self.allocations()? {
            if a.container_id == container_id && a.ifname == ifname {
                self.remove(a.ip)?;
                released.push(a.ip);
            }
        }
        Ok(released)
    }

    /// Removes one allocation record.
    pub fn remove(&self, ip: Ipv4Addr) -> Result<(), StoreError> {
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

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn alloc(i: &str, c: &str) -> Allocation {
        Allocation {
            ip: ip(i),
            container_id: c.into(),
            ifname: "eth0".into(),
            host_if: None,
        }
    }

    fn none() -> BTreeSet<Ipv4Addr> {
        BTreeSet::new()
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        assert_eq!(
            usable(net("10.244.1.0/24")),
            Some((u32::from(ip("10.244.1.2")), u32::from(ip("10.244.1.254"))))
        );
        assert_eq!(
            usable(net("10.244.1.0/30")),
            Some((u32::from(ip("10.244.1.2")), u32::from(ip("10.244.1.2"))))
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
            let subnet = Ipv4Net::new(ip("10.244.1.0"), prefix).unwrap();
            let base = u32::from(subnet.network());
            let size = 1u32 << (32 - prefix);
            let allocations: Vec<_> = taken
                .iter()
                .filter(|o| **o < size)
                .map(|o| alloc(&Ipv4Addr::from(base + o).to_string(), &format!("c{o}")))
                .collect();
            let blocked: BTreeSet<Ipv4Addr> = unreadable
                .iter()
                .filter(|o| **o < size)
                .map(|o| Ipv4Addr::from(base + o))
                .collect();
            let last = last.filter(|l| *l < size).map(|l| Ipv4Addr::from(base + l));
            match decide(subnet, &allocations, &blocked, "new", "eth0", last) {
                Decision::New(a) => {
                    let o = u32::from(a) - base;
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
        assert_eq!(locked.last_reserved(), Some(ip("10.244.1.3")));
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
        let blocked: BTreeSet<Ipv4Addr> = [ip("10.244.1.2"), ip("10.244.1.3")].into();
        assert_eq!(
            decide(net("10.244.1.0/24"), &[], &blocked, "c", "eth0", None),
            Decision::New(ip("10.244.1.4"))
        );
        let all: BTreeSet<Ipv4Addr> = [ip("10.244.1.2")].into();
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
}
