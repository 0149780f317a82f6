//! Nothing reaches the disk after the image is taken.
//!
//! A kexec jump thaws user space when it returns (kernel_kexec,
//! kernel/kexec_core.c), so between the save and the power-off (or
//! hybrid-sleep's suspend) journald, services and ext4's journal commit
//! could write to the file systems the image will be resumed over; the
//! resumed kernel knows nothing of those writes, and a later journal replay
//! could bring them back over its own. So before the jump every writable
//! local file system is frozen (FIFREEZE: the kernel syncs it, blocks every
//! writer and leaves the disk consistent; freeze_super, fs/super.c), and it
//! is thawed only where the system goes on: after a failed save, a
//! snapshot, a wake-up from hybrid-sleep, a resume. A power-off keeps it
//! frozen to the end.
//!
//! A task that blocks on a frozen file system sleeps uninterruptibly and
//! cannot be frozen for the jump or a suspend (try_to_freeze_tasks,
//! kernel/power/process.c, would fail them after 20 s), and journald wakes
//! for every kernel message, the jump's own among them. So user space is
//! frozen first through the cgroup v2 freezer (cgroup.freeze, the kernel's
//! cgroup-v2.rst), as systemd-sleep freezes user.slice: every cgroup but
//! this tool's own line of ancestors and init.scope (PID 1, which the
//! kernel freezes for the jump itself).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::{mounts, sys};

/// User space and the local file systems, frozen; thawed when dropped,
/// and by a panic (the tools abort on one, so no `Drop` would run). While
/// it lives, Ctrl-C and the like wait (blocked signals), and the OOM
/// killer passes the tool by: a tool killed while frozen would leave the
/// machine frozen for good.
pub struct Frozen {
    /// What could not be frozen, for the user.
    pub notes: Vec<String>,
    /// The signal mask before, given back at the thaw.
    signals: libc::sigset_t,
    /// /proc/self/oom_score_adj before.
    oom_score_adj: Option<String>,
}

/// What is frozen now, in freezing order: a static, so that the panic hook
/// finds it.
struct Ice {
    /// The file systems (an open directory on each).
    filesystems: Vec<(File, PathBuf)>,
    /// The cgroups.
    cgroups: Vec<PathBuf>,
}

static ICE: Mutex<Ice> = Mutex::new(Ice { filesystems: Vec::new(), cgroups: Vec::new() });

/// How long the cgroups get to freeze: a task busy in the kernel freezes
/// when it leaves it.
const CGROUP_FREEZE_WAIT: Duration = Duration::from_secs(5);

/// Signals that would end the tool while frozen: they wait for the thaw.
const HELD_SIGNALS: [libc::c_int; 5] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGTSTP];

