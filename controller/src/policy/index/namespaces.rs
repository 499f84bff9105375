//! Namespaces: their labels, and the namespace-selected PeerSets that follow them.

use super::*;

impl PolicyIndex {
    /// A Namespace was added or changed.
    pub fn apply_namespace(&mut self, info: NamespaceInfo) {
        let id = self.ns_id(&info.name);
        let labels = Labels::new(&mut self.interner, &info.labels);
        let ns = &mut self.namespaces[id];
        ns.exists = true;
        if ns.labels != labels {
            ns.labels = labels;
            self.refresh_namespace_sets(id);
        }
    }

    /// A Namespace was deleted.
    pub fn delete_namespace(&mut self, name: &str) {
        let Some(&id) = self.ns_by_name.get(name) else {
            return;
        };
        let ns = &mut self.namespaces[id];
        ns.exists = false;
        if ns.labels != Labels::default() {
            ns.labels = Labels::default();
            self.refresh_namespace_sets(id);
        }
        self.maybe_forget_namespace(id);
    }

    /// The complete list of Namespaces (after a watch (re)start).
    pub fn reset_namespaces(&mut self, all: Vec<NamespaceInfo>) {
        let keep: HashSet<&str> = all.iter().map(|n| n.name.as_str()).collect();
        let gone: Vec<String> = self
            .namespaces
            .iter()
            .filter(|(_, ns)| ns.exists && !keep.contains(ns.name.as_str()))
            .map(|(_, ns)| ns.name.to_string())
            .collect();
        drop(keep);
        for name in gone {
            self.delete_namespace(&name);
        }
        for ns in all {
            self.apply_namespace(ns);
        }
    }

    pub(super) fn ns_id(&mut self, name: &str) -> NsId {
        if let Some(&id) = self.ns_by_name.get(name) {
            return id;
        }
        let sym = self.interner.intern(name);
        let labels = Labels::default();
        let nssel_sets = self.nssel_sets_matching(&labels);
        let id = self.namespaces.insert(Namespace {
            name: sym.clone(),
            labels,
            exists: false,
            pods: HashMap::new(),
            groups: HashMap::new(),
            scoped_sets: Vec::new(),
            nssel_sets,
            policies: 0,
        });
        self.ns_by_name.insert(sym.as_arc().clone(), id);
        id
    }

    pub(super) fn maybe_forget_namespace(&mut self, id: NsId) {
        let ns = &self.namespaces[id];
        if !ns.exists
            && ns.pods.is_empty()
            && ns.groups.is_empty()
            && ns.scoped_sets.is_empty()
            && ns.policies == 0
        {
            let name = ns.name.as_arc().clone();
            self.ns_by_name.remove(&name);
            self.namespaces.remove(id);
        }
    }

    pub(super) fn namespace_selector(&self, set: SetId) -> Option<&Selector> {
        match &self.sets[set].key {
            PeerKey::Pods {
                scope: PeerScope::Namespaces(sel),
                ..
            } => Some(sel),
            _ => None,
        }
    }

    /// The namespace-selector sets whose selector matches `labels`.
    fn nssel_sets_matching(&self, labels: &Labels) -> Vec<SetId> {
        self.nssel_sets
            .iter()
            .copied()
            .filter(|&s| {
                self.namespace_selector(s)
                    .is_some_and(|sel| sel.matches(labels))
            })
            .collect()
    }

    /// Re-evaluates the namespace-selector sets against a namespace's labels.
    pub(super) fn refresh_namespace_sets(&mut self, id: NsId) {
        let new = self.nssel_sets_matching(&self.namespaces[id].labels);
        let old = std::mem::take(&mut self.namespaces[id].nssel_sets);
        let pods: Vec<PodId> = self.namespaces[id].pods.values().copied().collect();
        for &s in old.iter().filter(|s| !new.contains(s)) {
            for &p in &pods {
                if self.pods[p].sets.contains(&s) {
                    self.leave_set(p, s);
                }
            }
        }
        for &s in new.iter().filter(|s| !old.contains(s)) {
            for &p in &pods {
                if self.pods[p].member() && self.set_selects_labels(s, &self.pods[p].labels) {
                    self.join_set(p, s);
                }
            }
        }
        self.namespaces[id].nssel_sets = new;
    }

    // ----- Pods -------------------------------------------------------
}
