//! The repository's Dockerfile, built by buildah offline as CI builds it
//! (`--pull=never --network=none`, `BINARIES=prebuilt`, `RUNTIME_BASE` =
//! the debootstrap base of the runtime-base stage's packages): the result
//! is a valid OCI archive, its binaries and tools run from its rootfs, and
//! it is file for file the image the lab imports ([`images::canal_image`]),
//! with the same entrypoint, user and environment. buildah leaves nothing
//! behind on the machine.

mod image_common;

use std::path::Path;

use canal_e2e::images::{self, CanalImageOptions, DockerfileBuild, read_archive};

#[test]
fn ci_builds_the_dockerfile_into_the_lab_image() {
    let leaks = ["/etc/cni", "/var/lib/containers", "/run/containers"];
    let before: Vec<bool> = leaks.iter().map(|p| Path::new(p).exists()).collect();
    let lab = images::canal_image(&CanalImageOptions::default()).unwrap();
    let started = std::time::Instant::now();
    let oci = images::dockerfile_build(&DockerfileBuild {
        build: false,
        ..DockerfileBuild::default()
    })
    .unwrap();
    let took = started.elapsed();
    for (path, existed) in leaks.iter().zip(before) {
        assert_eq!(
            Path::new(path).exists(),
            existed,
            "buildah left {path} behind"
        );
    }

    let built = read_archive(&oci).unwrap();
    let [image] = built.images.as_slice() else {
        panic!("{:?}", built.images)
    };
    assert_eq!(image.ref_name.as_deref(), Some(images::DOCKERFILE_TAG));
    let lab_archive = read_archive(&lab.path).unwrap();
    let lab_image = &lab_archive.images[0];
    assert_eq!(image.platform, lab_image.platform);
    assert_eq!(image.config.entrypoint, lab_image.config.entrypoint);
    assert_eq!(image.config.user, lab_image.config.user);
    assert_eq!(image.config.env, lab_image.config.env);
    assert_eq!(image.config.cmd, lab_image.config.cmd);
    assert_eq!(image.config.workdir, lab_image.config.workdir);
    // buildah stacks its COPY layer on the very base layer the lab uses.
    assert_eq!(image.diff_ids.first(), lab_image.diff_ids.first());

    let dockerfile_root = tempfile::tempdir().unwrap();
    images::extract_rootfs(&built, image, dockerfile_root.path()).unwrap();
    image_common::check_canal_rootfs(dockerfile_root.path(), image.config.user.as_deref());
    let lab_root = tempfile::tempdir().unwrap();
    images::extract_rootfs(&lab_archive, lab_image, lab_root.path()).unwrap();
    let (want, got) = (
        image_common::tree(lab_root.path()),
        image_common::tree(dockerfile_root.path()),
    );
    let differ: Vec<String> = want
        .keys()
        .chain(got.keys())
        .filter(|k| want.get(*k) != got.get(*k))
        .take(20)
        .map(|k| format!("{k}: lab {:?}, Dockerfile {:?}", want.get(k), got.get(k)))
        .collect();
    assert!(
        differ.is_empty(),
        "the images differ:\n{}",
        differ.join("\n")
    );
    eprintln!(
        "Dockerfile built by buildah in {:.1}s; {} files, identical to {}",
        took.as_secs_f64(),
        got.len(),
        lab.reference
    );
}