impl Frozen {
    /// Syncs, freezes the other cgroups, and freezes every writable local
    /// file system. A file system whose kind cannot be frozen (vfat: no
    /// freeze_fs) is noted, and so is one frozen already (by someone else,
    /// left to them). Anything else fails, everything thawed again.
    pub fn everything() -> Result<Self> {
        // SAFETY: sigemptyset/sigaddset fill a sigset_t of ours; the mask
        // is this thread's only (the tool has no other threads).
        let signals = unsafe {
            let mut held: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut held);
            for signal in HELD_SIGNALS {
                libc::sigaddset(&mut held, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &held, &mut old);
            old
        };
        let oom_score_adj = std::fs::read_to_string("/proc/self/oom_score_adj").ok();
        let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
        install_panic_thaw();
        let mut frozen = Self { notes: Vec::new(), signals, oom_score_adj };
        // One sync for all, while every process runs (a FUSE daemon must,
        // to write back its pages), so that each freeze has little left.
        // SAFETY: sync takes no arguments.
        unsafe { libc::sync() };
        let own = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)));
        // Without cgroup v2 there is nothing to freeze this way.
        if let (Some(root), Some(own)) = (mounts::all().into_iter().find(|m| m.fstype == "cgroup2"), own) {
            frozen.notes.extend(freeze_cgroups(&root.point, &own));
        }
        frozen.freeze_filesystems()?;
        Ok(frozen)
    }

    /// Freezes the writable local file systems, each once, the last
    /// mounted first: a file system on a loop device is frozen before the
    /// one its backing file lies on, which its own freeze writes to.
    fn freeze_filesystems(&mut self) -> Result<()> {
        let mut seen = Vec::new();
        for mount in mounts::all().into_iter().rev() {
            // Block devices only, each file system once (bind mounts, btrfs
            // subvolumes: one superblock). btrfs shows an anonymous device
            // (major 0): its source names the real one. A root mounted from
            // /dev/root has only its device number. FUSE's (fuseblk) are
            // served by a daemon that is frozen now: never touched.
            if !mount.writable() || mount.fstype.starts_with("fuse") {
                continue;
            }
            let device = if mount.fstype == "btrfs" {
                std::fs::metadata(&mount.source).ok().map(|m| std::os::unix::fs::MetadataExt::rdev(&m)).filter(|_| mount.source.starts_with("/dev/"))
            } else {
                Path::new("/sys/dev/block").join(&mount.dev).exists().then(|| {
                    let (major, minor) = mount.dev.split_once(':').unwrap_or(("0", "0"));
                    libc::makedev(major.parse().unwrap_or(0), minor.parse().unwrap_or(0))
                })
            };
            let Some(device) = device.filter(|&d| libc::major(d) != 0) else { continue };
            if seen.contains(&device) {
                continue;
            }
            seen.push(device);
            let dir = File::open(&mount.point).map_err(|e| anyhow::anyhow!("opening {} to freeze it: {e}", mount.point.display()))?;
            // SAFETY: FIFREEZE (include/uapi/linux/fs.h) takes no argument
            // the kernel reads; `dir` is an open file on the file system.
            if unsafe { libc::ioctl(dir.as_raw_fd(), linux_raw_sys::ioctl::FIFREEZE as _, 0) } == 0 {
                lock().filesystems.push((dir, mount.point));
                continue;
            }
            let what = format!("{} ({}) at {}", mount.fstype, mount.source, mount.point.display());
            match std::io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.notes.push(format!("{what} cannot be frozen: what is written to it between the image and the power-off reaches the disk"))
                }
                e if e.raw_os_error() == Some(libc::EBUSY) => self.notes.push(format!("{what} was frozen already, by someone else: left as it is")),
                e => bail!("freezing {what}: {e}"),
            }
        }
        Ok(())
    }

    /// Says `line` while frozen ([`say`]).
    pub fn say(&self, line: &str) {
        say(line);
    }

    /// Stays frozen for good: the machine powers off, or must be reset
    /// (the disk then matches the image, which the next boot resumes).
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

/// Says `line`, also while user space is frozen: journald, frozen too,
/// would hold it, and a power-off would lose it, so then it goes to the
/// kernel log, which shows it on the console (as its log level allows) and
/// gives it to the journal when it runs again. To a terminal it is written
/// as always. Never fails (a closed terminal must not stop a thaw).
pub fn say(line: &str) {
    let frozen = ICE.try_lock().is_ok_and(|ice| !ice.filesystems.is_empty() || !ice.cgroups.is_empty());
    // SAFETY: isatty takes a descriptor number.
    if !frozen || unsafe { libc::isatty(1) } == 1 {
        let _ = writeln!(std::io::stdout(), "{line}");
    } else {
        sys::kernel_log(line);
    }
}

/// The frozen state, whatever a panic left of its lock.
fn lock() -> std::sync::MutexGuard<'static, Ice> {
    ICE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Thaws what is frozen: the file systems, last frozen first (a loop
/// device's after the one holding its backing file), then the cgroups.
fn thaw() {
    let mut ice = lock();
    for (dir, point) in ice.filesystems.drain(..).rev() {
        // SAFETY: FITHAW (include/uapi/linux/fs.h) takes no argument the
        // kernel reads; `dir` is an open file on the frozen file system.
        if unsafe { libc::ioctl(dir.as_raw_fd(), linux_raw_sys::ioctl::FITHAW as _, 0) } != 0 {
            warn(&format!("ksave: WARNING: thawing {} failed: {} (`fsfreeze -u {}`)", point.display(), std::io::Error::last_os_error(), point.display()));
        }
    }
    for cgroup in ice.cgroups.drain(..) {
        if let Err(e) = std::fs::write(cgroup.join("cgroup.freeze"), "0") {
            warn(&format!("ksave: WARNING: thawing the cgroup {} failed: {e}", cgroup.display()));
        }
    }
}

/// A warning on stderr and in the kernel log; never fails.
fn warn(warning: &str) {
    let _ = writeln!(std::io::stderr(), "{warning}");
    sys::kernel_log(warning);
}

/// Thaws on a panic too, before the abort (once per process).
fn install_panic_thaw() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            thaw();
            previous(info);
        }));
    });
}

