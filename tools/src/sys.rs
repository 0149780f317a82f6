//! What the running system says about its RAM and partitions.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use diskdrv::part::{self, Guid};
use ksave_format::Range;

/// The firmware map's name for RAM (/sys/firmware/memmap, /proc/iomem).
const RAM: &str = "System RAM";
/// Its name for ACPI NVS (arch/x86/kernel/e820.c, e820_type_to_string).
const NVS: &str = "ACPI Non-volatile Storage";

/// The machine's RAM, as the firmware map says: /sys/firmware/memmap
/// ("System RAM" entries), else /proc/iomem. Page-aligned, sorted, merged.
pub fn ram_ranges() -> Result<Vec<Range>> {
    let listed = firmware_memmap(RAM).ok().filter(|r| !r.is_empty());
    let merged = whole_pages(match listed {
        Some(ranges) => ranges,
        None => proc_iomem(RAM)?,
    });
    ensure!(!merged.is_empty(), "no System RAM in the firmware memory map");
    Ok(merged)
}

/// RAM the kernel has that the firmware map does not list, with the
/// name /proc/iomem gives it: memory a driver added (virtio-mem's "System
/// RAM (virtio_mem)", dax/kmem's "System RAM (kmem)", CXL), which the kernel
/// keeps out of /sys/firmware/memmap (`MHP_NO_FIRMWARE_MEMMAP`,
/// mm/memory_hotplug.c). A save covers only the firmware's RAM, and a
/// fresh boot's ksave has no such RAM to restore into, so `hibernate`
/// refuses while there is any.
pub fn ram_outside_firmware_map() -> Result<Vec<(Range, String)>> {
    if !std::fs::exists("/sys/firmware/memmap").unwrap_or(false) {
        return Ok(Vec::new()); // ram_ranges reads /proc/iomem itself
    }
    let listed = ram_ranges()?;
    let iomem = std::fs::read_to_string("/proc/iomem").context("reading /proc/iomem")?;
    Ok(unlisted_ram(&iomem, &listed))
}

/// The "System RAM..." ranges of `iomem` (whole pages) not inside one of
/// `listed`, at any depth: a driver's RAM is nested under its device's
/// region ("virtio0" > "System RAM (virtio_mem)", "dax0.0" > "System RAM
/// (kmem)").
fn unlisted_ram(iomem: &str, listed: &[Range]) -> Vec<(Range, String)> {
    let mut out = Vec::new();
    for line in iomem.lines().map(str::trim_start) {
        let Some((span, name)) = line.split_once(" : ") else { continue };
        if !name.starts_with(RAM) {
            continue;
        }
        let Some((a, b)) = span.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (hex(a), hex(b)) else { continue };
        let Some(r) = (Range { start, end: end.saturating_add(1) }).page_aligned() else { continue };
        if !listed.iter().any(|l| l.start <= r.start && r.end <= l.end) {
            out.push((r, name.to_string()));
        }
    }
    out
}

/// The machine's ACPI NVS, found and shaped as [`ram_ranges`] finds RAM
/// (ksave's resume takes the same whole pages from its boot map). Linux's
/// hibernation saves these too (kernel/power/suspend_nvs.c). Often none.
pub fn nvs_ranges() -> Result<Vec<Range>> {
    let ranges = match std::fs::exists("/sys/firmware/memmap") {
        Ok(true) => firmware_memmap(NVS)?,
        _ => proc_iomem(NVS)?,
    };
    Ok(whole_pages(ranges))
}

/// The whole pages of `ranges`, sorted, touching ones merged.
fn whole_pages(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range> = Vec::new();
    for r in ranges.iter().filter_map(Range::page_aligned) {
        match merged.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Where this kernel's VMCOREINFO note is (`/sys/kernel/vmcoreinfo`: the
/// physical address and size in hex, kernel/ksysfs.c), from which ksave
/// finds the free pages; `None` for a kernel built without it
/// (CONFIG_VMCORE_INFO, or CONFIG_CRASH_CORE before 6.9).
pub fn vmcoreinfo() -> Option<Range> {
    let text = std::fs::read_to_string("/sys/kernel/vmcoreinfo").ok()?;
    let mut words = text.split_whitespace().map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok());
    let (start, len) = (words.next()??, words.next()??);
    (start > 0 && len > 0 && len <= ksave_format::config::MAX_VMCOREINFO).then(|| Range { start, end: start + len })
}

/// Suspends to RAM (`mem`: the kernel's default suspend, s2idle or deep
/// as /sys/power/mem_sleep says) and returns when something wakes the
/// machine.
pub fn suspend() -> Result<()> {
    std::fs::write("/sys/power/state", "mem").context("suspending to RAM (writing mem to /sys/power/state)")
}

/// What ended a [`suspend_for`], and after how many seconds of CLOCK_BOOTTIME
/// (which counts the time suspended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    ByTheAlarm(u64),
    Early(u64),
}

