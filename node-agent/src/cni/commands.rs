//! The CNI commands. Each one parses and validates its input
//! ([`super::config`]), takes the attachment's locks ([`super::lock`]:
//! container, then host interface), reads the kernel, decides
//! ([`super::ownership`], [`super::ipam::decide`]) and applies
//! ([`super::dataplane`], the IPAM store) before it lets go, so the store
//! and the kernel agree after every call, whatever runs at the same time.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rtnetlink::Handle;

use super::config::{CniEnv, NetConf};
use super::dataplane::{self, DataplaneError, PodSpec};
use super::error::{CniError, Code};
use super::ipam::{self, Decision, Store};
use super::lock::AttachmentLock;
use super::ownership::{self, AddPlan, Attachment, Refusal};
use super::result;
use super::sandbox::{self, Sandbox, SandboxError};
use crate::overlay::family::Family;
use crate::runfiles::{FamilyNetwork, NetworkFile, RunDir};

fn read_network(conf: &NetConf) -> Result<NetworkFile, CniError> {
    let run = RunDir::new(&conf.run_dir);
    match run.read_network() {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(CniError::new(
            Code::TryAgainLater,
            "canal-agent has not configured this node yet",
            format!(
                "{} does not exist; is canal-agent running on this node and has the Node a podCIDR?",
                run.network_file().display()
            ),
        )
        .in_version(&conf.cni_version)),
        Err(e) => Err(CniError::new(Code::Io, "cannot read the agent's network file", e.to_string())
            .in_version(&conf.cni_version)),
    }
}

fn store_error(conf: &NetConf) -> impl Fn(ipam::StoreError) -> CniError + '_ {
    move |e| {
        CniError::new(Code::Io, "IPAM store failure", e.to_string()).in_version(&conf.cni_version)
    }
}

fn dataplane_error(conf: &NetConf, e: DataplaneError) -> CniError {
    let (code, msg) = match &e {
        DataplaneError::Mismatch(_) => (
            Code::CheckFailed,
            "the pod's network differs from what ADD set up",
        ),
        DataplaneError::Conflict(_) => (
            Code::Conflict,
            "the pod's network conflicts with what is already there",
        ),
        _ => (Code::Dataplane, "setting up the pod interface failed"),
    };
    CniError::new(code, msg, e.to_string()).in_version(&conf.cni_version)
}

fn sandbox_error(conf: &NetConf, e: SandboxError) -> CniError {
    let (code, msg) = match &e {
        SandboxError::Missing(_) => (
            Code::UnknownContainer,
            "the container's network namespace does not exist",
        ),
        SandboxError::NodeNamespace(_) => (
            Code::InvalidEnvironment,
            "CNI_NETNS is the node's own network namespace",
        ),
        SandboxError::NotNetns(_) => (
            Code::InvalidEnvironment,
            "CNI_NETNS is not a network namespace",
        ),
        SandboxError::Io { .. } | SandboxError::Netlink(_) => (
            Code::Io,
            "cannot enter the container's network namespace (CNI_NETNS)",
        ),
    };
    CniError::new(code, msg, e.to_string()).in_version(&conf.cni_version)
}

fn refusal_error(conf: &NetConf, r: &Refusal) -> CniError {
    let code = match r {
        Refusal::SecondInterface { .. } => Code::AlreadyAttached,
        _ => Code::Conflict,
    };
    let (msg, details) = r.describe();
    CniError::new(code, msg, details).in_version(&conf.cni_version)
}

fn host_handle(conf: &NetConf) -> Result<Handle, CniError> {
    crate::netns::handle_here().map_err(|e| dataplane_error(conf, e.into()))
}

/// Waits for the attachment's locks.
fn lock(
    conf: &NetConf,
    store: &Store,
    env: &CniEnv,
    host_if: &str,
) -> Result<AttachmentLock, CniError> {
    AttachmentLock::acquire(&store.locks_dir(), &env.container_id, Some(host_if), true)
        .map_err(store_error(conf))?
        .ok_or_else(|| {
            // A waiting acquire returns only with the lock.
            CniError::new(
                Code::Io,
                "IPAM store failure",
                "the attachment lock was not taken",
            )
        })
}

