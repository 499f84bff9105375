//! Probes from pods: one destination, or every pod pair as a truth table.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::Error;
use crate::lab::probe::probe_in;
use crate::lab::{
    Context, DEFAULT_PROBE_TIMEOUT, Matrix, PodRecord, ProbeOutcome, Protocol, matrix, names, pods,
};

/// A probe's destination.
#[derive(Debug, Clone)]
pub enum Target {
    /// A lab pod, `namespace/name`.
    Pod(String),
    /// The internet host ([`names::INTERNET_HOST`]).
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

/// The address of a probe target.
pub fn target_ip(ctx: &Context, target: &Target) -> Result<IpAddr, Error> {
    match target {
        Target::Internet => Ok(IpAddr::V4(names::INTERNET_HOST)),
        Target::Address(ip) => Ok(*ip),
        Target::Pod(key) => {
            let (ns, name) = pods::parse_key(key)?;
            let pod = ctx.state.load_pod(&ns, &name)?;
            pod.ipv4()
                .map(IpAddr::V4)
                .ok_or_else(|| Error::Lab(format!("pod {key} has no IPv4 address")))
        }
    }
}

/// Probes `target` from the pod `from` (`namespace/name`).
pub async fn probe(
    ctx: &Context,
    from: &str,
    target: &Target,
    port: u16,
    protocol: Protocol,
    timeout: Duration,
) -> Result<ProbeOutcome, Error> {
    let (ns, name) = pods::parse_key(from)?;
    let source = ctx.state.load_pod(&ns, &name)?;
    let dst = SocketAddr::new(target_ip(ctx, target)?, port);
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
}

impl Default for MatrixOptions {
    fn default() -> MatrixOptions {
        MatrixOptions {
            port: 80,
            protocol: Protocol::Tcp,
            timeout: DEFAULT_PROBE_TIMEOUT,
            concurrency: matrix::DEFAULT_CONCURRENCY,
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
    let mut jobs = Vec::new();
    for from in &pods {
        for to in &pods {
            let ip = to
                .ipv4()
                .ok_or_else(|| Error::Lab(format!("pod {} has no IPv4 address", to.key())))?;
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