fn boottime_seconds() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64
}

/// suspend-then-hibernate's first half, as systemd-sleep does it: suspend
/// with a CLOCK_BOOTTIME_ALARM timer `seconds` ahead (the kernel programs
/// an RTC that can wake the machine when it suspends, refuses to suspend
/// with the timer under 2 s away, and leaves other alarms alone:
/// kernel/time/alarmtimer.c), and tell whether that timer is what woke it.
pub fn suspend_for(seconds: u64) -> Result<Woken> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    ensure!(seconds >= 2, "suspend-then-hibernate: a delay of {seconds} s is too short to suspend for (HibernateDelaySec, at least 2 s)");
    // SAFETY: timerfd_create takes no pointers.
    let raw = unsafe { libc::timerfd_create(libc::CLOCK_BOOTTIME_ALARM, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
    ensure!(raw >= 0, "an alarm timer to wake the machine (timerfd_create(CLOCK_BOOTTIME_ALARM)): {} (needs an RTC, CONFIG_RTC_CLASS)", std::io::Error::last_os_error());
    // SAFETY: raw is a new file descriptor that nothing else owns.
    let timer = unsafe { OwnedFd::from_raw_fd(raw) };
    let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let due = libc::itimerspec { it_interval: zero, it_value: libc::timespec { tv_sec: seconds as libc::time_t, tv_nsec: 0 } };
    // SAFETY: due is a valid itimerspec; no old value is asked for.
    let rc = unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &due, std::ptr::null_mut()) };
    ensure!(rc == 0, "setting the alarm timer: {}", std::io::Error::last_os_error());
    let start = boottime_seconds();
    suspend()?;
    let after = boottime_seconds().saturating_sub(start);
    // Its expiry may be handled a moment after the wake-up: wait for it
    // briefly when the time is (nearly) up.
    let wait_ms = if after + 1 >= seconds { 1500 } else { 0 };
    let mut poll = libc::pollfd { fd: timer.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let fired = unsafe { libc::poll(&mut poll, 1, wait_ms) } == 1;
    Ok(if fired { Woken::ByTheAlarm(after) } else { Woken::Early(after) })
}

