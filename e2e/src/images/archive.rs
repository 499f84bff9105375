//! Writes an image archive: packs the layers, derives the configuration,
//! manifest and index, and writes the single tar that holds the OCI layout
//! and the docker-save `manifest.json` (module docs of [`super`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::oci::{
    self, Config, Descriptor, DockerManifest, Index, Layout, Manifest, RootFs, RunConfig,
};
use super::{DEFAULT_PATH, Error, ImageConfig, Layer, PackedLayer, reference};

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The image's name.
    pub tag: Tag,
    /// Bottom layer first.
    pub layers: Vec<Layer>,
    /// Entrypoint, env, user, workdir.
    pub config: ImageConfig,
    /// Where the archive is written (created when missing).
    pub out_dir: PathBuf,
}

/// How an image is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    /// This reference, e.g. `registry.k8s.io/pause:3.10.2` (normalized as
    /// the CRI does, see [`super::normalize_reference`]).
    Reference(String),
    /// `<repository>:<prefix><first 12 hex digits of the manifest digest>`:
    /// a new tag whenever the content changes, so a `helm upgrade` to a
    /// rebuilt image rolls the pods.
    Content {
        /// e.g. `ghcr.io/canal-dev/canal`.
        repository: String,
        /// e.g. `0.1.0-dev.`.
        prefix: String,
    },
}

/// A built image: import it with
/// `ctr -n k8s.io images import --local <path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageArchive {
    /// The full reference the image is imported as, e.g.
    /// `ghcr.io/canal-dev/canal:0.1.0-dev.0123456789ab`.
    pub reference: String,
    /// The archive.
    pub path: PathBuf,
    /// `sha256:<hex>` of the image manifest (what `ctr images ls` shows as
    /// the digest).
    pub digest: String,
    /// Bytes of the archive.
    pub size: u64,
}

impl ImageArchive {
    /// The reference without its tag (`image.repository` of a chart).
    pub fn repository(&self) -> &str {
        self.split().0
    }

    /// The tag (`image.tag` of a chart).
    pub fn tag(&self) -> &str {
        self.split().1
    }

    fn split(&self) -> (&str, &str) {
        // References are normalized when built: always repository:tag with
        // the tag after the last ':' (a registry port sits before a '/').
        self.reference
            .rsplit_once(':')
            .unwrap_or((self.reference.as_str(), ""))
    }
}

/// Builds the image `spec` describes into `spec.out_dir`. An archive with
/// the same digest and name already there is kept as it is.
pub fn build_image(spec: &ImageSpec) -> Result<ImageArchive, Error> {
    if spec.layers.is_empty() {
        return Err(Error::Invalid("an image needs at least one layer".into()));
    }
    std::fs::create_dir_all(&spec.out_dir)
        .map_err(|e| Error::io(format!("creating {}", spec.out_dir.display()), e))?;
    // Layers are packed next to the archive (same filesystem, no /tmp
    // space needed) and dropped with this directory.
    let work = tempfile::Builder::new()
        .prefix(".image-")
        .tempdir_in(&spec.out_dir)
        .map_err(|e| {
            Error::io(
                format!("creating a directory in {}", spec.out_dir.display()),
                e,
            )
        })?;
    let mut layers = Vec::with_capacity(spec.layers.len());
    for (i, layer) in spec.layers.iter().enumerate() {
        layers.push(layer.pack(&work.path().join(format!("layer-{i}.tar")))?);
    }
    let docs = Documents::new(&layers, &spec.config);
    let reference = match &spec.tag {
        Tag::Reference(r) => reference::parse(r)?,
        Tag::Content { repository, prefix } => {
            let hex = docs.manifest_digest.trim_start_matches("sha256:");
            reference::parse(&format!("{repository}:{prefix}{}", &hex[..12]))?
        }
    };
    let path = spec
        .out_dir
        .join(format!("{}.tar", file_stem(&reference.full())));
    let stamp = format!("{}\n{}\n", docs.manifest_digest, reference.full());
    let stamp_path = path.with_extension("tar.digest");
    if let (Ok(meta), Ok(old)) = (path.metadata(), std::fs::read_to_string(&stamp_path))
        && old == stamp
    {
        return Ok(ImageArchive {
            reference: reference.full(),
            path,
            digest: docs.manifest_digest,
            size: meta.len(),
        });
    }
    let tmp = work.path().join("archive.tar");
    let size = write_archive(&tmp, &docs, &layers, &reference)?;
    // Stamp removed first and written last: a crash in between leaves an
    // archive without a stamp, which the next build rewrites.
    let _ = std::fs::remove_file(&stamp_path);
    std::fs::rename(&tmp, &path)
        .map_err(|e| Error::io(format!("moving the archive to {}", path.display()), e))?;
    std::fs::write(&stamp_path, stamp)
        .map_err(|e| Error::io(format!("writing {}", stamp_path.display()), e))?;
    if let Tag::Content { repository, prefix } = &spec.tag {
        // Each rebuild of the binaries is a new tag; keep only the newest
        // archive of the series (a few hundred MB each). Images already
        // imported somewhere are not affected.
        let series = format!(
            "{}_{prefix}",
            file_stem(&reference::parse(&format!("{repository}:x"))?.repository)
        );
        remove_older(&spec.out_dir, &series, &path);
    }
    Ok(ImageArchive {
        reference: reference.full(),
        path,
        digest: docs.manifest_digest,
        size,
    })
}

