//! Debian base layers made with `debootstrap`, cached outside the
//! repository.
//!
//! A base is `debootstrap --variant=minbase <suite>` (itself cached per
//! suite and mirror, about a minute cold), then, in a chroot inside a
//! private mount namespace, `apt-get upgrade` from the suite, its updates
//! and security archives and `apt-get install --no-install-recommends` of
//! the requested packages, trimmed as Debian's `-slim` images are (no
//! documentation but copyright files, no manuals, no locales), without apt
//! lists, caches, logs or this machine's `resolv.conf`/`hostname`, packed
//! into one layer. The cache key hashes the suite, mirrors, package list and
//! [`RECIPE`], so changing any of them builds a new base; `rm -rf
//! ~/.cache/canal/images` takes newer Debian updates.
//!
//! Nothing here starts a service (`policy-rc.d` refuses every start) or
//! touches the root namespace's mounts: `/proc` is mounted inside
//! `unshare --mount`, and vanishes with it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cache::{self, Lock};
use super::{Error, Layer, PackedLayer, layer, run};

/// Bumped whenever the way a base is made changes, so cached bases made the
/// old way are not used.
pub const RECIPE: u32 = 1;

/// The Debian mirror (`$CANAL_DEBIAN_MIRROR` overrides it).
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The security archive (`$CANAL_DEBIAN_SECURITY_MIRROR` overrides it).
pub const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";

/// Which base: a suite and the packages installed on top of minbase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseSpec {
    /// e.g. `bookworm`.
    pub suite: String,
    /// Installed with `--no-install-recommends`; sorted and deduplicated.
    pub packages: Vec<String>,
    /// The archive debootstrap and apt use.
    pub mirror: String,
    /// The security archive (`<suite>-security`).
    pub security_mirror: String,
}

impl BaseSpec {
    /// A base of `suite` with `packages`, from the default (or
    /// `$CANAL_DEBIAN_MIRROR`) mirrors.
    pub fn new<S: AsRef<str>>(suite: &str, packages: &[S]) -> BaseSpec {
        let mut packages: Vec<String> = packages.iter().map(|p| p.as_ref().to_string()).collect();
        packages.sort();
        packages.dedup();
        let env = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.to_string());
        BaseSpec {
            suite: suite.to_string(),
            packages,
            mirror: env("CANAL_DEBIAN_MIRROR", DEFAULT_MIRROR),
            security_mirror: env("CANAL_DEBIAN_SECURITY_MIRROR", DEFAULT_SECURITY_MIRROR),
        }
    }

    /// The cache key of the minbase this base starts from.
    fn minbase_key(&self) -> String {
        key(&format!(
            "recipe={RECIPE}\nsuite={}\nmirror={}\n",
            self.suite, self.mirror
        ))
    }

    /// The cache key of this base.
    pub fn key(&self) -> String {
        key(&format!(
            "recipe={RECIPE}\nsuite={}\nmirror={}\nsecurity={}\npackages={}\n",
            self.suite,
            self.mirror,
            self.security_mirror,
            self.packages.join(" ")
        ))
    }

    fn validate(&self) -> Result<(), Error> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.:".contains(c))
        };
        if !ok(&self.suite) {
            return Err(Error::Invalid(format!("Debian suite {:?}", self.suite)));
        }
        if let Some(p) = self.packages.iter().find(|p| !ok(p) || p.starts_with('-')) {
            return Err(Error::Invalid(format!("Debian package name {p:?}")));
        }
        Ok(())
    }

    /// The apt sources of the base (deb822), as Debian's images have them.
    pub fn sources(&self) -> String {
        let mut s = format!("Types: deb\nURIs: {}\nSuites: {}", self.mirror, self.suite);
        // sid has neither an updates nor a security suite.
        if !matches!(self.suite.as_str(), "sid" | "unstable") {
            s.push_str(&format!(
                " {0}-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: {1}\nSuites: {0}-security",
                self.suite, self.security_mirror
            ));
        }
        s.push_str(
            "\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        );
        s
    }
}

fn key(recipe: &str) -> String {
    hex::encode(&Sha256::digest(recipe.as_bytes())[..8])
}

/// A cached base layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// What it was made from.
    pub spec: BaseSpec,
    /// The packed layer (uncompressed tar of the whole root filesystem).
    pub packed: PackedLayer,
    /// `package version` lines of everything installed in it.
    pub installed: PathBuf,
}