/// Whether `command` is found on `PATH`, as the shell would run it.
pub fn on_path(command: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).any(|dir| std::fs::metadata(dir.join(command)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The word on this boot's command line that says not to resume
/// (`ksave.noresume`, or the kernel's own `noresume`), if there is one.
pub fn noresume() -> Option<String> {
    std::fs::read_to_string("/proc/cmdline").ok().and_then(|line| noresume_word(&line).map(str::to_string))
}

fn noresume_word(cmdline: &str) -> Option<&str> {
    cmdline.split_whitespace().find(|w| matches!(*w, "ksave.noresume" | "noresume"))
}

/// Whether this kernel poisons the pages it frees (`page_poison=` true on
/// its command line, mm/page_poison.c; parsed by kstrtobool): it then
/// expects its free pages to hold the poison pattern, not the zeros a
/// restore puts in pages left out, and would report each as corrupted when
/// it allocates it. Linux's own hibernation poisons them again after a
/// restore (kernel/power/snapshot.c, clear_or_poison_free_pages); ksave
/// cannot, so such a kernel's free pages are saved.
pub fn page_poisoning() -> bool {
    std::fs::read_to_string("/proc/cmdline").is_ok_and(|line| poisons_free_pages(&line))
}

/// `page_poison=` with a value kstrtobool reads as true (lib/kstrtox.c:
/// 1, y, Y, t, T, on, On, ...); the last one given counts.
fn poisons_free_pages(cmdline: &str) -> bool {
    cmdline.split_whitespace().filter_map(|w| w.strip_prefix("page_poison=")).next_back().and_then(kstrtobool) == Some(true)
}

/// Whether this kernel relies on nothing in the pages it holds free, so
/// that a resume may leave them as it finds them: Ok with the proof, Err
/// with the doubt (then a resume zeroes them, as `init_on_free=1` needs:
/// the kernel hands such pages out without clearing them, mm/page_alloc.c
/// post_alloc_hook). The proof is the kernel's own word at boot, "mem
/// auto-init: ... heap free:off" (report_meminit, mm/mm_init.c; a line only
/// the kernel can log, facility 0), else `init_on_free=` on its command
/// line, else its config saying CONFIG_INIT_ON_FREE_DEFAULT_ON is not set.
/// A kernel that poisons its free pages has them saved instead
/// ([`page_poisoning`]).
pub fn free_pages_as_found() -> std::result::Result<String, String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let config_path = format!("/boot/config-{}", release.trim());
    let config = std::fs::read_to_string(&config_path).ok();
    free_pages_verdict(&cmdline, kernel_log_line("heap free:").as_deref(), config.as_deref().map(|c| (config_path.as_str(), c)))
}

fn free_pages_verdict(cmdline: &str, meminit: Option<&str>, config: Option<(&str, &str)>) -> std::result::Result<String, String> {
    if poisons_free_pages(cmdline) {
        return Err("it poisons them (page_poison=)".into());
    }
    if let Some(line) = meminit {
        return match line.split("heap free:").nth(1) {
            Some(v) if v.starts_with("off") => Ok(format!("its boot log says \"{}\"", line.trim())),
            _ => Err(format!("it zeroes them when freed (its boot log says \"{}\")", line.trim())),
        };
    }
    match cmdline.split_whitespace().filter_map(|w| w.strip_prefix("init_on_free=")).next_back().map(kstrtobool) {
        Some(Some(false)) => return Ok("init_on_free=0 on its command line".into()),
        Some(Some(true)) => return Err("it zeroes them when freed (init_on_free=1)".into()),
        Some(None) => return Err("its init_on_free= is not a value the kernel reads".into()),
        None => {}
    }
    match config {
        Some((path, text)) if text.lines().any(|l| l == "# CONFIG_INIT_ON_FREE_DEFAULT_ON is not set") => {
            Ok(format!("{path}: CONFIG_INIT_ON_FREE_DEFAULT_ON is not set"))
        }
        Some((path, _)) => Err(format!("{path} does not say CONFIG_INIT_ON_FREE_DEFAULT_ON is off")),
        None => Err("neither its boot log nor its config says whether it zeroes freed pages".into()),
    }
}

/// A boolean as the kernel's kstrtobool reads it (lib/kstrtox.c).
fn kstrtobool(v: &str) -> Option<bool> {
    match v.as_bytes() {
        [b'1' | b'y' | b'Y' | b't' | b'T', ..] | [b'o' | b'O', b'n' | b'N', ..] => Some(true),
        [b'0' | b'n' | b'N' | b'f' | b'F', ..] | [b'o' | b'O', b'f' | b'F', ..] => Some(false),
        _ => None,
    }
}

/// The last line of the kernel's log (/dev/kmsg) that contains `needle`
/// and that the kernel itself logged (facility 0: a line written to
/// /dev/kmsg from user space never has it, printk/printk.c devkmsg_write).
/// None if the log no longer holds one.
fn kernel_log_line(needle: &str) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok()?;
    let mut found = None;
    let mut record = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&record[..n]);
                let Some((prefix, message)) = text.split_once(';') else { continue };
                let from_kernel = prefix.split(',').next().and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| p >> 3 == 0);
                let message = message.lines().next().unwrap_or("");
                if from_kernel && message.contains(needle) {
                    found = Some(message.to_string());
                }
            }
            // Records overwritten while reading: go on from the oldest left.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    found
}

/// What a save does with free pages on this kernel, said once by `setup`
/// and `hibernate`.
pub fn free_pages_note() -> Option<&'static str> {
    vmcoreinfo().is_none().then_some(
        "this kernel has no /sys/kernel/vmcoreinfo (built without CONFIG_VMCORE_INFO), so ksave cannot tell its free pages and saves every non-zero page",
    )
}

/// Pages on the kernel's per-CPU free lists (the "count:" lines of
/// /proc/zoneinfo). They are free, but their page structs do not say so and
/// vmcoreinfo does not describe the lists, so a save stores them.
pub fn per_cpu_list_pages() -> Option<u64> {
    per_cpu_lists_sum("count:")
}

/// The sum of the per-CPU lists' `field` ("count:", "high:") in /proc/zoneinfo.
fn per_cpu_lists_sum(field: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/zoneinfo").ok()?;
    Some(info.lines().filter_map(|l| l.trim().strip_prefix(field)?.trim().parse::<u64>().ok()).sum())
}

