//! One pass of the sync: the overlay of every IP family, forwarding,
//! masquerade and the network file, each step run whatever the others did,
//! with its failures collected in a [`SyncReport`] and its metrics, logs and
//! Events recorded. A failure of one family's overlay never keeps the other
//! family from being programmed; the report names the family.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use kube::runtime::events::EventType;

use super::{Agent, FamilyInputs, Inputs, ensure_ip_forward, netlink_step, sync_error_step};
use crate::component::{NodeFamily, NodeNetwork};
use crate::masq::RulesConfig;
use crate::overlay::desired::{OverlayConfig, Skipped};
use crate::overlay::diff::Kind;
use crate::overlay::family::Family;
use crate::overlay::netlink::Category;
use crate::overlay::{self, FamilyInput, FamilyPlan, SyncError, Synced};
use crate::report::{Step, SyncReport};
use crate::runfiles::{FamilyNetwork, NetworkFile};

/// "IPv6: " before a family's messages on a dual-stack node (a single-family
/// node's messages read as before).
fn prefix(inputs: &Inputs, family: Family) -> String {
    if inputs.families.len() > 1 || family == Family::V6 {
        format!("{family}: ")
    } else {
        String::new()
    }
}

impl Agent {
    /// What each family's overlay is to be: the cluster's families in its
    /// order (programmed where this node has a subnet of them), then the
    /// families the cluster does not have (removed).
    fn family_inputs(&self, inputs: &Inputs) -> Vec<FamilyInput> {
        let mut out: Vec<FamilyInput> = inputs
            .families
            .iter()
            .map(|f| FamilyInput {
                family: f.family,
                plan: match &f.local {
                    Some(local) => FamilyPlan::Program {
                        config: OverlayConfig::new(&inputs.config, f.cluster_cidr),
                        local: local.clone(),
                        peers: f.peers.clone(),
                    },
                    None => FamilyPlan::Remove,
                },
                interface: inputs.config.interface.clone(),
                previous_underlay: self.last_underlay.get(&f.family).copied(),
            })
            .collect();
        for family in Family::ALL {
            if !out.iter().any(|f| f.family == family) {
                out.push(FamilyInput {
                    family,
                    plan: FamilyPlan::Remove,
                    interface: inputs.config.interface.clone(),
                    previous_underlay: self.last_underlay.get(&family).copied(),
                });
            }
        }
        out
    }

    /// One pass over kernel, iptables and files; every step runs, and the
    /// failures are returned.
    pub(super) async fn program(&mut self, inputs: &Inputs, trigger: &'static str) -> SyncReport {
        let mut report = SyncReport::new();
        let family_inputs = self.family_inputs(inputs);
        let mut synced: Vec<Synced> = Vec::new();
        match overlay::sync(&self.netlink, &family_inputs).await {
            Ok(all) => {
                self.metrics
                    .sync_phase_duration
                    .with_label_values(&["dump"])
                    .observe(all.dump.as_secs_f64());
                for (input, result) in family_inputs.iter().zip(all.families) {
                    match result {
                        Ok(s) => synced.push(s),
                        Err(e) => {
                            if let SyncError::Netlink(n) = &e {
                                self.count_netlink_error(n.category);
                            }
                            let p = prefix(inputs, input.family);
                            report.fail(sync_error_step(&e), format!("{p}{e}"));
                        }
                    }
                }
            }
            Err(e) => {
                self.count_netlink_error(e.category);
                report.fail(netlink_step(&e), &e);
            }
        }
        for s in &synced {
            self.observe_overlay(inputs, s, &mut report).await;
        }
        for f in &inputs.families {
            if let Some(why) = &f.missing {
                report.note(format!(
                    "{}: not programmed on this Node ({why}); its pods get no {} address",
                    f.family, f.family
                ));
            }
        }
        for f in &inputs.families {
            if let Err(e) = ensure_ip_forward(f.family) {
                report.fail(Step::Forwarding, e);
            }
        }
        self.gate_pod_ipv6(inputs, &mut report).await;
        self.sync_masquerade(inputs, trigger, &mut report).await;
        if !synced.is_empty() {
            self.write_network(inputs, &synced, &mut report);
        }
        for s in synced {
            match (&s.underlay, s.programmed) {
                (Some(u), true) => {
                    self.last_underlay.insert(s.family, u.index);
                }
                _ => {
                    self.last_underlay.remove(&s.family);
                }
            }
            self.last_desired.insert(s.family, s.desired);
        }
        self.last_clean = report.is_clean();
        report
    }

