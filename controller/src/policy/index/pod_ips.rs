//! Pod IPs as identities: which IPs of a pod it holds (inside its node's
//! podCIDRs and the clusterCIDR, and claimed before any other pod), the
//! handover when a holder goes, and the reports that become
//! PodIPRefused / PodIPAccepted Events.

use std::net::IpAddr;

use ipnet::IpNet;
use smallvec::SmallVec;

use super::{PodId, PodIpReport, PolicyIndex, masked, pod_fp};

impl PolicyIndex {
    /// The cluster's pod ranges (None: unknown, so not checked). Pods
    /// holding IPs outside them lose those IPs.
    pub fn set_cluster_cidrs(&mut self, cidrs: Option<Vec<IpNet>>) {
        if self.cluster_cidrs == cidrs {
            return;
        }
        self.cluster_cidrs = cidrs;
        let all: Vec<PodId> = self.pods.iter().map(|(id, _)| id).collect();
        for id in all {
            self.reclaim(id);
        }
    }

    /// True when `a` holds a contested IP before `b`: a running pod before a
    /// terminating one, then the older, then by namespace/name, so every
    /// controller (and every restart) decides the same.
    fn claims_before(&self, a: PodId, b: PodId) -> bool {
        let key = |id: PodId| {
            let p = &self.pods[id];
            (
                p.terminating,
                p.created,
                self.namespaces[p.ns].name.as_str(),
                &*p.name,
            )
        };
        key(a) < key(b)
    }

    /// Why `ip` of pod `id` can never be its address, if so.
    fn ip_out_of_range(&self, id: PodId, ip: IpAddr) -> Option<String> {
        let p = &self.pods[id];
        if let Some(cluster) = &self.cluster_cidrs
            && !cluster.iter().any(|c| c.contains(&ip))
        {
            let shown: Vec<String> = cluster.iter().map(ToString::to_string).collect();
            return Some(format!(
                "{ip} lies outside clusterCIDR {}",
                shown.join(", ")
            ));
        }
        let strict = self.cluster_cidrs.is_some();
        let Some(node) = p.node.map(|n| &self.nodes[n]) else {
            return strict.then(|| format!("{ip}: the pod is on no node"));
        };
        if node.pod_cidrs.is_empty() {
            return strict.then(|| format!("{ip}: its node {} has no podCIDR", node.name));
        }
        if node.pod_cidrs.iter().any(|c| c.contains(&ip)) {
            return None;
        }
        let shown: Vec<String> = node.pod_cidrs.iter().map(ToString::to_string).collect();
        Some(format!(
            "{ip} lies outside the podCIDR {} of its node {}",
            shown.join(", "),
            node.name
        ))
    }

    /// Gives up every claim of `id`; returns the pods that hold an IP now.
    pub(super) fn release_claims(&mut self, id: PodId) -> SmallVec<[PodId; 2]> {
        let p = &mut self.pods[id];
        let mask = std::mem::take(&mut p.claimed);
        let ips: SmallVec<[IpAddr; 2]> = masked(&p.ips, mask).collect();
        ips.into_iter()
            .filter_map(|ip| self.claims.release(ip, id))
            .collect()
    }

    /// Bit mask of the IPs of `id` it may claim.
    fn valid_mask(&self, id: PodId) -> u8 {
        let p = &self.pods[id];
        if !p.member() {
            return 0;
        }
        p.ips
            .iter()
            .take(8)
            .enumerate()
            .filter(|(_, ip)| self.ip_out_of_range(id, **ip).is_none())
            .fold(0, |m, (i, _)| m | (1 << i))
    }

