//! Pod address management from the node subnet, host-local style: one file
//! per allocated address under `<dataDir>/<network>/`, changed only while
//! holding an exclusive `flock` on `<dir>/lock`, so concurrent ADDs never
//! share an address. The choice of address is a pure function.

use std::collections::BTreeSet;
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
    /// Take this free address.
    New(Ipv4Addr),
    /// No free address.
    Exhausted,
}

/// Decides the address for `container_id`/`ifname`: its existing one, or
/// round-robin the next free one after `last` (so a released address is not
/// handed out again at once).
pub fn decide(
    subnet: Ipv4Net,
    allocations: &[Allocation],
    container_id: &str,
    ifname: &str,
    last: Option<Ipv4Addr>,
) -> Decision {
    if let Some(a) = allocations
        .iter()
        .find(|a| a.container_id == container_id && a.ifname == ifname && subnet.contains(&a.ip))
    {
        return Decision::Existing(a.ip);
    }
    let Some((first, end)) = usable(subnet) else {
        return Decision::Exhausted;
    };
    let taken: BTreeSet<u32> = allocations.iter().map(|a| u32::from(a.ip)).collect();
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
    /// Every recorded allocation.
    pub fn allocations(&self) -> Result<Vec<Allocation>, StoreError> {
        let dir = &self.store.dir;
        let entries = std::fs::read_dir(dir).map_err(self.store.err("listing", dir.clone()))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.store.err("listing", dir.clone()))?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let path = entry.path();
            let text = std::fs::read_to_string(&path).map_err(self.store.err("reading", path))?;
            let mut lines = text.lines().map(str::trim);
            out.push(Allocation {
                ip,
                container_id: lines.next().unwrap_or_default().to_string(),
                ifname: lines.next().unwrap_or_default().to_string(),
            });
        }
        out.sort();
        Ok(out)
    }

    /// The last address handed out.
    pub fn last_reserved(&self) -> Option<Ipv4Addr> {
        std::fs::read_to_string(self.store.dir.join(LAST_FILE))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    /// Records `ip` for the container+interface.
    pub fn reserve(
        &self,
        ip: Ipv4Addr,
        container_id: &str,
        ifname: &str,
    ) -> Result<(), StoreError> {
        let path = self.store.dir.join(ip.to_string());
        let content = format!("{container_id}\n{ifname}\n");
        crate::runfiles::write_atomic(&path, content.as_bytes(), 0o644).map_err(|e| {
            StoreError {
                action: "writing",
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let last = self.store.dir.join(LAST_FILE);
        let mut f = File::create(&last).map_err(self.store.err("writing", last.clone()))?;
        f.write_all(ip.to_string().as_bytes())
            .map_err(self.store.err("writing", last))?;
        Ok(())
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
        }
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
            decide(net("10.244.1.0/24"), &[], "c", "eth0", None),
            Decision::New(ip("10.244.1.2"))
        );
    }

    #[test]
    fn repeated_add_gets_the_same_address() {
        let a = [alloc("10.244.1.7", "c1")];
        assert_eq!(
            decide(net("10.244.1.0/24"), &a, "c1", "eth0", None),
            Decision::Existing(ip("10.244.1.7"))
        );
        // Another interface of the same container is another allocation.
        assert_eq!(
            decide(net("10.244.1.0/24"), &a, "c1", "net1", None),
            Decision::New(ip("10.244.1.2"))
        );
        // After a subnet change the old address does not count.
        assert_eq!(
            decide(net("10.244.9.0/24"), &a, "c1", "eth0", None),
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
            decide(net("10.244.1.0/30"), &a, "c2", "eth0", None),
            Decision::Exhausted
        );
    }

    proptest! {
        #[test]
        fn never_hands_out_a_taken_or_reserved_address(
            prefix in 24u8..=30,
            taken in proptest::collection::btree_set(0u32..256, 0..300),
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
            let last = last.filter(|l| *l < size).map(|l| Ipv4Addr::from(base + l));
            match decide(subnet, &allocations, "new", "eth0", last) {
                Decision::New(a) => {
                    let o = u32::from(a) - base;
                    prop_assert!(o >= 2 && o < size - 1, "{a} reserved");
                    prop_assert!(!allocations.iter().any(|x| x.ip == a), "{a} taken");
                }
                Decision::Exhausted => {
                    let free = (2..size - 1).filter(|o| !taken.contains(o)).count();
                    prop_assert_eq!(free, 0);
                }
                Decision::Existing(_) => prop_assert!(false, "no existing allocation"),
            }
        }
    }

    #[test]
    fn store_records_and_releases_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "k8s-pod-network");
        let locked = store.lock().unwrap();
        assert!(locked.allocations().unwrap().is_empty());
        locked.reserve(ip("10.244.1.2"), "c1", "eth0").unwrap();
        locked.reserve(ip("10.244.1.3"), "c2", "eth0").unwrap();
        assert_eq!(locked.last_reserved(), Some(ip("10.244.1.3")));
        assert_eq!(
            locked.allocations().unwrap(),
            vec![alloc("10.244.1.2", "c1"), alloc("10.244.1.3", "c2")]
        );
        assert_eq!(
            locked.release("c1", "eth0").unwrap(),
            vec![ip("10.244.1.2")]
        );
        assert!(locked.release("c1", "eth0").unwrap().is_empty());
        assert_eq!(locked.allocations().unwrap().len(), 1);
    }
}
