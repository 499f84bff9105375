//! Which kernel objects belong to which CNI attachment, and what ADD and DEL
//! may therefore do with them. Pure.
//!
//! The host-side veth is named from the pod (`cali` + hash of
//! `namespace.pod`, the name the controller derives the pod's policy
//! endpoint from), so every sandbox of one pod wants the same name: when a
//! kubelet recreates a sandbox, the new sandbox's ADD finds the old one's
//! veth, and the old one's DEL finds the new one's. The name alone cannot
//! say whose a veth is, so ADD marks the host end with the attachment that
//! made it (the interface alias `canal:<container id>:<ifname>`), and DEL
//! deletes only a veth that carries its own mark. A veth without a mark
//! (made before marks existed, or by an ADD that died between creating and
//! marking it) counts as an attachment's only when it is paired with that
//! attachment's interface in that attachment's own namespace.

use std::net::IpAddr;

use super::result::{GATEWAY, GATEWAY_V6};
use crate::overlay::family::Family;

/// The prefix of every mark.
pub const MARK_PREFIX: &str = "canal:";

/// One CNI attachment: a container ID and its interface name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment<'a> {
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// CNI_IFNAME.
    pub ifname: &'a str,
}

impl Attachment<'_> {
    /// The mark (interface alias) of the host veth this attachment made.
    /// Fits the kernel's 255-byte alias: container IDs are at most
    /// [`super::config::MAX_CONTAINER_ID`] characters, interface names 15.
    pub fn mark(&self) -> String {
        format!("{MARK_PREFIX}{}:{}", self.container_id, self.ifname)
    }
}

/// The (container ID, interface) a mark names. Neither contains ':'.
pub fn parse_mark(alias: &str) -> Option<(&str, &str)> {
    let rest = alias.strip_prefix(MARK_PREFIX)?;
    let (container_id, ifname) = rest.split_once(':')?;
    (!container_id.is_empty() && !ifname.is_empty() && !ifname.contains(':'))
        .then_some((container_id, ifname))
}

/// What the kernel says about one link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkFacts {
    /// Interface index (in the link's own namespace).
    pub index: u32,
    /// Whether it is a veth.
    pub is_veth: bool,
    /// Its alias, if it has one.
    pub alias: Option<String>,
    /// The peer's index (IFLA_LINK), for a veth.
    pub peer: Option<u32>,
}

/// Whether `host` and `pod` are the two ends of one veth pair.
pub fn paired(host: &LinkFacts, pod: &LinkFacts) -> bool {
    host.is_veth && pod.is_veth && host.peer == Some(pod.index) && pod.peer == Some(host.index)
}

fn unmarked(link: &LinkFacts) -> bool {
    link.alias.as_deref().is_none_or(str::is_empty)
}

/// Whether the host veth belongs to `me`; `pod` is `me`'s interface in its
/// own namespace, when that could be looked at.
pub fn owns(me: &Attachment, host: &LinkFacts, pod: Option<&LinkFacts>) -> bool {
    host.is_veth
        && (host.alias.as_deref() == Some(me.mark().as_str())
            || (unmarked(host) && pod.is_some_and(|p| paired(host, p))))
}

/// Why ADD refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The container already has another interface on this network (CNI
    /// code 103): canal gives a pod one interface, the one the controller
    /// polices.
    SecondInterface { existing: String },
    /// The host veth's name is taken by a device that is not a veth.
    HostNameTaken { host_if: String },
    /// The container already has an interface of that name that canal did
    /// not make (the spec says ADD must then fail).
    PodInterfaceExists { ifname: String },
    /// The container's namespace has routes canal would have to replace.
    PodRoutesExist { routes: Vec<String> },
}

impl Refusal {
    /// Short message and details for the error document.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            Refusal::SecondInterface { existing } => (
                "the container already has an interface on this network",
                format!(
                    "canal-cni wires one interface per container and this container has {existing}; DEL it first, or use another network for a second interface"
                ),
            ),
            Refusal::HostNameTaken { host_if } => (
                "the host interface name is taken",
                format!(
                    "{host_if} exists on the node and is not a veth; canal-cni leaves it alone"
                ),
            ),
            Refusal::PodInterfaceExists { ifname } => (
                "the interface already exists in the container",
                format!(
                    "{ifname} exists in the container's namespace and canal-cni did not make it"
                ),
            ),
            Refusal::PodRoutesExist { routes } => (
                "the container's namespace already has routes canal-cni would replace",
                format!(
                    "{}; canal-cni adds the pod's default route and never replaces a route it did not make",
                    routes.join(", ")
                ),
            ),
        }
    }
}