    /// Re-decides the claims of the unlinked pod `id`, links it, and relinks
    /// the pods whose holdings changed with it.
    pub(super) fn settle_and_link(&mut self, id: PodId) {
        let mut affected = self.release_claims(id);
        let valid = self.valid_mask(id);
        let ips: SmallVec<[IpAddr; 2]> = masked(&self.pods[id].ips, valid).collect();
        // Split borrow: the order reads the pods, the claims change.
        let mut claims = std::mem::take(&mut self.claims);
        for ip in ips {
            if let Some(displaced) = claims.claim(ip, id, |a, b| self.claims_before(a, b)) {
                affected.push(displaced);
            }
        }
        self.claims = claims;
        self.pods[id].claimed = valid;
        self.refresh_held(id);
        self.link_pod(id);
        affected.sort();
        affected.dedup();
        for q in affected {
            if q != id {
                self.relink(q);
            }
        }
    }

    /// The pod's holdings changed because of another pod.
    pub(super) fn relink(&mut self, id: PodId) {
        self.unlink_pod(id);
        self.refresh_held(id);
        self.link_pod(id);
        self.review(id);
    }

    /// Validity may have changed (a node's podCIDRs, the cluster's range):
    /// the claims are decided again when they differ.
    pub(super) fn reclaim(&mut self, id: PodId) {
        self.review(id);
        if self.valid_mask(id) == self.pods[id].claimed {
            return;
        }
        self.unlink_pod(id);
        self.settle_and_link(id);
    }

    fn refresh_held(&mut self, id: PodId) {
        let p = &self.pods[id];
        let held = p
            .ips
            .iter()
            .take(8)
            .enumerate()
            .filter(|(i, ip)| p.claimed & (1 << i) != 0 && self.claims.holder(**ip) == Some(id))
            .fold(0u8, |m, (i, _)| m | (1 << i));
        let held_ips: SmallVec<[IpAddr; 2]> = masked(&p.ips, held).collect();
        let own_fp = pod_fp(
            self.namespaces[p.ns].name.as_str(),
            &p.name,
            &held_ips,
            &p.named_ports,
        );
        let p = &mut self.pods[id];
        p.held = held;
        p.own_fp = own_fp;
    }

    pub(super) fn review(&mut self, id: PodId) {
        let p = &mut self.pods[id];
        if !p.review_queued {
            p.review_queued = true;
            self.ip_review.push(id);
        }
    }

    /// Which IPs of pod `id` NetworkPolicy does not use, and why.
    fn ip_problem(&self, id: PodId) -> Option<String> {
        let p = &self.pods[id];
        if !p.member() {
            return None;
        }
        let mut why: Vec<String> = Vec::new();
        for &ip in p.ips.iter() {
            if p.held_ips().any(|h| h == ip) {
                continue;
            }
            if let Some(reason) = self.ip_out_of_range(id, ip) {
                why.push(reason);
            } else if let Some(h) = self.claims.holder(ip) {
                let holder = &self.pods[h];
                why.push(format!(
                    "{ip} is already held by pod {}/{}, so it counts as that pod's until it lets go",
                    self.namespaces[holder.ns].name, holder.name
                ));
            }
        }
        (!why.is_empty()).then(|| {
            format!(
                "canal does not use {} of this pod's IPs for NetworkPolicy (it joins no peer set and the pod may not send from it): {}",
                why.len(),
                why.join("; ")
            )
        })
    }

    pub(super) fn pod_reports(&mut self) -> Vec<PodIpReport> {
        let mut out = Vec::new();
        for id in std::mem::take(&mut self.ip_review) {
            let Some(p) = self.pods.get_mut(id) else {
                continue;
            };
            p.review_queued = false;
            let problem = self.ip_problem(id);
            let p = &mut self.pods[id];
            if p.reported != problem {
                p.reported = problem.clone();
                out.push(PodIpReport {
                    namespace: self.namespaces[p.ns].name.to_string(),
                    name: p.name.to_string(),
                    uid: p.uid.as_deref().map(str::to_string),
                    problem,
                });
            }
        }
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// IPs that more than one pod reports.
    pub fn contested_ips(&self) -> usize {
        self.claims.contested()
    }
}