/// Removes `<series>*.tar` (and stamps) in `dir` other than `keep`.
fn remove_older(dir: &Path, series: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let archive = name.strip_suffix(".digest").unwrap_or(&name);
        if name.starts_with(series) && archive.ends_with(".tar") && dir.join(archive) != keep {
            // Best effort: a file another build just removed is fine.
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A file name for a reference: `/` and `:` become `_`.
fn file_stem(reference: &str) -> String {
    reference.replace(['/', ':'], "_")
}

/// The serialized configuration and manifest of an image.
struct Documents {
    config: Vec<u8>,
    config_digest: String,
    manifest: Vec<u8>,
    manifest_digest: String,
}

impl Documents {
    fn new(layers: &[PackedLayer], image: &ImageConfig) -> Documents {
        let platform = oci::platform();
        let mut env = image.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.to_string());
        }
        let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        let config = Config {
            created: Some(oci::CREATED.to_string()),
            architecture: platform.architecture,
            os: platform.os,
            config: RunConfig {
                user: image.user.clone(),
                env: Some(env),
                entrypoint: non_empty(&image.entrypoint),
                cmd: non_empty(&image.cmd),
                working_dir: image.workdir.clone(),
                labels: (!image.labels.is_empty()).then(|| image.labels.clone()),
            },
            rootfs: RootFs {
                kind: "layers".to_string(),
                // Uncompressed layers: the diff_id is the blob's digest.
                diff_ids: layers.iter().map(|l| l.digest.clone()).collect(),
            },
            history: Vec::new(),
        };
        // Serializing these plain structs cannot fail (no maps with
        // non-string keys, no custom serializers).
        let config = serde_json::to_vec(&config).unwrap_or_default();
        let config_digest = oci::sha256(&config);
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(oci::MEDIA_MANIFEST.to_string()),
            config: descriptor(oci::MEDIA_CONFIG, &config_digest, config.len() as u64),
            layers: layers
                .iter()
                .map(|l| descriptor(oci::MEDIA_LAYER, &l.digest, l.size))
                .collect(),
        };
        let manifest = serde_json::to_vec(&manifest).unwrap_or_default();
        Documents {
            manifest_digest: oci::sha256(&manifest),
            config,
            config_digest,
            manifest,
        }
    }
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size,
        platform: None,
        annotations: BTreeMap::new(),
    }
}

/// The small files of the archive besides the blobs, by path.
fn top_files(
    docs: &Documents,
    layers: &[PackedLayer],
    r: &reference::Reference,
) -> BTreeMap<String, Vec<u8>> {
    let mut manifest = descriptor(
        oci::MEDIA_MANIFEST,
        &docs.manifest_digest,
        docs.manifest.len() as u64,
    );
    manifest.platform = Some(oci::platform());
    manifest.annotations = BTreeMap::from([
        (oci::ANNOTATION_CONTAINERD_NAME.to_string(), r.full()),
        (oci::ANNOTATION_REF_NAME.to_string(), r.tag.clone()),
    ]);
    let index = Index {
        schema_version: 2,
        media_type: Some(oci::MEDIA_INDEX.to_string()),
        manifests: vec![manifest],
    };
    let docker = vec![DockerManifest {
        config: oci::blob_path(&docs.config_digest),
        repo_tags: vec![r.full()],
        layers: layers.iter().map(|l| oci::blob_path(&l.digest)).collect(),
    }];
    let layout = Layout {
        image_layout_version: "1.0.0".to_string(),
    };
    // Plain structs: serialization cannot fail.
    BTreeMap::from([
        (
            "index.json".to_string(),
            serde_json::to_vec(&index).unwrap_or_default(),
        ),
        (
            "manifest.json".to_string(),
            serde_json::to_vec(&docker).unwrap_or_default(),
        ),
        (
            "oci-layout".to_string(),
            serde_json::to_vec(&layout).unwrap_or_default(),
        ),
    ])
}

