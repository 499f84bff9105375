//! canal-agent's NetworkPolicy task, plugged in as a [`NodeComponent`]:
//! watches this node's NodePolicySet (field selector on its name), the
//! PolicyGroups and the PeerSets, feeds the pure [`PolicyStore`] (which
//! assembles only consistent versions of them), and runs one level-triggered
//! [`PolicyEnforcer::sync`] whenever the inputs changed, once every list is
//! complete. It also runs the periodic drift check, writes the
//! NodePolicySet status (field manager `canal-agent`, only when it changed)
//! and opens its readiness gate after the first sync.
//!
//! One task owns the store and the enforcer; watch tasks and PeerSet GETs
//! send what they see over a channel. Events that arrive while a sync runs
//! are applied together before the next one, so a burst costs one sync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use canal_crds::{
    NodePolicySet, NodePolicySetStatus, PeerSet, PeerSetObjectSpec, PolicyGroup, PolicyGroupSpec,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, warn};

use super::enforcer::{Error as SyncError, PolicyEnforcer, SyncStats};
use super::firewall::{Monitor, Schedule, Wake};
use super::metrics::PolicyMetrics;
use super::render::EnforcementConfig;
use super::status::{disabled_status, enforced_status};
use super::store::{Fetched, NodePolicySetView, PolicyStore, Shared, Step};
use super::watch::{self, Backend};
use crate::agent::FIELD_MANAGER;
use crate::component::{ComponentContext, ComponentError, ComponentFuture, NodeComponent};

/// Tuning of the policy task.
#[derive(Clone, Debug)]
pub struct Options {
    /// Period of the drift check (re-read the kernel, repair).
    pub drift_interval: Duration,
    /// First wait before retrying a failed sync or status write; doubles
    /// up to `max_retry_backoff`.
    pub retry_backoff: Duration,
    /// Longest wait between retries.
    pub max_retry_backoff: Duration,
    /// The cheap checks between drift checks (foreign firewall changes,
    /// ipsets, anti-spoofing counters).
    pub schedule: Schedule,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            drift_interval: Duration::from_secs(60),
            retry_backoff: Duration::from_millis(500),
            max_retry_backoff: Duration::from_secs(30),
            schedule: Schedule::default(),
        }
    }
}

/// NetworkPolicy enforcement as a component of canal-agent.
#[derive(Debug, Default)]
pub struct PolicyComponent {
    options: Options,
}

impl PolicyComponent {
    /// The component with these options.
    pub fn new(options: Options) -> PolicyComponent {
        PolicyComponent { options }
    }
}

impl NodeComponent for PolicyComponent {
    fn name(&self) -> &'static str {
        "policy"
    }

    fn run(self: Box<Self>, ctx: ComponentContext) -> ComponentFuture {
        let span = tracing::info_span!("policy", node = %ctx.node_name);
        Box::pin(run(ctx, self.options).instrument(span))
    }
}

/// What the watch tasks and GETs report to the owner task.
pub enum Input {
    /// This node's NodePolicySet (None: it does not decode).
    NodePolicySet(Event<Option<NodePolicySetView>>),
    /// A PolicyGroup (None: it does not decode).
    PolicyGroup(Event<(String, Option<PolicyGroupSpec>)>),
    /// A PeerSet (None: it does not decode).
    PeerSet(Event<(String, Option<PeerSetObjectSpec>)>),
    /// The result of a GET.
    Fetched(Fetched),
}

/// The NodePolicySet as the store needs it. The status keeps only the
/// agent's own condition: canal-controller's `Published` condition is its
/// own entry of the conditions map, and the agent's status writes must not
/// carry (and so take over) a copy of it.
pub fn node_policy_set_view(guard: DeserializeGuard<NodePolicySet>) -> Option<NodePolicySetView> {
    match guard.0 {
        Ok(nps) => Some(NodePolicySetView {
            uid: nps.metadata.uid,
            generation: nps.metadata.generation,
            spec: nps.spec,
            status: nps.status.map(|mut s| {
                s.conditions
                    .retain(|c| c.type_ == canal_crds::condition::ENFORCED);
                s
            }),
        }),
        Err(bad) => {
            error!(
                "NodePolicySet {} cannot be decoded ({}); keeping what is programmed",
                bad.metadata.name.unwrap_or_default(),
                bad.error
            );
            None
        }
    }
}

