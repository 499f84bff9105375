//! Nodes: their podCIDRs and which pods are endpoints on them.

use super::*;

impl PolicyIndex {
    /// A Node was added or changed.
    pub fn apply_node(&mut self, info: NodeInfo) {
        let id = self.node_id(&info.name);
        let node = &mut self.nodes[id];
        if !node.exists {
            node.exists = true;
            self.dirty_node(id);
        }
        self.set_node_pod_cidrs(id, info.pod_cidrs);
    }

    /// A Node's pod subnets changed: its pods' claims are decided again.
    pub(super) fn set_node_pod_cidrs(&mut self, id: NodeId, cidrs: Vec<IpNet>) {
        if self.nodes[id].pod_cidrs == cidrs {
            return;
        }
        self.nodes[id].pod_cidrs = cidrs;
        let pods = self.nodes[id].pods.clone();
        for p in pods {
            self.reclaim(p);
        }
    }

    /// A Node was deleted: its NodePolicySet goes too.
    pub fn delete_node(&mut self, name: &str) {
        let Some(&id) = self.node_by_name.get(name) else {
            return;
        };
        let node = &mut self.nodes[id];
        if node.exists {
            node.exists = false;
            self.dirty_node(id);
        }
        // Its subnets are free for other Nodes: its pods hold nothing.
        self.set_node_pod_cidrs(id, Vec::new());
        self.maybe_forget_node(id);
    }

    /// The complete list of Nodes (after a watch (re)start).
    pub fn reset_nodes(&mut self, all: Vec<NodeInfo>) {
        let keep: HashSet<&str> = all.iter().map(|n| n.name.as_str()).collect();
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.exists && !keep.contains(&*n.name))
            .map(|(_, n)| n.name.to_string())
            .collect();
        drop(keep);
        for name in gone {
            self.delete_node(&name);
        }
        for n in all {
            self.apply_node(n);
        }
    }

    /// Names of the Nodes that exist.
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.exists)
            .map(|(_, n)| &*n.name)
    }

    /// Names of the PeerSets some policy references.
    pub fn peer_set_names(&self) -> impl Iterator<Item = &str> {
        self.sets.iter().map(|(_, s)| &*s.name)
    }

    pub(super) fn node_id(&mut self, name: &str) -> NodeId {
        if let Some(&id) = self.node_by_name.get(name) {
            return id;
        }
        let name: Arc<str> = Arc::from(name);
        let id = self.nodes.insert(Node {
            name: name.clone(),
            exists: false,
            pod_cidrs: Vec::new(),
            pods: Vec::new(),
            refs: 0,
            dirty: false,
        });
        self.node_by_name.insert(name, id);
        id
    }

    pub(super) fn maybe_forget_node(&mut self, id: NodeId) {
        let node = &self.nodes[id];
        if !node.exists && node.refs == 0 {
            let name = node.name.clone();
            self.dirty_nps_names.insert(name.clone());
            self.node_by_name.remove(&name);
            self.nodes.remove(id);
        }
    }

    // ----- NetworkPolicies --------------------------------------------
}