/// The families a new pod gets on this node: every family of the network
/// file, IPv6 only while [`RunDir::ipv6_for_pods`] allows it (fail closed:
/// no IPv6 where NetworkPolicy could be bypassed over it).
fn pod_families(conf: &NetConf, network: &NetworkFile) -> Vec<FamilyNetwork> {
    let run = RunDir::new(&conf.run_dir);
    let ipv6 = match run.ipv6_for_pods() {
        Ok(allowed) => allowed,
        Err(e) => {
            eprintln!("canal-cni: {e}; the pod gets no IPv6 address");
            false
        }
    };
    let families: Vec<FamilyNetwork> = network
        .families()
        .into_iter()
        .filter(|f| f.family() == Family::V4 || ipv6)
        .collect();
    if !ipv6 && network.family(Family::V6).is_some() {
        eprintln!(
            "canal-cni: IPv6 is not given to pods on this node: NetworkPolicy is enforced here and the policy component does not guard IPv6 ({} lists no ipv6)",
            run.policy_families_file().display()
        );
    }
    families
}

pub(super) async fn add(env: &CniEnv, stdin: &[u8]) -> Result<serde_json::Value, CniError> {
    let conf = NetConf::parse(stdin)?;
    let v = conf.cni_version.clone();
    env.require(true).map_err(|e| e.in_version(&v))?;
    let network = read_network(&conf)?;
    let mtu = if conf.mtu != 0 { conf.mtu } else { network.mtu };
    let families = pod_families(&conf, &network);
    if families.is_empty() {
        return Err(CniError::new(
            Code::TryAgainLater,
            "no address family can be given to pods on this node",
            "the node has only an IPv6 subnet and IPv6 is not given to pods while NetworkPolicy is enforced without IPv6 support (policy-families)",
        )
        .in_version(&v));
    }
    let netns = PathBuf::from(&env.netns);
    // Before any allocation: a missing or wrong namespace leaves nothing.
    let pod = sandbox::open(&netns).map_err(|e| sandbox_error(&conf, e))?;
    let host = host_handle(&conf)?;
    let me = Attachment {
        container_id: &env.container_id,
        ifname: &env.ifname,
    };
    let host_if = env.host_interface();
    let store = Store::new(&conf.data_dir, &conf.name);
    let locks = lock(&conf, &store, env, &host_if)?;

    // One interface per container: say so before anything else is looked
    // at (the container's routes are the other interface's).
    let records = store
        .lock()
        .and_then(|locked| locked.allocations())
        .map_err(store_error(&conf))?;
    if let Some(existing) = ipam::other_interface(&records, &env.container_id, &env.ifname) {
        return Err(refusal_error(&conf, &Refusal::SecondInterface { existing }));
    }
    let facts = dataplane::inspect(&host, Some(&pod.handle), &host_if, &env.ifname)
        .await
        .map_err(|e| dataplane_error(&conf, e))?;
    let plan = ownership::plan_add(
        &me,
        &host_if,
        facts.host.as_ref(),
        facts.pod.as_ref(),
        &facts.pod_routes,
    );
    if let AddPlan::Refuse(r) = &plan {
        return Err(refusal_error(&conf, r));
    }
    let (ips, fresh) = allocate(&conf, &store, &families, env, &host_if)?;
    let spec = PodSpec {
        netns,
        ifname: env.ifname.clone(),
        host_if: host_if.clone(),
        ips,
        mtu,
        mark: me.mark(),
    };
    let wired = match dataplane::add(&host, &pod, &spec, &plan).await {
        Ok(w) => w,
        Err(e) => {
            undo_add(&host, &pod.handle, &store, &me, &host_if, &plan, &fresh).await;
            return Err(dataplane_error(&conf, e));
        }
    };
    // The store and the kernel agree now; the policy wait needs no lock.
    drop(locks);
    wait_for_policy(&RunDir::new(&conf.run_dir), &host_if, conf.policy_wait()).await;
    Ok(result::add_result(&v, &wired, conf.legacy_result()))
}

