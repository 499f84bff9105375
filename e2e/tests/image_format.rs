//! The image archive format, without a network or a Debian base: archives
//! of small synthetic layers are read back and checked the way importers
//! check them (digests, sizes, diff_ids, the docker-save manifest), their
//! layers unpacked and compared with the files they came from (also by GNU
//! tar, an independent reader), packed twice to the same bytes, and
//! tampered with in every way an importer must refuse.

mod image_common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use canal_e2e::images::{self, Entry, ImageConfig, ImageSpec, Layer, Tag, read_archive};
use sha2::{Digest, Sha256};

/// A root filesystem with the shapes that trip packers: a hard link, a
/// symlink, a path and a link target over tar's 100-byte fields, setuid,
/// a non-root owner, an empty directory, a file capability.
fn sample_rootfs(root: &Path) -> PathBuf {
    let long_dir = root
        .join("usr/share")
        .join("d".repeat(60))
        .join("e".repeat(60));
    fs::create_dir_all(&long_dir).unwrap();
    fs::write(long_dir.join("long-file"), "deep").unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("usr/bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(
        root.join("usr/bin/tool"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-alias")).unwrap();
    symlink("tool", root.join("usr/bin/tool-link")).unwrap();
    let long_target = format!("../share/{}/{}/long-file", "d".repeat(60), "e".repeat(60));
    symlink(&long_target, root.join("usr/bin/deep-link")).unwrap();
    fs::create_dir_all(root.join("home/user")).unwrap();
    fs::write(root.join("home/user/.profile"), "x=1\n").unwrap();
    std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::chown(root.join("home/user/.profile"), Some(1000), Some(1000)).unwrap();
    fs::create_dir_all(root.join("var/empty")).unwrap();
    fs::set_permissions(root.join("var/empty"), fs::Permissions::from_mode(0o1777)).unwrap();
    // cap_net_raw=ep, as `setcap` writes it (VFS_CAP_REVISION_2).
    let cap: [u8; 20] = [
        0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    fs::write(root.join("usr/bin/pinger"), "ping").unwrap();
    xattr::set(root.join("usr/bin/pinger"), "security.capability", &cap).unwrap();
    root.to_path_buf()
}

fn spec(rootfs: &Path, out: &Path) -> ImageSpec {
    ImageSpec {
        tag: Tag::Reference("canal.local/sample:1".into()),
        layers: vec![
            Layer::Dir(rootfs.to_path_buf()),
            Layer::Entries(vec![
                Entry::bytes("/usr/local/bin/hello", "hello\n", 0o755),
                Entry::symlink("/usr/local/bin/hi", "hello"),
                Entry::dir("/data", 0o700).owner(65532, 65532),
            ]),
        ],
        config: ImageConfig {
            entrypoint: vec!["/usr/local/bin/hello".into()],
            cmd: vec!["--flag".into()],
            env: vec!["A=1".into()],
            user: Some("65532:65532".into()),
            workdir: Some("/data".into()),
            labels: BTreeMap::from([("org.example".into(), "yes".into())]),
        },
        out_dir: out.to_path_buf(),
    }
}

#[test]
fn archive_reads_back_as_it_was_built() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = sample_rootfs(&tmp.path().join("rootfs"));
    let built = images::build_image(&spec(&rootfs, &tmp.path().join("out"))).unwrap();
    assert_eq!(built.reference, "canal.local/sample:1");
    assert_eq!(
        (built.repository(), built.tag()),
        ("canal.local/sample", "1")
    );
    assert_eq!(built.size, fs::metadata(&built.path).unwrap().len());

    let a = read_archive(&built.path).unwrap();
    assert!(a.has_docker_manifest);
    for name in ["oci-layout", "index.json", "manifest.json"] {
        assert!(
            a.entries.iter().any(|e| e == name),
            "{name} missing: {:?}",
            a.entries
        );
    }
    let [image] = a.images.as_slice() else {
        panic!("one image expected: {:?}", a.images)
    };
    assert_eq!(
        image.containerd_name.as_deref(),
        Some("canal.local/sample:1")
    );
    assert_eq!(image.ref_name.as_deref(), Some("1"));
    assert_eq!(image.docker_tags, ["canal.local/sample:1"]);
    assert_eq!(image.manifest_digest, built.digest);
    assert_eq!(image.platform, "amd64/linux");
    assert_eq!(image.layers.len(), 2);
    assert_eq!(image.config.entrypoint, ["/usr/local/bin/hello"]);
    assert_eq!(image.config.cmd, ["--flag"]);
    assert_eq!(image.config.env, [images::DEFAULT_PATH, "A=1"]);
    assert_eq!(image.config.user.as_deref(), Some("65532:65532"));
    assert_eq!(image.config.workdir.as_deref(), Some("/data"));
    assert_eq!(image.config.labels["org.example"], "yes");

    // Unpacked, the first layer is the directory it came from.
    let unpacked = tmp.path().join("unpacked");
    images::extract_rootfs(&a, image, &unpacked).unwrap();
    let mut want = image_common::tree(&rootfs);
    let got = image_common::tree(&unpacked);
    for (path, desc) in [
        ("data", "dir mode=700 owner=65532:65532"),
        ("usr/local", "dir mode=755 owner=0:0"),
        ("usr/local/bin", "dir mode=755 owner=0:0"),
        ("usr/local/bin/hi", "link -> hello mode=0 owner=0:0"),
    ] {
        want.insert(path.into(), desc.into());
    }
    want.insert(
        "usr/local/bin/hello".into(),
        format!(
            "file 6 cap=None sha={} mode=755 owner=0:0",
            hex::encode(Sha256::digest("hello\n"))
        ),
    );
    assert_eq!(got, want);
    // The hard link is one file again.
    let ino = |p: &str| fs::metadata(unpacked.join(p)).unwrap().ino();
    assert_eq!(ino("usr/bin/tool"), ino("usr/bin/tool-alias"));

    // GNU tar reads the layers the same way (long names, links, owners).
    let by_tar = tmp.path().join("by-tar");
    fs::create_dir(&by_tar).unwrap();
    let layers = tmp.path().join("layers");
    fs::create_dir(&layers).unwrap();
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&built.path)
        .arg("-C")
        .arg(&layers)
        .status()
        .unwrap();
    assert!(status.success());
    for layer in &image.layers {
        let blob = layers.join(layer.replace("sha256:", "blobs/sha256/"));
        let status = Command::new("tar")
            .args([
                "--same-owner",
                "--xattrs",
                "--xattrs-include=security.*",
                "-xpf",
            ])
            .arg(&blob)
            .arg("-C")
            .arg(&by_tar)
            .status()
            .unwrap();
        assert!(status.success(), "GNU tar could not read layer {layer}");
    }
    assert_eq!(image_common::tree(&by_tar), got);
}

#[test]
fn packing_twice_gives_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = sample_rootfs(&tmp.path().join("rootfs"));
    let first = images::build_image(&spec(&rootfs, &tmp.path().join("one"))).unwrap();
    // New mtimes and atimes, the same content.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    for e in walkdir::WalkDir::new(&rootfs) {
        let e = e.unwrap();
        if e.file_type().is_file() {
            let data = fs::read(e.path()).unwrap();
            let perm = fs::metadata(e.path()).unwrap().permissions();
            let caps = xattr::get(e.path(), "security.capability").unwrap();
            // Rewriting keeps the inode, so the hard link stays.
            fs::write(e.path(), &data).unwrap();
            fs::set_permissions(e.path(), perm).unwrap();
            if let Some(c) = caps {
                xattr::set(e.path(), "security.capability", &c).unwrap();
            }
        }
    }
    let second = images::build_image(&spec(&rootfs, &tmp.path().join("two"))).unwrap();
    assert_eq!(first.digest, second.digest);
    assert_eq!(
        fs::read(&first.path).unwrap(),
        fs::read(&second.path).unwrap()
    );

    // One byte more is another image, and a content tag follows it.
    fs::write(rootfs.join("usr/bin/tool"), "#!/bin/sh\necho tool!\n").unwrap();
    let mut changed = spec(&rootfs, &tmp.path().join("three"));
    changed.tag = Tag::Content {
        repository: "canal.local/sample".into(),
        prefix: "dev.".into(),
    };
    let third = images::build_image(&changed).unwrap();
    assert_ne!(third.digest, first.digest);
    let hex = third.digest.trim_start_matches("sha256:");
    assert_eq!(
        third.reference,
        format!("canal.local/sample:dev.{}", &hex[..12])
    );

    // The next build of the series replaces the older archive; another
    // image in the same directory stays.
    let other = images::build_image(&spec(&rootfs, &tmp.path().join("three"))).unwrap();
    fs::write(rootfs.join("usr/bin/tool"), "#!/bin/sh\necho tool!!\n").unwrap();
    let fourth = images::build_image(&changed).unwrap();
    assert_ne!(fourth.path, third.path);
    assert!(fourth.path.is_file());
    assert!(
        !third.path.exists(),
        "the older archive of the series stayed"
    );
    assert!(!third.path.with_extension("tar.digest").exists());
    assert!(other.path.is_file(), "an unrelated archive was removed");
}