    /// Metrics, logs, Events and report entries for what one family's
    /// overlay sync did.
    async fn observe_overlay(&mut self, inputs: &Inputs, synced: &Synced, report: &mut SyncReport) {
        let family = synced.family;
        let p = prefix(inputs, family);
        let phase = &self.metrics.sync_phase_duration;
        phase
            .with_label_values(&["compute"])
            .observe(synced.compute.as_secs_f64());
        phase
            .with_label_values(&["apply"])
            .observe(synced.apply.as_secs_f64());

        if let (Some(e), Some(u)) = (&synced.underlay_error, &synced.underlay) {
            report.fail(
                Step::Underlay,
                format!("{p}{e}; keeping the underlay in use, {} ({})", u.name, u.ip),
            );
        }
        let plan = &synced.plan;
        let desired = &synced.desired;
        let drift = self.last_clean && self.last_desired.get(&family) == Some(desired);
        // What was changed: the plan minus what failed (a refused MTU is
        // planned again on every sync but changes nothing).
        let mut applied = plan.counts();
        for e in &synced.errors {
            let kind = match e.category {
                Category::Dump => continue,
                Category::Mtu => Kind::Link,
                Category::Change(kind) => kind,
            };
            if let Some(n) = applied.get_mut(&kind) {
                *n = n.saturating_sub(1);
            }
        }
        applied.retain(|_, n| *n > 0);
        let changed: usize = applied.values().sum();
        for (kind, n) in &applied {
            let n = *n;
            self.metrics
                .kernel_changes
                .with_label_values(&[kind.as_str()])
                .inc_by(n as u64);
            if drift {
                self.metrics
                    .drift_repairs
                    .with_label_values(&[kind.as_str()])
                    .inc_by(n as u64);
            }
        }
        for op in &plan.links {
            if let crate::overlay::diff::LinkOp::Delete {
                name,
                reason: crate::overlay::diff::DeleteReason::Incompatible,
                ..
            } = op
            {
                self.status
                    .event(
                        inputs.uid.clone(),
                        EventType::Warning,
                        "VxlanDeviceRecreated",
                        format!("{name} had another VNI, port, local address, underlay or learning setting; recreated it"),
                    )
                    .await;
            }
        }
        if changed > 0 {
            let counts: Vec<String> = applied
                .iter()
                .map(|(k, n)| format!("{}={n}", k.as_str()))
                .collect();
            if drift {
                tracing::warn!(
                    family = family.as_str(),
                    changes = changed,
                    "repaired kernel state changed by someone else: {}",
                    counts.join(" ")
                );
                self.status
                    .event(
                        inputs.uid.clone(),
                        EventType::Normal,
                        "DriftRepaired",
                        format!(
                            "restored {p}overlay state changed outside canal-agent: {}",
                            counts.join(" ")
                        ),
                    )
                    .await;
            } else {
                tracing::info!(
                    family = family.as_str(),
                    changes = changed,
                    vxlan_peers = desired.vxlan_peers,
                    direct_peers = desired.direct_peers,
                    "overlay updated: {}",
                    counts.join(" ")
                );
            }
        }
        for e in &synced.errors {
            self.count_netlink_error(e.category);
            match (&synced.underlay, e.category) {
                (Some(u), Category::Mtu) => {
                    // Say what would work: the kernel only answers EINVAL.
                    let max = u.mtu.saturating_sub(family.vxlan_overhead());
                    report.fail(
                        Step::Mtu,
                        format!(
                            "{p}{e} (at most {max} fits underlay {} with MTU {} over {family}; backend.mtu 0 derives it)",
                            u.name, u.mtu
                        ),
                    );
                }
                _ => report.fail(netlink_step(e), format!("{p}{e}")),
            }
        }
        let label = family.as_str();
        self.metrics
            .remote_nodes
            .with_label_values(&[label, "vxlan"])
            .set(desired.vxlan_peers as i64);
        self.metrics
            .remote_nodes
            .with_label_values(&[label, "direct"])
            .set(desired.direct_peers as i64);
        for reason in crate::overlay::desired::SkipReason::ALL {
            let n = desired
                .skipped
                .iter()
                .filter(|s| s.reason == reason)
                .count();
            self.metrics
                .remote_nodes_skipped
                .with_label_values(&[label, reason.as_str()])
                .set(n as i64);
        }
        for s in &desired.skipped {
            report.note(format!(
                "{p}no route to Node {}: {}",
                s.peer,
                s.reason.as_str()
            ));
        }
        let last = self.last_skipped.entry(family).or_default();
        if desired.skipped != *last {
            let new: Vec<Skipped> = desired
                .skipped
                .iter()
                .filter(|s| !last.contains(s))
                .cloned()
                .collect();
            *last = desired.skipped.clone();
            for s in &new {
                tracing::warn!(peer = %s.peer, family = label, reason = s.reason.as_str(), "peer gets no route");
                self.status
                    .event(
                        inputs.uid.clone(),
                        EventType::Warning,
                        "PeerSkipped",
                        format!("{p}no route to Node {}: {}", s.peer, s.reason.as_str()),
                    )
                    .await;
            }
        }
        if !synced.programmed {
            return;
        }
        let underlay_ip = synced.underlay.as_ref().map(|u| u.ip);
        if let (Some(f), Some(ip)) = (
            inputs.families.iter().find(|f| f.family == family),
            underlay_ip,
        ) && let Some(text) = self.report_mismatch(f, ip)
        {
            self.status
                .event(
                    inputs.uid.clone(),
                    EventType::Warning,
                    "UnderlayAddressMismatch",
                    text,
                )
                .await;
        }
        if let Some(text) = self.mismatch.get(&family) {
            report.note(text.clone());
        }
    }