impl Base {
    /// The base as the bottom layer of an image.
    pub fn layer(&self) -> Layer {
        Layer::Packed(self.packed.clone())
    }
}

/// What `base.json` records next to a cached layer.
#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    spec: BaseSpec,
    digest: String,
    size: u64,
}

/// The base `spec` describes: from the cache, or built now (about a minute
/// and a half cold, most of it debootstrap; the minbase is shared by every
/// package list). Needs root, `debootstrap`, `unshare` and `chroot`, and the
/// Debian mirror when cold.
pub fn debian_base(spec: &BaseSpec) -> Result<Base, Error> {
    spec.validate()?;
    let root = cache::dir().join("debian");
    let dir = root.join(format!("base-{}-{}", spec.suite, spec.key()));
    if let Some(base) = cached(&dir, spec) {
        return Ok(base);
    }
    let _lock = Lock::exclusive(&root)?;
    // Someone may have built it while we waited for the lock.
    if let Some(base) = cached(&dir, spec) {
        return Ok(base);
    }
    let minbase = minbase(&root, spec)?;
    eprintln!(
        "canal: installing {} into a {} base (once per package list)",
        if spec.packages.is_empty() {
            "updates".to_string()
        } else {
            spec.packages.join(" ")
        },
        spec.suite
    );
    let work = tempfile::Builder::new()
        .prefix(".base-")
        .tempdir_in(&root)
        .map_err(|e| Error::io(format!("creating a directory in {}", root.display()), e))?;
    let rootfs = work.path().join("rootfs");
    run(Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg(&minbase)
        .arg(&rootfs))?;
    let sources = work.path().join("debian.sources");
    std::fs::write(&sources, spec.sources())
        .map_err(|e| Error::io(format!("writing {}", sources.display()), e))?;
    run(Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "bash",
            "-c",
            INSTALL_SCRIPT,
            "install",
        ])
        .arg(&rootfs)
        .arg(work.path())
        .args(&spec.packages))?;
    let out = work.path().join("out");
    std::fs::create_dir(&out).map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    let packed = layer::pack_dir(&rootfs, &out.join("layer.tar"))?;
    std::fs::rename(work.path().join("packages.txt"), out.join("packages.txt"))
        .map_err(|e| Error::io("keeping the installed package list", e))?;
    let stamp = Stamp {
        spec: spec.clone(),
        digest: packed.digest.clone(),
        size: packed.size,
    };
    // A plain struct: serialization cannot fail.
    let json = serde_json::to_vec_pretty(&stamp).unwrap_or_default();
    std::fs::write(out.join("base.json"), json).map_err(|e| Error::io("writing base.json", e))?;
    std::fs::rename(&out, &dir)
        .map_err(|e| Error::io(format!("moving the base to {}", dir.display()), e))?;
    eprintln!(
        "canal: base {} ready: {} MB layer {}",
        dir.display(),
        packed.size / 1_000_000,
        packed.digest
    );
    cached(&dir, spec)
        .ok_or_else(|| Error::Invalid(format!("{} vanished after it was built", dir.display())))
}

fn cached(dir: &Path, spec: &BaseSpec) -> Option<Base> {
    let stamp: Stamp = serde_json::from_slice(&std::fs::read(dir.join("base.json")).ok()?).ok()?;
    let layer = dir.join("layer.tar");
    let size = layer.metadata().ok()?.len();
    (stamp.spec == *spec && stamp.size == size).then(|| Base {
        spec: spec.clone(),
        packed: PackedLayer {
            path: layer,
            digest: stamp.digest,
            size,
        },
        installed: dir.join("packages.txt"),
    })
}

