//! Source ports for UDP probes that never repeat a recent 5-tuple, across
//! every process probing one lab.
//!
//! UDP has no handshake: a datagram with the addresses and ports of an
//! earlier allowed exchange belongs to that conntrack entry (alive for
//! `nf_conntrack_udp_timeout`, 30 s, or `..._stream`, 120 s) and passes any
//! NetworkPolicy created since, exactly as a reply of an allowed flow must.
//! A probe that reuses one would report a pair the policy denies as
//! connected. So the lab's probes take their source ports from one rotation
//! per lab, persisted under `/run/canal-lab/<prefix>/` and locked with
//! `flock(2)`, shared by `canal-lab matrix`, `probe` and the tests:
//!
//! - the range [`RANGE`] (below the kernel's ephemeral ports, so never a
//!   TCP probe's) is cut into blocks of [`BLOCK`] ports;
//! - a process reserves the next block of the rotation, and uses its ports
//!   for at most [`BLOCK_HOLD`] (then it reserves another);
//! - a block becomes reusable only [`BLOCK_HOLD`] + the conntrack UDP
//!   timeout after it was reserved; a process that comes round to a block
//!   that is not reusable yet waits (probes slow down rather than lie).
//!
//! The rotation is keyed by the lab (the prefix of its namespace names):
//! labs have their own namespaces and conntrack tables. The files live in
//! `/run` (tmpfs, like conntrack state gone at reboot) rather than the state
//! directory because probes know the namespace they run in, not the state
//! directory; `canal-lab down` removes them.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The source ports UDP probes use: 176 blocks of 128 below the kernel's
/// ephemeral range (32768-60999).
pub const RANGE: std::ops::Range<u16> = 10_240..32_768;
/// Ports per reservation.
pub const BLOCK: u16 = 128;
/// How long a process may use the ports of a block it reserved.
pub const BLOCK_HOLD: Duration = Duration::from_secs(10);
/// The conntrack UDP timeout assumed when the kernel does not say (the
/// default of `nf_conntrack_udp_timeout_stream`), plus a margin.
pub const DEFAULT_FLOW_TIMEOUT: Duration = Duration::from_secs(125);
/// Where the rotations live, one directory per lab.
pub const RUN_DIR: &str = "/run/canal-lab";

/// Number of blocks in [`RANGE`].
pub const BLOCKS: u32 = (RANGE.end - RANGE.start) as u32 / BLOCK as u32;

// Whole blocks, all below the kernel's ephemeral ports (checked at compile
// time).
const _: () = assert!(RANGE.end <= 32_768 && (RANGE.end - RANGE.start).is_multiple_of(BLOCK));

/// The persisted rotation of one lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// The block the next reservation takes.
    pub next: u32,
    /// Per block, the Unix time (ms) from which it may be reserved again.
    pub reusable_at_ms: Vec<u64>,
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation {
            next: 0,
            reusable_at_ms: vec![0; BLOCKS as usize],
        }
    }
}

impl Rotation {
    /// Reserves the next block at `now_ms`: `Ok(block)`, or `Err(wait_ms)`
    /// when that block was handed out less than `hold + flow_timeout` ago.
    /// Pure: the caller persists the result.
    pub fn reserve(&mut self, now_ms: u64, hold_and_timeout_ms: u64) -> Result<u32, u64> {
        if self.reusable_at_ms.len() != BLOCKS as usize || self.next >= BLOCKS {
            // A file from another layout: start over, conservatively (every
            // block waits a full timeout).
            *self = Rotation {
                next: 0,
                reusable_at_ms: vec![now_ms + hold_and_timeout_ms; BLOCKS as usize],
            };
        }
        let block = self.next;
        let reusable_at = self.reusable_at_ms[block as usize];
        if reusable_at > now_ms {
            return Err(reusable_at - now_ms);
        }
        self.reusable_at_ms[block as usize] = now_ms + hold_and_timeout_ms;
        self.next = (block + 1) % BLOCKS;
        Ok(block)
    }
}

/// The first port of a block.
pub fn block_start(block: u32) -> u16 {
    // block < BLOCKS, so the product stays inside RANGE.
    RANGE.start + (block as u16) * BLOCK
}