#[test]
fn an_archive_on_disk_is_reused_only_when_its_stamp_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = sample_rootfs(&tmp.path().join("rootfs"));
    let out = tmp.path().join("out");
    let first = images::build_image(&spec(&rootfs, &out)).unwrap();
    let written = fs::metadata(&first.path).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = images::build_image(&spec(&rootfs, &out)).unwrap();
    assert_eq!(again, first);
    assert_eq!(
        fs::metadata(&first.path).unwrap().modified().unwrap(),
        written
    );
    // A damaged archive whose stamp was lost (a crash mid-write) is rebuilt.
    fs::write(&first.path, "garbage").unwrap();
    fs::remove_file(first.path.with_extension("tar.digest")).unwrap();
    let rebuilt = images::build_image(&spec(&rootfs, &out)).unwrap();
    assert_eq!(rebuilt.digest, first.digest);
    read_archive(&rebuilt.path).unwrap();
    // Leftovers of packing do not stay next to the archive.
    let names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn short_names_are_normalized_as_the_cri_looks_them_up() {
    let tmp = tempfile::tempdir().unwrap();
    let built = images::build_image(&ImageSpec {
        tag: Tag::Reference("busybox:1.36".into()),
        layers: vec![Layer::Entries(vec![Entry::bytes("/bin/sh", "x", 0o755)])],
        config: ImageConfig::default(),
        out_dir: tmp.path().to_path_buf(),
    })
    .unwrap();
    assert_eq!(built.reference, "docker.io/library/busybox:1.36");
    let a = read_archive(&built.path).unwrap();
    assert_eq!(
        a.images[0].containerd_name.as_deref(),
        Some("docker.io/library/busybox:1.36")
    );
    assert_eq!(a.images[0].docker_tags, ["docker.io/library/busybox:1.36"]);
}

