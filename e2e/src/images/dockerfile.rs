//! What the image builders take from the repository's Dockerfile, so that
//! the Dockerfile stays the one description of the canal image: the
//! `runtime-base` stage's Debian suite and `apt-get install` packages, and
//! the `runtime` stage's binary directory, `USER` and `ENTRYPOINT`.
//! [`super::canal_image`] builds from these; a test compares its result
//! with what `buildah` makes of the Dockerfile itself.

use std::path::{Path, PathBuf};

use super::Error;

/// The stage that installs the runtime packages.
pub const RUNTIME_BASE_STAGE: &str = "runtime-base";
/// The final stage.
pub const RUNTIME_STAGE: &str = "runtime";
/// The stage that copies host-built binaries (`--build-arg BINARIES=prebuilt`).
pub const PREBUILT_STAGE: &str = "prebuilt";

/// The canal image as the Dockerfile describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanalDockerfile {
    /// The Dockerfile.
    pub path: PathBuf,
    /// The Debian suite of `FROM debian:<suite>-slim AS runtime-base`.
    pub suite: String,
    /// What that stage's `apt-get install` installs.
    pub packages: Vec<String>,
    /// Where the `runtime` stage copies the binaries (`/usr/local/bin/`).
    pub binaries_dir: String,
    /// The `runtime` stage's `USER`.
    pub user: Option<String>,
    /// The `runtime` stage's `ENTRYPOINT` (exec form).
    pub entrypoint: Vec<String>,
}

/// One instruction: its keyword (upper case) and the rest of its logical
/// line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Instruction {
    keyword: String,
    args: String,
}

/// Reads `path`.
pub fn load(path: &Path) -> Result<CanalDockerfile, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    parse(path, &text)
}

/// Parses a Dockerfile's text (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<CanalDockerfile, Error> {
    let bad = |reason: String| Error::Dockerfile {
        path: path.to_path_buf(),
        reason,
    };
    let stages = stages(&instructions(text));
    let stage = |name: &str| {
        stages
            .iter()
            .find(|(n, _, _)| n.as_deref() == Some(name))
            .ok_or_else(|| bad(format!("no stage named {name:?}")))
    };
    let (_, from, body) = stage(RUNTIME_BASE_STAGE)?;
    let suite = from
        .strip_prefix("debian:")
        .and_then(|t| t.strip_suffix("-slim"))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            bad(format!(
                "stage {RUNTIME_BASE_STAGE} is FROM {from}, expected debian:<suite>-slim"
            ))
        })?;
    let installs: Vec<Vec<String>> = body
        .iter()
        .filter(|i| i.keyword == "RUN")
        .flat_map(|i| apt_installs(&i.args))
        .collect();
    let packages = match installs.as_slice() {
        [one] if !one.is_empty() => one.clone(),
        _ => {
            return Err(bad(format!(
                "stage {RUNTIME_BASE_STAGE} should have exactly one `apt-get install` with packages, found {}",
                installs.len()
            )));
        }
    };
    let (_, _, body) = stage(RUNTIME_STAGE)?;
    let last = |kw: &str| {
        body.iter()
            .rev()
            .find(|i| i.keyword == kw)
            .map(|i| i.args.trim().to_string())
    };
    let binaries_dir = body
        .iter()
        .filter(|i| i.keyword == "COPY")
        .find_map(|i| {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            (words.first() == Some(&"--from=binaries"))
                .then(|| words.last().map(|s| s.to_string()))?
        })
        .ok_or_else(|| bad(format!("stage {RUNTIME_STAGE} has no COPY --from=binaries")))?;
    let entrypoint = last("ENTRYPOINT")
        .ok_or_else(|| bad(format!("stage {RUNTIME_STAGE} has no ENTRYPOINT")))?;
    let entrypoint: Vec<String> = serde_json::from_str(&entrypoint).map_err(|e| {
        bad(format!(
            "ENTRYPOINT {entrypoint} is not the exec (JSON) form: {e}"
        ))
    })?;
    Ok(CanalDockerfile {
        path: path.to_path_buf(),
        suite: suite.to_string(),
        packages,
        binaries_dir,
        user: last("USER"),
        entrypoint,
    })
}

