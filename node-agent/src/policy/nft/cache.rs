//! What the nftables renderer keeps between syncs, so a sync re-renders
//! only what its inputs changed: every fragment of the table is stored
//! with the inputs it was rendered from and reused while they are equal
//! (policy chains and PeerSet sets by pointer, since the model shares them
//! between syncs while unchanged; endpoint chains, dispatch maps,
//! anti-spoofing and base chains by value, all small). Pure, no I/O; the
//! output equals a render without a cache (see the property test in
//! `render_tests.rs`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use canal_crds::{EndpointToHostAction, Protocol};

use crate::policy::antispoof::{SourceMap, SpoofReason};
use crate::policy::model::{
    AddressSet, Block, Direction, Families, Family, Isolation, PortSet, RuleModel,
};

use super::ruleset::{NftChain, NftRuleset, NftSet};

/// A set a policy chain references, by what it is rendered from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum SetRef {
    /// A PeerSet's addresses of one family.
    Address(String, Family),
    /// An ipBlock minus its excepts.
    Block(Block),
    /// A local named port.
    LocalPorts(Protocol, String, Family),
    /// A PeerSet's named ports of one family.
    PeerPorts(String, Family),
    /// A list of port ranges (more than one), whatever the protocol.
    Services(Vec<(u16, u16)>),
}

/// A rendered policy chain and what it was rendered from.
#[derive(Debug)]
pub(super) struct CachedChain {
    pub name: String,
    pub rules: Arc<Vec<RuleModel>>,
    pub families: Families,
    pub chain: NftChain,
    /// The sets it references (ids of [`NftCache::intern`]) and the name each had.
    pub refs: Vec<(usize, Option<String>)>,
}

/// An endpoint chain and what it was rendered from.
#[derive(Debug)]
struct CachedEndpoint {
    isolation: Isolation,
    log: bool,
    name: String,
    chain: NftChain,
}

/// A PeerSet's address set: the model set it came from, its name, the set.
pub(super) type CachedSet = (Arc<AddressSet>, String, NftSet);

type Antispoof = (
    SourceMap,
    Families,
    Vec<(String, NftChain)>,
    Vec<(String, NftSet)>,
    Vec<(String, SpoofReason)>,
);

/// What the renderer keeps between calls.
#[derive(Debug, Default)]
pub struct NftCache {
    /// PeerSet address sets per family (IPv4, IPv6), by PeerSet: (model
    /// set it came from, name, set).
    pub(super) sets: [HashMap<String, CachedSet>; 2],
    /// PeerSet named-port sets.
    pub(super) port_sets: HashMap<(String, Family), (Arc<PortSet>, NftSet)>,
    /// Policy chains by (policy, direction).
    pub(super) chains: HashMap<(String, Direction), CachedChain>,
    /// Set references by id (cached chains hold ids: checking one is an
    /// index, not a lookup by name).
    ref_ids: HashMap<SetRef, usize>,
    ref_list: Vec<SetRef>,
    endpoints: HashMap<(String, Direction), CachedEndpoint>,
    dispatch: Option<(BTreeSet<String>, NftSet, NftSet)>,
    antispoof: Option<Antispoof>,
    base: Option<(EndpointToHostAction, bool, [NftChain; 4])>,
}

/// The endpoint chains of one render: taken from the cache, put back after.
pub(super) struct EndpointChains {
    old: HashMap<(String, Direction), CachedEndpoint>,
    new: HashMap<(String, Direction), CachedEndpoint>,
}

impl EndpointChains {
    /// The chain of `iface` in `dir`: the cached one while its isolation
    /// and logging are unchanged, else `render()`'s (name, chain).
    pub fn get(
        &mut self,
        iface: &str,
        dir: Direction,
        isolation: &Isolation,
        log: bool,
        render: impl FnOnce() -> (String, NftChain),
    ) -> (String, NftChain) {
        let key = (iface.to_string(), dir);
        let cached = match self.old.remove(&key) {
            Some(c) if c.log == log && c.isolation == *isolation => c,
            _ => {
                let (name, chain) = render();
                CachedEndpoint {
                    isolation: isolation.clone(),
                    log,
                    name,
                    chain,
                }
            }
        };
        let out = (cached.name.clone(), cached.chain.clone());
        self.new.insert(key, cached);
        out
    }
}