/// Starts the agent's policy watches (its NodePolicySet, every PolicyGroup
/// and PeerSet), each sending converted events with their arrival time.
pub fn spawn_watches(
    client: &kube::Client,
    node_name: &str,
    tx: &mpsc::Sender<(Instant, Input)>,
    metrics: &PolicyMetrics,
) -> JoinSet<()> {
    let mut watches = JoinSet::new();
    let nps_api: Api<DeserializeGuard<NodePolicySet>> = Api::all(client.clone());
    let by_name = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    watches.spawn(watch(
        nps_api,
        by_name,
        tx.clone(),
        metrics.clone(),
        "nodepolicyset",
        node_policy_set_view,
        Input::NodePolicySet,
    ));
    let pg_api: Api<DeserializeGuard<PolicyGroup>> = Api::all(client.clone());
    watches.spawn(watch(
        pg_api,
        watcher::Config::default(),
        tx.clone(),
        metrics.clone(),
        "policygroup",
        |guard: DeserializeGuard<PolicyGroup>| match guard.0 {
            Ok(pg) => (pg.metadata.name.unwrap_or_default(), Some(pg.spec)),
            Err(bad) => {
                let name = bad.metadata.name.unwrap_or_default();
                warn!(
                    policy_group = %name,
                    "PolicyGroup cannot be decoded ({}); the nodes that use it keep their previous policy",
                    bad.error
                );
                (name, None)
            }
        },
        Input::PolicyGroup,
    ));
    let ps_api: Api<DeserializeGuard<PeerSet>> = Api::all(client.clone());
    watches.spawn(watch(
        ps_api,
        watcher::Config::default(),
        tx.clone(),
        metrics.clone(),
        "peerset",
        |guard: DeserializeGuard<PeerSet>| match guard.0 {
            Ok(ps) => (ps.metadata.name.unwrap_or_default(), Some(ps.spec)),
            Err(bad) => {
                let name = bad.metadata.name.unwrap_or_default();
                warn!(
                    peer_set = %name,
                    "PeerSet cannot be decoded ({}); it matches nobody",
                    bad.error
                );
                (name, None)
            }
        },
        Input::PeerSet,
    ));
    watches
}

/// Applies one input to the store; returns whether the inputs changed.
pub fn apply_input(s: &mut PolicyStore, at: Instant, input: Input) -> bool {
    match input {
        Input::NodePolicySet(event) => match event {
            Event::Apply(Some(v)) => s.apply_node_policy_set(v, at),
            Event::Delete(Some(_)) => s.delete_node_policy_set(),
            Event::Init => {
                s.node_policy_set_relist_start();
                false
            }
            Event::InitApply(Some(v)) => {
                s.node_policy_set_relist_apply(v);
                false
            }
            Event::InitDone => s.node_policy_set_relist_done(at),
            // Undecodable: already logged; keep what is programmed.
            Event::Apply(None) | Event::Delete(None) | Event::InitApply(None) => false,
        },
        Input::PolicyGroup(event) => match event {
            Event::Apply((name, Some(spec))) => s.apply_policy_group(&name, spec, at),
            // Undecodable: as if missing; the nodes that name it wait.
            Event::Apply((name, None)) | Event::Delete((name, _)) => {
                s.delete_policy_group(&name, at)
            }
            Event::Init => {
                s.relist_start(Shared::PolicyGroup);
                false
            }
            Event::InitApply((name, spec)) => {
                if let Some(spec) = spec {
                    s.policy_group_relist_apply(&name, spec);
                }
                false
            }
            Event::InitDone => s.relist_done(Shared::PolicyGroup, at),
        },
        Input::PeerSet(event) => match event {
            Event::Apply((name, Some(spec))) => s.apply_peer_set(&name, spec, at),
            // An undecodable set matches nobody, like a missing one.
            Event::Apply((name, None)) | Event::Delete((name, _)) => s.delete_peer_set(&name, at),
            Event::Init => {
                s.relist_start(Shared::PeerSet);
                false
            }
            Event::InitApply((name, spec)) => {
                if let Some(spec) = spec {
                    s.peer_set_relist_apply(&name, spec);
                }
                false
            }
            Event::InitDone => {
                let changed = s.relist_done(Shared::PeerSet, at);
                info!(held = s.objects_held(Shared::PeerSet), "listed PeerSets");
                changed
            }
        },
        Input::Fetched(result) => s.fetched(result, at),
    }
}

