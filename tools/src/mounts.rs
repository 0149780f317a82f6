//! The mount table, /proc/self/mountinfo (proc(5)): one parser for every
//! question the tool asks of it.

use std::path::{Path, PathBuf};

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The file system's device, "major:minor" (major 0: the kernel's
    /// anonymous devices, e.g. tmpfs, and btrfs's, named by its source).
    pub dev: String,
    /// Where it is mounted.
    pub point: PathBuf,
    /// This mount's options (`ro` for a read-only bind of a writable
    /// file system).
    pub options: String,
    /// The file system type.
    pub fstype: String,
    /// What it was mounted from ("/dev/vda2", "tmpfs", "server:/export").
    pub source: String,
    /// The file system's own options, shared by all its mounts.
    pub super_options: String,
}

impl Mount {
    /// Parses a line: "id parent major:minor root point options [optional
    /// fields] - type source super-options", with space, tab, newline and
    /// backslash in paths escaped in octal.
    pub fn parse(line: &str) -> Option<Self> {
        let (head, tail) = line.split_once(" - ")?;
        let fields: Vec<&str> = head.split(' ').collect();
        let mut tail = tail.split(' ');
        Some(Self {
            dev: fields.get(2)?.to_string(),
            point: PathBuf::from(unescape(fields.get(4)?)),
            options: fields.get(5)?.to_string(),
            fstype: tail.next()?.to_string(),
            source: unescape(tail.next()?),
            super_options: tail.next().unwrap_or("").to_string(),
        })
    }

    /// The file system itself is writable (a read-only bind of it still
    /// leaves it writable through its other mounts).
    pub fn writable(&self) -> bool {
        self.super_options.split(',').any(|o| o == "rw")
    }

    /// The mount options and the file system's, as words.
    pub fn all_options(&self) -> impl Iterator<Item = &str> {
        self.options.split(',').chain(self.super_options.split(','))
    }
}

/// Every mount, in the kernel's order (an over-mount after what it hides);
/// none if the table cannot be read.
pub fn all() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| t.lines().filter_map(Mount::parse).collect()).unwrap_or_default()
}

/// The mount `path` lies on: the longest mount point that is a prefix of
/// its canonical path, the last listed of equals (it hides the others).
pub fn of(path: &Path) -> Option<Mount> {
    let path = std::fs::canonicalize(path).ok()?;
    all().into_iter().filter(|m| path.starts_with(&m.point)).max_by_key(|m| m.point.as_os_str().len())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read() {
        let m = Mount::parse("29 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro").unwrap();
        assert_eq!((m.dev.as_str(), m.point.as_path(), m.fstype.as_str(), m.source.as_str()), ("8:1", Path::new("/"), "ext4", "/dev/sda1"));
        assert!(m.writable());
        let tmpfs = Mount::parse("30 29 0:26 / /run rw,nosuid shared:2 - tmpfs tmpfs rw,size=100k").unwrap();
        assert_eq!(tmpfs.fstype, "tmpfs");
        // No optional fields; a read-only file system.
        let ro = Mount::parse("31 29 8:2 / /srv ro - xfs /dev/sda2 ro,attr2").unwrap();
        assert!(!ro.writable());
        assert!(ro.all_options().any(|o| o == "attr2"));
    }

    #[test]
    fn escaped_paths_are_undone() {
        let m = Mount::parse(r"40 29 8:3 / /mnt/my\040disk rw - ext4 /dev/disk/by-label/a\134b rw").unwrap();
        assert_eq!(m.point, Path::new("/mnt/my disk"));
        assert_eq!(m.source, r"/dev/disk/by-label/a\b");
        assert_eq!(unescape(r"a\04"), r"a\04"); // cut short: kept as it is
    }

    #[test]
    fn a_read_only_bind_of_a_writable_file_system_is_writable() {
        let m = Mount::parse("41 29 8:1 /srv /var/srv ro,relatime - ext4 /dev/sda1 rw").unwrap();
        assert!(m.writable());
    }
}
