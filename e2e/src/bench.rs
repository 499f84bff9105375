//! What the latency benchmarks share: percentiles, and the "every node
//! enforces it" check they time against.

use std::collections::BTreeMap;
use std::time::Duration;

use canal_crds::condition::{ENFORCED, is_true};
use canal_crds::{NodePolicySet, PolicyGroup, PolicyGroupSpec};
use kube::api::{Api, ListParams};

/// The `p`th percentile (nearest rank) of `sorted`; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Whether each of the `nodes` NodePolicySets lists `policy` (`ns/name`)
/// when `present` (or does not when not), at the generation its agent
/// reports enforced. A failed read counts as not yet.
pub async fn policy_enforced_everywhere(
    client: &kube::Client,
    nodes: usize,
    policy: &str,
    present: bool,
) -> bool {
    let Ok(list) = Api::<NodePolicySet>::all(client.clone())
        .list(&ListParams::default())
        .await
    else {
        return false;
    };
    let Ok(groups) = Api::<PolicyGroup>::all(client.clone())
        .list(&ListParams::default())
        .await
    else {
        return false;
    };
    let groups: BTreeMap<String, PolicyGroupSpec> = groups
        .items
        .into_iter()
        .map(|g| (g.metadata.name.clone().unwrap_or_default(), g.spec))
        .collect();
    list.items.len() == nodes
        && list.items.iter().all(|nps| {
            let Ok(node) = canal_crds::assemble::assemble_node("", &nps.spec, |n| groups.get(n))
            else {
                return false;
            };
            let has = node.policies.iter().any(|p| p.name == policy);
            let status = nps.status.clone().unwrap_or_default();
            has == present
                && status.observed_generation == nps.metadata.generation
                && is_true(&status.conditions, ENFORCED)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(5));
        assert_eq!(percentile(&v, 90.0), Duration::from_millis(9));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(10));
        assert_eq!(percentile(&v, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
