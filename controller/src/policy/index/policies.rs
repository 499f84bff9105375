//! NetworkPolicies: activation, the groups they share and the PeerSets they reference.

use super::*;

impl PolicyIndex {
    /// A NetworkPolicy was added or changed.
    pub fn apply_policy(&mut self, np: &NetworkPolicy) {
        let namespace = np.metadata.namespace.as_deref().unwrap_or_default();
        let name = np.metadata.name.as_deref().unwrap_or_default();
        let result = compile::compile(&mut self.interner, np);
        let id = self.policy_id(namespace, name);
        self.policies[id].uid = np.metadata.uid.clone();
        match result {
            Ok(def) => {
                if self.policies[id].problem.take().is_some() {
                    let p = &self.policies[id];
                    self.reports.push(PolicyReport {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        uid: p.uid.clone(),
                        problem: None,
                        kept_previous: false,
                    });
                }
                if self.is_active_version(id, &def) {
                    return;
                }
                let new = self.activate(id, def);
                self.replace_active(id, Some(new));
            }
            Err(invalid) => self.record_problem(id, invalid.to_string()),
        }
    }

    pub(super) fn policy_id(&mut self, namespace: &str, name: &str) -> PolicyId {
        let full_name: Arc<str> = Arc::from(format!("{namespace}/{name}"));
        if let Some(&id) = self.policy_by_name.get(&full_name) {
            return id;
        }
        let ns = self.ns_id(namespace);
        self.namespaces[ns].policies += 1;
        let id = self.policies.insert(Policy {
            ns,
            namespace: namespace.to_string(),
            name: name.to_string(),
            full_name: full_name.clone(),
            uid: None,
            active: None,
            problem: None,
        });
        self.policy_by_name.insert(full_name, id);
        id
    }

    /// Reports a problem once (until it changes); the active version, if
    /// any, stays in force.
    pub(super) fn record_problem(&mut self, id: PolicyId, message: String) {
        let p = &mut self.policies[id];
        if p.problem.as_deref() != Some(message.as_str()) {
            p.problem = Some(message.clone());
            self.reports.push(PolicyReport {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                problem: Some(message),
                kept_previous: p.active.is_some(),
            });
        }
    }

    /// A NetworkPolicy was deleted.
    pub fn delete_policy(&mut self, namespace: &str, name: &str) {
        let full_name = format!("{namespace}/{name}");
        let Some(id) = self.policy_by_name.remove(full_name.as_str()) else {
            return;
        };
        self.replace_active(id, None);
        let ns = self.policies[id].ns;
        self.policies.remove(id);
        self.namespaces[ns].policies -= 1;
        self.maybe_forget_namespace(ns);
    }

    /// A NetworkPolicy that cannot even be read (it does not decode): it is
    /// reported like an invalid one, and a previous version stays in force.
    pub fn apply_invalid_policy(
        &mut self,
        namespace: &str,
        name: &str,
        uid: Option<String>,
        problem: String,
    ) {
        let id = self.policy_id(namespace, name);
        let p = &mut self.policies[id];
        p.uid = uid;
        self.record_problem(id, problem);
    }

    /// The complete list of NetworkPolicies (after a watch (re)start).
    pub fn reset_policies(&mut self, all: Vec<NetworkPolicy>) {
        self.reset_policies_keeping(all, Vec::new());
    }