fn write_archive(
    out: &Path,
    docs: &Documents,
    layers: &[PackedLayer],
    r: &reference::Reference,
) -> Result<u64, Error> {
    let ctx = |e: io::Error| Error::io(format!("writing {}", out.display()), e);
    let file = File::create(out).map_err(ctx)?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let entry = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        h
    };
    for dir in ["blobs", "blobs/sha256"] {
        tar.append_data(
            &mut entry(tar::EntryType::Directory, 0o755, 0),
            dir,
            io::empty(),
        )
        .map_err(ctx)?;
    }
    // Blobs in digest order, each once (two equal layers share a blob).
    let mut blobs: BTreeMap<&str, Blob> = BTreeMap::new();
    blobs.insert(&docs.config_digest, Blob::Bytes(&docs.config));
    blobs.insert(&docs.manifest_digest, Blob::Bytes(&docs.manifest));
    for l in layers {
        blobs.insert(&l.digest, Blob::File(l));
    }
    for (digest, blob) in blobs {
        let name = oci::blob_path(digest);
        match blob {
            Blob::Bytes(b) => tar
                .append_data(
                    &mut entry(tar::EntryType::Regular, 0o644, b.len() as u64),
                    &name,
                    b,
                )
                .map_err(ctx)?,
            Blob::File(l) => {
                let f = File::open(&l.path)
                    .map_err(|e| Error::io(format!("reading {}", l.path.display()), e))?;
                tar.append_data(
                    &mut entry(tar::EntryType::Regular, 0o644, l.size),
                    &name,
                    f.take(l.size),
                )
                .map_err(ctx)?;
            }
        }
    }
    for (name, bytes) in top_files(docs, layers, r) {
        tar.append_data(
            &mut entry(tar::EntryType::Regular, 0o644, bytes.len() as u64),
            &name,
            bytes.as_slice(),
        )
        .map_err(ctx)?;
    }
    let mut w = tar.into_inner().map_err(ctx)?;
    w.flush().map_err(ctx)?;
    let file = w.into_inner().map_err(|e| ctx(e.into_error()))?;
    file.sync_all().map_err(ctx)?;
    Ok(file.metadata().map_err(ctx)?.len())
}

enum Blob<'a> {
    Bytes(&'a [u8]),
    File(&'a PackedLayer),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_and_tag_of_an_archive() {
        let a = ImageArchive {
            reference: "localhost:5000/canal:0.1.0-dev.abc".into(),
            path: PathBuf::new(),
            digest: String::new(),
            size: 0,
        };
        assert_eq!(a.repository(), "localhost:5000/canal");
        assert_eq!(a.tag(), "0.1.0-dev.abc");
        assert_eq!(
            file_stem("ghcr.io/canal-dev/canal:0.1.0"),
            "ghcr.io_canal-dev_canal_0.1.0"
        );
    }

    #[test]
    fn default_path_is_added_once() {
        let layer = PackedLayer {
            path: PathBuf::new(),
            digest: "sha256:00".into(),
            size: 1,
        };
        let with = |env: Vec<String>| {
            let d = Documents::new(
                std::slice::from_ref(&layer),
                &ImageConfig {
                    env,
                    ..ImageConfig::default()
                },
            );
            let c: Config = serde_json::from_slice(&d.config).unwrap();
            c.config.env.unwrap()
        };
        assert_eq!(with(vec!["A=1".into()]), [DEFAULT_PATH, "A=1"]);
        assert_eq!(with(vec!["PATH=/x".into()]), ["PATH=/x"]);
    }
}
