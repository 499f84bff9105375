//! The Prometheus registry each binary serves: the standard `process_*`
//! metrics (CPU, resident memory, open file descriptors, start time) and
//! `canal_build_info`, next to which the binary registers its own.

use prometheus::process_collector::ProcessCollector;
use prometheus::{IntGaugeVec, Opts, Registry};

/// A registry with the process collector and `canal_build_info` registered.
/// `component` names the binary (`controller`, `agent`).
pub fn registry(component: &str) -> Result<Registry, prometheus::Error> {
    let registry = Registry::new();
    registry.register(Box::new(ProcessCollector::for_self()))?;
    let info = IntGaugeVec::new(
        Opts::new(
            "canal_build_info",
            "Always 1; the labels say which component and version is running.",
        ),
        &["component", "version"],
    )?;
    info.with_label_values(&[component, env!("CARGO_PKG_VERSION")])
        .set(1);
    registry.register(Box::new(info))?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_and_build_info_are_served() {
        let r = registry("controller").unwrap();
        let names: Vec<String> = r.gather().iter().map(|f| f.name().to_string()).collect();
        assert!(names.contains(&"canal_build_info".to_string()), "{names:?}");
        assert!(
            names.contains(&"process_resident_memory_bytes".to_string()),
            "{names:?}"
        );
    }
}