/// The conntrack UDP timeout of the calling thread's namespace (the larger
/// of the two), or [`DEFAULT_FLOW_TIMEOUT`] when that is larger or unknown.
pub fn flow_timeout() -> Duration {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s + 5))
    };
    [
        read("nf_conntrack_udp_timeout_stream"),
        read("nf_conntrack_udp_timeout"),
    ]
    .into_iter()
    .flatten()
    .fold(DEFAULT_FLOW_TIMEOUT, Duration::max)
}

/// The rotation of one lab, as one process uses it.
#[derive(Debug)]
pub struct SourcePorts {
    dir: PathBuf,
    hold: Duration,
    flow_timeout: Duration,
    lease: Mutex<Option<Lease>>,
}

#[derive(Debug)]
struct Lease {
    next: u16,
    end: u16,
    until: Instant,
}

impl SourcePorts {
    /// The rotation kept in `dir`.
    pub fn new(dir: impl Into<PathBuf>, hold: Duration, flow_timeout: Duration) -> SourcePorts {
        SourcePorts {
            dir: dir.into(),
            hold,
            flow_timeout,
            lease: Mutex::new(None),
        }
    }

    /// This process's handle on the rotation of the lab that owns the
    /// network namespace `netns` (by its prefix, `cl<hex>-...`; any other
    /// name is a rotation of its own).
    pub fn for_netns(netns: Option<&str>) -> Arc<SourcePorts> {
        static ALL: OnceLock<Mutex<HashMap<String, Arc<SourcePorts>>>> = OnceLock::new();
        let key = lab_key(netns);
        let mut all = ALL
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        all.entry(key.clone())
            .or_insert_with(|| {
                Arc::new(SourcePorts::new(
                    rotation_dir(&key),
                    BLOCK_HOLD,
                    flow_timeout(),
                ))
            })
            .clone()
    }

    /// The next source port: from this process's current block while it
    /// lasts, else from a newly reserved one (waiting if the rotation has
    /// come round to a block still within the conntrack timeout).
    pub fn next(&self) -> Result<u16, Error> {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lease.as_mut()
            && l.next < l.end
            && Instant::now() < l.until
        {
            let port = l.next;
            l.next += 1;
            return Ok(port);
        }
        let reserved_at = Instant::now();
        let block = self.reserve()?;
        let start = block_start(block);
        *lease = Some(Lease {
            next: start + 1,
            end: start + BLOCK,
            until: reserved_at + self.hold,
        });
        Ok(start)
    }

    /// Reserves a block in the shared file, waiting while the next one is
    /// not reusable.
    fn reserve(&self) -> Result<u32, Error> {
        let total_ms = (self.hold + self.flow_timeout).as_millis() as u64;
        let mut warned = false;
        loop {
            let outcome = {
                let _lock = self.lock()?;
                let file = self.dir.join("udp-ports.json");
                let mut rotation = read_rotation(&file);
                let outcome = rotation.reserve(unix_ms(), total_ms);
                if outcome.is_ok() {
                    write_rotation(&file, &rotation)?;
                }
                outcome
            };
            match outcome {
                Ok(block) => return Ok(block),
                Err(wait_ms) => {
                    if !warned {
                        tracing::warn!(
                            wait_ms,
                            "UDP probes came round to source ports used within the conntrack timeout: waiting"
                        );
                        warned = true;
                    }
                    std::thread::sleep(Duration::from_millis(wait_ms.min(1000)));
                }
            }
        }
    }

    fn lock(&self) -> Result<File, Error> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Io(format!("creating {}", self.dir.display()), e))?;
        let path = self.dir.join("udp-ports.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::Io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock on a descriptor we own; released when the file closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Io(
                format!("locking {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(file)
    }
}

/// The key of a namespace's lab: its prefix, when it has the lab's form.
fn lab_key(netns: Option<&str>) -> String {
    let Some(name) = netns else {
        return "root".into();
    };
    match name.split_once('-') {
        Some((prefix, _))
            if prefix.len() == 8
                && prefix.starts_with("cl")
                && prefix[2..].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            prefix.to_string()
        }
        _ => format!("netns-{name}"),
    }
}

/// Where the rotation of the lab `key` lives.
pub fn rotation_dir(key: &str) -> PathBuf {
    Path::new(RUN_DIR).join(key)
}

