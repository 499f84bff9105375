//! Reads an image archive back and checks it the way an importer would:
//! every blob's name is its digest, every descriptor's size and digest
//! match a blob, every layer is a readable uncompressed tar whose digest
//! is the `diff_id` the configuration lists, and a docker-save
//! `manifest.json`, when present, names the same config and layers as the
//! OCI index. Also reads OCI archives other tools write (`buildah push
//! --disable-compression ... oci-archive:`), which is how the Dockerfile's
//! image is compared with [`super::canal_image`]'s.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::oci::{self, Config, DockerManifest, Index, Layout, Manifest};
use super::{Error, ImageConfig};

/// What an archive holds, verified.
#[derive(Debug, Clone)]
pub struct ArchiveContents {
    /// The archive.
    pub path: PathBuf,
    /// One per manifest of `index.json`.
    pub images: Vec<ArchiveImage>,
    /// Whether a docker-save `manifest.json` is present (its entries were
    /// checked against the OCI index).
    pub has_docker_manifest: bool,
    /// Paths of the archive's entries in the order they appear.
    pub entries: Vec<String>,
}

/// One image of an archive.
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    /// The `io.containerd.image.name` annotation (the name containerd
    /// imports it as).
    pub containerd_name: Option<String>,
    /// The `org.opencontainers.image.ref.name` annotation.
    pub ref_name: Option<String>,
    /// The docker-save `RepoTags` of the same image.
    pub docker_tags: Vec<String>,
    /// `sha256:` of the manifest.
    pub manifest_digest: String,
    /// `sha256:` of the configuration (the image ID).
    pub config_digest: String,
    /// `architecture/os` of the configuration.
    pub platform: String,
    /// Entrypoint, env, user, workdir, labels.
    pub config: ImageConfig,
    /// `sha256:` of each layer blob, bottom first (the `diff_ids` too when
    /// uncompressed).
    pub layers: Vec<String>,
    /// Whether each layer blob is gzip-compressed.
    pub gzip: Vec<bool>,
    /// `sha256:` of each uncompressed layer (verified).
    pub diff_ids: Vec<String>,
}

/// A blob's place in the archive.
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    size: u64,
}

