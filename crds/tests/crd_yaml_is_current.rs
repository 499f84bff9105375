//! The CRD YAML committed in the Helm chart is exactly what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/canal/crds");
    let mut stale = vec![];
    for crd in canal_crds::crd::all() {
        let path = dir.join(canal_crds::crd::file_name(&crd));
        let expected = canal_crds::crd::to_yaml(&crd).unwrap();
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != expected {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale CRD YAML (run `cargo run -p canal-crds --bin crdgen`): {stale:?}"
    );
}
