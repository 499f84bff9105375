//! The zero-leak handshake with canal-cni (CONTRACTS.md): `<run-dir>/policy-enabled`
//! exists while policy is enforced, and `<run-dir>/endpoints/<iface>` (content:
//! the NodePolicySet generation) exists only while that pod's chains are in
//! the kernel. Files are written after the chains are programmed and removed
//! before they are deleted, so "file exists" always implies "chains exist".
//!
//! `<run-dir>/policy-families` (`ipv4` or `ipv4,ipv6`) names the families in
//! which pods are guarded (anti-spoofing, and policy while enabled): canal-cni
//! gives a pod IPv6 only when it lists `ipv6`. A family is added after its
//! rules are in and removed before they go.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::model::Families;

/// A handshake file operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("run-dir file {path}: {source}")]
pub struct HandshakeError {
    /// The file or directory concerned.
    pub path: PathBuf,
    /// What went wrong.
    #[source]
    pub source: io::Error,
}

/// Name of the marker file that says policy is enforced.
pub const ENABLED_FILE: &str = "policy-enabled";
/// Directory of per-endpoint files.
pub const ENDPOINTS_DIR: &str = "endpoints";
/// The families pods are guarded in (the dualstack contract with canal-cni).
pub const FAMILIES_FILE: &str = "policy-families";

/// Keeps the run-dir files in step with what is programmed.
#[derive(Debug)]
pub struct Handshake {
    run_dir: PathBuf,
    /// Files known to exist (iface -> content); None until the directory was listed.
    files: Option<BTreeMap<String, String>>,
    enabled: Option<bool>,
    /// What `policy-families` says (None: not written by this process yet).
    families: Option<Families>,
}

fn err(path: &Path) -> impl FnOnce(io::Error) -> HandshakeError + '_ {
    move |source| HandshakeError {
        path: path.to_path_buf(),
        source,
    }
}

impl Handshake {
    /// Handshake files under `run_dir`.
    pub fn new(run_dir: &Path) -> Handshake {
        Handshake {
            run_dir: run_dir.to_path_buf(),
            files: None,
            enabled: None,
            families: None,
        }
    }

    /// The endpoints directory.
    pub fn endpoints_dir(&self) -> PathBuf {
        self.run_dir.join(ENDPOINTS_DIR)
    }

    /// Creates or removes `policy-enabled`.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<(), HandshakeError> {
        if self.enabled == Some(enabled) {
            return Ok(());
        }
        let path = self.run_dir.join(ENABLED_FILE);
        if enabled {
            write_atomic(&path, "enabled\n")?;
        } else {
            remove_if_exists(&path)?;
        }
        self.enabled = Some(enabled);
        Ok(())
    }

    fn files(&mut self) -> Result<&mut BTreeMap<String, String>, HandshakeError> {
        if self.files.is_none() {
            let dir = self.endpoints_dir();
            let mut found = BTreeMap::new();
            match fs::read_dir(&dir) {
                Ok(entries) => {
                    for entry in entries {
                        let entry = entry.map_err(err(&dir))?;
                        let name = entry.file_name().to_string_lossy().into_owned();
                        if name.starts_with('.') {
                            // A temporary file left by a crash mid-write.
                            let _ = fs::remove_file(entry.path());
                            continue;
                        }
                        let content = fs::read_to_string(entry.path()).unwrap_or_default();
                        found.insert(name, content);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(&dir)(e)),
            }
            self.files = Some(found);
        }
        // Just set above when it was None.
        Ok(self.files.get_or_insert_with(BTreeMap::new))
    }

    /// Before the rules change: drops from `policy-families` what `next`
    /// no longer guards (its rules are about to go).
    pub fn narrow_families(&mut self, next: Families) -> Result<(), HandshakeError> {
        let current = match self.families {
            Some(f) => f,
            // After a restart: what the last agent wrote (nothing: none).
            None => {
                let text = fs::read_to_string(self.run_dir.join(FAMILIES_FILE)).unwrap_or_default();
                let has = |t: &str| text.split([',', ' ', '\n']).any(|w| w.trim() == t);
                Families {
                    v4: has("ipv4"),
                    v6: has("ipv6"),
                }
            }
        };
        let narrowed = Families {
            v4: current.v4 && next.v4,
            v6: current.v6 && next.v6,
        };
        if narrowed != current {
            self.write_families_file(narrowed)?;
        } else {
            self.families = Some(current);
        }
        Ok(())
    }

    /// After the rules are in: `policy-families` lists exactly `families`.
    pub fn write_families(&mut self, families: Families) -> Result<(), HandshakeError> {
        if self.families != Some(families) {
            self.write_families_file(families)?;
        }
        Ok(())
    }

    fn write_families_file(&mut self, families: Families) -> Result<(), HandshakeError> {
        write_atomic(
            &self.run_dir.join(FAMILIES_FILE),
            &format!("{}\n", families.file_text()),
        )?;
        self.families = Some(families);
        Ok(())
    }

    /// Removes the files of endpoints not in `keep` (before their chains go).
    pub fn remove_except(&mut self, keep: &BTreeSet<String>) -> Result<(), HandshakeError> {
        let dir = self.endpoints_dir();
        let files = self.files()?;
        let stale: Vec<String> = files
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for iface in stale {
            remove_if_exists(&dir.join(&iface))?;
            files.remove(&iface);
        }
        Ok(())
    }

    /// Writes a file for every programmed endpoint (after its chains are in).
    pub fn write(
        &mut self,
        programmed: &BTreeSet<String>,
        generation: Option<i64>,
    ) -> Result<(), HandshakeError> {
        let dir = self.endpoints_dir();
        let content = format!("{}\n", generation.unwrap_or(0));
        let files = self.files()?;
        if !programmed.is_empty() {
            fs::create_dir_all(&dir).map_err(err(&dir))?;
        }
        for iface in programmed {
            if files.get(iface) != Some(&content) {
                write_atomic(&dir.join(iface), &content)?;
                files.insert(iface.clone(), content.clone());
            }
        }
        Ok(())
    }
}

fn write_atomic(path: &Path, content: &str) -> Result<(), HandshakeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp"));
    fs::write(&temp, content).map_err(err(&temp))?;
    fs::rename(&temp, path).map_err(err(path))
}

fn remove_if_exists(path: &Path) -> Result<(), HandshakeError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn files_follow_programmed_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        // A file left by a previous agent for a pod that is gone.
        fs::create_dir_all(dir.path().join("endpoints")).unwrap();
        fs::write(dir.path().join("endpoints/caliold"), "3\n").unwrap();
        let mut h = Handshake::new(dir.path());
        h.set_enabled(true).unwrap();
        assert!(dir.path().join("policy-enabled").exists());
        let want = set(&["cali1", "cali2"]);
        h.remove_except(&want).unwrap();
        h.write(&want, Some(7)).unwrap();
        let mut listed: Vec<String> = fs::read_dir(dir.path().join("endpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        listed.sort();
        assert_eq!(listed, vec!["cali1", "cali2"]);
        assert_eq!(
            fs::read_to_string(dir.path().join("endpoints/cali1")).unwrap(),
            "7\n"
        );
        h.remove_except(&set(&["cali2"])).unwrap();
        assert!(!dir.path().join("endpoints/cali1").exists());
        h.set_enabled(false).unwrap();
        assert!(!dir.path().join("policy-enabled").exists());
    }
}
