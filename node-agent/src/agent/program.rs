//! One pass of the sync: the overlay, IPv4 forwarding, masquerade and the
//! network file, each step run whatever the others did, with its failures
//! collected in a [`SyncReport`] and its metrics, logs and Events recorded.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use kube::runtime::events::EventType;

use super::{Agent, Inputs, ensure_ip_forward, netlink_step, sync_error_step};
use crate::component::NodeNetwork;
use crate::masq::RulesConfig;
use crate::overlay::desired::Skipped;
use crate::overlay::diff::Kind;
use crate::overlay::netlink::Category;
use crate::overlay::{self, SyncError, Synced};
use crate::report::{Step, SyncReport};
use crate::runfiles::NetworkFile;

impl Agent {
    /// One pass over kernel, iptables and files; every step runs, and the
    /// failures are returned.
    pub(super) async fn program(&mut self, inputs: &Inputs, trigger: &'static str) -> SyncReport {
        let mut report = SyncReport::new();
        let synced = match overlay::sync(
            &self.netlink,
            &inputs.local,
            &inputs.peers,
            &inputs.config,
            self.last_underlay,
        )
        .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                if let SyncError::Netlink(n) = &e {
                    self.count_netlink_error(n.category);
                }
                report.fail(sync_error_step(&e), &e);
                None
            }
        };
        if let Some(synced) = &synced {
            self.observe_overlay(inputs, synced, &mut report).await;
        }
        if let Err(e) = ensure_ip_forward() {
            report.fail(Step::Forwarding, e);
        }
        self.sync_masquerade(inputs, trigger, &mut report).await;
        if let Some(synced) = synced {
            self.write_network(inputs, &synced, &mut report);
            self.last_underlay = Some(synced.underlay.index);
            self.last_desired = Some(synced.desired);
        }
        self.last_clean = report.is_clean();
        report
    }

    /// Metrics, logs, Events and report entries for what the overlay sync did.
    async fn observe_overlay(&mut self, inputs: &Inputs, synced: &Synced, report: &mut SyncReport) {
        let phase = &self.metrics.sync_phase_duration;
        phase
            .with_label_values(&["dump"])
            .observe(synced.dump.as_secs_f64());
        phase
            .with_label_values(&["compute"])
            .observe(synced.compute.as_secs_f64());
        phase
            .with_label_values(&["apply"])
            .observe(synced.apply.as_secs_f64());

        if let Some(e) = &synced.underlay_error {
            report.fail(
                Step::Underlay,
                format!(
                    "{e}; keeping the underlay in use, {} ({})",
                    synced.underlay.name, synced.underlay.ip
                ),
            );
        }
        let plan = &synced.plan;
        let desired = &synced.desired;
        let drift = self.last_clean && self.last_desired.as_ref() == Some(desired);
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
                            "restored overlay state changed outside canal-agent: {}",
                            counts.join(" ")
                        ),
                    )
                    .await;
            } else {
                tracing::info!(
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
            if e.category == Category::Mtu {
                // Say what would work: the kernel only answers EINVAL.
                let max = synced
                    .underlay
                    .mtu
                    .saturating_sub(crate::overlay::desired::VXLAN_OVERHEAD);
                report.fail(
                    Step::Mtu,
                    format!(
                        "{e} (at most {max} fits underlay {} with MTU {}; backend.mtu 0 derives it)",
                        synced.underlay.name, synced.underlay.mtu
                    ),
                );
            } else {
                report.fail(netlink_step(e), e);
            }
        }
        self.metrics
            .remote_nodes
            .with_label_values(&["vxlan"])
            .set(desired.vxlan_peers as i64);
        self.metrics
            .remote_nodes
            .with_label_values(&["direct"])
            .set(desired.direct_peers as i64);
        for reason in crate::overlay::desired::SkipReason::ALL {
            let n = desired
                .skipped
                .iter()
                .filter(|s| s.reason == reason)
                .count();
            self.metrics
                .remote_nodes_skipped
                .with_label_values(&[reason.as_str()])
                .set(n as i64);
        }
        for s in &desired.skipped {
            report.note(format!(
                "no route to Node {}: {}",
                s.peer,
                s.reason.as_str()
            ));
        }
        if desired.skipped != self.last_skipped {
            let new: Vec<Skipped> = desired
                .skipped
                .iter()
                .filter(|s| !self.last_skipped.contains(s))
                .cloned()
                .collect();
            for s in &new {
                tracing::warn!(peer = %s.peer, reason = s.reason.as_str(), "peer gets no route");
                self.status
                    .event(
                        inputs.uid.clone(),
                        EventType::Warning,
                        "PeerSkipped",
                        format!("no route to Node {}: {}", s.peer, s.reason.as_str()),
                    )
                    .await;
            }
            self.last_skipped = desired.skipped.clone();
        }
        if let Some(text) = self.report_mismatch(inputs, synced.underlay.ip) {
            self.status
                .event(
                    inputs.uid.clone(),
                    EventType::Warning,
                    "UnderlayAddressMismatch",
                    text,
                )
                .await;
        }
        if let Some(text) = &self.mismatch {
            report.note(text.clone());
        }
    }

    /// iptables: read back on every periodic resync and whenever the wanted
    /// rules change (a failed write is retried by every sync).
    async fn sync_masquerade(&mut self, inputs: &Inputs, trigger: &str, report: &mut SyncReport) {
        let iptables_started = Instant::now();
        let rules = RulesConfig {
            cluster_cidr: inputs.config.cluster_cidr,
            node_subnet: inputs.local.subnet,
            masquerade: inputs.config.masquerade,
            ipv6: None,
            dataplane: crate::policy::model::DataplaneChoice::Auto,
        };
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

    /// The network file for canal-cni and the facts for other components,
    /// with the MTU the VXLAN device really has.
    fn write_network(&mut self, inputs: &Inputs, synced: &Synced, report: &mut SyncReport) {
        let desired = &synced.desired;
        let file = NetworkFile {
            cluster_cidr: inputs.config.cluster_cidr,
            node_subnet: inputs.local.subnet,
            mtu: synced.pod_mtu,
            node_name: self.node_name.clone(),
            node_ip: Some(synced.underlay.ip),
        };
        match self.run_dir.write_network(&file) {
            Ok(true) => tracing::info!(
                path = %self.run_dir.network_file().display(),
                subnet = %file.node_subnet,
                mtu = file.mtu,
                "wrote the network file for canal-cni"
            ),
            Ok(false) => {}
            Err(e) => report.fail(Step::NetworkFile, e),
        }

        let published = Arc::new(NodeNetwork {
            node_name: self.node_name.clone(),
            node_subnet: inputs.local.subnet,
            config: inputs.config.clone(),
            pod_mtu: synced.pod_mtu,
            underlay_interface: synced.underlay.name.clone(),
            node_ip: synced.underlay.ip,
            vxlan_device: desired.device.as_ref().map(|d| d.name.clone()),
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

    fn count_netlink_error(&self, category: Category) {
        self.metrics
            .netlink_errors
            .with_label_values(&[category.as_str()])
            .inc();
    }

    /// Logs and gauges an underlay address that differs from the Node's;
    /// returns the text when it is new (for an Event).
    fn report_mismatch(&mut self, inputs: &Inputs, underlay_ip: Ipv4Addr) -> Option<String> {
        let mut problems = Vec::new();
        if let Some(internal) = inputs.internal_ip.filter(|ip| *ip != underlay_ip) {
            problems.push(format!("the Node's InternalIP is {internal}"));
        }
        if let Some(public) = inputs.public_ip.filter(|ip| *ip != underlay_ip) {
            problems.push(format!(
                "its public-ip annotation (where peers send VXLAN traffic) is {public}"
            ));
        }
        let text = (!problems.is_empty()).then(|| {
            format!(
                "the underlay address {underlay_ip} differs from the Node's addresses: {}; set CanalNetwork spec.interface to the interface that carries the node address",
                problems.join(", ")
            )
        });
        self.metrics
            .underlay_mismatch
            .set(i64::from(text.is_some()));
        if text == self.mismatch {
            return None;
        }
        if let Some(t) = &text {
            tracing::warn!("{t}");
        }
        self.mismatch = text.clone();
        text
    }
}
