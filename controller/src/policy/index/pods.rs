//! Pods: their groups, PeerSet memberships and named ports, kept incrementally.

use super::*;

impl PolicyIndex {
    /// A Pod was added or changed.
    pub fn apply_pod(&mut self, info: PodInfo) {
        let ns = self.ns_id(&info.namespace);
        let labels = Labels::new(&mut self.interner, &info.labels);
        let named_ports: Box<[(Sym, Protocol, u16)]> = info
            .named_ports
            .iter()
            .map(|p| (self.interner.intern(&p.name), p.protocol, p.port))
            .collect();
        let node = info.node.as_deref().map(|n| self.node_id(n));
        let ips: Box<[IpAddr]> = info.ips.into_boxed_slice();
        let existing = self.namespaces[ns].pods.get(info.name.as_str()).copied();
        let id = match existing {
            Some(id) => {
                let p = &self.pods[id];
                if p.labels == labels
                    && p.ips == ips
                    && p.named_ports == named_ports
                    && p.node == node
                    && p.host_network == info.host_network
                    && p.finished == info.finished
                    && p.created == info.created
                    && p.terminating == info.terminating
                {
                    // Status churn NetworkPolicy does not see (readiness, ...).
                    self.pods[id].uid = info.uid.map(String::into_boxed_str);
                    return;
                }
                let old_node = p.node;
                if old_node != node {
                    if let Some(n) = old_node {
                        self.nodes[n].refs -= 1;
                    }
                    if let Some(n) = node {
                        self.nodes[n].refs += 1;
                    }
                }
                self.unlink_pod(id);
                let p = &mut self.pods[id];
                p.labels = labels;
                p.ips = ips;
                p.named_ports = named_ports;
                p.node = node;
                p.host_network = info.host_network;
                p.finished = info.finished;
                p.uid = info.uid.map(String::into_boxed_str);
                p.created = info.created;
                p.terminating = info.terminating;
                self.settle_and_link(id);
                if let Some(n) = old_node {
                    self.maybe_forget_node(n);
                }
                id
            }
            None => {
                let name: Arc<str> = Arc::from(info.name);
                let id = self.pods.insert(Pod {
                    ns,
                    name: name.clone(),
                    node,
                    labels,
                    ips,
                    named_ports,
                    host_network: info.host_network,
                    finished: info.finished,
                    uid: info.uid.map(String::into_boxed_str),
                    created: info.created,
                    terminating: info.terminating,
                    claimed: 0,
                    held: 0,
                    reported: None,
                    review_queued: false,
                    own_fp: 0,
                    groups: SmallVec::new(),
                    sets: SmallVec::new(),
                });
                self.namespaces[ns].pods.insert(name, id);
                if let Some(n) = node {
                    self.nodes[n].refs += 1;
                }
                self.settle_and_link(id);
                id
            }
        };
        self.review(id);
        if let Some(n) = node {
            self.maybe_forget_node(n);
        }
    }