/// The attachment's addresses, one per family of `families` (in that
/// order): its records, or new ones recorded now. Returns them and the
/// ones that are new. Records of families the pod no longer gets (IPv6
/// while it is not allowed) are released.
fn allocate(
    conf: &NetConf,
    store: &Store,
    families: &[FamilyNetwork],
    env: &CniEnv,
    host_if: &str,
) -> Result<(Vec<IpAddr>, Vec<IpAddr>), CniError> {
    let locked = store.lock().map_err(store_error(conf))?;
    let listing = locked.listing().map_err(store_error(conf))?;
    for warning in listing.warnings(store.dir()) {
        eprintln!("{warning}");
    }
    let blocked = listing.blocked();
    let mut ips = Vec::new();
    let mut fresh = Vec::new();
    let undo = |fresh: &[IpAddr]| {
        for ip in fresh {
            let _ = locked.remove(*ip);
        }
    };
    for f in families {
        let family = f.family();
        match ipam::decide(
            f.node_subnet,
            &listing.records,
            &blocked,
            &env.container_id,
            &env.ifname,
            locked.last_reserved(family),
        ) {
            Decision::Existing(ip) => {
                // A record from before host interfaces were kept gets one,
                // so GC can find the interface later.
                let known = listing.records.iter().any(|a| {
                    a.ip == ip
                        && a.container_id == env.container_id
                        && a.host_if.as_deref() == Some(host_if)
                });
                if !known {
                    locked
                        .write_record(ip, &env.container_id, &env.ifname, host_if)
                        .map_err(store_error(conf))?;
                }
                ips.push(ip);
            }
            Decision::New(ip) => {
                // Records of this container+interface from an old subnet of
                // the family go.
                let reserved = locked
                    .release_family(&env.container_id, &env.ifname, family, None)
                    .and_then(|_| locked.reserve(ip, &env.container_id, &env.ifname, host_if));
                if let Err(e) = reserved {
                    undo(&fresh);
                    return Err(store_error(conf)(e));
                }
                ips.push(ip);
                fresh.push(ip);
            }
            Decision::OtherInterface(existing) => {
                undo(&fresh);
                return Err(refusal_error(conf, &Refusal::SecondInterface { existing }));
            }
            Decision::Exhausted => {
                undo(&fresh);
                let in_subnet = listing
                    .records
                    .iter()
                    .filter(|a| f.node_subnet.contains(&a.ip))
                    .count();
                return Err(CniError::new(
                    Code::SubnetExhausted,
                    "no free address in the node's pod subnet",
                    format!(
                        "every usable address of {} is allocated ({in_subnet} records, {} unreadable entries held back, in {})",
                        f.node_subnet,
                        blocked.len(),
                        store.dir().display()
                    ),
                )
                .in_version(&conf.cni_version));
            }
        }
    }
    for family in Family::ALL {
        if !families.iter().any(|f| f.family() == family) {
            locked
                .release_family(&env.container_id, &env.ifname, family, None)
                .map_err(store_error(conf))?;
        }
    }
    Ok((ips, fresh))
}

/// After a failed ADD: the interface this ADD made (or re-addressed) goes,
/// and so do the addresses recorded for it now, so no half-made pod stays.
/// A repeated ADD of a working pod that failed leaves the pod as it was.
async fn undo_add(
    host: &Handle,
    pod: &Handle,
    store: &Store,
    me: &Attachment<'_>,
    host_if: &str,
    plan: &AddPlan,
    fresh: &[IpAddr],
) {
    if (!matches!(plan, AddPlan::Keep { .. }) || !fresh.is_empty())
        && let Ok(facts) = dataplane::inspect(host, Some(pod), host_if, me.ifname).await
        && let Some(index) = ownership::plan_del(me, facts.host.as_ref(), facts.pod.as_ref())
        && let Err(e) = dataplane::delete_index(host, index, host_if).await
    {
        eprintln!("canal-cni ADD: removing {host_if} after the failure: {e}");
    }
    if !fresh.is_empty()
        && let Ok(locked) = store.lock()
    {
        for ip in fresh {
            let _ = locked.remove(*ip);
        }
    }
}

