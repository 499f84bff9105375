//! Image references as containerd's CRI looks them up.
//!
//! The kubelet hands the CRI `busybox:1.36`; the CRI normalizes it to
//! `docker.io/library/busybox:1.36` and looks for an image of exactly that
//! name. An archive annotated with the short form would import fine and
//! never be found, so names are normalized the same way before they are
//! written.

use super::Error;

/// A normalized `repository:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    /// `ghcr.io/canal-dev/canal`.
    pub repository: String,
    /// `0.1.0`.
    pub tag: String,
}

impl Reference {
    pub fn full(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

/// Normalizes `name[:tag]` as the docker reference grammar does: a first
/// component without `.`/`:` that is not `localhost` means Docker Hub, a
/// single Docker Hub component means `library/`, and a missing tag means
/// `latest`. Digest references (`@sha256:`) are rejected: an archive names
/// images by tag.
pub fn normalize_reference(name: &str) -> Result<String, Error> {
    parse(name).map(|r| r.full())
}

pub(crate) fn parse(name: &str) -> Result<Reference, Error> {
    let bad = |why: &str| Error::Invalid(format!("image reference {name:?}: {why}"));
    if name.contains('@') {
        return Err(bad("digest references are not supported, give a tag"));
    }
    // A ':' after the last '/' separates the tag; one before it is a port.
    let (repo, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], &name[i + 1..]),
        _ => (name, "latest"),
    };
    if repo.is_empty() || repo.starts_with('/') || repo.ends_with('/') || repo.contains("//") {
        return Err(bad("empty path component"));
    }
    if !valid_tag(tag) {
        return Err(bad(
            "a tag is up to 128 of [A-Za-z0-9_.-], not starting with . or -",
        ));
    }
    let mut parts: Vec<&str> = repo.split('/').collect();
    let has_domain = parts.len() > 1 && {
        let first = parts[0];
        first.contains('.') || first.contains(':') || first == "localhost"
    };
    let domain = if has_domain {
        parts.remove(0)
    } else {
        "docker.io"
    };
    for p in &parts {
        if !valid_path_component(p) {
            return Err(bad(
                "path components are lowercase [a-z0-9] separated by . _ __ or -",
            ));
        }
    }
    if domain == "docker.io" && parts.len() == 1 {
        parts.insert(0, "library");
    }
    Ok(Reference {
        repository: format!("{domain}/{}", parts.join("/")),
        tag: tag.to_string(),
    })
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_path_component(p: &str) -> bool {
    !p.is_empty()
        && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_the_cri() {
        for (given, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("canal-dev/canal:0.1.0", "docker.io/canal-dev/canal:0.1.0"),
            (
                "ghcr.io/canal-dev/canal:0.1.0",
                "ghcr.io/canal-dev/canal:0.1.0",
            ),
            ("localhost/canal:dev", "localhost/canal:dev"),
            ("localhost:5000/canal", "localhost:5000/canal:latest"),
            (
                "registry.k8s.io/e2e-test-images/agnhost:2.53",
                "registry.k8s.io/e2e-test-images/agnhost:2.53",
            ),
            (
                "registry.k8s.io/pause:3.10.2",
                "registry.k8s.io/pause:3.10.2",
            ),
        ] {
            assert_eq!(normalize_reference(given).unwrap(), want, "{given}");
        }
    }

    #[test]
    fn rejects_what_no_runtime_could_find() {
        for bad in [
            "",
            ":tag",
            "Canal:1",
            "ghcr.io//canal:1",
            "canal/:1",
            "canal:-x",
            "canal:a b",
            "canal@sha256:00",
            "ghcr.io/canal-:1",
        ] {
            assert!(normalize_reference(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn splits_repository_and_tag() {
        let r = parse("localhost:5000/a/b:v1").unwrap();
        assert_eq!(r.repository, "localhost:5000/a/b");
        assert_eq!(r.tag, "v1");
    }
}