    /// A Pod was deleted.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        let Some(&ns) = self.ns_by_name.get(namespace) else {
            return;
        };
        let Some(id) = self.namespaces[ns].pods.remove(name) else {
            return;
        };
        self.unlink_pod(id);
        let handed_over = self.release_claims(id);
        let node = self.pods[id].node;
        self.pods.remove(id);
        for q in handed_over {
            self.relink(q);
        }
        if let Some(n) = node {
            self.nodes[n].refs -= 1;
            self.maybe_forget_node(n);
        }
        self.maybe_forget_namespace(ns);
    }

    /// The complete list of Pods (after a watch (re)start).
    pub fn reset_pods(&mut self, all: Vec<PodInfo>) {
        let keep: HashSet<(&str, &str)> = all
            .iter()
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        let gone: Vec<(String, String)> = self
            .pods
            .iter()
            .filter_map(|(_, p)| {
                let ns = self.namespaces[p.ns].name.as_str();
                (!keep.contains(&(ns, &*p.name))).then(|| (ns.to_string(), p.name.to_string()))
            })
            .collect();
        drop(keep);
        for (ns, name) in gone {
            self.delete_pod(&ns, &name);
        }
        self.pods.reserve(all.len());
        for p in all {
            self.apply_pod(p);
        }
    }

    /// Adds a pod's contributions: groups, span, set memberships, named ports.
    pub(super) fn link_pod(&mut self, id: PodId) {
        let p = &self.pods[id];
        if !p.member() {
            return;
        }
        let ns = &self.namespaces[p.ns];
        let mut groups: SmallVec<[GroupId; 4]> = ns
            .groups
            .values()
            .copied()
            .filter(|&g| self.groups[g].selector.matches(&p.labels))
            .collect();
        groups.sort_by(|&a, &b| self.groups[a].key.cmp(&self.groups[b].key));
        let sets: SmallVec<[SetId; 4]> = ns
            .scoped_sets
            .iter()
            .chain(ns.nssel_sets.iter())
            .copied()
            .filter(|&s| self.set_selects_labels(s, &p.labels))
            .collect();
        let endpoint = p.endpoint();
        for &s in &sets {
            self.join_set(id, s);
        }
        self.add_named_ports(id, 1);
        if let Some(node) = endpoint {
            self.nodes[node].pods.push(id);
            for &g in &groups {
                let span = &mut self.groups[g].span;
                *span.entry(node).or_insert(0) += 1;
                if span.len() == 1 {
                    // First endpoint: the PolicyGroup object is now needed.
                    self.dirty_group(g);
                }
            }
            self.dirty_node(node);
        }
        self.pods[id].groups = groups;
    }

    /// Removes everything `link_pod` added.
    pub(super) fn unlink_pod(&mut self, id: PodId) {
        let p = &mut self.pods[id];
        if !p.member() {
            return;
        }
        let groups = std::mem::take(&mut p.groups);
        let sets = p.sets.clone();
        let endpoint = p.endpoint();
        for s in sets {
            self.leave_set(id, s);
        }
        self.add_named_ports(id, -1);
        if let Some(node) = endpoint {
            self.nodes[node].pods.retain(|&x| x != id);
            for g in groups {
                span_remove(&mut self.groups[g].span, node);
                if self.groups[g].span.is_empty() {
                    self.dirty_group(g);
                }
            }
            self.dirty_node(node);
        }
    }

    pub(super) fn set_selects_labels(&self, s: SetId, labels: &Labels) -> bool {
        match &self.sets[s].key {
            PeerKey::Pods { pods: None, .. } => true,
            PeerKey::Pods {
                pods: Some(sel), ..
            } => sel.matches(labels),
            PeerKey::NamedPort { .. } => false,
        }
    }

    pub(super) fn join_set(&mut self, pod: PodId, s: SetId) {
        let p = &mut self.pods[pod];
        p.sets.push(s);
        let set = &mut self.sets[s];
        for ip in p.held_ips() {
            let n = set.ips.entry(ip).or_insert(0);
            *n += 1;
            if *n == 1 {
                let h = fingerprint::ip_member(ip);
                set.sum = set.sum.wrapping_add(h);
                if set.shards.add(h, objects::ip_weight(ip), h) {
                    set.shards.rebuild(set.ips.keys().map(|&ip| {
                        let h = fingerprint::ip_member(ip);
                        (h, objects::ip_weight(ip), h)
                    }));
                }
            }
        }
        if p.held != 0 {
            self.dirty_set(s);
        }
    }

    pub(super) fn leave_set(&mut self, pod: PodId, s: SetId) {
        let p = &mut self.pods[pod];
        p.sets.retain(|x| *x != s);
        let set = &mut self.sets[s];
        for ip in p.held_ips() {
            if let Some(n) = set.ips.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    set.ips.remove(&ip);
                    let h = fingerprint::ip_member(ip);
                    set.sum = set.sum.wrapping_sub(h);
                    set.shards.remove(h, objects::ip_weight(ip), h);
                }
            }
        }
        if p.held != 0 {
            self.dirty_set(s);
        }
    }

    /// Adds (+1) or removes (-1) a pod's (IP, named port) members.
    pub(super) fn add_named_ports(&mut self, pod: PodId, delta: i32) {
        let p = &self.pods[pod];
        if p.named_ports.is_empty() || p.held == 0 {
            return;
        }
        let mut touched: SmallVec<[SetId; 4]> = SmallVec::new();
        let budget = self.limits.peer_set_slice_bytes;
        for (name, protocol, port) in p.named_ports.iter() {
            let key = (name.clone(), *protocol);
            let entry = self
                .named_ports
                .entry(key.clone())
                .or_insert_with(|| PortMembers::new(budget));
            let protocol = *protocol;
            for ip in p.held_ips() {
                let h = fingerprint::port_member(ip, protocol, *port);
                let w = objects::port_weight(ip, protocol, *port);
                if delta > 0 {
                    let n = entry.members.entry((ip, *port)).or_insert(0);
                    *n += 1;
                    if *n == 1 {
                        entry.sum = entry.sum.wrapping_add(h);
                        if entry.shards.add(h, w, h) {
                            entry
                                .shards
                                .rebuild(entry.members.keys().map(|&(ip, port)| {
                                    let h = fingerprint::port_member(ip, protocol, port);
                                    (h, objects::port_weight(ip, protocol, port), h)
                                }));
                        }
                    }
                } else if let Some(n) = entry.members.get_mut(&(ip, *port)) {
                    *n -= 1;
                    if *n == 0 {
                        entry.members.remove(&(ip, *port));
                        entry.sum = entry.sum.wrapping_sub(h);
                        entry.shards.remove(h, w, h);
                    }
                }
            }
            match entry.set {
                Some(s) => touched.push(s),
                None if entry.members.is_empty() => {
                    self.named_ports.remove(&key);
                }
                None => {}
            }
        }
        for s in touched {
            self.dirty_set(s);
        }
    }

    // ----- Nodes ------------------------------------------------------
}