async fn run(ctx: ComponentContext, options: Options) -> Result<(), ComponentError> {
    let metrics = PolicyMetrics::register(&ctx.registry)?;
    let enforcer = PolicyEnforcer::new(&ctx.run_dir, metrics.clone());
    let (tx, rx) = mpsc::channel(1024);
    let mut watches = spawn_watches(&ctx.client, &ctx.node_name, &tx, &metrics);
    let owner = Owner {
        recorder: Recorder::new(
            ctx.client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(ctx.node_name.clone()),
            },
        ),
        client: ctx.client.clone(),
        status: StatusWriter::new(Api::all(ctx.client.clone()), &ctx.node_name),
        node_name: ctx.node_name.clone(),
        store: PolicyStore::new(),
        enforcer,
        metrics,
        options,
        tx,
        readiness: ctx.readiness.clone(),
        synced_once: false,
        defer_status: false,
        status_deferred: None,
        announced: None,
        drift_event_at: None,
        verify: super::verify::Verifier::default(),
    };
    // Dropping `watches` (when this returns or the agent stops) aborts them.
    let result = owner.run(rx, ctx.network).await;
    watches.shutdown().await;
    result
}

/// Watches `api`, converting every object in the watch task (the object is
/// dropped there) and sending it to the owner with the time it arrived.
async fn watch<K, T>(
    api: Api<K>,
    config: watcher::Config,
    tx: mpsc::Sender<(Instant, Input)>,
    metrics: PolicyMetrics,
    resource: &'static str,
    convert: impl Fn(K) -> T + Send + 'static,
    wrap: fn(Event<T>) -> Input,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    // No debounce: every change matters, and the owner coalesces.
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                metrics.watch_errors.with_label_values(&[resource]).inc();
                warn!("watching {resource}: {e} (retrying)");
                continue;
            }
        };
        metrics.watch_events.with_label_values(&[resource]).inc();
        let at = Instant::now();
        if tx
            .send((at, wrap(map_event(event, &convert))))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The same event with its object converted.