/// Keeps the kernel's per-CPU free lists short until dropped, so that the
/// pages on them go back to the buddy allocator, where a save can see they
/// are free. Since 6.7 each list may grow to an eighth of its zone (pcp
/// high auto-tuning, mm/page_alloc.c): after a process frees a lot, tens of
/// MiB. A large vm.percpu_pagelist_high_fraction caps every list at four
/// batches, and writes to vm.stat_refresh have every CPU give the excess
/// back now (refresh_cpu_vm_stats -> decay_pcp_high); older kernels trim
/// their short lists on the next free. Drop puts the fraction back.
pub struct ShortPerCpuLists {
    old_fraction: String,
}

const HIGH_FRACTION: &str = "/proc/sys/vm/percpu_pagelist_high_fraction";

impl ShortPerCpuLists {
    /// None when the kernel has no such knob (before 5.14) or refuses it.
    pub fn new() -> Option<Self> {
        let old_fraction = std::fs::read_to_string(HIGH_FRACTION).ok()?;
        std::fs::write(HIGH_FRACTION, "1000000").ok()?;
        let lists = Self { old_fraction };
        // Each refresh lowers a list's limit ("high") by an eighth at most,
        // and frees only what is above it: a list below its limit gives
        // nothing back until the limit comes down to it. So repeat while
        // limits and lists together still shrink (some 30 rounds, a few ms).
        let lists_and_limits = || Some(per_cpu_lists_sum("count:")? + per_cpu_lists_sum("high:")?);
        let mut last = lists_and_limits();
        for _ in 0..64 {
            if std::fs::write("/proc/sys/vm/stat_refresh", "1").is_err() {
                break;
            }
            let now = lists_and_limits();
            if now >= last {
                break;
            }
            last = now;
        }
        Some(lists)
    }
}

impl Drop for ShortPerCpuLists {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(HIGH_FRACTION, self.old_fraction.trim()) {
            eprintln!("ksave: could not put {HIGH_FRACTION} back to {}: {e}", self.old_fraction.trim());
        }
    }
}

/// Why this kernel cannot jump to ksave, if it is in lockdown (Secure Boot
/// turns lockdown on in most distributions' kernels): in lockdown
/// kexec_load(2) is refused (kernel/kexec.c, kexec_load_check:
/// `security_locked_down(LOCKDOWN_KEXEC)`), and kexec_file_load(2) takes
/// only signed kernels and no `KEXEC_PRESERVE_CONTEXT`; the kernel's own
/// hibernation is refused there too (kernel/power/hibernate.c,
/// hibernation_available: `LOCKDOWN_HIBERNATION`).
pub fn lockdown() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    lockdown_mode(&text).map(|mode| {
        format!(
            "this kernel is in lockdown ({mode}), as kernels are under Secure Boot: it refuses to load ksave with kexec (kexec_load(2), LOCKDOWN_KEXEC), \
             as it refuses its own hibernation. To use ksave, turn Secure Boot off in the firmware setup (or, with shim, `mokutil --disable-validation`) \
             and boot without lockdown= on the command line"
        )
    })
}

/// The active mode in /sys/kernel/security/lockdown's text ("none
/// [integrity] confidentiality": the bracketed one,
/// security/lockdown/lockdown.c), unless it is "none".
fn lockdown_mode(text: &str) -> Option<&str> {
    let mode = text.split_whitespace().find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))?;
    (mode != "none").then_some(mode)
}

/// Writes `line` to the kernel log (/dev/kmsg), where the journal picks it
/// up; nothing when that cannot be opened.
pub fn kernel_log(line: &str) {
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = std::io::Write::write_all(&mut kmsg, line.as_bytes());
    }
}

/// This boot's ACPI FACS hardware signature (ACPI 6.5, 5.2.10: the u32 at
/// offset 8), if the kernel shows the table (root, CONFIG_ACPI).
pub fn acpi_hardware_signature() -> Option<u32> {
    let facs = std::fs::read("/sys/firmware/acpi/tables/FACS").ok()?;
    (facs.len() >= 12 && &facs[..4] == b"FACS").then(|| u32::from_le_bytes(facs[8..12].try_into().unwrap()))
}

/// The DMA remapping units (IOMMUs) this machine's ACPI DMAR and IVRS
/// tables list (root: /sys/firmware/acpi/tables). None when there are no
/// such tables.
pub fn remapping_units() -> Vec<bootinfo::acpi::RemappingUnit> {
    let mut units = Vec::new();
    for name in ["DMAR", "IVRS"] {
        let Ok(table) = std::fs::read(Path::new("/sys/firmware/acpi/tables").join(name)) else {
            continue;
        };
        let mut out = [bootinfo::acpi::RemappingUnit::Vtd(0); 16];
        let n = bootinfo::acpi::remapping_units(&table, &mut out);
        units.extend_from_slice(&out[..n]);
    }
    units
}

