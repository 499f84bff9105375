//! Image layers: deterministic, uncompressed tars of a directory or of a
//! list of entries, hashed while they are written.
//!
//! Determinism is what lets a digest stand for content: entries are sorted
//! by path (parents first), every mtime is 0, owners are numeric without
//! names, and nothing of the packing machine (atime, inode numbers, user
//! names) reaches the tar. Hard links inside a directory stay hard links
//! (the first path in sort order carries the data), symlinks stay symlinks,
//! and the `security.capability` attribute (file capabilities set by
//! package scripts) is kept as a PAX record, as Docker does.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Error;

/// The mtime of every entry.
const MTIME: u64 = 0;
/// The only extended attribute carried into layers.
const CAPABILITY_XATTR: &str = "security.capability";

/// A layer already packed to a file: an uncompressed tar, so its digest is
/// also its `diff_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedLayer {
    /// The tar.
    pub path: PathBuf,
    /// `sha256:<hex>` of the file.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

/// One layer of an image, bottom first in [`super::ImageSpec::layers`].
#[derive(Debug, Clone)]
pub enum Layer {
    /// A packed layer (e.g. [`super::Base::layer`]), copied as it is.
    Packed(PackedLayer),
    /// Every file under a directory (the directory is the image's `/`),
    /// with the owners and modes it has on disk.
    Dir(PathBuf),
    /// Files, links and directories listed one by one; missing parent
    /// directories are added (`0755`, root).
    Entries(Vec<Entry>),
}

/// A file, link or directory of an [`Layer::Entries`] layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path in the image, e.g. `/usr/local/bin/canal-agent`.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (setuid/setgid/sticky included).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
}

/// The kinds of [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file with the contents of a file on this machine.
    File(PathBuf),
    /// A regular file with these contents.
    Bytes(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A directory.
    Dir,
}

impl Entry {
    /// A file copied from `source`, owned by root.
    pub fn file(path: impl Into<String>, source: impl Into<PathBuf>, mode: u32) -> Entry {
        Entry::new(path, EntryKind::File(source.into()), mode)
    }

    /// A file with the given contents, owned by root.
    pub fn bytes(path: impl Into<String>, data: impl Into<Vec<u8>>, mode: u32) -> Entry {
        Entry::new(path, EntryKind::Bytes(data.into()), mode)
    }

    /// A symbolic link.
    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Entry {
        Entry::new(path, EntryKind::Symlink(target.into()), 0o777)
    }

    /// A directory, owned by root.
    pub fn dir(path: impl Into<String>, mode: u32) -> Entry {
        Entry::new(path, EntryKind::Dir, mode)
    }

    /// The same entry with another owner.
    pub fn owner(mut self, uid: u64, gid: u64) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }

    fn new(path: impl Into<String>, kind: EntryKind, mode: u32) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
        }
    }
}

impl Layer {
    /// Packs this layer into `out` (a [`Layer::Packed`] is returned as it
    /// is, `out` untouched).
    pub(crate) fn pack(&self, out: &Path) -> Result<PackedLayer, Error> {
        match self {
            Layer::Packed(p) => Ok(p.clone()),
            Layer::Dir(dir) => pack_dir(dir, out),
            Layer::Entries(entries) => pack_entries(entries, out),
        }
    }
}

