//! Runs the kernel tools (`iptables-restore`, `iptables-save`, `ipset`),
//! optionally inside another network namespace (tests, benchmarks, the lab).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// A tool run that failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program could not be started (not installed, no permission).
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// Talking to the running program failed.
    #[error("{program}: {source}")]
    Io {
        program: String,
        #[source]
        source: io::Error,
    },
    /// The program exited unsuccessfully.
    #[error("{program} exited with {code:?}: {stderr}")]
    Failed {
        program: String,
        code: Option<i32>,
        stderr: String,
    },
    /// The program did not finish in time (it was killed).
    #[error("{program} did not finish within {after:?}")]
    Timeout { program: String, after: Duration },
}

/// Tells the registry of canal's writers that a child exited, however
/// `run` returns (also on a timeout, which kills it).
struct ExitGuard(Option<u32>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            super::watch::own_writers().exited(pid);
        }
    }
}

/// Where the tools run.
#[derive(Clone, Debug, Default)]
pub struct Exec {
    /// The namespace path, and an open handle that keeps it alive and proves it exists.
    netns: Option<(PathBuf, Arc<File>)>,
}

impl Exec {
    /// Run tools in the agent's own network namespace.
    pub fn host() -> Exec {
        Exec::default()
    }

    /// Run tools inside the network namespace at `path` (e.g. `/run/netns/x`).
    pub fn in_netns(path: &Path) -> io::Result<Exec> {
        let file = File::open(path)?;
        Ok(Exec {
            netns: Some((path.to_path_buf(), Arc::new(file))),
        })
    }

    /// The namespace path, when not the agent's own.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_ref().map(|(p, _)| p.as_path())
    }

    /// A command for `program` that will start in the configured namespace.
    /// Another namespace is entered through `nsenter --net=<path>` rather
    /// than a `pre_exec` hook: a hook forces `fork()`, which copies the page
    /// tables of a large agent on every restore, while without one the
    /// standard library spawns with `posix_spawn` (vfork speed).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = match &self.netns {
            Some((path, _)) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", path.display()))
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `program args`, feeding `stdin`, and returns its stdout.
    pub async fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        timeout: Duration,
    ) -> Result<String, ExecError> {
        let mut cmd = self.command(program, args);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
            program: program.to_string(),
            source,
        })?;
        // Before it gets its input (so before it can commit anything): its
        // changes are ours, not drift (`nsenter` execs the program, keeping the pid).
        let pid = child.id();
        if let Some(pid) = pid {
            super::watch::own_writers().started(pid);
        }
        let _exited = ExitGuard(pid);
        let input = child.stdin.take();
        let work = async {
            let feed = async {
                if let (Some(mut pipe), Some(text)) = (input, stdin) {
                    pipe.write_all(text.as_bytes()).await?;
                    pipe.shutdown().await?;
                }
                Ok::<(), io::Error>(())
            };
            let (fed, out) = tokio::join!(feed, child.wait_with_output());
            let out = out?;
            // A broken pipe means the program exited early; its status says why.
            if let Err(e) = fed
                && out.status.success()
            {
                return Err(e);
            }
            Ok(out)
        };
        let out = match tokio::time::timeout(timeout, work).await {
            Err(_) => {
                return Err(ExecError::Timeout {
                    program: program.to_string(),
                    after: timeout,
                });
            }
            Ok(Err(source)) => {
                return Err(ExecError::Io {
                    program: program.to_string(),
                    source,
                });
            }
            Ok(Ok(out)) => out,
        };
        // nsenter reports a program it cannot execute with 127, as a shell does.
        if self.netns.is_some() && out.status.code() == Some(127) {
            return Err(ExecError::Spawn {
                program: program.to_string(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ),
            });
        }
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            stderr.truncate(2000);
            return Err(ExecError::Failed {
                program: program.to_string(),
                code: out.status.code(),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