    /// Like [`PolicyIndex::reset_policies`], also keeping the policies named
    /// in `undecodable` (listed, but not readable; the caller re-applies them
    /// with [`PolicyIndex::apply_invalid_policy`]).
    pub fn reset_policies_keeping(
        &mut self,
        all: Vec<NetworkPolicy>,
        undecodable: Vec<(String, String)>,
    ) {
        let mut keep: HashSet<(&str, &str)> = all
            .iter()
            .map(|p| {
                (
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        keep.extend(undecodable.iter().map(|(n, m)| (n.as_str(), m.as_str())));
        let gone: Vec<(String, String)> = self
            .policies
            .iter()
            .filter(|(_, p)| !keep.contains(&(p.namespace.as_str(), p.name.as_str())))
            .map(|(_, p)| (p.namespace.clone(), p.name.clone()))
            .collect();
        drop(keep);
        for (ns, name) in gone {
            self.delete_policy(&ns, &name);
        }
        self.policies.reserve(all.len());
        self.policy_by_name.reserve(all.len());
        for p in &all {
            self.apply_policy(p);
        }
    }

    pub(super) fn is_active_version(&self, id: PolicyId, def: &PolicyDef) -> bool {
        match &self.policies[id].active {
            Some(a) => {
                a.ingress == def.ingress
                    && a.egress == def.egress
                    && *a.compiled == def.compiled
                    && self.groups[a.group].selector == def.pod_selector
            }
            None => false,
        }
    }

    /// Takes references on the new version's group and PeerSets.
    pub(super) fn activate(&mut self, id: PolicyId, def: PolicyDef) -> Active {
        let ns = self.policies[id].ns;
        let key = def.pod_selector.canonical_text();
        let group = match self.namespaces[ns].groups.get(key.as_str()) {
            Some(&g) => g,
            None => self.create_group(ns, key.into_boxed_str(), def.pod_selector),
        };
        if !self.groups[group].policies.contains(&id) {
            let name = self.policies[id].full_name.clone();
            let pos = self.groups[group]
                .policies
                .partition_point(|&p| *self.policies[p].full_name < *name);
            self.groups[group].policies.insert(pos, id);
        }
        let mut sets = Vec::with_capacity(def.peer_sets.len());
        for r in def.peer_sets {
            let s = match self.set_by_name.get(r.name.as_str()) {
                Some(&s) => s,
                None => self.create_set(r),
            };
            self.sets[s].refs += 1;
            sets.push(s);
        }
        let compiled = Arc::new(def.compiled);
        let fp = fingerprint::hashed("policy", &(def.ingress, def.egress, &*compiled));
        let parts = objects::policy_part_keys(
            &compiled,
            def.ingress,
            def.egress,
            self.limits.policy_part_bytes(),
            fp,
        );
        self.add_parts(group, &parts);
        self.group_changed(group);
        Active {
            group,
            ingress: def.ingress,
            egress: def.egress,
            compiled,
            fp,
            sets,
            parts,
        }
    }

    pub(super) fn add_parts(&mut self, group: GroupId, parts: &[PartKey]) {
        let g = &mut self.groups[group];
        let mut rebuild = false;
        for p in parts {
            rebuild |= g.shards.add(p.position, p.weight, p.content);
        }
        if rebuild {
            let items: Vec<PartKey> = g
                .policies
                .iter()
                .filter_map(|&p| self.policies[p].active.as_ref())
                .filter(|a| a.group == group)
                .flat_map(|a| a.parts.iter().copied())
                .chain(parts.iter().copied())
                .collect();
            self.groups[group]
                .shards
                .rebuild(items.into_iter().map(|p| (p.position, p.weight, p.content)));
        }
    }

    /// Puts `new` in force and releases what the old version held.
    pub(super) fn replace_active(&mut self, id: PolicyId, new: Option<Active>) {
        let new_group = new.as_ref().map(|a| a.group);
        let old = std::mem::replace(&mut self.policies[id].active, new);
        let Some(old) = old else {
            return;
        };
        if let Some(g) = self.groups.get_mut(old.group) {
            for p in &old.parts {
                g.shards.remove(p.position, p.weight, p.content);
            }
        }
        if new_group != Some(old.group) {
            self.groups[old.group].policies.retain(|&p| p != id);
            self.group_changed(old.group);
            if self.groups[old.group].policies.is_empty() {
                self.remove_group(old.group);
            }
        }
        for s in old.sets {
            self.release_set(s);
        }
    }

    pub(super) fn create_group(&mut self, ns: NsId, key: Box<str>, selector: Selector) -> GroupId {
        let name: Arc<str> = Arc::from(canal_crds::policy_group::policy_group_name(
            &self.namespaces[ns].name,
            &key,
        ));
        let id = self.groups.insert(Group {
            ns,
            key: key.clone(),
            name: name.clone(),
            selector,
            policies: Vec::new(),
            span: HashMap::new(),
            fp: None,
            queued: false,
            shards: Shards::new(self.limits.policy_group_slice_bytes),
            dirty: false,
        });
        self.group_by_name.insert(name, id);
        self.dirty_group(id);
        self.namespaces[ns].groups.insert(key, id);
        let pods: Vec<PodId> = self.namespaces[ns].pods.values().copied().collect();
        for p in pods {
            let pod = &self.pods[p];
            if !pod.member() || !self.groups[id].selector.matches(&pod.labels) {
                continue;
            }
            let key = &self.groups[id].key;
            let pos = pod
                .groups
                .partition_point(|&g| self.groups[g].key.as_ref() < key.as_ref());
            let endpoint = pod.endpoint();
            self.pods[p].groups.insert(pos, id);
            if let Some(node) = endpoint {
                *self.groups[id].span.entry(node).or_insert(0) += 1;
            }
        }
        id
    }

    pub(super) fn remove_group(&mut self, id: GroupId) {
        let group = &self.groups[id];
        let ns = group.ns;
        let key = group.key.clone();
        let span: Vec<NodeId> = group.span.keys().copied().collect();
        let pods: Vec<PodId> = self.namespaces[ns].pods.values().copied().collect();
        for p in pods {
            self.pods[p].groups.retain(|g| *g != id);
        }
        for n in span {
            self.dirty_node(n);
        }
        self.namespaces[ns].groups.remove(&key);
        let name = self.groups[id].name.clone();
        self.group_by_name.remove(&name);
        self.dirty_pg_names.insert(name);
        self.groups.remove(id);
    }

    /// A group's policy list changed: its fingerprint and every node in
    /// its span must be recomputed.
    pub(super) fn group_changed(&mut self, id: GroupId) {
        self.dirty_group(id);
        let group = &mut self.groups[id];
        group.fp = None;
        if !group.queued {
            group.queued = true;
            self.stale_groups.push(id);
        }
        let span: SmallVec<[NodeId; 16]> = self.groups[id].span.keys().copied().collect();
        for n in span {
            self.dirty_node(n);
        }
    }

    // ----- PeerSets ---------------------------------------------------

    pub(super) fn create_set(&mut self, r: PeerRef) -> SetId {
        let PeerRef { name, key, key_fp } = r;
        let name: Arc<str> = Arc::from(name);
        // The rendered selector is a function of the key.
        let selector_fp = key_fp;
        let id = self.sets.insert(PeerSet {
            name: name.clone(),
            key: key.clone(),
            selector_fp,
            refs: 0,
            ips: BTreeMap::new(),
            sum: 0,
            shards: Shards::new(self.limits.peer_set_slice_bytes),
            dirty: false,
        });
        self.set_by_name.insert(name, id);
        self.dirty_set(id);
        match &key {
            PeerKey::Pods {
                scope: PeerScope::Namespace(ns),
                ..
            } => {
                let ns = self.ns_id(ns);
                self.namespaces[ns].scoped_sets.push(id);
                self.join_matching_pods(ns, id);
            }
            PeerKey::Pods {
                scope: PeerScope::Namespaces(sel),
                ..
            } => {
                self.nssel_sets.push(id);
                let matching: Vec<NsId> = self
                    .namespaces
                    .iter()
                    .filter(|(_, ns)| sel.matches(&ns.labels))
                    .map(|(id, _)| id)
                    .collect();
                for ns in matching {
                    self.namespaces[ns].nssel_sets.push(id);
                    self.join_matching_pods(ns, id);
                }
            }
            PeerKey::NamedPort { name, protocol } => {
                let budget = self.limits.peer_set_slice_bytes;
                self.named_ports
                    .entry((name.clone(), *protocol))
                    .or_insert_with(|| PortMembers::new(budget))
                    .set = Some(id);
            }
        }
        id
    }

    pub(super) fn join_matching_pods(&mut self, ns: NsId, set: SetId) {
        let pods: Vec<PodId> = self.namespaces[ns]
            .pods
            .values()
            .copied()
            .filter(|&p| {
                self.pods[p].member() && self.set_selects_labels(set, &self.pods[p].labels)
            })
            .collect();
        for p in pods {
            self.join_set(p, set);
        }
    }

    pub(super) fn release_set(&mut self, id: SetId) {
        let set = &mut self.sets[id];
        set.refs -= 1;
        if set.refs > 0 {
            return;
        }
        let key = set.key.clone();
        let name = set.name.clone();
        match &key {
            PeerKey::Pods {
                scope: PeerScope::Namespace(ns),
                ..
            } => {
                if let Some(&ns) = self.ns_by_name.get(ns.as_str()) {
                    self.namespaces[ns].scoped_sets.retain(|s| *s != id);
                    self.drop_members(ns, id);
                    self.maybe_forget_namespace(ns);
                }
            }
            PeerKey::Pods { .. } => {
                self.nssel_sets.retain(|s| *s != id);
                let matching: Vec<NsId> = self
                    .namespaces
                    .iter()
                    .filter(|(_, ns)| ns.nssel_sets.contains(&id))
                    .map(|(id, _)| id)
                    .collect();
                for ns in matching {
                    self.namespaces[ns].nssel_sets.retain(|s| *s != id);
                    self.drop_members(ns, id);
                }
            }
            PeerKey::NamedPort { name, protocol } => {
                let k = (name.clone(), *protocol);
                if let Some(entry) = self.named_ports.get_mut(&k) {
                    entry.set = None;
                    if entry.members.is_empty() {
                        self.named_ports.remove(&k);
                    }
                }
            }
        }
        self.set_by_name.remove(&name);
        self.sets.remove(id);
        self.dirty_ps_names.insert(name);
    }

    pub(super) fn drop_members(&mut self, ns: NsId, set: SetId) {
        let pods: Vec<PodId> = self.namespaces[ns].pods.values().copied().collect();
        for p in pods {
            self.pods[p].sets.retain(|s| *s != set);
        }
    }
}
