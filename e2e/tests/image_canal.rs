//! The canal image end to end: built from the Dockerfile's description, a
//! debootstrap base and the workspace's release binaries; read back and
//! verified; unpacked, its binaries and tools run from it; built again, the
//! same archive. Needs root, debootstrap and (cold) Debian's mirror; builds
//! the release binaries when stale.

mod image_common;

use std::fs;

use object::{Object, ObjectSection};

use canal_e2e::images::{self, BaseSpec, CanalImageOptions, dockerfile, read_archive};

#[test]
fn canal_image_is_the_dockerfile_runtime_stage_and_runs() {
    let canal = images::canal_image(&CanalImageOptions::default()).unwrap();
    let df = dockerfile::load(&images::workspace_root().join("Dockerfile")).unwrap();

    // Named for the chart: repository as its default, a tag per content.
    assert_eq!(canal.repository(), images::CANAL_REPOSITORY);
    let hex = canal.digest.trim_start_matches("sha256:");
    assert_eq!(
        canal.tag(),
        format!("{}-dev.{}", env!("CARGO_PKG_VERSION"), &hex[..12])
    );

    let archive = read_archive(&canal.path).unwrap();
    let [image] = archive.images.as_slice() else {
        panic!("{:?}", archive.images)
    };
    assert_eq!(
        image.containerd_name.as_deref(),
        Some(canal.reference.as_str())
    );
    assert_eq!(image.docker_tags, std::slice::from_ref(&canal.reference));
    assert_eq!(image.manifest_digest, canal.digest);
    assert_eq!(image.config.entrypoint, df.entrypoint);
    assert_eq!(image.config.user, df.user);
    assert_eq!(image.config.env, [images::DEFAULT_PATH]);

    // Two layers: the cached base of the Dockerfile's packages, then the
    // binaries exactly as cargo built them.
    let base = images::debian_base(&BaseSpec::new(&df.suite, &df.packages)).unwrap();
    assert_eq!(image.layers.len(), 2);
    assert_eq!(image.layers[0], base.packed.digest);
    let installed = fs::read_to_string(&base.installed).unwrap();
    for p in &df.packages {
        assert!(
            installed.lines().any(|l| l.split(' ').next() == Some(p)),
            "{p} not installed:\n{installed}"
        );
    }

    let root = tempfile::tempdir().unwrap();
    images::extract_rootfs(&archive, image, root.path()).unwrap();
    for bin in images::release_binaries(false).unwrap() {
        let name = bin.file_name().unwrap().to_string_lossy().into_owned();
        let inside = root.path().join("usr/local/bin").join(&name);
        assert_eq!(
            fs::read(&inside).unwrap(),
            fs::read(&bin).unwrap(),
            "{name} differs from {}",
            bin.display()
        );
    }
    image_common::check_canal_rootfs(root.path(), image.config.user.as_deref());

    // Every real-kubelet node imports this archive (content and unpacked
    // snapshot): debug info once made it 622 MB and filled CI's disk.
    for bin in images::release_binaries(false).unwrap() {
        let bytes = fs::read(&bin).unwrap();
        let elf = object::File::parse(&*bytes).unwrap();
        let debug: Vec<&str> = elf
            .sections()
            .filter_map(|s| s.name().ok())
            .filter(|n| n.starts_with(".debug_"))
            .collect();
        assert!(
            debug.is_empty(),
            "{} ships debug sections {debug:?} ({} MB)",
            bin.display(),
            bytes.len() / 1_000_000
        );
    }
    assert!(
        canal.size < 300_000_000,
        "the image archive is {} MB; the budget is 300 MB",
        canal.size / 1_000_000
    );

    // Built again from the same inputs: the same archive, not rewritten.
    let written = fs::metadata(&canal.path).unwrap().modified().unwrap();
    let again = images::canal_image(&CanalImageOptions {
        build: false,
        ..CanalImageOptions::default()
    })
    .unwrap();
    assert_eq!(again, canal);
    assert_eq!(
        fs::metadata(&canal.path).unwrap().modified().unwrap(),
        written
    );
    eprintln!(
        "canal image {} ({} MB archive, layers {:?})",
        canal.reference,
        canal.size / 1_000_000,
        image.layers
    );
}