fn map_event<K, T>(event: Event<K>, f: impl Fn(K) -> T) -> Event<T> {
    match event {
        Event::Apply(o) => Event::Apply(f(o)),
        Event::Delete(o) => Event::Delete(f(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(f(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// GETs one object; retries a few times itself. Err: every attempt failed.
async fn get_spec<K, S>(
    api: Api<DeserializeGuard<K>>,
    kind: Shared,
    name: &str,
    metrics: &PolicyMetrics,
    spec: fn(K) -> S,
) -> Result<Option<S>, ()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match api.get_opt(name).await {
            Ok(Some(DeserializeGuard(Ok(obj)))) => {
                metrics.peer_set_fetches.with_label_values(&["found"]).inc();
                return Ok(Some(spec(obj)));
            }
            Ok(Some(DeserializeGuard(Err(bad)))) => {
                metrics.peer_set_fetches.with_label_values(&["found"]).inc();
                warn!(
                    kind = kind.as_str(),
                    name, "cannot be decoded ({}); as if missing", bad.error
                );
                return Ok(None);
            }
            Ok(None) => {
                metrics
                    .peer_set_fetches
                    .with_label_values(&["not_found"])
                    .inc();
                return Ok(None);
            }
            Err(e) => {
                metrics.peer_set_fetches.with_label_values(&["error"]).inc();
                if attempt >= 5 {
                    warn!(kind = kind.as_str(), name, "getting it: {e} (asking again)");
                    return Err(());
                }
                debug!(kind = kind.as_str(), name, "getting it: {e} (retrying)");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
}

/// GETs an object that became needed and reports it to the owner.
async fn fetch(
    client: kube::Client,
    kind: Shared,
    name: String,
    tx: mpsc::Sender<(Instant, Input)>,
    metrics: PolicyMetrics,
) {
    let result = match kind {
        Shared::PolicyGroup => Fetched::PolicyGroup(
            name.clone(),
            get_spec(Api::all(client), kind, &name, &metrics, |o: PolicyGroup| {
                o.spec
            })
            .await,
        ),
        Shared::PeerSet => Fetched::PeerSet(
            name.clone(),
            get_spec(Api::all(client), kind, &name, &metrics, |o: PeerSet| o.spec).await,
        ),
    };
    let _ = tx.send((Instant::now(), Input::Fetched(result))).await;
}

/// Why the owner syncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Change,
    Retry,
    DriftCheck,
    /// A drift check because someone else changed the firewall.
    FirewallChange,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Change => "change",
            Trigger::Retry => "retry",
            Trigger::DriftCheck => "drift_check",
            Trigger::FirewallChange => "firewall_change",
        }
    }

    fn is_check(self) -> bool {
        matches!(self, Trigger::DriftCheck | Trigger::FirewallChange)
    }
}

/// The task that owns the store and the enforcer.
struct Owner {
    recorder: Recorder,
    client: kube::Client,
    status: StatusWriter,
    node_name: String,
    store: PolicyStore,
    enforcer: PolicyEnforcer,
    metrics: PolicyMetrics,
    options: Options,
    tx: mpsc::Sender<(Instant, Input)>,
    readiness: canal_runtime::health::ReadinessGate,
    synced_once: bool,
    /// The running sync leaves its status write to the next one (input is queued).
    defer_status: bool,
    /// A status computed but not written yet (uid, status): written after
    /// the next sync or as soon as no input is queued.
    status_deferred: Option<(Option<String>, NodePolicySetStatus)>,
    /// The last Wait/Hold reason logged (logged once per change).
    announced: Option<String>,
    /// When the last PolicyDriftRepaired Event went out: a program that
    /// keeps rewriting canal's rules gets one Event a minute, not one per repair.
    drift_event_at: Option<Instant>,
    /// `kubectl canal explain --verify` requests and answers.
    verify: super::verify::Verifier,
}

impl Owner {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<(Instant, Input)>,
        mut network: tokio::sync::watch::Receiver<Option<Arc<crate::component::NodeNetwork>>>,
    ) -> Result<(), ComponentError> {
        let config_of = |n: &Option<Arc<crate::component::NodeNetwork>>| {
            n.as_deref().map(|n| {
                let mut config = EnforcementConfig::from(&n.config);
                // IPv4 is always guarded (pods of an IPv6-only node have
                // no IPv4 address to send from); IPv6 once the node has an
                // IPv6 subnet.
                config.families = super::model::Families {
                    v4: true,
                    v6: n
                        .families
                        .iter()
                        .any(|f| matches!(f.node_subnet, ipnet::IpNet::V6(_))),
                };
                config
            })
        };
        let initial = config_of(&network.borrow_and_update());
        self.store.set_config(initial, Instant::now());
        let mut dirty = true;
        let mut retry = RetrySchedule::new(&self.options);
        let mut drift = tokio::time::interval(self.options.drift_interval);
        drift.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        drift.reset();
        let mut monitor = self.monitor().await;
        let mut monitored = self.enforcer.active();
        let (verify_tx, mut verify_rx) = mpsc::channel(1);
        tokio::spawn(
            super::verify::watch_requests(self.client.clone(), self.node_name.clone(), verify_tx)
                .in_current_span(),
        );
        loop {
            // A dataplane switch changes what is worth watching.
            if self.enforcer.active() != monitored {
                monitored = self.enforcer.active();
                monitor = self.monitor().await;
            }
            for (kind, name) in self.store.take_fetches() {
                tokio::spawn(
                    fetch(
                        self.client.clone(),
                        kind,
                        name,
                        self.tx.clone(),
                        self.metrics.clone(),
                    )
                    .in_current_span(),
                );
            }
            let step = self.store.next_step();
            self.announce(&step);
            if step == Step::Sync && dirty && retry.at.is_none() {
                dirty = false;
                let trigger = if std::mem::take(&mut retry.due) {
                    Trigger::Retry
                } else {
                    Trigger::Change
                };
                // More input already queued: the next sync follows at
                // once, so this one's status write waits for it (the
                // kernel never waits for a status write).
                self.defer_status = !rx.is_empty();
                let ok = self.sync(trigger).await;
                self.defer_status = false;
                retry.record(ok);
            }
            if self.status_deferred.is_some() && rx.is_empty() {
                self.write_deferred_status().await;
            }
            tokio::select! {
                input = rx.recv() => {
                    let Some((at, input)) = input else {
                        return Err("the policy watches stopped".into());
                    };
                    dirty |= self.apply(at, input);
                    // Everything else already queued goes into the same sync.
                    while let Ok((at, input)) = rx.try_recv() {
                        dirty |= self.apply(at, input);
                    }
                }
                changed = network.changed() => {
                    if changed.is_err() {
                        // The agent is shutting down.
                        return Ok(());
                    }
                    let config = config_of(&network.borrow_and_update());
                    dirty |= self.store.set_config(config, Instant::now());
                }
                Some(id) = verify_rx.recv() => {
                    // Answered by the next kernel check: now when possible.
                    self.verify.request(id);
                    if self.synced_once && step == Step::Sync && retry.at.is_none() {
                        let ok = self.sync(Trigger::DriftCheck).await;
                        retry.record(ok);
                    }
                }
                _ = drift.tick() => {
                    if self.synced_once && step == Step::Sync && retry.at.is_none() {
                        let ok = self.sync(Trigger::DriftCheck).await;
                        retry.record(ok);
                    }
                }
                wake = monitor.next() => {
                    // Before the first sync, and while a retry is pending
                    // (it re-reads the kernel anyway), there is nothing to check.
                    if self.synced_once && step == Step::Sync && retry.at.is_none() {
                        let ok = self.on_wake(wake, &mut monitor).await;
                        retry.record(ok);
                    }
                }
                () = sleep_until(retry.at) => {
                    retry.at = None;
                    retry.due = true;
                    dirty = true;
                }
                () = sleep_until(self.status.retry_at) => {
                    self.status.retry(&self.metrics).await;
                }
            }
        }
    }

    /// The schedule of cheap checks for this node's iptables backend.
    async fn monitor(&mut self) -> Monitor {
        let backend = match self.enforcer.backend().await {
            Ok(b) => b,
            Err(e) => {
                // The first sync reports the missing tool; assume the default.
                warn!("cannot tell the iptables backend: {e}; assuming nf_tables");
                Backend::Nft
            }
        };
        let monitor = Monitor::new(backend, watch::host_watch(), self.options.schedule);
        info!(
            backend = ?backend,
            notifications = monitor.notified(),
            "watching the firewall for changes by other programs"
        );
        monitor
    }

    /// Runs what the monitor asks for; returns false when a check ran and failed.
    async fn on_wake(&mut self, wake: Wake, monitor: &mut Monitor) -> bool {
        match wake {
            Wake::Check { source } => {
                self.metrics
                    .firewall_changes
                    .with_label_values(&[source])
                    .inc();
                return self.sync(Trigger::FirewallChange).await;
            }
            Wake::CheckSets => match self.enforcer.sets_drifted().await {
                Ok(true) => {
                    debug!("canal's ipsets differ from what was applied");
                    monitor.check_now("ipset");
                }
                Ok(false) => {}
                Err(e) => debug!("reading ipset headers: {e}"),
            },
            Wake::PollLegacy => match self.enforcer.legacy_tables_changed().await {
                Ok(true) => monitor.check_now("legacy"),
                Ok(false) => {}
                Err(e) => debug!("reading the legacy iptables tables: {e}"),
            },
            Wake::ReadCounters => {
                if let Err(e) = self.enforcer.record_spoof_counters().await {
                    debug!("reading the anti-spoofing counters: {e}");
                }
            }
        }
        true
    }

    fn announce(&mut self, step: &Step) {
        let text = match step {
            Step::Wait(w) => w,
            Step::Hold(h) => h,
            Step::Sync => {
                // A newer NodePolicySet that is not consistent yet: the
                // previous version stays programmed; say what it waits for.
                let waiting = self.store.waiting_on().map(|w| {
                    format!(
                        "keeping generation {:?} programmed; the newest NodePolicySet waits for: {w}",
                        self.store.inputs().generation
                    )
                });
                if waiting != self.announced {
                    if let Some(w) = &waiting {
                        info!("{w}");
                    }
                    self.announced = waiting;
                }
                return;
            }
        };
        if self.announced.as_ref() == Some(text) {
            return;
        }
        if matches!(step, Step::Hold(_)) {
            warn!("{text}; leaving the kernel's policy state as it is");
        } else {
            info!("{text}");
        }
        self.announced = Some(text.clone());
    }

    /// Applies one input to the store; returns whether the inputs changed.
    fn apply(&mut self, at: Instant, input: Input) -> bool {
        apply_input(&mut self.store, at, input)
    }

    /// One sync (or drift check) and what follows it: metrics, status,
    /// readiness. Returns whether it succeeded.
    async fn sync(&mut self, trigger: Trigger) -> bool {
        let started = Instant::now();
        let oldest = self.store.pending().values().min().copied();
        let span = tracing::debug_span!("policy_sync", trigger = trigger.as_str());
        let result = match trigger {
            Trigger::DriftCheck | Trigger::FirewallChange => {
                match self.enforcer.check_drift().instrument(span).await {
                    Ok(Some(stats)) => Ok(stats),
                    Ok(None) => return true,
                    Err(e) => Err(e),
                }
            }
            Trigger::Change | Trigger::Retry => {
                self.enforcer
                    .sync(self.store.inputs())
                    .instrument(span)
                    .await
            }
        };
        let ok = result.is_ok();
        if trigger.is_check() {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let generation = self.store.inputs().generation;
            self.verify
                .checked(trigger.as_str(), generation, result.as_ref(), &now);
        }
        self.metrics
            .syncs
            .with_label_values(&[trigger.as_str(), if ok { "success" } else { "error" }])
            .inc();
        match &result {
            Ok(stats) => {
                if !trigger.is_check() {
                    let now = Instant::now();
                    for (cause, at) in self.store.take_pending() {
                        self.metrics
                            .programming_duration
                            .with_label_values(&[cause.as_str()])
                            .observe(now.duration_since(at).as_secs_f64());
                    }
                }
                self.log_sync(trigger, stats).await;
            }
            Err(e) => error!(
                trigger = trigger.as_str(),
                category = e.category(),
                "policy sync failed: {e} (retrying)"
            ),
        }
        let status_start = Instant::now();
        self.write_status(result.as_ref())
            .instrument(tracing::debug_span!("status_write"))
            .await;
        if let (Ok(stats), false) = (&result, trigger.is_check())
            && stats.applied
        {
            self.record_stages(
                stats,
                oldest.map(|o| started.saturating_duration_since(o)),
                status_start.elapsed(),
            );
        }
        if let (Ok(stats), false) = (&result, self.synced_once) {
            // Ready once the first sync is in the kernel and reported.
            self.synced_once = true;
            self.readiness.set(true);
            info!(
                rules = stats.rules,
                endpoints = stats.endpoints,
                restored = stats.applied,
                "first policy sync done"
            );
        }
        ok
    }

    /// The stages of a change sync that changed the kernel.
    fn record_stages(&self, stats: &SyncStats, queued: Option<Duration>, status: Duration) {
        let kernel = stats.restore_time.saturating_sub(stats.plan_time);
        let stages = [
            ("queue", queued),
            ("render", Some(stats.render_time)),
            ("plan", Some(stats.plan_time)),
            ("kernel", Some(kernel)),
            ("status", Some(status)),
        ];
        for (stage, d) in stages {
            if let Some(d) = d {
                self.metrics
                    .programming_stage
                    .with_label_values(&[stage])
                    .observe(d.as_secs_f64());
            }
        }
    }

    async fn log_sync(&mut self, trigger: Trigger, stats: &SyncStats) {
        if !stats.applied {
            debug!(trigger = trigger.as_str(), "policy already in the kernel");
            return;
        }
        let p = &stats.plan;
        if trigger.is_check() {
            // The enforcer logged and counted it; a person wants to see it.
            let note = format!(
                "restored NetworkPolicy rules changed outside canal-agent: chains={} hooks={} sets={}",
                p.chains_written + p.chains_deleted,
                p.hooks_fixed,
                p.sets_created
                    + p.sets_swapped
                    + p.sets_destroyed
                    + p.members_added
                    + p.members_removed
            );
            if self
                .drift_event_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
            {
                self.drift_event_at = Some(Instant::now());
                self.event(EventType::Normal, "PolicyDriftRepaired", note)
                    .await;
            }
            return;
        }
        if !self.store.inputs().config.enabled {
            info!(changes = ?stats.plan, "policy.enabled is false: removed every NetworkPolicy chain, hook and set");
            return;
        }
        info!(
            generation = ?self.store.inputs().generation,
            endpoints = stats.endpoints,
            rules = stats.rules,
            sets = stats.sets,
            changes = ?stats.plan,
            duration_ms = stats.duration.as_millis() as u64,
            "programmed NetworkPolicy"
        );
    }

    async fn write_status(&mut self, outcome: Result<&SyncStats, &SyncError>) {
        let Some((uid, observed)) = self.store.node_policy_set() else {
            return;
        };
        let uid = uid.map(str::to_string);
        let previous = match &self.status_deferred {
            Some((for_uid, status)) if *for_uid == uid => Some(status.clone()),
            _ => self.status.previous(uid.as_deref(), observed),
        };
        let generation = self.store.inputs().generation;
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let (mut status, mut changed) = if self.store.inputs().config.enabled {
            enforced_status(previous.as_ref(), generation, outcome, now)
        } else {
            disabled_status(previous.as_ref(), generation, now)
        };
        if let Some(kernel) = self
            .verify
            .report()
            .filter(|k| status.kernel.as_deref() != Some(k))
        {
            status.kernel = Some(Box::new(kernel));
            changed = true;
        }
        if changed && self.defer_status {
            self.status_deferred = Some((uid, status));
        } else if changed {
            self.status_deferred = None;
            self.status.write(uid, status, &self.metrics).await;
        } else if self.status_deferred.is_some() && !self.defer_status {
            // Unchanged since the deferred one: that one is still to write.
            self.write_deferred_status().await;
        }
    }

    async fn write_deferred_status(&mut self) {
        if let Some((uid, status)) = self.status_deferred.take() {
            self.status.write(uid, status, &self.metrics).await;
        }
    }

    /// Publishes an Event about this Node (best effort).
    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node_name.clone()),
            ..ObjectReference::default()
        };
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "EnforcePolicy".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            debug!("publishing Event {reason}: {e}");
        }
    }
}