fn hex(text: &str) -> Result<u64> {
    Ok(u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)?)
}

/// The `kind` entries of /sys/firmware/memmap.
fn firmware_memmap(kind: &str) -> Result<Vec<Range>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/firmware/memmap")? {
        let dir = entry?.path();
        if std::fs::read_to_string(dir.join("type"))?.trim() != kind {
            continue;
        }
        let start = hex(&std::fs::read_to_string(dir.join("start"))?)?;
        let end = hex(&std::fs::read_to_string(dir.join("end"))?)? + 1; // inclusive
        out.push(Range { start, end });
    }
    Ok(out)
}

/// The top-level `kind` entries of /proc/iomem.
fn proc_iomem(kind: &str) -> Result<Vec<Range>> {
    let text = std::fs::read_to_string("/proc/iomem").context("reading /proc/iomem")?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with(' ') && l.split_once(" : ").is_some_and(|(_, k)| k == kind)) {
        let (span, _) = line.split_once(" : ").unwrap();
        let (a, b) = span.split_once('-').context("odd /proc/iomem line")?;
        out.push(Range { start: hex(a)?, end: hex(b)? + 1 });
    }
    ensure!(!out.iter().any(|r| r.start == 0 && r.end == 1), "/proc/iomem hides addresses (need root)");
    Ok(out)
}

/// A partition, as the host sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartInfo {
    /// The partition's device, e.g. /dev/sda1.
    pub device: PathBuf,
    /// Its disk, e.g. /dev/sda.
    pub disk: PathBuf,
    /// Its unique GUID (PARTUUID).
    pub guid: Guid,
    /// First LBA on the disk.
    pub first_lba: u64,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Its number on the disk (sfdisk's and sysfs's).
    pub number: u64,
    /// Its partition type GUID.
    pub type_guid: Guid,
    /// Its disk's GUID (the GPT header's).
    pub disk_guid: Guid,
}

/// The most bytes of GPT entries read: 128 entries of 128 bytes is what
/// every partitioning tool writes; a header asking for more than this is
/// damaged or hostile, not a disk.
const MAX_GPT_ENTRY_BYTES: u64 = 1 << 20;

/// A disk's GPT: its logical block size (LBAs count these) and entries.
pub struct Gpt {
    /// Bytes in a logical block: 512 or 4096.
    pub block_size: u64,
    /// The disk's GUID.
    pub disk_guid: Guid,
    /// The partition entries in use.
    pub entries: Vec<part::Entry>,
}

/// The GPT of a disk (device or image file), CRCs checked; the backup GPT
/// is used if the primary is damaged. The block size is where the header
/// is found: at byte 512 or 4096 (a 4Kn disk).
pub fn gpt_entries(disk: &Path) -> Result<Gpt> {
    let file = File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    let len = device_len(&file)?;
    for block_size in [512u64, 4096] {
        let read = |lba: u64, n: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, lba * block_size)?;
            Ok(buf)
        };
        for lba in [1, len / block_size - 1] {
            let sector: [u8; 512] = read(lba, 512)?.try_into().unwrap();
            let Some(h) = part::parse_gpt_header(&sector, lba) else {
                continue;
            };
            let len = h.entry_count as u64 * h.entry_size as u64;
            if len > MAX_GPT_ENTRY_BYTES {
                continue; // damaged or hostile: try the other copy
            }
            let bytes = read(h.entries_lba, len as usize)?;
            if !part::entries_crc_ok(&h, &bytes) {
                continue;
            }
            let entries = bytes.chunks(h.entry_size as usize).filter_map(part::parse_entry).collect();
            return Ok(Gpt { block_size, disk_guid: h.disk_guid, entries });
        }
    }
    bail!("{} has no valid GPT", disk.display())
}

/// Bytes in a file or block device.
pub fn device_len(file: &File) -> Result<u64> {
    let meta = file.metadata()?;
    if meta.len() > 0 {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 (linux/fs.h) writes one u64 through the pointer.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(file), linux_raw_sys::ioctl::BLKGETSIZE64 as _, &mut size) };
    ensure!(rc == 0, "cannot size the device: {}", std::io::Error::last_os_error());
    Ok(size)
}

fn sysfs_u64(path: PathBuf) -> Result<u64> {
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().parse()?)
}