/// A writer that hashes and counts what passes through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// `(inner, "sha256:<hex>", bytes)`.
    pub fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (self.inner, digest, self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type TarBuilder = tar::Builder<HashingWriter<BufWriter<File>>>;

fn start(out: &Path) -> Result<TarBuilder, Error> {
    let file =
        File::create(out).map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    Ok(tar::Builder::new(HashingWriter::new(
        BufWriter::with_capacity(1 << 20, file),
    )))
}

fn finish(builder: TarBuilder, out: &Path) -> Result<PackedLayer, Error> {
    let ctx = |e| Error::io(format!("writing {}", out.display()), e);
    let hashing = builder.into_inner().map_err(ctx)?;
    let (writer, digest, size) = hashing.finish();
    let file = writer.into_inner().map_err(|e| ctx(e.into_error()))?;
    file.sync_all().map_err(ctx)?;
    Ok(PackedLayer {
        path: out.to_path_buf(),
        digest,
        size,
    })
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

/// Packs every entry under `root` (not `root` itself) into the tar `out`.
pub(crate) fn pack_dir(root: &Path, out: &Path) -> Result<PackedLayer, Error> {
    let mut builder = start(out)?;
    let io_err = |what: &Path, e: io::Error| Error::io(format!("packing {}", what.display()), e);
    // (dev, inode) of files with several links -> the path packed first.
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let walk = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for item in walk {
        let item = item.map_err(|e| {
            let path = e.path().unwrap_or(root).to_path_buf();
            io_err(&path, e.into())
        })?;
        let path = item.path();
        let rel = path.strip_prefix(root).map_err(|_| {
            Error::Invalid(format!("{} is outside {}", path.display(), root.display()))
        })?;
        let meta = path.symlink_metadata().map_err(|e| io_err(path, e))?;
        let ft = meta.file_type();
        let (uid, gid, mode) = (meta.uid() as u64, meta.gid() as u64, meta.mode());
        if let Some(cap) = capability(path) {
            builder
                .append_pax_extensions([(
                    format!("SCHILY.xattr.{CAPABILITY_XATTR}").as_str(),
                    cap.as_slice(),
                )])
                .map_err(|e| io_err(path, e))?;
        }
        if ft.is_dir() {
            let mut h = header(tar::EntryType::Directory, mode, uid, gid, 0);
            builder
                .append_data(&mut h, rel, io::empty())
                .map_err(|e| io_err(path, e))?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path).map_err(|e| io_err(path, e))?;
            let mut h = header(tar::EntryType::Symlink, 0o777, uid, gid, 0);
            builder
                .append_link(&mut h, rel, &target)
                .map_err(|e| io_err(path, e))?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = links.get(&key) {
                    let mut h = header(tar::EntryType::Link, mode, uid, gid, 0);
                    builder
                        .append_link(&mut h, rel, first)
                        .map_err(|e| io_err(path, e))?;
                    continue;
                }
                links.insert(key, rel.to_path_buf());
            }
            let file = File::open(path).map_err(|e| io_err(path, e))?;
            let mut h = header(tar::EntryType::Regular, mode, uid, gid, meta.len());
            builder
                .append_data(&mut h, rel, file.take(meta.len()))
                .map_err(|e| io_err(path, e))?;
        } else {
            // Device nodes, FIFOs and sockets belong to a running system,
            // not to an image (the runtime makes /dev): fail rather than
            // pack a rootfs that was not cleaned.
            let what = if ft.is_block_device() || ft.is_char_device() {
                "a device node"
            } else if ft.is_fifo() {
                "a FIFO"
            } else {
                "a socket"
            };
            return Err(Error::Invalid(format!(
                "{} is {what}; images hold files, links and directories only",
                path.display()
            )));
        }
    }
    finish(builder, out)
}

fn capability(path: &Path) -> Option<Vec<u8>> {
    // Only files can carry capabilities, and a filesystem without xattrs
    // has none to lose.
    xattr::get(path, CAPABILITY_XATTR).ok().flatten()
}