#[test]
fn specs_no_runtime_could_use_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let with = |layers: Vec<Layer>, tag: &str| {
        images::build_image(&ImageSpec {
            tag: Tag::Reference(tag.into()),
            layers,
            config: ImageConfig::default(),
            out_dir: tmp.path().join("out"),
        })
    };
    assert!(with(vec![], "a:1").is_err(), "an image without layers");
    let one = || vec![Layer::Entries(vec![Entry::bytes("/a", "x", 0o644)])];
    assert!(with(one(), "Upper/Case:1").is_err());
    assert!(with(one(), "a@sha256:00").is_err());
    assert!(
        with(
            vec![Layer::Entries(vec![Entry::bytes("../a", "x", 0o644)])],
            "a:1"
        )
        .is_err()
    );
    // A rootfs with a device node or FIFO was not cleaned: refuse it.
    let dirty = tmp.path().join("dirty");
    fs::create_dir_all(dirty.join("dev")).unwrap();
    let fifo = dirty.join("dev/fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = with(vec![Layer::Dir(dirty)], "a:1").unwrap_err();
    assert!(err.to_string().contains("FIFO"), "{err}");
}

/// The archive's files by name, to tamper with.
fn unpack(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut a = tar::Archive::new(fs::File::open(path).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        out.push((name, data));
    }
    out
}

fn repack(files: &[(String, Vec<u8>)], path: &Path) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn blob_name(digest: &str) -> String {
    digest.replace("sha256:", "blobs/sha256/")
}