impl NftCache {
    /// The id of `r`.
    pub(super) fn intern(&mut self, r: SetRef) -> usize {
        if let Some(id) = self.ref_ids.get(&r) {
            return *id;
        }
        let id = self.ref_list.len();
        self.ref_list.push(r.clone());
        self.ref_ids.insert(r, id);
        id
    }

    /// The reference of `id`.
    pub(super) fn set_ref(&self, id: usize) -> &SetRef {
        &self.ref_list[id]
    }

    /// Keeps the reference table within a few times what a render uses
    /// (`used`): past that it starts over, with the chains that hold ids.
    pub(super) fn bound_refs(&mut self, used: usize) {
        if self.ref_list.len() > 4 * used + 256 {
            self.ref_ids.clear();
            self.ref_list.clear();
            self.chains.clear();
        }
    }

    /// Anti-spoofing (prerouting and its sets) for `map`, rendered by
    /// `render` into `r` unless `map` and `families` are unchanged.
    pub(super) fn antispoof(
        &mut self,
        r: &mut NftRuleset,
        map: &SourceMap,
        families: Families,
        render: fn(&mut NftRuleset, &SourceMap, Families),
    ) {
        let hit = matches!(&self.antispoof, Some((m, f, ..)) if *f == families && m == map);
        if !hit {
            let mut part = NftRuleset::default();
            render(&mut part, map, families);
            self.antispoof = Some((
                map.clone(),
                families,
                part.chains.into_iter().collect(),
                part.sets.into_iter().collect(),
                part.spoof_rules.into_iter().collect(),
            ));
        }
        if let Some((_, _, chains, sets, spoof)) = &self.antispoof {
            r.chains.extend(chains.iter().cloned());
            r.sets.extend(sets.iter().cloned());
            r.spoof_rules.extend(spoof.iter().cloned());
        }
    }

    /// The endpoint chains of the previous render, for [`EndpointChains::get`].
    pub(super) fn take_endpoints(&mut self) -> EndpointChains {
        EndpointChains {
            old: std::mem::take(&mut self.endpoints),
            new: HashMap::new(),
        }
    }

    /// Keeps the endpoint chains this render used (the others are gone).
    pub(super) fn keep_endpoints(&mut self, e: EndpointChains) {
        self.endpoints = e.new;
    }

    /// The dispatch maps (to-wl, from-wl) of `ifaces`.
    pub(super) fn dispatch(
        &mut self,
        ifaces: &BTreeSet<String>,
        render: impl FnOnce() -> (NftSet, NftSet),
    ) -> (NftSet, NftSet) {
        match &self.dispatch {
            Some((have, to, from)) if have == ifaces => (to.clone(), from.clone()),
            _ => {
                let (to, from) = render();
                self.dispatch = Some((ifaces.clone(), to.clone(), from.clone()));
                (to, from)
            }
        }
    }

    /// forward, input, guard-forward, guard-input.
    pub(super) fn base_chains(
        &mut self,
        action: EndpointToHostAction,
        v6: bool,
        render: impl FnOnce() -> (NftChain, NftChain, NftChain, NftChain),
    ) -> (NftChain, NftChain, NftChain, NftChain) {
        let chains = match &self.base {
            Some((a, v, c)) if *a == action && *v == v6 => c.clone(),
            _ => {
                let (a, b, c, d) = render();
                let c = [a, b, c, d];
                self.base = Some((action, v6, c.clone()));
                c
            }
        };
        let [a, b, c, d] = chains;
        (a, b, c, d)
    }
}