/// The zero-leak handshake: while policy is enforced, wait (bounded) until
/// the agent has programmed this interface's chains. Traffic of an unknown
/// interface is dropped, so a timeout only delays the pod's first packet.
async fn wait_for_policy(run: &RunDir, host_if: &str, timeout: Duration) {
    if !run.policy_enabled_file().exists() {
        return;
    }
    let file = run.endpoint_file(host_if);
    let deadline = Instant::now() + timeout;
    while !file.exists() {
        if Instant::now() >= deadline {
            eprintln!(
                "canal-cni: policy for {host_if} not programmed after {timeout:?} ({} missing); continuing, its traffic is dropped until it is",
                file.display()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) async fn del(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    env.require(false)
        .map_err(|e| e.in_version(&conf.cni_version))?;
    // DEL must always be able to clean up: without a usable namespace it
    // still deletes its own host veth and releases its address.
    let pod: Option<Sandbox> = if env.netns.is_empty() {
        None
    } else {
        match sandbox::open(Path::new(&env.netns)) {
            Ok(h) => Some(h),
            // The sandbox is gone, and with it the veth pair.
            Err(SandboxError::Missing(_)) => None,
            Err(e) => {
                eprintln!("canal-cni DEL: not looking into CNI_NETNS: {e}");
                None
            }
        }
    };
    let host = host_handle(&conf)?;
    let me = Attachment {
        container_id: &env.container_id,
        ifname: &env.ifname,
    };
    let host_if = env.host_interface();
    let store = Store::new(&conf.data_dir, &conf.name);
    let locks = lock(&conf, &store, env, &host_if)?;
    let pod = pod.as_ref().map(|p| &p.handle);
    let facts = match dataplane::inspect(&host, pod, &host_if, &env.ifname).await {
        Ok(f) => f,
        Err(_) if pod.is_some() => dataplane::inspect(&host, None, &host_if, &env.ifname)
            .await
            .map_err(|e| dataplane_error(&conf, e))?,
        Err(e) => return Err(dataplane_error(&conf, e)),
    };
    match ownership::plan_del(&me, facts.host.as_ref(), facts.pod.as_ref()) {
        Some(index) => dataplane::delete_index(&host, index, &host_if)
            .await
            .map_err(|e| dataplane_error(&conf, e))?,
        None => {
            if let Some(h) = &facts.host {
                eprintln!(
                    "canal-cni DEL: leaving {host_if}: it is not {}'s (alias {:?}), another sandbox of the pod has it",
                    me.mark(),
                    h.alias.as_deref().unwrap_or_default()
                );
            }
        }
    }
    // The veth its record names, when that is another name (the runtime
    // passed other CNI_ARGS than to ADD): only by its mark, no namespace.
    let records = store
        .lock()
        .and_then(|locked| locked.allocations())
        .map_err(store_error(&conf))?;
    let mut recorded: Vec<&str> = records
        .iter()
        .filter(|a| a.container_id == env.container_id && a.ifname == env.ifname)
        .filter_map(|a| a.host_if.as_deref())
        .filter(|h| *h != host_if)
        .collect();
    recorded.dedup();
    for other in recorded {
        let facts = dataplane::inspect(&host, None, other, &env.ifname)
            .await
            .map_err(|e| dataplane_error(&conf, e))?;
        if let Some(index) = ownership::plan_del(&me, facts.host.as_ref(), None) {
            dataplane::delete_index(&host, index, other)
                .await
                .map_err(|e| dataplane_error(&conf, e))?;
        }
    }
    let locked = store.lock().map_err(store_error(&conf))?;
    locked
        .release(&env.container_id, &env.ifname)
        .map_err(store_error(&conf))?;
    drop(locked);
    locks.remove();
    Ok(())
}

pub(super) async fn check(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    let v = conf.cni_version.clone();
    if matches!(v.as_str(), "0.3.0" | "0.3.1") {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "CHECK needs CNI 0.4.0 or later",
            format!("cniVersion is {v}"),
        ));
    }
    env.require(true).map_err(|e| e.in_version(&v))?;
    let network = read_network(&conf)?;
    let pod = sandbox::open(Path::new(&env.netns)).map_err(|e| sandbox_error(&conf, e))?;
    let host = host_handle(&conf)?;
    let me = Attachment {
        container_id: &env.container_id,
        ifname: &env.ifname,
    };
    let host_if = env.host_interface();
    let store = Store::new(&conf.data_dir, &conf.name);
    let _locks = lock(&conf, &store, env, &host_if)?;
    let failed =
        |msg: &str, details: String| CniError::new(Code::CheckFailed, msg, details).in_version(&v);
    // The records are the truth: a cached result whose address has no
    // record says the pod holds an address that can be handed out again.
    let records: Vec<ipam::Allocation> = {
        let locked = store.lock().map_err(store_error(&conf))?;
        locked
            .allocations()
            .map_err(store_error(&conf))?
            .into_iter()
            .filter(|a| a.container_id == env.container_id && a.ifname == env.ifname)
            .collect()
    };
    // Every family the cached result names must agree with its record.
    let cached = conf
        .prev_result
        .as_ref()
        .map(result::prev_ips)
        .unwrap_or_default();
    if records.is_empty() {
        return Err(failed(
            "no address is recorded for this container",
            format!(
                "{} {} has no IPAM record in {}{}",
                env.container_id,
                env.ifname,
                store.dir().display(),
                cached
                    .first()
                    .map(|ip| format!(
                        "; the cached result's {ip} could be handed out to another pod"
                    ))
                    .unwrap_or_default()
            ),
        ));
    }
    for c in &cached {
        let family = Family::of_addr(c);
        match records.iter().find(|r| Family::of_addr(&r.ip) == family) {
            Some(r) if r.ip != *c => {
                return Err(failed(
                    "the cached result differs from the IPAM record",
                    format!("the cached result says {c}, the record {}", r.ip),
                ));
            }
            Some(_) => {}
            None => {
                return Err(failed(
                    "no address is recorded for this container",
                    format!(
                        "the cached result's {c} has no IPAM record in {}; it could be handed out to another pod",
                        store.dir().display()
                    ),
                ));
            }
        }
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for f in network.families() {
        if let Some(r) = records.iter().find(|r| f.node_subnet.contains(&r.ip)) {
            ips.push(r.ip);
        }
    }
    if let Some(r) = records.iter().find(|r| !ips.contains(&r.ip)) {
        let subnets: Vec<String> = network
            .families()
            .iter()
            .map(|f| f.node_subnet.to_string())
            .collect();
        return Err(failed(
            "the pod address is outside the node subnet",
            format!("{} is not in {}", r.ip, subnets.join(" or ")),
        ));
    }
    let spec = PodSpec {
        netns: PathBuf::from(&env.netns),
        ifname: env.ifname.clone(),
        host_if,
        ips,
        mtu: if conf.mtu != 0 { conf.mtu } else { network.mtu },
        mark: me.mark(),
    };
    dataplane::check(&host, &pod, &spec, &me)
        .await
        .map_err(|e| dataplane_error(&conf, e))
}

/// STATUS (CNI 1.1): ready once canal-agent has written network.json.
pub(super) fn status(stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    read_network(&conf).map(drop).map_err(|e| {
        if e.code == Code::TryAgainLater as u32 {
            CniError {
                code: Code::NotAvailable as u32,
                ..e
            }
        } else {
            e
        }
    })
}

/// GC (CNI 1.1): every attachment not listed as valid loses its address and
/// its host veth (with its route), so a released address is wired nowhere.
/// An attachment with a call in progress is left to the next GC.
pub(super) async fn gc(_env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    let Some(valid) = &conf.valid_attachments else {
        return Ok(());
    };
    let store = Store::new(&conf.data_dir, &conf.name);
    if !store.dir().exists() {
        return Ok(());
    }
    let stale: Vec<ipam::Allocation> = {
        let locked = store.lock().map_err(store_error(&conf))?;
        let listing = locked.listing().map_err(store_error(&conf))?;
        for warning in listing.warnings(store.dir()) {
            eprintln!("{warning}");
        }
        listing
            .records
            .into_iter()
            .filter(|a| {
                !valid
                    .iter()
                    .any(|v| v.container_id == a.container_id && v.ifname == a.ifname)
            })
            .collect()
    };
    if stale.is_empty() {
        return Ok(());
    }
    let host = host_handle(&conf)?;
    for a in stale {
        let Some(locks) = AttachmentLock::acquire(
            &store.locks_dir(),
            &a.container_id,
            a.host_if.as_deref(),
            false,
        )
        .map_err(store_error(&conf))?
        else {
            eprintln!(
                "canal-cni GC: {} {} is busy; left to the next GC",
                a.container_id, a.ifname
            );
            continue;
        };
        let me = Attachment {
            container_id: &a.container_id,
            ifname: &a.ifname,
        };
        // The attachment's host veth: the one its record names, or (a
        // record from before they were kept) the one routing its address.
        let (link, routes) = dataplane::gc_candidate(&host, a.host_if.as_deref(), a.ip)
            .await
            .map_err(|e| dataplane_error(&conf, e))?;
        if let Some((name, link)) = link
            && ownership::gc_owns(&me, &link, a.ip, &routes)
        {
            dataplane::delete_index(&host, link.index, &name)
                .await
                .map_err(|e| dataplane_error(&conf, e))?;
        }
        eprintln!(
            "canal-cni GC: releasing {} of {} {}",
            a.ip, a.container_id, a.ifname
        );
        store
            .lock()
            .and_then(|locked| locked.remove(a.ip))
            .map_err(store_error(&conf))?;
        locks.remove();
    }
    Ok(())
}