/// Replaces the blob `old` by `new` (named by its digest) and rewrites
/// every document that referred to `old` (descriptor digests and sizes,
/// diff_ids, docker-save paths), a rewritten manifest becoming a new blob
/// in turn: afterwards only what the test broke on purpose is wrong.
fn replace_blob(files: &mut Vec<(String, Vec<u8>)>, old: &str, new: Vec<u8>) -> String {
    let new_digest = sha(&new);
    let at = files
        .iter()
        .position(|(n, _)| *n == blob_name(old))
        .unwrap();
    files[at] = (blob_name(&new_digest), new.clone());
    let hex = old.trim_start_matches("sha256:");
    let referrers: Vec<String> = files
        .iter()
        .filter(|(n, d)| *n != blob_name(&new_digest) && String::from_utf8_lossy(d).contains(hex))
        .map(|(n, _)| n.clone())
        .collect();
    for name in referrers {
        let data = &files.iter().find(|(n, _)| *n == name).unwrap().1;
        let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(data) else {
            continue;
        };
        rewrite(&mut doc, old, &new_digest, new.len());
        let bytes = serde_json::to_vec(&doc).unwrap();
        if name.starts_with("blobs/") {
            replace_blob(files, &name.replace("blobs/sha256/", "sha256:"), bytes);
        } else {
            files.iter_mut().find(|(n, _)| *n == name).unwrap().1 = bytes;
        }
    }
    new_digest
}

fn rewrite(v: &mut serde_json::Value, old: &str, new: &str, size: usize) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            if m.get("digest").and_then(Value::as_str) == Some(old) {
                m.insert("size".into(), size.into());
            }
            m.values_mut().for_each(|c| rewrite(c, old, new, size));
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite(c, old, new, size)),
        Value::String(s) if s == old => *s = new.to_string(),
        Value::String(s) if *s == blob_name(old) => *s = blob_name(new),
        _ => {}
    }
}

#[test]
fn tampered_archives_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = sample_rootfs(&tmp.path().join("rootfs"));
    let built = images::build_image(&spec(&rootfs, &tmp.path().join("out"))).unwrap();
    let good = unpack(&built.path);
    let image = read_archive(&built.path).unwrap().images.remove(0);
    let bad = tmp.path().join("bad.tar");
    let refused = |files: &[(String, Vec<u8>)], want: &str| {
        repack(files, &bad);
        let err = read_archive(&bad).expect_err(want).to_string();
        assert!(err.contains(want), "expected {want:?} in: {err}");
    };
    // Repacked untouched, the archive is fine: the checks below fail for
    // what they break, not for the repacking.
    repack(&good, &bad);
    read_archive(&bad).unwrap();

    // A flipped byte in a layer.
    let mut files = good.clone();
    let layer_name = image.layers[0].replace("sha256:", "blobs/sha256/");
    let layer = files.iter_mut().find(|(n, _)| *n == layer_name).unwrap();
    layer.1[600] ^= 1;
    refused(&files, "has digest");

    // A layer missing.
    let files: Vec<_> = good
        .iter()
        .filter(|(n, _)| *n != layer_name)
        .cloned()
        .collect();
    refused(&files, "is not in the archive");

    // The docker manifest lists the layers in another order.
    let mut files = good.clone();
    let m = files
        .iter_mut()
        .find(|(n, _)| n == "manifest.json")
        .unwrap();
    let mut docker: serde_json::Value = serde_json::from_slice(&m.1).unwrap();
    docker[0]["Layers"].as_array_mut().unwrap().reverse();
    m.1 = serde_json::to_vec(&docker).unwrap();
    refused(&files, "manifest.json lists layers");

    // A configuration whose diff_id is not the layer's, every digest and
    // size consistent with it.
    let mut files = good.clone();
    let config_name = image.config_digest.replace("sha256:", "blobs/sha256/");
    let config = &files.iter().find(|(n, _)| *n == config_name).unwrap().1;
    let mut v: serde_json::Value = serde_json::from_slice(config).unwrap();
    v["rootfs"]["diff_ids"][0] = sha(b"another layer").into();
    replace_blob(
        &mut files,
        &image.config_digest,
        serde_json::to_vec(&v).unwrap(),
    );
    refused(&files, "has diff_id");

    // A layer that is not a tar, named by its own digest (the diff_id
    // follows it).
    let mut files = good.clone();
    replace_blob(&mut files, &image.layers[1], vec![0x42u8; 2048]);
    refused(&files, "is not a tar");

    // No OCI layout marker: not an OCI archive.
    let files: Vec<_> = good
        .iter()
        .filter(|(n, _)| n != "oci-layout")
        .cloned()
        .collect();
    refused(&files, "no oci-layout");
}