/// What ADD does with the host veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddPlan {
    /// Nothing there: make the pair.
    Create,
    /// `me`'s pair is complete; (re)configure it. `mark`: it has no mark yet.
    Keep { mark: bool },
    /// A host veth of that name from another sandbox of the pod (or a
    /// half-made pair): delete it by index, then make the pair.
    Replace { stale: u32 },
    /// Change nothing.
    Refuse(Refusal),
}

/// Decides ADD from the host veth named for the pod, the container's
/// interface named CNI_IFNAME, and the container namespace's routes.
pub fn plan_add(
    me: &Attachment,
    host_if: &str,
    host: Option<&LinkFacts>,
    pod: Option<&LinkFacts>,
    pod_routes: &[RouteFacts],
) -> AddPlan {
    if let Some(h) = host {
        if !h.is_veth {
            return AddPlan::Refuse(Refusal::HostNameTaken {
                host_if: host_if.to_string(),
            });
        }
        if let Some((container_id, ifname)) = h.alias.as_deref().and_then(parse_mark)
            && container_id == me.container_id
            && ifname != me.ifname
        {
            return AddPlan::Refuse(Refusal::SecondInterface {
                existing: ifname.to_string(),
            });
        }
    }
    let ours = match (host, pod) {
        (Some(h), Some(p)) => owns(me, h, Some(p)) && paired(h, p),
        _ => false,
    };
    if pod.is_some() && !ours {
        return AddPlan::Refuse(Refusal::PodInterfaceExists {
            ifname: me.ifname.to_string(),
        });
    }
    let foreign = foreign_routes(pod_routes, pod.filter(|_| ours).map(|p| p.index));
    if !foreign.is_empty() {
        return AddPlan::Refuse(Refusal::PodRoutesExist { routes: foreign });
    }
    match host {
        Some(h) if ours => AddPlan::Keep {
            mark: h.alias.as_deref() != Some(me.mark().as_str()),
        },
        Some(h) => AddPlan::Replace { stale: h.index },
        None => AddPlan::Create,
    }
}

/// What DEL deletes: the index of the host veth when it is `me`'s. The
/// pod end goes with it; nothing else is touched (routes through the veth
/// go with the device).
pub fn plan_del(me: &Attachment, host: Option<&LinkFacts>, pod: Option<&LinkFacts>) -> Option<u32> {
    host.filter(|h| owns(me, h, pod)).map(|h| h.index)
}

/// Whether GC may delete `host` for `me`, a stale attachment whose address
/// is `ip` (the container's namespace is not known to GC): a veth with
/// `me`'s mark, or an unmarked veth (made before marks existed) that
/// carries the node's route to `me`'s recorded address.
pub fn gc_owns(me: &Attachment, host: &LinkFacts, ip: IpAddr, host_routes: &[RouteFacts]) -> bool {
    let routes_ip = || {
        host_routes
            .iter()
            .any(|r| r.dst == Some(ip) && r.is_host_route() && r.oif == Some(host.index))
    };
    owns(me, host, None) || (host.is_veth && unmarked(host) && routes_ip())
}

/// A route of the main table (either family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFacts {
    /// Its family.
    pub family: Family,
    /// Destination (None = default).
    pub dst: Option<IpAddr>,
    /// Prefix length.
    pub prefix: u8,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Output interface.
    pub oif: Option<u32>,
}

impl RouteFacts {
    /// A /32 (IPv4) or /128 (IPv6) route to one address.
    pub fn is_host_route(&self) -> bool {
        self.dst.is_some() && self.prefix == self.family.host_prefix()
    }

    fn describe(&self) -> String {
        let dst = match self.dst {
            None if self.prefix == 0 => "default".to_string(),
            dst => format!(
                "{}/{}",
                dst.unwrap_or(self.family.unspecified()),
                self.prefix
            ),
        };
        match (self.gateway, self.oif) {
            (Some(gw), _) => format!("{dst} via {gw}"),
            (None, Some(oif)) => format!("{dst} dev #{oif}"),
            (None, None) => dst,
        }
    }
}