/// `debootstrap --variant=minbase` of the suite, cached; called with the
/// lock held.
fn minbase(root: &Path, spec: &BaseSpec) -> Result<PathBuf, Error> {
    let dir = root.join(format!("minbase-{}-{}", spec.suite, spec.minbase_key()));
    if dir.join("etc/debian_version").is_file() {
        return Ok(dir);
    }
    if which("debootstrap").is_none() {
        return Err(Error::MissingTool {
            tool: "debootstrap".into(),
            hint: "apt-get install debootstrap (listed in .ci/run)".into(),
        });
    }
    eprintln!(
        "canal: debootstrap --variant=minbase {} (once per suite, about a minute)",
        spec.suite
    );
    let work = tempfile::Builder::new()
        .prefix(".minbase-")
        .tempdir_in(root)
        .map_err(|e| Error::io(format!("creating a directory in {}", root.display()), e))?;
    let target = work.path().join("rootfs");
    let debs = root.join("debs");
    std::fs::create_dir_all(&debs)
        .map_err(|e| Error::io(format!("creating {}", debs.display()), e))?;
    run(Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(&spec.suite)
        .arg(&target)
        .arg(&spec.mirror))?;
    std::fs::rename(&target, &dir)
        .map_err(|e| Error::io(format!("moving the minbase to {}", dir.display()), e))?;
    Ok(dir)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs in a private mount namespace: `$1` the rootfs, `$2` the work
/// directory (holding `debian.sources`, receiving `packages.txt`), then the
/// packages.
const INSTALL_SCRIPT: &str = r#"
set -euo pipefail
root=$1 work=$2
shift 2
cd "$root"
mount -t proc proc proc
# apt resolves the mirror with this machine's DNS settings (removed below).
rm -f etc/resolv.conf usr/sbin/policy-rc.d
cp /etc/resolv.conf etc/resolv.conf
printf '#!/bin/sh\n# no service starts while the image is built\nexit 101\n' > usr/sbin/policy-rc.d
chmod 755 usr/sbin/policy-rc.d
rm -f etc/apt/sources.list
cp "$work/debian.sources" etc/apt/sources.list.d/debian.sources
# Debian's -slim trimming, for what apt installs next ...
cat > etc/dpkg/dpkg.cfg.d/slim <<'EOF'
# As in Debian's -slim images: no documentation but copyright files, no
# manuals, no translations.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
# ... and for what debootstrap already unpacked.
find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf usr/share/man/* usr/share/groff/* usr/share/info/* usr/share/lintian/* usr/share/linda/*
find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
chroot . /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C \
  sh -euc 'apt-get update -qq
apt-get -y -qq upgrade
if [ $# -gt 0 ]; then apt-get install -y -qq --no-install-recommends "$@"; fi
apt-get clean' sh "$@"
chroot . dpkg-query -W -f '${Package} ${Version}\n' > "$work/packages.txt"
umount proc
# Nothing of this machine or of the build stays in the image.
rm -f usr/sbin/policy-rc.d etc/resolv.conf etc/hostname
rm -rf var/lib/apt/lists/* var/cache/apt/* var/cache/ldconfig/aux-cache
rm -f var/cache/debconf/*-old var/lib/dpkg/*-old
find var/log -type f -delete
find dev proc sys tmp var/tmp -mindepth 1 -delete
find run -mindepth 1 ! -type d -delete
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_follows_packages_not_their_order() {
        let a = BaseSpec::new("bookworm", &["iptables", "ipset"]);
        let b = BaseSpec::new("bookworm", &["ipset", "iptables", "ipset"]);
        let c = BaseSpec::new("bookworm", &["ipset"]);
        let d = BaseSpec::new("trixie", &["ipset"]);
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
        assert_ne!(c.key(), d.key());
        // The minbase is shared by every package list of a suite.
        assert_eq!(a.minbase_key(), c.minbase_key());
        assert_ne!(c.minbase_key(), d.minbase_key());
    }

    #[test]
    fn rejects_names_that_would_reach_a_shell_or_apt_as_options() {
        assert!(
            BaseSpec::new("bookworm", &["-o=APT::X"])
                .validate()
                .is_err()
        );
        assert!(BaseSpec::new("bookworm", &["a;b"]).validate().is_err());
        assert!(BaseSpec::new("book worm", &["a"]).validate().is_err());
        assert!(
            BaseSpec::new("bookworm", &["libc6", "g++"])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn sources_have_updates_and_security() {
        let s = BaseSpec {
            suite: "bookworm".into(),
            packages: vec![],
            mirror: DEFAULT_MIRROR.into(),
            security_mirror: DEFAULT_SECURITY_MIRROR.into(),
        }
        .sources();
        assert!(s.contains("Suites: bookworm bookworm-updates\n"), "{s}");
        assert!(
            s.contains("URIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"),
            "{s}"
        );
        assert_eq!(s.matches("Components: main").count(), 2);
    }
}