    /// iptables: read back on every periodic resync and whenever the wanted
    /// rules change (a failed write is retried by every sync). Every family
    /// the node has is masqueraded: IPv4, IPv6, or both.
    async fn sync_masquerade(&mut self, inputs: &Inputs, trigger: &str, report: &mut SyncReport) {
        let ipv4 = inputs.programmed(Family::V4).and_then(|(f, local)| {
            match (f.cluster_cidr, local.subnet) {
                (ipnet::IpNet::V4(c), ipnet::IpNet::V4(n)) => Some((c, n)),
                _ => None,
            }
        });
        let iptables_started = Instant::now();
        let rules = RulesConfig {
            ipv4,
            masquerade: inputs.config.masquerade,
            ipv6: inputs.programmed(Family::V6).and_then(|(f6, local6)| {
                match (f6.cluster_cidr, local6.subnet) {
                    (ipnet::IpNet::V6(c), ipnet::IpNet::V6(n)) => Some((c, n)),
                    _ => None,
                }
            }),
            dataplane: inputs.config.policy_dataplane.into(),
        };
        if rules.ipv4.is_none() && rules.ipv6.is_none() {
            return;
        }
        match self.masq.sync(&rules, trigger == "resync").await {
            Ok(outcome) => {
                if !outcome.rewritten.is_empty() {
                    tracing::info!(tables = ?outcome.rewritten, masquerade = rules.masquerade, "iptables rules written");
                    self.metrics
                        .kernel_changes
                        .with_label_values(&["iptables"])
                        .inc_by(outcome.rewritten.len() as u64);
                }
                if !outcome.repaired.is_empty() {
                    tracing::warn!(tables = ?outcome.repaired, "repaired iptables rules changed by someone else");
                    self.metrics
                        .drift_repairs
                        .with_label_values(&["iptables"])
                        .inc_by(outcome.repaired.len() as u64);
                }
            }
            Err(e) => {
                self.metrics
                    .iptables_errors
                    .with_label_values(&[e.step.as_str()])
                    .inc();
                report.fail(Step::Masquerade, &e);
            }
        }
        self.metrics
            .sync_phase_duration
            .with_label_values(&["iptables"])
            .observe(iptables_started.elapsed().as_secs_f64());
    }

