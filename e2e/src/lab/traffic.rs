//! Probes from pods: one destination, or every pod pair as a truth table.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::Error;
use crate::lab::probe::probe_in;
use crate::lab::{
    Context, DEFAULT_PROBE_TIMEOUT, Family, Matrix, PodRecord, ProbeOutcome, Protocol, matrix,
    names, pods,
};

/// A probe's destination.
#[derive(Debug, Clone)]
pub enum Target {
    /// A lab pod, `namespace/name`.
    Pod(String),
    /// The internet host ([`names::INTERNET_HOST`], or
    /// [`names::INTERNET_HOST6`] for IPv6).
    Internet,
    /// Any address.
    Address(IpAddr),
}

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Target, Error> {
        if s == "internet" {
            return Ok(Target::Internet);
        }
        if let Ok(ip) = s.parse() {
            return Ok(Target::Address(ip));
        }
        pods::parse_key(s)?;
        Ok(Target::Pod(s.to_string()))
    }
}

/// The address of a probe target in the lab's primary family.
pub fn target_ip(ctx: &Context, target: &Target) -> Result<IpAddr, Error> {
    target_ip_of(ctx, target, None)
}

/// The address of a probe target in `family` (None: the lab's primary
/// family; an address target is what it is).
pub fn target_ip_of(
    ctx: &Context,
    target: &Target,
    family: Option<Family>,
) -> Result<IpAddr, Error> {
    let family = family.unwrap_or_else(|| ctx.lab.ip_family.primary());
    match target {
        Target::Internet => Ok(match family {
            Family::V4 => IpAddr::V4(names::INTERNET_HOST),
            Family::V6 => IpAddr::V6(names::INTERNET_HOST6),
        }),
        Target::Address(ip) => Ok(*ip),
        Target::Pod(key) => {
            let (ns, name) = pods::parse_key(key)?;
            let pod = ctx.state.load_pod(&ns, &name)?;
            pod.ip(family)
                .ok_or_else(|| Error::Lab(format!("pod {key} has no {family} address")))
        }
    }
}

/// Probes `target` from the pod `from` (`namespace/name`) in the lab's
/// primary family.
pub async fn probe(
    ctx: &Context,
    from: &str,
    target: &Target,
    port: u16,
    protocol: Protocol,
    timeout: Duration,
) -> Result<ProbeOutcome, Error> {
    probe_family(ctx, from, target, None, port, protocol, timeout).await
}

/// Probes `target` from the pod `from` in `family` (None: the primary).
pub async fn probe_family(
    ctx: &Context,
    from: &str,
    target: &Target,
    family: Option<Family>,
    port: u16,
    protocol: Protocol,
    timeout: Duration,
) -> Result<ProbeOutcome, Error> {
    let (ns, name) = pods::parse_key(from)?;
    let source = ctx.state.load_pod(&ns, &name)?;
    let dst = SocketAddr::new(target_ip_of(ctx, target, family)?, port);
    tokio::task::spawn_blocking(move || probe_in(&source.netns, dst, protocol, timeout))
        .await
        .map_err(|e| Error::Lab(format!("probe task: {e}")))?
}

/// What `matrix` probes.
#[derive(Debug, Clone)]
pub struct MatrixOptions {
    /// Destination port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Per-probe timeout.
    pub timeout: Duration,
    /// Probes in flight.
    pub concurrency: usize,
    /// The family to probe (None: the lab's primary family).
    pub family: Option<Family>,
}

impl Default for MatrixOptions {
    fn default() -> MatrixOptions {
        MatrixOptions {
            port: 80,
            protocol: Protocol::Tcp,
            timeout: DEFAULT_PROBE_TIMEOUT,
            concurrency: matrix::DEFAULT_CONCURRENCY,
            family: None,
        }
    }
}

/// A probed truth table and each cell's outcome.
#[derive(Debug, Clone)]
pub struct MatrixRun {
    /// The table.
    pub matrix: Matrix,
    /// Every probe's outcome, by (from, to).
    pub outcomes: BTreeMap<(String, String), ProbeOutcome>,
}

/// Probes every pod pair (self included) in parallel.
pub async fn run_matrix(ctx: &Context, opts: &MatrixOptions) -> Result<MatrixRun, Error> {
    let pods = ctx.state.pods()?;
    let family = opts.family.unwrap_or_else(|| ctx.lab.ip_family.primary());
    let mut jobs = Vec::new();
    for from in &pods {
        for to in &pods {
            let ip = to
                .ip(family)
                .ok_or_else(|| Error::Lab(format!("pod {} has no {family} address", to.key())))?;
            jobs.push(matrix::ProbeJob {
                from: from.key(),
                netns: from.netns.clone(),
                to: to.key(),
                dst: SocketAddr::from((ip, opts.port)),
            });
        }
    }
    let (protocol, timeout, concurrency) = (opts.protocol, opts.timeout, opts.concurrency);
    let (jobs, results) = tokio::task::spawn_blocking(move || {
        let results = matrix::run_probes(&jobs, protocol, timeout, concurrency);
        (jobs, results)
    })
    .await
    .map_err(|e| Error::Lab(format!("matrix task: {e}")))?;
    let mut table = Matrix::filled(pods.iter().map(PodRecord::key), false);
    let mut outcomes = BTreeMap::new();
    for (job, result) in jobs.into_iter().zip(results) {
        let outcome = result?;
        table.set(&job.from, &job.to, outcome.connected);
        outcomes.insert((job.from, job.to), outcome);
    }
    Ok(MatrixRun {
        matrix: table,
        outcomes,
    })
}