/// The routes the pod's wiring would collide with: a default route (of
/// either family) or a route to a gateway that is not on `ours` (the pod
/// interface, when it is already canal's).
pub fn foreign_routes(routes: &[RouteFacts], ours: Option<u32>) -> Vec<String> {
    let gateways = [IpAddr::V4(GATEWAY), IpAddr::V6(GATEWAY_V6)];
    routes
        .iter()
        .filter(|r| {
            r.prefix == 0 || (r.is_host_route() && r.dst.is_some_and(|d| gateways.contains(&d)))
        })
        .filter(|r| ours.is_none() || r.oif != ours)
        .map(RouteFacts::describe)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Attachment = Attachment {
        container_id: "new",
        ifname: "eth0",
    };

    fn veth(index: u32, peer: u32, alias: Option<&str>) -> LinkFacts {
        LinkFacts {
            index,
            is_veth: true,
            alias: alias.map(str::to_string),
            peer: Some(peer),
        }
    }

    fn plan(host: Option<&LinkFacts>, pod: Option<&LinkFacts>) -> AddPlan {
        plan_add(&ME, "caliX", host, pod, &[])
    }

    #[test]
    fn marks_round_trip() {
        assert_eq!(ME.mark(), "canal:new:eth0");
        assert_eq!(parse_mark("canal:new:eth0"), Some(("new", "eth0")));
        for bad in [
            "",
            "canal:",
            "canal:x",
            "canal::eth0",
            "canal:x:",
            "other:x:eth0",
            "canal:x:a:b",
        ] {
            assert_eq!(parse_mark(bad), None, "{bad}");
        }
        let longest = Attachment {
            container_id: &"f".repeat(crate::cni::config::MAX_CONTAINER_ID),
            ifname: "abcdefghijklmno",
        };
        assert!(longest.mark().len() <= 255);
    }

    #[test]
    fn add_creates_keeps_or_replaces() {
        assert_eq!(plan(None, None), AddPlan::Create);
        // Our complete pair: keep it (and mark it when it has no mark).
        let host = veth(10, 2, Some("canal:new:eth0"));
        let pod = veth(2, 10, None);
        assert_eq!(plan(Some(&host), Some(&pod)), AddPlan::Keep { mark: false });
        let unmarked = veth(10, 2, None);
        assert_eq!(
            plan(Some(&unmarked), Some(&pod)),
            AddPlan::Keep { mark: true }
        );
        // The old sandbox's veth: replace it.
        let old = veth(10, 7, Some("canal:old:eth0"));
        assert_eq!(plan(Some(&old), None), AddPlan::Replace { stale: 10 });
        assert_eq!(
            plan(Some(&veth(10, 7, None)), None),
            AddPlan::Replace { stale: 10 }
        );
        // Ours by mark but its pod end is not here (another netns).
        assert_eq!(plan(Some(&host), None), AddPlan::Replace { stale: 10 });
    }

    #[test]
    fn add_refuses_what_it_would_have_to_destroy() {
        let eth0 = veth(10, 2, Some("canal:new:eth0"));
        let second = Attachment {
            ifname: "net1",
            ..ME
        };
        assert_eq!(
            plan_add(&second, "caliX", Some(&eth0), None, &[]),
            AddPlan::Refuse(Refusal::SecondInterface {
                existing: "eth0".into()
            })
        );
        let dummy = LinkFacts {
            index: 10,
            ..LinkFacts::default()
        };
        assert!(matches!(
            plan(Some(&dummy), None),
            AddPlan::Refuse(Refusal::HostNameTaken { .. })
        ));
        // The container has an eth0 that is not paired with our veth.
        let theirs = veth(2, 99, None);
        for host in [
            None,
            Some(&eth0),
            Some(&veth(10, 7, Some("canal:old:eth0"))),
        ] {
            assert!(
                matches!(
                    plan(host, Some(&theirs)),
                    AddPlan::Refuse(Refusal::PodInterfaceExists { .. })
                ),
                "{host:?}"
            );
        }
        // Paired, but with another container's mark (a reused namespace).
        let other = veth(10, 2, Some("canal:old:eth0"));
        assert!(matches!(
            plan(Some(&other), Some(&veth(2, 10, None))),
            AddPlan::Refuse(Refusal::PodInterfaceExists { .. })
        ));
    }

    #[test]
    fn add_never_replaces_a_route_it_did_not_make() {
        let default_elsewhere = RouteFacts {
            family: Family::V4,
            dst: None,
            prefix: 0,
            gateway: Some("10.99.0.254".parse().unwrap()),
            oif: Some(5),
        };
        let v6_default_elsewhere = RouteFacts {
            family: Family::V6,
            dst: None,
            prefix: 0,
            gateway: Some("fe80::1".parse().unwrap()),
            oif: Some(5),
        };
        let unrelated = RouteFacts {
            family: Family::V4,
            dst: Some("10.98.0.0".parse().unwrap()),
            prefix: 16,
            gateway: None,
            oif: Some(5),
        };
        match plan_add(
            &ME,
            "caliX",
            None,
            None,
            &[default_elsewhere.clone(), unrelated.clone()],
        ) {
            AddPlan::Refuse(Refusal::PodRoutesExist { routes }) => {
                assert_eq!(routes, vec!["default via 10.99.0.254".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan_add(&ME, "caliX", None, None, &[v6_default_elsewhere]),
            AddPlan::Refuse(Refusal::PodRoutesExist { .. })
        ));
        assert_eq!(
            plan_add(&ME, "caliX", None, None, &[unrelated]),
            AddPlan::Create
        );
        // Our own default route on our own interface is no conflict.
        let host = veth(10, 2, Some("canal:new:eth0"));
        let pod = veth(2, 10, None);
        let ours = RouteFacts {
            family: Family::V4,
            dst: None,
            prefix: 0,
            gateway: Some(IpAddr::V4(GATEWAY)),
            oif: Some(2),
        };
        assert_eq!(
            plan_add(&ME, "caliX", Some(&host), Some(&pod), &[ours]),
            AddPlan::Keep { mark: false }
        );
    }

    #[test]
    fn gc_deletes_marked_veths_and_unmarked_ones_routing_the_address() {
        let ip: IpAddr = "10.244.1.5".parse().unwrap();
        let route = |oif| RouteFacts {
            family: Family::V4,
            dst: Some(ip),
            prefix: 32,
            gateway: None,
            oif: Some(oif),
        };
        assert!(gc_owns(&ME, &veth(10, 2, Some("canal:new:eth0")), ip, &[]));
        assert!(!gc_owns(
            &ME,
            &veth(10, 2, Some("canal:newer:eth0")),
            ip,
            &[route(10)]
        ));
        assert!(gc_owns(&ME, &veth(10, 2, None), ip, &[route(10)]));
        assert!(!gc_owns(&ME, &veth(10, 2, None), ip, &[route(11)]));
        assert!(!gc_owns(&ME, &veth(10, 2, None), ip, &[]));
    }

    #[test]
    fn del_deletes_only_its_own_veth() {
        let mine = veth(10, 2, Some("canal:new:eth0"));
        assert_eq!(plan_del(&ME, Some(&mine), None), Some(10));
        let new_sandbox = veth(11, 3, Some("canal:newer:eth0"));
        assert_eq!(plan_del(&ME, Some(&new_sandbox), None), None);
        assert_eq!(plan_del(&ME, None, None), None);
        // Unmarked: ours only when paired with our own interface.
        let unmarked = veth(10, 2, None);
        assert_eq!(plan_del(&ME, Some(&unmarked), None), None);
        assert_eq!(
            plan_del(&ME, Some(&unmarked), Some(&veth(2, 10, None))),
            Some(10)
        );
        assert_eq!(
            plan_del(&ME, Some(&unmarked), Some(&veth(2, 11, None))),
            None
        );
        // Another interface of the same container is not ours.
        let net1 = Attachment {
            ifname: "net1",
            ..ME
        };
        assert_eq!(plan_del(&net1, Some(&mine), None), None);
        // Not a veth: never.
        let dummy = LinkFacts {
            index: 10,
            alias: Some(ME.mark()),
            ..LinkFacts::default()
        };
        assert_eq!(plan_del(&ME, Some(&dummy), None), None);
    }
}