/// Describes a partition device (e.g. /dev/sda1) from sysfs and its GPT.
pub fn partition_info(device: &Path) -> Result<PartInfo> {
    let name = device.file_name().context("not a device path")?.to_string_lossy().to_string();
    let sys = PathBuf::from("/sys/class/block").join(&name);
    ensure!(sys.join("partition").exists(), "{} is not a partition", device.display());
    let number = sysfs_u64(sys.join("partition"))?;
    let first_lba = sysfs_u64(sys.join("start"))?;
    let sectors = sysfs_u64(sys.join("size"))?;
    let disk_name = std::fs::canonicalize(&sys)?.parent().context("no parent disk")?.file_name().unwrap().to_string_lossy().to_string();
    let disk = PathBuf::from("/dev").join(disk_name);
    // sysfs counts 512-byte sectors, the GPT the disk's blocks.
    let gpt = gpt_entries(&disk)?;
    let entry = gpt
        .entries
        .iter()
        .find(|e| e.first_lba * (gpt.block_size / 512) == first_lba)
        .with_context(|| format!("{} (partition {number}) is not in {}'s GPT", device.display(), disk.display()))?;
    Ok(PartInfo { device: device.into(), disk, guid: entry.unique, first_lba, sectors, number, type_guid: entry.type_guid, disk_guid: gpt.disk_guid })
}

/// The PCI function a disk hangs off, as sysfs shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controller {
    /// Its PCI address (e.g. 0000:00:04.0).
    pub address: String,
    /// Vendor and device IDs.
    pub ids: (u16, u16),
    /// Class, subclass, programming interface.
    pub class: (u8, u8, u8),
    /// The kernel driver bound to it, if any.
    pub driver: Option<String>,
    /// What ksave's drivers make of it (`None`: ksave cannot drive it).
    pub kind: Option<diskdrv::pci::StorageKind>,
}

impl std::fmt::Display for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PCI {} ({:04x}:{:04x}, class {:02x}{:02x}{:02x}", self.address, self.ids.0, self.ids.1, self.class.0, self.class.1, self.class.2)?;
        if let Some(driver) = &self.driver {
            write!(f, ", driver {driver}")?;
        }
        write!(f, ")")
    }
}

/// The nearest PCI function above block device `disk` (e.g. `sda`) in the
/// sysfs tree at `sys` (normally /sys): the controller ksave must drive.
pub fn controller_of(sys: &Path, disk: &str) -> Result<Controller> {
    let dev = std::fs::canonicalize(sys.join("class/block").join(disk)).with_context(|| format!("{disk} is not in {}/class/block", sys.display()))?;
    let is_pci_address = |name: &str| {
        let b = name.as_bytes();
        b.len() == 12 && b[4] == b':' && b[7] == b':' && b[10] == b'.' && name.chars().filter(|c| c.is_ascii_hexdigit()).count() == 9
    };
    let function = dev
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| is_pci_address(&n.to_string_lossy())) && p.join("class").exists())
        .with_context(|| format!("{disk} is not behind a PCI controller ({})", dev.display()))?;
    let read_hex = |file: &str| -> Result<u32> { Ok(u32::from_str_radix(std::fs::read_to_string(function.join(file))?.trim().trim_start_matches("0x"), 16)?) };
    let (vendor, device, class) = (read_hex("vendor")? as u16, read_hex("device")? as u16, read_hex("class")?);
    let class = ((class >> 16) as u8, (class >> 8) as u8, class as u8);
    let driver = std::fs::read_link(function.join("driver")).ok().and_then(|p| Some(p.file_name()?.to_string_lossy().to_string()));
    Ok(Controller {
        address: function.file_name().unwrap().to_string_lossy().to_string(),
        ids: (vendor, device),
        class,
        driver,
        kind: diskdrv::pci::StorageKind::of(vendor, device, class),
    })
}

/// Finds the partition whose PARTUUID is `guid`: exactly one disk must
/// have it (a cloned disk or RAID1 members have it twice, and which one is
/// meant cannot be known; ksave refuses them too).
pub fn partition_by_guid(guid: Guid) -> Result<PartInfo> {
    let mut found = partitions_by_guid(guid)?;
    match found.len() {
        0 => bail!("no partition with PARTUUID {guid} on this machine"),
        1 => Ok(found.remove(0)),
        _ => {
            let where_ = found.iter().map(|p| p.device.display().to_string()).collect::<Vec<_>>().join(", ");
            bail!("PARTUUID {guid} is on {} partitions ({where_}): a cloned disk? Give one a new GUID (sfdisk --part-uuid) and set up again", found.len())
        }
    }
}