    /// The network file for canal-cni and the facts for other components:
    /// every programmed family in the cluster's order, with the MTU that
    /// fits all of them (a family whose device refused an MTU gives the
    /// MTU the device really has). A family whose sync failed as a whole
    /// keeps its previous entry, as the file as a whole does.
    fn write_network(&mut self, inputs: &Inputs, synced: &[Synced], report: &mut SyncReport) {
        let by_family: BTreeMap<Family, &Synced> = synced.iter().map(|s| (s.family, s)).collect();
        let mut families = Vec::new();
        let mut node_families = Vec::new();
        let mut mtu: Option<u32> = None;
        for f in &inputs.families {
            let Some(local) = &f.local else {
                self.last_files.remove(&f.family);
                continue;
            };
            let entry = match by_family
                .get(&f.family)
                .and_then(|s| Some((s, s.underlay.as_ref()?)))
            {
                Some((s, underlay)) if s.programmed => {
                    mtu = Some(mtu.map_or(s.pod_mtu, |m| m.min(s.pod_mtu)));
                    node_families.push(NodeFamily {
                        family: f.family,
                        cluster_cidr: f.cluster_cidr,
                        node_subnet: local.subnet,
                        underlay_interface: underlay.name.clone(),
                        node_ip: underlay.ip,
                        vxlan_device: s.desired.device.as_ref().map(|d| d.name.clone()),
                    });
                    let entry = FamilyNetwork {
                        cluster_cidr: f.cluster_cidr,
                        node_subnet: local.subnet,
                        node_ip: Some(underlay.ip),
                    };
                    self.last_files.insert(f.family, entry);
                    Some(entry)
                }
                _ => self.last_files.get(&f.family).copied(),
            };
            families.extend(entry);
        }
        let Some(mtu) = mtu else {
            return;
        };
        let Some(file) = NetworkFile::new(&self.node_name, mtu, families) else {
            return;
        };
        match self.run_dir.write_network(&file) {
            Ok(true) => tracing::info!(
                path = %self.run_dir.network_file().display(),
                subnets = %file.families().iter().map(|f| f.node_subnet.to_string()).collect::<Vec<_>>().join(","),
                mtu = file.mtu,
                "wrote the network file for canal-cni"
            ),
            Ok(false) => {}
            Err(e) => report.fail(Step::NetworkFile, e),
        }

        let Some(first) = node_families
            .iter()
            .find(|f| f.family == Family::V4)
            .or(node_families.first())
            .cloned()
        else {
            return;
        };
        let published = Arc::new(NodeNetwork {
            node_name: self.node_name.clone(),
            node_subnet: first.node_subnet,
            config: inputs.config.clone(),
            pod_mtu: mtu,
            underlay_interface: first.underlay_interface.clone(),
            node_ip: first.node_ip,
            vxlan_device: first.vxlan_device.clone(),
            families: node_families,
        });
        self.network_tx.send_if_modified(|current| {
            if current.as_deref() == Some(&*published) {
                false
            } else {
                *current = Some(published);
                true
            }
        });
    }

    /// Fail closed for running pods: IPv6 off on their host veths while
    /// pods may not have it ([`super::ipv6_gate`]).
    async fn gate_pod_ipv6(&mut self, inputs: &Inputs, report: &mut SyncReport) {
        let allowed = super::ipv6_gate::ipv6_allowed(&self.run_dir, inputs.config.policy_enabled);
        let why = match allowed {
            Ok(true) => return,
            Ok(false) => {
                "NetworkPolicy is enforced here and the policy component does not guard IPv6"
                    .to_string()
            }
            Err(e) => e,
        };
        match super::ipv6_gate::close_here() {
            Ok(closed) if closed.is_empty() => {}
            Ok(closed) => {
                let text = format!(
                    "turned IPv6 off on {} pod interface(s) ({}): {why}; their pods keep IPv4",
                    closed.len(),
                    closed.join(", ")
                );
                tracing::warn!("{text}");
                self.status
                    .event(
                        inputs.uid.clone(),
                        EventType::Warning,
                        "PodIPv6Disabled",
                        text,
                    )
                    .await;
            }
            Err(e) => report.fail(Step::PodIpv6, e),
        }
    }

    fn count_netlink_error(&self, category: Category) {
        self.metrics
            .netlink_errors
            .with_label_values(&[category.as_str()])
            .inc();
    }

    /// Logs and gauges an underlay address of one family that differs from
    /// the Node's; returns the text when it is new (for an Event).
    fn report_mismatch(&mut self, f: &FamilyInputs, underlay_ip: IpAddr) -> Option<String> {
        let family = f.family;
        let mut problems = Vec::new();
        if let Some(internal) = f.internal_ip.filter(|ip| *ip != underlay_ip) {
            problems.push(format!("the Node's {family} InternalIP is {internal}"));
        }
        if let Some(public) = f.public_ip.filter(|ip| *ip != underlay_ip) {
            let key = match family {
                Family::V4 => "public-ip",
                Family::V6 => "public-ipv6",
            };
            problems.push(format!(
                "its {key} annotation (where peers send VXLAN traffic) is {public}"
            ));
        }
        let text = (!problems.is_empty()).then(|| {
            format!(
                "the underlay address {underlay_ip} differs from the Node's addresses: {}; set CanalNetwork spec.interface to the interface that carries the node address",
                problems.join(", ")
            )
        });
        let previous = match &text {
            Some(t) => self.mismatch.insert(family, t.clone()),
            None => self.mismatch.remove(&family),
        };
        self.metrics
            .underlay_mismatch
            .set(i64::from(!self.mismatch.is_empty()));
        if text == previous {
            return None;
        }
        if let Some(t) = &text {
            tracing::warn!("{t}");
        }
        text
    }
}
