//! What a node's kernel holds (routes, neighbours, FDB), read with
//! iproute2's JSON output, and the checks `up` and the tests make on it.
//! Parsing and checks are pure.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::Error;
use crate::lab::netns;

/// One IPv4 route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination (`default` is 0.0.0.0/0).
    pub dst: Ipv4Net,
    /// Next hop.
    pub gateway: Option<Ipv4Addr>,
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
    /// IPv4 routes of the main table.
    pub routes: Vec<Route>,
    /// IPv4 neighbours.
    pub neighbours: Vec<Neighbour>,
    /// Bridge FDB entries (VXLAN devices included).
    pub fdb: Vec<FdbEntry>,
}

impl Snapshot {
    /// Routes to `dst` exactly.
    pub fn route_to(&self, dst: Ipv4Net) -> Option<&Route> {
        self.routes.iter().find(|r| r.dst == dst)
    }

    /// Whether anything (route, neighbour, FDB entry) still mentions a
    /// remote node: its pod subnet, the subnet's gateway address, its VTEP
    /// MAC or its underlay address.
    pub fn mentions(
        &self,
        pod_cidr: Ipv4Net,
        vtep_mac: &str,
        node_address: Ipv4Addr,
    ) -> Vec<String> {
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

/// Parses `ip -j -4 route show`.
pub fn parse_routes(json: &str) -> Result<Vec<Route>, String> {
    parse_list::<RawRoute>(json)?
        .into_iter()
        .map(|r| {
            let dst = if r.dst == "default" {
                Ipv4Net::default()
            } else if r.dst.contains('/') {
                r.dst
                    .parse()
                    .map_err(|e| format!("route dst {}: {e}", r.dst))?
            } else {
                let ip: Ipv4Addr = r
                    .dst
                    .parse()
                    .map_err(|e| format!("route dst {}: {e}", r.dst))?;
                Ipv4Net::from(ip)
            };
            Ok(Route {
                dst,
                gateway: r.gateway.and_then(|g| g.parse().ok()),
                dev: r.dev.unwrap_or_default(),
            })
        })
        .collect()
}

/// Parses `ip -j -4 neigh show`.
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

/// Reads a namespace's IPv4 routes (main table).
pub fn routes(netns_name: &str) -> Result<Vec<Route>, Error> {
    parse_routes(&netns::ip(&[
        "-n", netns_name, "-j", "-4", "route", "show",
    ])?)
    .map_err(|e| Error::Lab(format!("parsing routes of {netns_name}: {e}")))
}

/// Reads a namespace's routes, neighbours and FDB.
pub fn snapshot(netns_name: &str) -> Result<Snapshot, Error> {
    let bad = |what: &str, e: String| Error::Lab(format!("parsing {what} of {netns_name}: {e}"));
    let routes = routes(netns_name)?;
    let neighbours = parse_neighbours(&netns::ip(&[
        "-n", netns_name, "-j", "-4", "neigh", "show",
    ])?)
    .map_err(|e| bad("neighbours", e))?;
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
    /// `spec.podCIDR`, once the controller allocated it.
    pub pod_cidr: Option<Ipv4Net>,
}

/// What keeps the overlay from being complete: nodes without a subnet, and
/// for every node the other nodes' subnets it has no route to.
pub fn missing_routes(nodes: &[NodeView], routes: &BTreeMap<String, Vec<Route>>) -> Vec<String> {
    let mut missing = Vec::new();
    for node in nodes {
        if node.pod_cidr.is_none() {
            missing.push(format!("{} has no podCIDR yet", node.name));
        }
    }
    for node in nodes {
        let table = routes.get(&node.name).map(Vec::as_slice).unwrap_or(&[]);
        for other in nodes.iter().filter(|o| o.name != node.name) {
            if let Some(cidr) = other.pod_cidr
                && !table.iter().any(|r| r.dst == cidr)
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
        assert_eq!(routes[0].dst, Ipv4Net::default());
        assert_eq!(routes[1].gateway, Some("10.244.2.0".parse().unwrap()));
        assert_eq!(routes[2].dst, "10.244.1.7/32".parse::<Ipv4Net>().unwrap());
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
                pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
            },
            NodeView {
                name: "node-2".into(),
                pod_cidr: Some("10.244.2.0/24".parse().unwrap()),
            },
            NodeView {
                name: "node-3".into(),
                pod_cidr: None,
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
        let cidr = "10.244.2.0/24".parse().unwrap();
        let addr = "172.30.5.12".parse().unwrap();
        assert_eq!(snap.mentions(cidr, "0A:58:00:00:00:02", addr).len(), 3);
        let other = "10.244.3.0/24".parse().unwrap();
        assert!(
            snap.mentions(other, "0a:58:00:00:00:03", "172.30.5.13".parse().unwrap())
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
