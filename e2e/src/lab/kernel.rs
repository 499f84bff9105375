//! What a node's kernel holds (routes, neighbours, FDB) of both IP
//! families, read with iproute2's JSON output, and the checks `up` and the
//! tests make on it. Parsing and checks are pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::Error;
use crate::lab::netns;

/// One route (either family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination (`default` is 0.0.0.0/0 or ::/0).
    pub dst: IpNet,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Output device.
    pub dev: String,
}

/// One neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// Address.
    pub ip: String,
    /// Link-layer address.
    pub lladdr: Option<String>,
    /// Device.
    pub dev: String,
    /// States (PERMANENT, REACHABLE, ...).
    pub state: Vec<String>,
}

/// One bridge FDB entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    /// MAC address.
    pub mac: String,
    /// Device.
    pub dev: String,
    /// Remote (VXLAN) destination.
    pub dst: Option<String>,
}

/// A node namespace's routing state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Routes of the main table, both families.
    pub routes: Vec<Route>,
    /// Neighbours, both families.
    pub neighbours: Vec<Neighbour>,
    /// Bridge FDB entries (VXLAN devices included).
    pub fdb: Vec<FdbEntry>,
}

impl Snapshot {
    /// Routes to `dst` exactly.
    pub fn route_to(&self, dst: impl Into<IpNet>) -> Option<&Route> {
        let dst = dst.into();
        self.routes.iter().find(|r| r.dst == dst)
    }

    /// Whether anything (route, neighbour, FDB entry) still mentions a
    /// remote node: its pod subnet, the subnet's gateway address, its VTEP
    /// MAC or its underlay address.
    pub fn mentions(
        &self,
        pod_cidr: impl Into<IpNet>,
        vtep_mac: &str,
        node_address: impl Into<IpAddr>,
    ) -> Vec<String> {
        let (pod_cidr, node_address) = (pod_cidr.into(), node_address.into());
        let gateway = pod_cidr.network().to_string();
        let address = node_address.to_string();
        let mut found = Vec::new();
        for r in &self.routes {
            if r.dst == pod_cidr || r.gateway == Some(pod_cidr.network()) {
                found.push(format!("route {r:?}"));
            }
        }
        for n in &self.neighbours {
            let permanent = n.state.iter().any(|s| s == "PERMANENT");
            if n.ip == gateway
                || (permanent
                    && n.lladdr
                        .as_deref()
                        .is_some_and(|m| m.eq_ignore_ascii_case(vtep_mac)))
            {
                found.push(format!("neighbour {n:?}"));
            }
        }
        for f in &self.fdb {
            if f.mac.eq_ignore_ascii_case(vtep_mac) || f.dst.as_deref() == Some(address.as_str()) {
                found.push(format!("fdb {f:?}"));
            }
        }
        found
    }
}

#[derive(Deserialize)]
struct RawRoute {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: Option<String>,
}

#[derive(Deserialize)]
struct RawNeighbour {
    dst: String,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

#[derive(Deserialize)]
struct RawFdb {
    mac: String,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    dst: Option<String>,
}

fn parse_list<T: for<'de> Deserialize<'de>>(json: &str) -> Result<Vec<T>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))
}

/// Parses `ip -j -4 route show` (or `-6`: `v6` says which, for `default`).
pub fn parse_routes_of(json: &str, v6: bool) -> Result<Vec<Route>, String> {
    parse_list::<RawRoute>(json)?
        .into_iter()
        .map(|r| {
            let dst = if r.dst == "default" {
                if v6 {
                    IpNet::V6(Ipv6Net::default())
                } else {
                    IpNet::V4(Ipv4Net::default())
                }
            } else if r.dst.contains('/') {
                r.dst
                    .parse()
                    .map_err(|e| format!("route dst {}: {e}", r.dst))?
            } else {
                let ip: IpAddr = r
                    .dst
                    .parse()
                    .map_err(|e| format!("route dst {}: {e}", r.dst))?;
                IpNet::from(ip)
            };
            Ok(Route {
                dst,
                gateway: r.gateway.and_then(|g| g.parse().ok()),
                dev: r.dev.unwrap_or_default(),
            })
        })
        .collect()
}

/// Parses `ip -j -4 route show`.
pub fn parse_routes(json: &str) -> Result<Vec<Route>, String> {
    parse_routes_of(json, false)
}

