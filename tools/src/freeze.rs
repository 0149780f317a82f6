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
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::{mounts, sys};

/// User space and the local file systems, frozen; thawed when dropped.
pub struct Frozen {
    /// The file systems this froze (an open directory on each), in order.
    filesystems: Vec<(File, PathBuf)>,
    /// The cgroups this froze.
    cgroups: Vec<PathBuf>,
    /// What could not be frozen, for the user.
    pub notes: Vec<String>,
}

/// How long the cgroups get to freeze: a task busy in the kernel freezes
/// when it leaves it.
const CGROUP_FREEZE_WAIT: Duration = Duration::from_secs(5);

impl Frozen {
    /// Freezes the other cgroups, syncs, and freezes every writable
    /// local file system. A file system whose kind cannot be frozen (vfat:
    /// no freeze_fs) is noted; one frozen already (by someone else) is left
    /// to them. Anything else fails, everything thawed again.
    pub fn everything() -> Result<Self> {
        let mut frozen = Self { filesystems: Vec::new(), cgroups: Vec::new(), notes: Vec::new() };
        let own = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)));
        // Without cgroup v2 there is nothing to freeze this way.
        if let (Some(root), Some(own)) = (mounts::all().into_iter().find(|m| m.fstype == "cgroup2"), own) {
            frozen.freeze_cgroups(&root.point, &own);
        }
        // One sync for all, so that each freeze has little left to write.
        // SAFETY: sync takes no arguments.
        unsafe { libc::sync() };
        let mut devices = Vec::new();
        for mount in mounts::all() {
            // Block devices only, each file system once (bind mounts, btrfs
            // subvolumes: one superblock).
            if !mount.writable() || !mount.source.starts_with("/dev/") {
                continue;
            }
            let Ok(device) = std::fs::metadata(&mount.source).map(|m| std::os::unix::fs::MetadataExt::rdev(&m)) else { continue };
            if devices.contains(&device) {
                continue;
            }
            devices.push(device);
            let dir = File::open(&mount.point).map_err(|e| anyhow::anyhow!("opening {} to freeze it: {e}", mount.point.display()))?;
            // SAFETY: FIFREEZE (include/uapi/linux/fs.h) takes no argument
            // the kernel reads; `dir` is an open file on the file system.
            if unsafe { libc::ioctl(dir.as_raw_fd(), linux_raw_sys::ioctl::FIFREEZE as _, 0) } == 0 {
                frozen.filesystems.push((dir, mount.point));
                continue;
            }
            match std::io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => frozen.notes.push(format!(
                    "{} ({}) at {} cannot be frozen: what is written to it between the image and the power-off reaches the disk",
                    mount.fstype,
                    mount.source,
                    mount.point.display()
                )),
                e if e.raw_os_error() == Some(libc::EBUSY) => {} // frozen already, not by us
                e => bail!("freezing {} at {}: {e}", mount.fstype, mount.point.display()),
            }
        }
        Ok(frozen)
    }

    /// Says `line` while user space is frozen: journald, frozen too, would
    /// hold it, and a power-off would lose it; the kernel log shows it on
    /// the console (as its log level allows) and gives it to the journal
    /// when it runs again. To a terminal it is written as always.
    pub fn say(&self, line: &str) {
        // SAFETY: isatty takes a descriptor number.
        if unsafe { libc::isatty(1) } == 1 {
            println!("{line}");
        } else {
            sys::kernel_log(line);
        }
    }

    /// Stays frozen for good: the machine powers off.
    pub fn keep(self) {
        std::mem::forget(self);
    }

    /// Freezes every cgroup under `root` (the cgroup2 mount) but those on
    /// the way to `own` (this process's, "/system.slice/x.service") and
    /// init.scope, and waits for them; one that does not freeze in time is
    /// noted (the jump's own freezer tries it again).
    fn freeze_cgroups(&mut self, root: &Path, own: &str) {
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
                    self.cgroups.push(child);
                }
            }
            level.push(step);
        }
        let deadline = Instant::now() + CGROUP_FREEZE_WAIT;
        let mut waiting: Vec<&PathBuf> = self.cgroups.iter().collect();
        while !waiting.is_empty() && Instant::now() < deadline {
            waiting.retain(|c| !std::fs::read_to_string(c.join("cgroup.events")).is_ok_and(|e| e.lines().any(|l| l == "frozen 1")));
            std::thread::sleep(Duration::from_millis(10));
        }
        for cgroup in waiting {
            self.notes.push(format!("{} did not freeze in {} s", cgroup.strip_prefix(root).unwrap_or(cgroup).display(), CGROUP_FREEZE_WAIT.as_secs()));
        }
    }
}

impl Drop for Frozen {
    /// Thaws the file systems, last frozen first, then the cgroups.
    fn drop(&mut self) {
        for (dir, point) in self.filesystems.iter().rev() {
            // SAFETY: FITHAW (include/uapi/linux/fs.h) takes no argument the
            // kernel reads; `dir` is an open file on the frozen file system.
            if unsafe { libc::ioctl(dir.as_raw_fd(), linux_raw_sys::ioctl::FITHAW as _, 0) } != 0 {
                let warning = format!("ksave: WARNING: thawing {} failed: {} (`fsfreeze -u {}`)", point.display(), std::io::Error::last_os_error(), point.display());
                eprintln!("{warning}");
                sys::kernel_log(&warning);
            }
        }
        for cgroup in &self.cgroups {
            if let Err(e) = std::fs::write(cgroup.join("cgroup.freeze"), "0") {
                let warning = format!("ksave: WARNING: thawing the cgroup {} failed: {e}", cgroup.display());
                eprintln!("{warning}");
                sys::kernel_log(&warning);
            }
        }
    }
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
        let mut frozen = Frozen { filesystems: Vec::new(), cgroups: Vec::new(), notes: Vec::new() };
        frozen.freeze_cgroups(&root, "/system.slice/systemd-hibernate.service");
        assert!(frozen.notes.is_empty(), "{:?}", frozen.notes);
        assert_eq!(
            ["init.scope", "system.slice", "system.slice/systemd-journald.service", "system.slice/systemd-hibernate.service", "user.slice"].map(state),
            ["0", "0", "1", "0", "1"]
        );
        drop(frozen);
        // Thawed, but what someone else froze stays frozen.
        assert_eq!(["system.slice/systemd-journald.service", "user.slice", "system.slice/someone-elses.service"].map(state), ["0", "0", "1"]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