/// Every partition whose PARTUUID is `guid`.
pub fn partitions_by_guid(guid: Guid) -> Result<Vec<PartInfo>> {
    let mut found: Vec<PartInfo> = Vec::new();
    for entry in std::fs::read_dir("/sys/class/block")? {
        let name = entry?.file_name().to_string_lossy().to_string();
        let sys = PathBuf::from("/sys/class/block").join(&name);
        if !sys.join("partition").exists() {
            continue;
        }
        let device = PathBuf::from("/dev").join(&name);
        if let Ok(info) = partition_info(&device)
            && info.guid == guid
        {
            found.push(info);
        }
    }
    Ok(found)
}

/// What this machine encrypts with dm-crypt, for people: the root file
/// system and each active swap that lies above a `crypt` target
/// (`/sys/dev/block/M:m/slaves`, followed down). Empty: nothing.
pub fn encryption_in_use() -> Vec<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut found = Vec::new();
    if let Some(crypt) = fs_device("/".as_ref()).and_then(crypt_below) {
        found.push(format!("its root file system (on {crypt})"));
    }
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for name in swaps.lines().skip(1).filter_map(|l| l.split_whitespace().next()) {
        let Ok(meta) = std::fs::metadata(name) else { continue };
        let dev = if meta.file_type().is_block_device() { Some(meta.rdev()) } else { fs_device(name.as_ref()) };
        if let Some(crypt) = dev.and_then(crypt_below) {
            found.push(format!("the swap {name} (on {crypt})"));
        }
    }
    found
}

/// The block device the file system holding `path` is mounted from: its
/// mount source in /proc/self/mountinfo (btrfs reports an anonymous
/// `st_dev`, major 0, not its device), else `st_dev`.
fn fs_device(path: &Path) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let source = crate::mounts::of(path).map(|m| m.source);
    match source.and_then(|s| std::fs::metadata(s).ok()) {
        Some(meta) if meta.file_type().is_block_device() => Some(meta.rdev()),
        _ => std::fs::metadata(path).ok().map(|m| m.dev()),
    }
}

/// The dm-crypt device (its name) the block device `dev` is, or lies
/// above, if any.
fn crypt_below(dev: u64) -> Option<String> {
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev))).ok()?;
    let mut todo = vec![sys];
    while let Some(dir) = todo.pop() {
        // A partition's slaves are its disk's: look at the device itself.
        if std::fs::read_to_string(dir.join("dm/uuid")).is_ok_and(|u| u.starts_with("CRYPT-")) {
            let name = std::fs::read_to_string(dir.join("dm/name")).unwrap_or_default();
            return Some(format!("/dev/mapper/{}", name.trim()));
        }
        if let Ok(slaves) = std::fs::read_dir(dir.join("slaves")) {
            todo.extend(slaves.flatten().filter_map(|s| std::fs::canonicalize(s.path()).ok()));
        }
    }
    None
}