/// Packs a list of entries into the tar `out`.
pub(crate) fn pack_entries(entries: &[Entry], out: &Path) -> Result<PackedLayer, Error> {
    let tree = with_parents(entries)?;
    let mut builder = start(out)?;
    for (rel, entry) in &tree {
        let io_err = |e| Error::io(format!("packing /{rel}"), e);
        match &entry.kind {
            EntryKind::Dir => {
                let mut h = header(
                    tar::EntryType::Directory,
                    entry.mode,
                    entry.uid,
                    entry.gid,
                    0,
                );
                builder
                    .append_data(&mut h, rel, io::empty())
                    .map_err(io_err)?;
            }
            EntryKind::Symlink(target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, entry.uid, entry.gid, 0);
                builder.append_link(&mut h, rel, target).map_err(io_err)?;
            }
            EntryKind::Bytes(data) => {
                let mut h = header(
                    tar::EntryType::Regular,
                    entry.mode,
                    entry.uid,
                    entry.gid,
                    data.len() as u64,
                );
                builder
                    .append_data(&mut h, rel, data.as_slice())
                    .map_err(io_err)?;
            }
            EntryKind::File(source) => {
                let src_err = |e| Error::io(format!("reading {}", source.display()), e);
                let file = File::open(source).map_err(src_err)?;
                let len = file.metadata().map_err(src_err)?.len();
                let mut h = header(
                    tar::EntryType::Regular,
                    entry.mode,
                    entry.uid,
                    entry.gid,
                    len,
                );
                // take(): a file that grows while packed must not overrun
                // the size in its header.
                builder
                    .append_data(&mut h, rel, file.take(len))
                    .map_err(io_err)?;
            }
        }
    }
    finish(builder, out)
}

/// The entries keyed by their path relative to `/`, in tar order, with the
/// missing parent directories added. Pure, so the path rules are tested
/// without packing.
fn with_parents(entries: &[Entry]) -> Result<BTreeMap<String, Entry>, Error> {
    let mut tree = BTreeMap::new();
    for e in entries {
        let rel = relative(&e.path)?;
        if tree.insert(rel.clone(), e.clone()).is_some() {
            return Err(Error::Invalid(format!("{} is listed twice", e.path)));
        }
    }
    let mut parents = Vec::new();
    for rel in tree.keys() {
        let mut p = Path::new(rel.as_str()).parent();
        while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
            parents.push(dir.to_string_lossy().into_owned());
            p = dir.parent();
        }
    }
    for dir in parents {
        match tree.get(&dir) {
            Some(e) if e.kind != EntryKind::Dir => {
                return Err(Error::Invalid(format!(
                    "/{dir} is a parent of other entries but not a directory"
                )));
            }
            Some(_) => {}
            None => {
                tree.insert(dir.clone(), Entry::dir(format!("/{dir}"), 0o755));
            }
        }
    }
    // A BTreeMap of strings sorts "a/b" after "a" and "a-b" before "a/b";
    // both put every parent before its children, which is all tar needs.
    Ok(tree)
}

fn relative(path: &str) -> Result<String, Error> {
    let rel = path
        .strip_prefix('/')
        .ok_or_else(|| Error::Invalid(format!("{path:?}: image paths are absolute")))?
        .trim_end_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(Error::Invalid(format!(
            "{path:?}: expected a normalized path below /"
        )));
    }
    Ok(rel.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_added_before_children() {
        let tree = with_parents(&[
            Entry::bytes("/usr/local/bin/b", "b", 0o755),
            Entry::bytes("/usr/local/bin/a", "a", 0o755),
            Entry::dir("/usr", 0o700),
        ])
        .unwrap();
        let keys: Vec<&str> = tree.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/a",
                "usr/local/bin/b"
            ]
        );
        // An explicit directory keeps its own mode.
        assert_eq!(tree["usr"].mode, 0o700);
        assert_eq!(tree["usr/local"].mode, 0o755);
    }

    #[test]
    fn bad_paths_are_rejected() {
        for p in ["usr/bin", "/", "/a/../b", "/a//b", "/./a"] {
            assert!(with_parents(&[Entry::dir(p, 0o755)]).is_err(), "{p:?}");
        }
        let dup = [Entry::dir("/a", 0o755), Entry::bytes("/a/", "x", 0o644)];
        assert!(with_parents(&dup).is_err());
        let file_as_parent = [
            Entry::bytes("/a", "x", 0o644),
            Entry::bytes("/a/b", "y", 0o644),
        ];
        assert!(with_parents(&file_as_parent).is_err());
    }
}
