//! Things a task creates on the machine (loop devices, mounts, files, processes) and
//! removes again, in reverse order, when the task ends — also on error or Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::util::output;

enum Undo {
    Detach(String),
    Unmount(PathBuf),
    RemoveDir(PathBuf),
    Kill(String, Child),
}

/// Owns everything a task set up; dropping it tears it all down.
pub struct Scratch {
    undo: Vec<Undo>,
    interrupted: Arc<AtomicBool>,
}

impl Scratch {
    /// Installs a Ctrl-C/SIGTERM handler that makes [`Scratch::check`] fail, so the
    /// task unwinds through `Drop` instead of dying with things left behind.
    pub fn new() -> Result<Self> {
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        ctrlc::set_handler(move || {
            eprintln!("interrupted: cleaning up");
            flag.store(true, Ordering::SeqCst);
        })
        .context("cannot install the Ctrl-C handler")?;
        Ok(Self {
            undo: Vec::new(),
            interrupted,
        })
    }

    /// Fails when the user interrupted the task.
    pub fn check(&self) -> Result<()> {
        if self.interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    }

    /// A fresh directory, removed at the end.
    pub fn dir(&mut self, prefix: &str) -> Result<PathBuf> {
        let base = std::env::temp_dir();
        for n in 0..1000u32 {
            let p = base.join(format!("{prefix}-{}-{n}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                self.undo.push(Undo::RemoveDir(p.clone()));
                return Ok(p);
            }
        }
        bail!("cannot create a scratch directory under {}", base.display())
    }

    /// A loop device over a new sparse file of `size` bytes, detached at the end.
    pub fn loop_device(&mut self, file: &Path, size: u64, direct_io: bool) -> Result<String> {
        let f = std::fs::File::create(file)
            .with_context(|| format!("cannot create {}", file.display()))?;
        f.set_len(size)
            .with_context(|| format!("cannot size {}", file.display()))?;
        drop(f);
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        let dev = output(cmd.arg(file))?.trim().to_owned();
        if !dev.starts_with("/dev/loop") {
            bail!("losetup returned an unexpected device `{dev}`");
        }
        self.undo.push(Undo::Detach(dev.clone()));
        Ok(dev)
    }

    /// Mounts `dev` at `dir`, unmounted at the end.
    pub fn mount(&mut self, dev: &str, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        crate::util::run(Command::new("mount").arg(dev).arg(dir))?;
        self.undo.push(Undo::Unmount(dir.to_owned()));
        Ok(())
    }

    /// Unmounts `dir` now (it was mounted by [`Scratch::mount`]).
    pub fn unmount(&mut self, dir: &Path) -> Result<()> {
        crate::util::run(Command::new("umount").arg(dir))?;
        self.undo
            .retain(|u| !matches!(u, Undo::Unmount(d) if d == dir));
        Ok(())
    }

    /// Starts a process that is stopped (SIGTERM, then SIGKILL) at the end.
    pub fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        self.undo.push(Undo::Kill(name.to_owned(), child));
        Ok(())
    }

    /// Stops the process started under `name` with SIGTERM and waits for it.
    pub fn stop(&mut self, name: &str) -> Result<std::process::ExitStatus> {
        let i = self
            .undo
            .iter()
            .position(|u| matches!(u, Undo::Kill(n, _) if n == name))
            .with_context(|| format!("no process named {name}"))?;
        let Undo::Kill(_, child) = self.undo.remove(i) else {
            unreachable!("position matched a Kill");
        };
        terminate(child)
    }

    /// Has the process started under `name` exited? Returns its status if so.
    pub fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        self.undo.iter_mut().find_map(|u| match u {
            Undo::Kill(n, child) if n == name => child.try_wait().ok().flatten(),
            _ => None,
        })
    }
}

fn terminate(mut child: Child) -> Result<std::process::ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let pid = child.id().to_string();
    if let Err(e) = Command::new("kill").args(["-TERM", &pid]).status() {
        eprintln!("cannot send SIGTERM to {pid}: {e}");
    }
    for _ in 0..100 {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill()?;
    Ok(child.wait()?)
}

impl Drop for Scratch {
    fn drop(&mut self) {
        while let Some(u) = self.undo.pop() {
            let result = match u {
                Undo::Kill(name, child) => terminate(child)
                    .map(|_| ())
                    .with_context(|| format!("stopping {name}")),
                Undo::Unmount(dir) => crate::util::run(Command::new("umount").arg(&dir)),
                Undo::Detach(dev) => crate::util::run(Command::new("losetup").args(["-d", &dev])),
                Undo::RemoveDir(dir) => std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display())),
            };
            if let Err(e) = result {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}