/// Parses `ip -j -4 neigh show` (or `-6`).
pub fn parse_neighbours(json: &str) -> Result<Vec<Neighbour>, String> {
    Ok(parse_list::<RawNeighbour>(json)?
        .into_iter()
        .map(|n| Neighbour {
            ip: n.dst,
            lladdr: n.lladdr,
            dev: n.dev.unwrap_or_default(),
            state: n.state,
        })
        .collect())
}

/// Parses `bridge -j fdb show`.
pub fn parse_fdb(json: &str) -> Result<Vec<FdbEntry>, String> {
    Ok(parse_list::<RawFdb>(json)?
        .into_iter()
        .map(|f| FdbEntry {
            mac: f.mac,
            dev: f.dev.unwrap_or_default(),
            dst: f.dst,
        })
        .collect())
}

/// Reads a namespace's routes of both families (main table).
pub fn routes(netns_name: &str) -> Result<Vec<Route>, Error> {
    let bad = |e| Error::Lab(format!("parsing routes of {netns_name}: {e}"));
    let mut routes = parse_routes_of(
        &netns::ip(&["-n", netns_name, "-j", "-4", "route", "show"])?,
        false,
    )
    .map_err(bad)?;
    routes.extend(
        parse_routes_of(
            &netns::ip(&["-n", netns_name, "-j", "-6", "route", "show"])?,
            true,
        )
        .map_err(bad)?,
    );
    Ok(routes)
}

/// Reads a namespace's routes, neighbours and FDB.
pub fn snapshot(netns_name: &str) -> Result<Snapshot, Error> {
    let bad = |what: &str, e: String| Error::Lab(format!("parsing {what} of {netns_name}: {e}"));
    let routes = routes(netns_name)?;
    let mut neighbours = parse_neighbours(&netns::ip(&[
        "-n", netns_name, "-j", "-4", "neigh", "show",
    ])?)
    .map_err(|e| bad("neighbours", e))?;
    neighbours.extend(
        parse_neighbours(&netns::ip(&[
            "-n", netns_name, "-j", "-6", "neigh", "show",
        ])?)
        .map_err(|e| bad("IPv6 neighbours", e))?,
    );
    let fdb = parse_fdb(&netns::run(
        std::process::Command::new("bridge").args(["-n", netns_name, "-j", "fdb", "show"]),
    )?)
    .map_err(|e| bad("the FDB", e))?;
    Ok(Snapshot {
        routes,
        neighbours,
        fdb,
    })
}

/// A node as the readiness check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// `spec.podCIDRs`, once the controller allocated them (empty before).
    pub pod_cidrs: Vec<IpNet>,
}

/// The podCIDRs of a Node object (`spec.podCIDRs`, else `spec.podCIDR`).
pub fn pod_cidrs(node: &k8s_openapi::api::core::v1::Node) -> Vec<IpNet> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    let listed: Vec<IpNet> = spec
        .pod_cidrs
        .iter()
        .flatten()
        .filter_map(|c| c.parse().ok())
        .collect();
    if listed.is_empty() {
        spec.pod_cidr
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect()
    } else {
        listed
    }
}

/// What keeps the overlay from being complete: nodes without a subnet, and
/// for every node the other nodes' subnets (each family's) it has no route
/// to.
pub fn missing_routes(nodes: &[NodeView], routes: &BTreeMap<String, Vec<Route>>) -> Vec<String> {
    let mut missing = Vec::new();
    for node in nodes {
        if node.pod_cidrs.is_empty() {
            missing.push(format!("{} has no podCIDR yet", node.name));
        }
    }
    for node in nodes {
        let table = routes.get(&node.name).map(Vec::as_slice).unwrap_or(&[]);
        for other in nodes.iter().filter(|o| o.name != node.name) {
            for cidr in other
                .pod_cidrs
                .iter()
                .filter(|c| !table.iter().any(|r| r.dst == **c))
            {
                missing.push(format!(
                    "{} has no route to {}'s {cidr}",
                    node.name, other.name
                ));
            }
        }
    }
    missing
}