/// Processes that hold `memfd_secret(2)` memory, as "pid (comm)": Linux
/// refuses to hibernate while any does (hibernation_available(),
/// kernel/power/hibernate.c: the memory must never be written out), and so
/// does ksave. Found by their mappings of the secretmem file
/// (mm/secretmem.c names it "secretmem").
pub fn secretmem_holders() -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut holders = Vec::new();
    for p in procs.flatten() {
        let name = p.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let maps = std::fs::read_to_string(p.path().join("maps")).unwrap_or_default();
        if maps.lines().any(|l| l.split_whitespace().nth(5).is_some_and(|f| f == "/secretmem" || f.starts_with("/secretmem"))) {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            holders.push(format!("{name} ({})", comm.trim()));
        }
    }
    holders
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs tree with `disk` under PCI function 0000:00:04.0.
    fn fake_sys(disk: &str, path_below: &str, ids: (u16, u16), class: u32, driver: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let function = root.path().join("devices/pci0000:00/0000:00:04.0");
        let dev = function.join(path_below).join(disk);
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(function.join("vendor"), format!("0x{:04x}\n", ids.0)).unwrap();
        std::fs::write(function.join("device"), format!("0x{:04x}\n", ids.1)).unwrap();
        std::fs::write(function.join("class"), format!("0x{class:06x}\n")).unwrap();
        std::fs::create_dir_all(root.path().join("bus/pci/drivers").join(driver)).unwrap();
        std::os::unix::fs::symlink(root.path().join("bus/pci/drivers").join(driver), function.join("driver")).unwrap();
        std::fs::create_dir_all(root.path().join("class/block")).unwrap();
        std::os::unix::fs::symlink(&dev, root.path().join("class/block").join(disk)).unwrap();
        root
    }

    #[test]
    fn ram_a_driver_added_is_found() {
        let iomem = "00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n00100000-1ffdffff : System RAM\n  01000000-01ffffff : Kernel code\n140000000-33fffffff : virtio0\n  140000000-17fffffff : System RAM (virtio_mem)\n";
        let listed = [Range { start: 0x1000, end: 0x9f000 }, Range { start: 0x10_0000, end: 0x1ffe_0000 }];
        assert_eq!(unlisted_ram(iomem, &listed), [(Range { start: 0x1_4000_0000, end: 0x1_8000_0000 }, "System RAM (virtio_mem)".to_string())]);
        assert!(unlisted_ram(iomem, &[Range { start: 0, end: 1 << 40 }]).is_empty());
    }

    #[test]
    fn free_pages_are_left_as_found_only_on_proof() {
        let off = Some("mem auto-init: stack:all(zero), heap alloc:on, heap free:off");
        let on = Some("mem auto-init: stack:off, heap alloc:off, heap free:on");
        let config_off = Some(("/boot/config-x", "CONFIG_X=y\n# CONFIG_INIT_ON_FREE_DEFAULT_ON is not set\n"));
        let config_on = Some(("/boot/config-x", "CONFIG_INIT_ON_FREE_DEFAULT_ON=y\n"));
        assert!(free_pages_verdict("quiet", off, None).is_ok());
        assert!(free_pages_verdict("quiet", on, config_off).is_err(), "the kernel's own word first");
        assert!(free_pages_verdict("page_poison=1", off, config_off).is_err());
        assert!(free_pages_verdict("init_on_free=0", None, config_on).is_ok());
        assert!(free_pages_verdict("init_on_free=0 init_on_free=on", None, config_off).is_err(), "the last one counts");
        assert!(free_pages_verdict("init_on_free=maybe", None, config_off).is_err());
        assert!(free_pages_verdict("quiet", None, config_off).is_ok());
        assert!(free_pages_verdict("quiet", None, config_on).is_err());
        assert!(free_pages_verdict("quiet", None, Some(("/boot/config-x", "CONFIG_X=y\n"))).is_err(), "silence is no proof");
        assert!(free_pages_verdict("quiet", None, None).is_err());
    }

    #[test]
    fn page_poisoning_is_read_as_the_kernel_reads_it() {
        assert!(!poisons_free_pages("root=/dev/sda1 quiet"));
        assert!(poisons_free_pages("quiet page_poison=1"));
        assert!(poisons_free_pages("page_poison=on init_on_free=0"));
        assert!(!poisons_free_pages("page_poison=0"));
        assert!(!poisons_free_pages("page_poison=off"));
        assert!(!poisons_free_pages("page_poison=1 page_poison=0"));
    }

    #[test]
    fn noresume_is_a_whole_word() {
        assert_eq!(noresume_word("root=/dev/sda1 ro ksave.noresume quiet\n"), Some("ksave.noresume"));
        assert_eq!(noresume_word("noresume"), Some("noresume"));
        assert_eq!(noresume_word("resume=/dev/sda2 ksave.noresumex noresume=1"), None);
    }

    #[test]
    fn lockdown_is_read_from_its_bracketed_mode() {
        assert_eq!(lockdown_mode("[none] integrity confidentiality\n"), None);
        assert_eq!(lockdown_mode("none [integrity] confidentiality\n"), Some("integrity"));
        assert_eq!(lockdown_mode("none integrity [confidentiality]\n"), Some("confidentiality"));
        assert_eq!(lockdown_mode(""), None);
    }

    #[test]
    fn a_disk_on_nvme_is_driven_and_one_on_usb_is_named() {
        let sys = fake_sys("nvme0n1", "nvme/nvme0", (0x1b36, 0x0010), 0x010802, "nvme");
        let c = controller_of(sys.path(), "nvme0n1").unwrap();
        assert_eq!((c.address.as_str(), c.kind), ("0000:00:04.0", Some(diskdrv::pci::StorageKind::Nvme)));
        let sys = fake_sys("sdb", "usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block", (0x8086, 0x1e31), 0x0c0330, "xhci_hcd");
        let c = controller_of(sys.path(), "sdb").unwrap();
        assert_eq!(c.kind, None);
        assert_eq!(c.to_string(), "PCI 0000:00:04.0 (8086:1e31, class 0c0330, driver xhci_hcd)");
        let sys = fake_sys("vda", "virtio1/block", (0x1af4, 0x1001), 0x010000, "virtio-pci");
        assert_eq!(controller_of(sys.path(), "vda").unwrap().kind, Some(diskdrv::pci::StorageKind::VirtioBlk));
    }
}