/// Removes a lab's rotation (`down`).
pub fn remove_rotation(prefix: &str) {
    let _ = std::fs::remove_dir_all(rotation_dir(prefix));
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn read_rotation(file: &Path) -> Rotation {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn write_rotation(file: &Path, rotation: &Rotation) -> Result<(), Error> {
    let text = serde_json::to_string(rotation)
        .map_err(|e| Error::Lab(format!("encoding {}: {e}", file.display())))?;
    // Written whole and renamed, under the lock: a reader never sees half.
    let tmp = file.with_extension("tmp");
    let mut out =
        File::create(&tmp).map_err(|e| Error::Io(format!("creating {}", tmp.display()), e))?;
    out.write_all(text.as_bytes())
        .map_err(|e| Error::Io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, file).map_err(|e| Error::Io(format!("renaming {}", tmp.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_last_block_ends_the_range() {
        assert_eq!(block_start(0), RANGE.start);
        assert_eq!(block_start(BLOCKS - 1) + BLOCK, RANGE.end);
    }

    #[test]
    fn blocks_rotate_and_wait_for_the_timeout() {
        let mut r = Rotation::default();
        let mut seen = HashSet::new();
        for _ in 0..BLOCKS {
            assert!(seen.insert(r.reserve(1_000, 500).unwrap()));
        }
        // Round again within the timeout: wait exactly until it passes.
        assert_eq!(r.reserve(1_200, 500), Err(300));
        assert_eq!(r.reserve(1_499, 500), Err(1));
        assert_eq!(r.reserve(1_500, 500), Ok(0));
        assert_eq!(r.next, 1);
    }

    #[test]
    fn a_foreign_file_restarts_conservatively() {
        let mut r = Rotation {
            next: 7,
            reusable_at_ms: vec![0; 3],
        };
        assert_eq!(r.reserve(1_000, 500), Err(500));
        assert_eq!(r.reusable_at_ms.len(), BLOCKS as usize);
    }

    #[test]
    fn lab_keys_come_from_the_namespace_prefix() {
        assert_eq!(lab_key(Some("cl0a1b2c-pod-x.a")), "cl0a1b2c");
        assert_eq!(lab_key(Some("cl0a1b2c-node-1")), "cl0a1b2c");
        assert_eq!(lab_key(Some("other-ns")), "netns-other-ns");
        assert_eq!(lab_key(Some("clzzzzzz-x")), "netns-clzzzzzz-x");
        assert_eq!(lab_key(None), "root");
    }

    /// Separate handles on one directory stand in for separate processes
    /// (flock excludes across open file descriptions): concurrent draws
    /// never hand out a port twice within a rotation.
    #[test]
    fn concurrent_handles_never_share_a_port() {
        let dir = tempfile::tempdir().unwrap();
        let handles: Vec<Arc<SourcePorts>> = (0..4)
            .map(|_| {
                Arc::new(SourcePorts::new(
                    dir.path(),
                    BLOCK_HOLD,
                    Duration::from_secs(60),
                ))
            })
            .collect();
        let per_handle = (BLOCKS as usize * BLOCK as usize) / 4 - 2 * BLOCK as usize;
        let threads: Vec<_> = handles
            .iter()
            .cloned()
            .map(|h| {
                std::thread::spawn(move || {
                    (0..per_handle)
                        .map(|_| h.next().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for t in threads {
            for port in t.join().unwrap() {
                assert!(RANGE.contains(&port));
                assert!(all.insert(port), "port {port} handed out twice");
            }
        }
    }

    /// A handle that comes round to a block reserved less than the timeout
    /// ago waits for it instead of reusing it.
    #[test]
    fn a_full_rotation_waits_for_the_flow_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let timeout = Duration::from_millis(700);
        let ports = SourcePorts::new(dir.path(), Duration::ZERO, timeout);
        let started = Instant::now();
        let first = ports.next().unwrap();
        // Hold zero: every draw reserves a block; BLOCKS draws go round.
        for _ in 1..BLOCKS {
            ports.next().unwrap();
        }
        assert!(started.elapsed() < timeout, "the first round must not wait");
        assert_eq!(ports.next().unwrap(), first);
        assert!(
            started.elapsed() >= timeout,
            "reused after {:?}",
            started.elapsed()
        );
    }
}