/// Whether an agent /readyz answer (a raw HTTP response) says ready.
pub fn http_ok(response: &str) -> bool {
    response
        .lines()
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        == Some("200")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = r#"[{"dst":"default","gateway":"172.30.5.1","dev":"eth0","flags":[]},
        {"dst":"10.244.2.0/24","gateway":"10.244.2.0","dev":"flannel.1","flags":["onlink"]},
        {"dst":"10.244.1.7","dev":"cali123","scope":"link","flags":[]},
        {"dst":"172.30.5.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"172.30.5.11","flags":[]}]"#;

    #[test]
    fn routes_parse() {
        let routes = parse_routes(ROUTES).unwrap();
        assert_eq!(routes.len(), 4);
        assert_eq!(routes[0].dst, IpNet::V4(Ipv4Net::default()));
        assert_eq!(routes[1].gateway, Some("10.244.2.0".parse().unwrap()));
        assert_eq!(routes[2].dst, "10.244.1.7/32".parse::<IpNet>().unwrap());
        let v6 = parse_routes_of(
            r#"[{"dst":"default","gateway":"fd00:30::1","dev":"eth0"},{"dst":"fd00:10:244:2::/64","gateway":"fd00:10:244:2::","dev":"flannel-v6.1"},{"dst":"fd00:10:244:1::5","dev":"cali1"}]"#,
            true,
        )
        .unwrap();
        assert_eq!(v6[0].dst, IpNet::V6(Ipv6Net::default()));
        assert_eq!(v6[1].gateway, Some("fd00:10:244:2::".parse().unwrap()));
        assert_eq!(v6[2].dst.prefix_len(), 128);
        assert!(parse_routes("").unwrap().is_empty());
        assert!(parse_routes("[{\"dst\":\"nonsense\"}]").is_err());
    }

    #[test]
    fn neighbours_and_fdb_parse() {
        let n = parse_neighbours(
            r#"[{"dst":"10.244.2.0","dev":"flannel.1","lladdr":"0a:58:00:00:00:02","state":["PERMANENT"]}]"#,
        )
        .unwrap();
        assert_eq!(n[0].state, ["PERMANENT"]);
        let f = parse_fdb(
            r#"[{"mac":"0a:58:00:00:00:02","dev":"flannel.1","dst":"172.30.5.12","flags":[],"state":"permanent"}]"#,
        )
        .unwrap();
        assert_eq!(f[0].dst.as_deref(), Some("172.30.5.12"));
    }

    #[test]
    fn missing_routes_lists_each_gap() {
        let nodes = vec![
            NodeView {
                name: "node-1".into(),
                pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            },
            NodeView {
                name: "node-2".into(),
                pod_cidrs: vec!["10.244.2.0/24".parse().unwrap()],
            },
            NodeView {
                name: "node-3".into(),
                pod_cidrs: vec![],
            },
        ];
        let mut routes = BTreeMap::new();
        routes.insert("node-1".to_string(), parse_routes(ROUTES).unwrap());
        let missing = missing_routes(&nodes, &routes);
        assert_eq!(
            missing,
            [
                "node-3 has no podCIDR yet",
                "node-2 has no route to node-1's 10.244.1.0/24",
                "node-3 has no route to node-1's 10.244.1.0/24",
                "node-3 has no route to node-2's 10.244.2.0/24",
            ]
        );
    }

    #[test]
    fn mentions_of_a_removed_node() {
        let snap = Snapshot {
            routes: parse_routes(ROUTES).unwrap(),
            neighbours: parse_neighbours(
                r#"[{"dst":"10.244.2.0","dev":"flannel.1","lladdr":"0a:58:00:00:00:02","state":["PERMANENT"]}]"#,
            )
            .unwrap(),
            fdb: parse_fdb(r#"[{"mac":"0a:58:00:00:00:02","dev":"flannel.1","dst":"172.30.5.12"}]"#)
                .unwrap(),
        };
        let cidr: IpNet = "10.244.2.0/24".parse().unwrap();
        let addr: IpAddr = "172.30.5.12".parse().unwrap();
        assert_eq!(snap.mentions(cidr, "0A:58:00:00:00:02", addr).len(), 3);
        let other: IpNet = "10.244.3.0/24".parse().unwrap();
        let other_addr: IpAddr = "172.30.5.13".parse().unwrap();
        assert!(
            snap.mentions(other, "0a:58:00:00:00:03", other_addr)
                .is_empty()
        );
    }

    #[test]
    fn http_status() {
        assert!(http_ok("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"));
        assert!(!http_ok("HTTP/1.1 503 Service Unavailable\r\n\r\n"));
        assert!(!http_ok(""));
    }
}
