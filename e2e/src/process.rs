//! Child processes of the lab and the tests. Two lifetimes:
//! - *owned*: dies with its owner (a test): killed on drop, and the kernel
//!   kills it too if the test process dies (`PR_SET_PDEATHSIG`);
//! - *detached*: outlives `canal-lab up` in its own session, found again
//!   through a pid file, stopped by `canal-lab down`.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// A process killed when dropped.
#[derive(Debug)]
pub struct OwnedChild {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl OwnedChild {
    /// Starts `cmd` with stdout and stderr going to `log`; the kernel kills it
    /// when the spawning thread's process dies.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<OwnedChild, Error> {
        let out =
            File::create(log).map_err(|e| Error::Io(format!("creating {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::Io(format!("opening {}", log.display()), e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::Io(format!("starting {name} ({:?})", cmd.get_program()), e))?;
        Ok(OwnedChild {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails with the tail of the log when the process has exited.
    pub fn check_running(&mut self) -> Result<(), Error> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(Error::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                log_tail: tail(&self.log, 30),
            });
        }
        Ok(())
    }

    /// The last lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Stops the process: SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            terminate(child.id() as i32, grace, || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Starts `cmd` in a session of its own, not tied to the caller's lifetime,
/// and records its pid in `pid_file`.
pub fn spawn_detached(
    name: &str,
    mut cmd: Command,
    log: &Path,
    pid_file: &Path,
) -> Result<u32, Error> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::Io(format!("opening {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::Io(format!("opening {}", log.display()), e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::Io(format!("starting {name} ({:?})", cmd.get_program()), e))?;
    let pid = child.id();
    std::fs::write(pid_file, format!("{pid}\n"))
        .map_err(|e| Error::Io(format!("writing {}", pid_file.display()), e))?;
    // The child is reaped by init once we exit; forget the handle on purpose.
    std::mem::forget(child);
    Ok(pid)
}

/// Reads a pid file and returns the pid if that process is alive and its
/// command line contains `expect` (guards against a recycled pid).
pub fn live_pid(pid_file: &Path, expect: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A process in the middle of execve (e.g. `ip netns exec` becoming its
    // target) briefly shows an empty command line: look again, for up to a
    // second: on a loaded 2-core machine the exec of a large debug binary
    // can outlast 100 ms (suspected cause of an internet echo server that
    // "exited" with an empty log during `up`).
    for _ in 0..500 {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        if !cmdline.is_empty() {
            let cmdline = String::from_utf8_lossy(&cmdline);
            return (cmdline.contains(expect) && !is_zombie(pid)).then_some(pid);
        }
        if is_zombie(pid) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Stops the process behind `pid_file` (if it is still ours) and removes the file.
pub fn stop_pid_file(pid_file: &Path, expect: &str, grace: Duration) -> bool {
    let stopped = match live_pid(pid_file, expect) {
        Some(pid) => {
            terminate(pid, grace, || {
                !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid)
            });
            true
        }
        None => false,
    };
    let _ = std::fs::remove_file(pid_file);
    stopped
}

/// How the process behind `pid_file` ended: its exit code or signal when
/// it is our child (reaped here), else that it is gone. None while it is
/// alive: a live child that [`live_pid`] missed (its command line
/// unreadable mid-exec) has not ended.
pub fn ended(pid_file: &Path) -> Option<String> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return Some(format!("no pid in {}", pid_file.display()));
    };
    match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(format!("pid {pid} exited with code {code}")),
        Ok(WaitStatus::Signaled(_, signal, _)) => Some(format!("pid {pid} killed by {signal}")),
        Ok(WaitStatus::StillAlive) => None,
        Ok(other) => Some(format!("pid {pid}: {other:?}")),
        // Not our child (started by another canal-lab process): /proc tells.
        Err(_) if std::path::Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) => None,
        Err(e) => Some(format!("pid {pid} gone ({e})")),
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn terminate(pid: i32, grace: Duration, mut gone: impl FnMut() -> bool) {
    // SAFETY: plain syscalls on a pid we own.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if gone() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !gone() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last `lines` lines of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until `ended` reports something (the child may still be
    /// starting or exiting).
    fn wait_ended(pid_file: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = ended(pid_file) {
                return s;
            }
            assert!(Instant::now() < deadline, "never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn ended_tells_an_exit_code_a_signal_and_a_live_process_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (log, pid_file) = (dir.path().join("log"), dir.path().join("pid"));
        let sh = |script: &str| {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", script]);
            spawn_detached("test child", cmd, &log, &pid_file).unwrap()
        };

        sh("exit 3");
        assert!(wait_ended(&pid_file).ends_with("exited with code 3"));

        let pid = sh("sleep 30");
        assert_eq!(ended(&pid_file), None, "a live child has not ended");
        // SAFETY: a plain signal to the child just started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        assert!(wait_ended(&pid_file).ends_with("killed by SIGKILL"));

        // Not our child: PID 1 is alive, a pid that exists nowhere is gone.
        std::fs::write(&pid_file, "1\n").unwrap();
        assert_eq!(ended(&pid_file), None);
        std::fs::write(&pid_file, format!("{}\n", i32::MAX)).unwrap();
        assert!(ended(&pid_file).unwrap().contains("gone"));
        std::fs::write(&pid_file, "").unwrap();
        assert!(ended(&pid_file).unwrap().starts_with("no pid"));
    }
}