/// Reads and verifies the archive at `path`.
pub fn read_archive(path: &Path) -> Result<ArchiveContents, Error> {
    let bad = |reason: String| Error::Format {
        path: path.to_path_buf(),
        reason,
    };
    let io_err = |e: io::Error| Error::io(format!("reading {}", path.display()), e);
    let file = File::open(path).map_err(io_err)?;
    let mut tar = tar::Archive::new(file);
    let mut entries = Vec::new();
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    let mut blobs: HashMap<String, Span> = HashMap::new();
    for entry in tar.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        let name = entry.path().map_err(io_err)?.to_string_lossy().into_owned();
        let name = name.trim_start_matches("./").to_string();
        entries.push(name.clone());
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let span = Span {
            offset: entry.raw_file_position(),
            size: entry.size(),
        };
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            // Hash every blob, keep the small ones (JSON) in memory.
            let mut hasher = Sha256::new();
            let mut keep = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = entry.read(&mut buf).map_err(io_err)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                if span.size <= 4 << 20 {
                    keep.extend_from_slice(&buf[..n]);
                }
            }
            let got = hex::encode(hasher.finalize());
            if got != hex {
                return Err(bad(format!("blob {name} has digest sha256:{got}")));
            }
            let digest = format!("sha256:{hex}");
            if span.size <= 4 << 20 {
                small.insert(digest.clone(), keep);
            }
            blobs.insert(digest, span);
        } else {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).map_err(io_err)?;
            small.insert(name, data);
        }
    }
    let json = |key: &str| -> Result<&[u8], Error> {
        small
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| bad(format!("no {key}")))
    };
    let layout: Layout = parse(json("oci-layout")?, "oci-layout").map_err(bad)?;
    if layout.image_layout_version != "1.0.0" {
        return Err(bad(format!(
            "oci-layout version {}",
            layout.image_layout_version
        )));
    }
    let index: Index = parse(json("index.json")?, "index.json").map_err(bad)?;
    if index.manifests.is_empty() {
        return Err(bad("index.json lists no manifest".into()));
    }
    let check = |d: &oci::Descriptor| -> Result<(), Error> {
        match blobs.get(&d.digest) {
            None => Err(bad(format!(
                "{} {} is not in the archive",
                d.media_type, d.digest
            ))),
            Some(s) if s.size != d.size => Err(bad(format!(
                "{} is {} bytes, its descriptor says {}",
                d.digest, s.size, d.size
            ))),
            Some(_) => Ok(()),
        }
    };
    let docker: Option<Vec<DockerManifest>> = match small.get("manifest.json") {
        Some(b) => Some(parse(b, "manifest.json").map_err(bad)?),
        None => None,
    };
    let mut images = Vec::new();
    for desc in &index.manifests {
        check(desc)?;
        if desc.media_type != oci::MEDIA_MANIFEST && desc.media_type != oci::MEDIA_DOCKER_MANIFEST {
            return Err(bad(format!(
                "index entry of media type {}",
                desc.media_type
            )));
        }
        let manifest: Manifest =
            parse(json(&desc.digest)?, &format!("manifest {}", desc.digest)).map_err(bad)?;
        check(&manifest.config)?;
        let config: Config =
            parse(json(&manifest.config.digest)?, "the image configuration").map_err(bad)?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(bad(format!(
                "{} layers but {} diff_ids",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        let mut gzip = Vec::new();
        for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            check(layer)?;
            let gz = match layer.media_type.as_str() {
                oci::MEDIA_LAYER | oci::MEDIA_DOCKER_LAYER => false,
                oci::MEDIA_LAYER_GZIP | oci::MEDIA_DOCKER_LAYER_GZIP => true,
                other => return Err(bad(format!("layer {} is {other}", layer.digest))),
            };
            // The diff_id is the digest of the uncompressed tar: hash it
            // while reading every entry.
            let got = tar_diff_id(path, blobs[&layer.digest], gz)
                .map_err(|e| bad(format!("layer {} is not a tar: {e}", layer.digest)))?;
            if &got != diff_id {
                return Err(bad(format!(
                    "layer {} has diff_id {diff_id}, its content {got}",
                    layer.digest
                )));
            }
            gzip.push(gz);
            layers.push(layer.digest.clone());
        }
        let docker_tags = match &docker {
            None => Vec::new(),
            Some(entries) => {
                let config_path = oci::blob_path(&manifest.config.digest);
                let entry = entries
                    .iter()
                    .find(|e| e.config == config_path)
                    .ok_or_else(|| {
                        bad(format!(
                            "manifest.json has no entry for config {}",
                            manifest.config.digest
                        ))
                    })?;
                let want: Vec<String> = layers.iter().map(|d| oci::blob_path(d)).collect();
                if entry.layers != want {
                    return Err(bad(format!(
                        "manifest.json lists layers {:?}, the OCI manifest {want:?}",
                        entry.layers
                    )));
                }
                entry.repo_tags.clone()
            }
        };
        images.push(ArchiveImage {
            containerd_name: desc
                .annotations
                .get(oci::ANNOTATION_CONTAINERD_NAME)
                .cloned(),
            ref_name: desc.annotations.get(oci::ANNOTATION_REF_NAME).cloned(),
            docker_tags,
            manifest_digest: desc.digest.clone(),
            config_digest: manifest.config.digest.clone(),
            platform: format!("{}/{}", config.architecture, config.os),
            config: ImageConfig {
                entrypoint: config.config.entrypoint.clone().unwrap_or_default(),
                cmd: config.config.cmd.clone().unwrap_or_default(),
                env: config.config.env.clone().unwrap_or_default(),
                user: config.config.user.clone().filter(|u| !u.is_empty()),
                workdir: config.config.working_dir.clone().filter(|w| !w.is_empty()),
                labels: config.config.labels.clone().unwrap_or_default(),
            },
            layers,
            gzip,
            diff_ids: config.rootfs.diff_ids.clone(),
        });
    }
    Ok(ArchiveContents {
        path: path.to_path_buf(),
        images,
        has_docker_manifest: docker.is_some(),
        entries,
    })
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("{what}: {e}"))
}

fn blob_reader(path: &Path, span: Span) -> io::Result<io::Take<File>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(span.offset))?;
    Ok(f.take(span.size))
}