/// When to retry after failed syncs: a doubling backoff, reset by a success.
struct RetrySchedule {
    initial: Duration,
    max: Duration,
    backoff: Option<Duration>,
    /// When the next attempt is due (no sync before then).
    at: Option<tokio::time::Instant>,
    /// The wait is over: the next sync is a retry.
    due: bool,
}

impl RetrySchedule {
    fn new(options: &Options) -> RetrySchedule {
        RetrySchedule {
            initial: options.retry_backoff,
            max: options.max_retry_backoff,
            backoff: None,
            at: None,
            due: false,
        }
    }

    fn record(&mut self, ok: bool) {
        if ok {
            self.backoff = None;
            return;
        }
        let delay = self
            .backoff
            .map(|d| (d * 2).min(self.max))
            .unwrap_or(self.initial);
        self.backoff = Some(delay);
        self.at = Some(tokio::time::Instant::now() + delay);
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes the NodePolicySet status with server-side apply (field manager
/// `canal-agent`), remembering what it wrote so transition times and the
/// "changed?" test use the newest status even before the watch shows it.
struct StatusWriter {
    api: Api<NodePolicySet>,
    name: String,
    /// (uid, status) of the last successful write.
    written: Option<(Option<String>, NodePolicySetStatus)>,
    /// A status that failed to write, retried at `retry_at`.
    unwritten: Option<(Option<String>, NodePolicySetStatus)>,
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
}

impl StatusWriter {
    fn new(api: Api<NodePolicySet>, name: &str) -> StatusWriter {
        StatusWriter {
            api,
            name: name.to_string(),
            written: None,
            unwritten: None,
            retry_at: None,
            backoff: Duration::from_millis(500),
        }
    }

    /// The status to compare against: ours when it is for this object,
    /// else the one stored in the API (after a restart: the last agent's).
    fn previous(
        &self,
        uid: Option<&str>,
        observed: Option<&NodePolicySetStatus>,
    ) -> Option<NodePolicySetStatus> {
        for (for_uid, status) in [&self.unwritten, &self.written].into_iter().flatten() {
            if for_uid.as_deref() == uid {
                return Some(status.clone());
            }
        }
        observed.cloned()
    }

    async fn write(
        &mut self,
        uid: Option<String>,
        status: NodePolicySetStatus,
        metrics: &PolicyMetrics,
    ) {
        let body = serde_json::json!({
            "apiVersion": format!("{}/{}", canal_crds::GROUP, canal_crds::VERSION),
            "kind": "NodePolicySet",
            "metadata": {"name": self.name},
            "status": status,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match self
            .api
            .patch_status(&self.name, &pp, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                metrics.status_writes.with_label_values(&["success"]).inc();
                debug!(observed_generation = ?status.observed_generation, "wrote NodePolicySet status");
                self.written = Some((uid, status));
                self.unwritten = None;
                self.retry_at = None;
                self.backoff = Duration::from_millis(500);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                // Deleted meanwhile: its successor gets a status after its sync.
                self.unwritten = None;
                self.retry_at = None;
            }
            Err(e) => {
                metrics.status_writes.with_label_values(&["error"]).inc();
                warn!(
                    "writing NodePolicySet {} status: {e} (retrying in {:?})",
                    self.name, self.backoff
                );
                self.unwritten = Some((uid, status));
                self.retry_at = Some(tokio::time::Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
            }
        }
    }

    async fn retry(&mut self, metrics: &PolicyMetrics) {
        self.retry_at = None;
        if let Some((uid, status)) = self.unwritten.take() {
            self.write(uid, status, metrics).await;
        }
    }
}