impl Drop for Frozen {
    /// Thaws, then gives the signals and the OOM score back.
    fn drop(&mut self) {
        thaw();
        if let Some(old) = &self.oom_score_adj {
            let _ = std::fs::write("/proc/self/oom_score_adj", old.trim());
        }
        // SAFETY: the mask saved by `everything`, for this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.signals, std::ptr::null_mut()) };
    }
}

/// Freezes every cgroup under `root` (the cgroup2 mount) but those on the
/// way to `own` (this process's, "/system.slice/x.service") and
/// init.scope, and waits for them; one that does not freeze in time is
/// noted (the jump's own freezer tries it again). Returns the notes.
fn freeze_cgroups(root: &Path, own: &str) -> Vec<String> {
    let mut level = root.to_path_buf();
    for step in Path::new(own.trim_start_matches('/')).components() {
        let Ok(children) = std::fs::read_dir(&level) else { break };
        for child in children.flatten().map(|c| c.path()) {
            let name = child.file_name().unwrap_or_default();
            if name == step.as_os_str() || name == "init.scope" || !child.is_dir() {
                continue;
            }
            // Only those not frozen already, so that the thaw gives back
            // what it found.
            let control = child.join("cgroup.freeze");
            if std::fs::read_to_string(&control).is_ok_and(|v| v.trim() == "0") && std::fs::write(&control, "1").is_ok() {
                lock().cgroups.push(child);
            }
        }
        level.push(step);
    }
    let deadline = Instant::now() + CGROUP_FREEZE_WAIT;
    let mut waiting: Vec<PathBuf> = lock().cgroups.clone();
    while !waiting.is_empty() && Instant::now() < deadline {
        waiting.retain(|c| !std::fs::read_to_string(c.join("cgroup.events")).is_ok_and(|e| e.lines().any(|l| l == "frozen 1")));
        std::thread::sleep(Duration::from_millis(10));
    }
    waiting.iter().map(|c| format!("{} did not freeze in {} s", c.strip_prefix(root).unwrap_or(c).display(), CGROUP_FREEZE_WAIT.as_secs())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup with the kernel's two files, frozen or not.
    fn cgroup(dir: &Path, frozen: bool) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("cgroup.freeze"), if frozen { "1\n" } else { "0\n" }).unwrap();
        // A fake kernel: frozen at once.
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
    }

    #[test]
    fn every_cgroup_but_our_line_and_init_is_frozen_and_thawed() {
        let root = std::env::temp_dir().join(format!("ksave-cgroups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, frozen) in [
            ("init.scope", false),
            ("system.slice", false),
            ("system.slice/systemd-journald.service", false),
            ("system.slice/systemd-hibernate.service", false),
            ("system.slice/someone-elses.service", true),
            ("user.slice", false),
        ] {
            cgroup(&root.join(path), frozen);
        }
        let state = |path: &str| std::fs::read_to_string(root.join(path).join("cgroup.freeze")).unwrap().trim().to_string();
        let notes = freeze_cgroups(&root, "/system.slice/systemd-hibernate.service");
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            ["init.scope", "system.slice", "system.slice/systemd-journald.service", "system.slice/systemd-hibernate.service", "user.slice"].map(state),
            ["0", "0", "1", "0", "1"]
        );
        thaw();
        // Thawed, but what someone else froze stays frozen.
        assert_eq!(["system.slice/systemd-journald.service", "user.slice", "system.slice/someone-elses.service"].map(state), ["0", "0", "1"]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