/// Reads every entry of a layer and returns `sha256:` of its uncompressed
/// bytes.
fn tar_diff_id(path: &Path, span: Span, gz: bool) -> io::Result<String> {
    let hashing = HashingReader {
        inner: layer_reader(path, span, gz)?,
        hasher: Sha256::new(),
    };
    let mut tar = tar::Archive::new(hashing);
    for e in tar.entries()? {
        io::copy(&mut e?, &mut io::sink())?;
    }
    let mut rest = tar.into_inner();
    io::copy(&mut rest, &mut io::sink())?;
    Ok(format!("sha256:{}", hex::encode(rest.hasher.finalize())))
}

fn layer_reader(path: &Path, span: Span, gz: bool) -> io::Result<Box<dyn Read>> {
    let raw = blob_reader(path, span)?;
    Ok(if gz {
        Box::new(flate2::read::GzDecoder::new(raw))
    } else {
        Box::new(raw)
    })
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the layers of `image` (of an archive read by [`read_archive`])
/// into `dest` as a runtime would: in order, owners and modes kept,
/// whiteouts (`.wh.<name>`, `.wh..wh..opq`) applied. Needs root for the
/// owners.
pub fn extract_rootfs(
    archive: &ArchiveContents,
    image: &ArchiveImage,
    dest: &Path,
) -> Result<(), Error> {
    let io_err = |what: String| move |e: io::Error| Error::io(what, e);
    let spans = blob_spans(&archive.path)?;
    std::fs::create_dir_all(dest).map_err(io_err(format!("creating {}", dest.display())))?;
    for (digest, gz) in image.layers.iter().zip(&image.gzip) {
        let span = *spans.get(digest).ok_or_else(|| Error::Format {
            path: archive.path.clone(),
            reason: format!("layer {digest} vanished"),
        })?;
        let ctx = format!("unpacking layer {digest} of {}", archive.path.display());
        let reader = layer_reader(&archive.path, span, *gz).map_err(io_err(ctx.clone()))?;
        let mut tar = tar::Archive::new(reader);
        tar.set_preserve_permissions(true);
        tar.set_preserve_ownerships(true);
        tar.set_unpack_xattrs(true);
        tar.set_overwrite(true);
        for entry in tar.entries().map_err(io_err(ctx.clone()))? {
            let mut entry = entry.map_err(io_err(ctx.clone()))?;
            let rel = entry.path().map_err(io_err(ctx.clone()))?.into_owned();
            let name = rel.file_name().map(|n| n.to_string_lossy().into_owned());
            let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
            match name.as_deref() {
                Some(".wh..wh..opq") => {
                    clear_dir(&parent)
                        .map_err(io_err(format!("{ctx}: opaque {}", parent.display())))?;
                    continue;
                }
                Some(n) if n.starts_with(".wh.") => {
                    let gone = parent.join(&n[4..]);
                    remove_any(&gone)
                        .map_err(io_err(format!("{ctx}: whiteout {}", gone.display())))?;
                    continue;
                }
                _ => {}
            }
            // A file replacing a directory of a lower layer (or the other
            // way round) replaces it whole.
            let target = dest.join(&rel);
            if let Ok(meta) = target.symlink_metadata() {
                let is_dir = entry.header().entry_type() == tar::EntryType::Directory;
                if meta.is_dir() != is_dir || (!is_dir && meta.file_type().is_symlink()) {
                    remove_any(&target)
                        .map_err(io_err(format!("{ctx}: replacing {}", target.display())))?;
                }
            }
            entry
                .unpack_in(dest)
                .map_err(io_err(format!("{ctx}: {}", rel.display())))?;
        }
    }
    Ok(())
}

fn blob_spans(path: &Path) -> Result<BTreeMap<String, Span>, Error> {
    let io_err = |e: io::Error| Error::io(format!("reading {}", path.display()), e);
    let mut tar = tar::Archive::new(File::open(path).map_err(io_err)?);
    let mut spans = BTreeMap::new();
    for entry in tar.entries().map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.path().map_err(io_err)?.to_string_lossy().into_owned();
        if let Some(hex) = name.trim_start_matches("./").strip_prefix("blobs/sha256/") {
            spans.insert(
                format!("sha256:{hex}"),
                Span {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
            );
        }
    }
    Ok(spans)
}

fn clear_dir(dir: &Path) -> io::Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for child in std::fs::read_dir(dir)? {
        remove_any(&child?.path())?;
    }
    Ok(())
}

fn remove_any(path: &Path) -> io::Result<()> {
    match path.symlink_metadata() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    }
}