/// Logical lines: continuations joined, comments and blank lines dropped
/// (comment lines may sit inside a continued instruction).
fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let logical = std::mem::take(&mut current);
                let logical = logical.trim();
                if logical.is_empty() {
                    continue;
                }
                let (keyword, args) = logical
                    .split_once(char::is_whitespace)
                    .unwrap_or((logical, ""));
                out.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.trim().to_string(),
                });
            }
        }
    }
    out
}

/// `(stage name, FROM image, instructions)` per stage.
fn stages(instructions: &[Instruction]) -> Vec<(Option<String>, String, Vec<Instruction>)> {
    let mut out: Vec<(Option<String>, String, Vec<Instruction>)> = Vec::new();
    for i in instructions {
        if i.keyword == "FROM" {
            let words: Vec<&str> = i
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            out.push((name, words.first().unwrap_or(&"").to_string(), Vec::new()));
        } else if let Some((_, _, body)) = out.last_mut() {
            body.push(i.clone());
        }
    }
    out
}

/// The package lists of every `apt-get install` in a shell command line.
fn apt_installs(shell: &str) -> Vec<Vec<String>> {
    shell
        .split("&&")
        .flat_map(|s| s.split(';'))
        .flat_map(|s| s.split("||"))
        .filter_map(|command| {
            let words: Vec<&str> = command.split_whitespace().collect();
            let at = words.windows(2).position(|w| w == ["apt-get", "install"])?;
            Some(
                words[at + 2..]
                    .iter()
                    .filter(|w| !w.starts_with('-'))
                    .map(|w| w.to_string())
                    .collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# syntax=docker/dockerfile:1
ARG BINARIES=build
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y clang
FROM --platform=$BUILDPLATFORM debian:trixie-slim AS runtime-base
# the tools
RUN apt-get update \
 # a comment inside the continuation
 && apt-get install -y --no-install-recommends iptables ipset \
    ca-certificates \
 && rm -rf /var/lib/apt/lists/*
FROM ${BINARIES} AS binaries
FROM runtime-base AS runtime
COPY --from=binaries /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/canal-controller"]
"#;

    #[test]
    fn reads_the_runtime_stages() {
        let d = parse(Path::new("Dockerfile"), SAMPLE).unwrap();
        assert_eq!(d.suite, "trixie");
        assert_eq!(d.packages, ["iptables", "ipset", "ca-certificates"]);
        assert_eq!(d.binaries_dir, "/usr/local/bin/");
        assert_eq!(d.user.as_deref(), Some("65532:65532"));
        assert_eq!(d.entrypoint, ["/usr/local/bin/canal-controller"]);
    }

    #[test]
    fn the_repository_dockerfile_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile");
        let d = load(&path).unwrap();
        assert_eq!(d.suite, "bookworm");
        for tool in [
            "iptables",
            "ipset",
            "containernetworking-plugins",
            "ca-certificates",
        ] {
            assert!(
                d.packages.iter().any(|p| p == tool),
                "{tool} missing: {:?}",
                d.packages
            );
        }
    }

    #[test]
    fn shapes_the_builders_cannot_follow_are_errors() {
        let no_stage = SAMPLE.replace("AS runtime-base", "AS base");
        assert!(parse(Path::new("D"), &no_stage).is_err());
        let not_debian = SAMPLE.replace("debian:trixie-slim", "ubuntu:24.04");
        assert!(parse(Path::new("D"), &not_debian).is_err());
        let two_installs = SAMPLE.replace("&& rm -rf", "&& apt-get install -y curl && rm -rf");
        assert!(parse(Path::new("D"), &two_installs).is_err());
        let shell_entrypoint =
            SAMPLE.replace(r#"["/usr/local/bin/canal-controller"]"#, "canal-controller");
        assert!(parse(Path::new("D"), &shell_entrypoint).is_err());
        let no_copy = SAMPLE.replace("COPY --from=binaries /out/ /usr/local/bin/\n", "");
        assert!(parse(Path::new("D"), &no_copy).is_err());
    }

    #[test]
    fn apt_lists_stop_at_the_next_command() {
        assert_eq!(
            apt_installs("apt-get update; apt-get install -y a b || true"),
            vec![vec!["a".to_string(), "b".to_string()]]
        );
        assert!(apt_installs("apt-get update").is_empty());
    }
}
