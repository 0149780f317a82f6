//! `ksave hibernate`: freeze, load, jump to ksave, read what it wrote, and
//! power off only for a complete image of this attempt.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use ksave_format::PAGE;
use ksave_format::header::{DATA_OFFSET, FLAG_IOMMU_LEFT_ON, Header, State};
use ksave_tools::freeze::{Frozen, say};
use ksave_tools::imagefile::ImageFile;
use ksave_tools::load;
use ksave_tools::mailbox::MailboxPage;
use ksave_tools::setup::{self, Setup};
use ksave_tools::sys;

use super::load::load_ksave;

/// How to hibernate (the command's options).
pub struct How {
    pub snapshot: bool,
    /// hybrid-sleep: suspend after a complete image, not power off.
    pub then_suspend: bool,
    /// suspend-then-hibernate: suspend first, for this many seconds.
    pub suspend_first: Option<u64>,
    pub kexec_tools: bool,
    pub all_pages: bool,
    pub drop_caches: bool,
    pub no_precheck: bool,
    pub selftest_fault_in_save: bool,
    /// The save on this CPU alone.
    pub one_cpu: bool,
}

pub fn run(how: &How) -> Result<ExitCode> {
    let &How { snapshot, then_suspend, suspend_first, kexec_tools, all_pages, drop_caches, no_precheck, one_cpu, selftest_fault_in_save } = how;
    // A kernel that poisons free pages expects the poison back in them:
    // only a save of every page gives it that.
    let poisoning = sys::page_poisoning();
    if poisoning && !all_pages {
        println!("ksave: this kernel poisons its free pages (page_poison=): saving them too");
    }
    let all_pages = all_pages || poisoning;
    if let Some(why) = sys::lockdown() {
        anyhow::bail!("{why}");
    }
    let secret = sys::secretmem_holders();
    if !secret.is_empty() {
        anyhow::bail!(
            "{} hold memfd_secret memory, which must never be written out (Linux refuses to hibernate then too: hibernation_available()): end them first",
            secret.join(", ")
        );
    }
    // Nothing of RAM left out: no image holds RAM a driver added.
    if let Some(what) = super::driver_ram()? {
        bail!("{what}");
    }
    let setup = Setup::load(&setup::path())?;
    // What the loading and the next boot would find out too late.
    if let Some(why) = ksave_tools::ready::why_not(&setup) {
        bail!("{why}");
    }
    // A file store is checked always, --no-precheck or not: a file moved
    // since setup leaves its old map and claim in blocks that are no longer
    // its, where ksave's own checks would find them intact.
    if !no_precheck || setup.file.is_some() {
        let checking = std::time::Instant::now();
        super::check_store(&setup)?;
        // For `make bench`: what finding the store's blocks again costs (a
        // file: FIEMAP, the layers below, the map on the disk).
        println!("ksave-metric store_check_ms={:.1}", checking.elapsed().as_secs_f64() * 1000.0);
    }
    if !no_precheck {
        super::precheck(&setup)?;
    }
    // Checked first, so that a store that cannot take the image is said
    // now, not when the alarm wakes the machine.
    if let Some(seconds) = suspend_first {
        match sys::suspend_for(seconds)? {
            sys::Woken::ByTheAlarm(after) => println!("ksave: woken by the alarm after {after} s of suspend: hibernating"),
            sys::Woken::Early(after) => {
                println!("ksave: woken after {after} s of suspend, before the {seconds} s were up: not hibernating");
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    match sys::free_pages_note() {
        Some(note) => println!("ksave: note: {note}"),
        None if all_pages && !poisoning => println!("ksave: saving free pages too (--all-pages)"),
        None if all_pages => {}
        None => match sys::free_pages_as_found() {
            Ok(proof) => println!("ksave: free pages: the kernel relies on nothing in them, so a resume leaves them as found ({proof})"),
            Err(doubt) => println!("ksave: free pages: a resume zeroes them: {doubt}"),
        },
    }
    if drop_caches {
        // Clean page cache only (1): dirty pages are written first, so
        // nothing is lost; files are read again after the resume.
        let t = std::time::Instant::now();
        // SAFETY: sync takes no arguments.
        unsafe { libc::sync() };
        std::fs::write("/proc/sys/vm/drop_caches", "1").context("dropping the page cache (/proc/sys/vm/drop_caches)")?;
        println!("ksave: page cache dropped in {} ms", t.elapsed().as_millis());
    }
    // The image file's cached pages: stale (a boot's reads of its map, or a
    // kernel that kept what setup wrote), and memory the save would hold.
    if let Some(file) = &setup.file {
        let _ = std::fs::File::open(&file.path).and_then(|f| ksave_tools::filestore::drop_cached_pages(&f));
    }
    // From here until the machine powers off, or goes on, nothing may reach
    // the disk the image will be resumed over (freeze.rs); and what the file
    // systems say of their mounts, recorded with the load, stays true.
    let frozen = Frozen::everything()?;
    for note in &frozen.notes {
        frozen.say(&format!("ksave: note: {note}"));
    }
    let loaded = load_ksave(&setup, kexec_tools, selftest_fault_in_save, all_pages, one_cpu)?;
    // Free pages on the per-CPU lists look used to ksave: send them back to
    // the allocator for the jump (the knob is restored when this is dropped).
    let per_cpu_before = sys::per_cpu_list_pages();
    let _short_lists = if all_pages { None } else { sys::ShortPerCpuLists::new() };
    if let (Some(before), Some(after)) = (per_cpu_before, sys::per_cpu_list_pages()) {
        frozen.say(&format!("ksave-metric per_cpu_list_pages_before={before} per_cpu_list_pages={after}"));
    }
    frozen.say(&format!("ksave: loaded in {} ms, holding about {} KiB; saving to {}", loaded.took.as_millis(), loaded.held_kib, setup.describe()));
    frozen.say(&format!("ksave-metric load_ms={} held_kib={}", loaded.took.as_millis(), loaded.held_kib));
    for fs in loaded.config.filesystems() {
        frozen.say(&if fs.is_btrfs() {
            format!("ksave: recorded: btrfs {} at generation {}: a resume after it was written is refused", fs.id(), fs.mounted_at)
        } else if fs.is_xfs() {
            format!("ksave: recorded: XFS {} with its log's head at byte {}: a resume after it was written is refused", fs.id(), fs.mounted_at)
        } else {
            format!("ksave: recorded: ext4 {} mounted {} times, last at {}: a resume after it was mounted again is refused", fs.id(), fs.mounts, fs.mounted_at)
        });
    }
    for what in ksave_tools::fs::seen().1 {
        frozen.say(&format!("ksave: note: {what} is not recorded (nothing on it proves a mount): only the initramfs keeps a boot from mounting it under the image"));
    }
    jump(kexec_tools)?;
    // No "time away" here: Linux's clocks stand still across the jump.
    let _ = load::unload(); // give the memory back
    let from_ksave = loaded.mailbox.as_ref().and_then(MailboxPage::posted);
    let verdict = verdict(&setup, loaded.config.nonce, from_ksave);
    if !matches!(verdict, Verdict::Saved(_)) || snapshot {
        // The system goes on.
        drop(frozen);
        return after_no_power_off(&setup, verdict);
    }
    let Verdict::Saved(h) = verdict else { unreachable!() };
    for line in complete(&h) {
        frozen.say(&line);
    }
    if then_suspend {
        return suspend_on_the_image(&setup, h.flags & FLAG_IOMMU_LEFT_ON != 0, frozen);
    }
    if h.flags & FLAG_IOMMU_LEFT_ON != 0 {
        // Resuming it would leave the kernel's devices doing DMA through an
        // IOMMU nobody set up: never offer that image.
        let why = "this kernel leaves its IOMMU translating across a kexec jump (CONFIG_SUSPEND off), which a resume after power-off cannot recreate; ksave saved a snapshot only";
        // Thawed whatever the invalidation does: no boot resumes an image
        // with this flag (verdict: SnapshotOnly).
        let invalidated = invalidate_while_running(&setup, why);
        drop(frozen);
        invalidated?;
        eprintln!("ksave: hibernation FAILED, not powering off: {why} (image invalidated)");
        println!("ksave-metric refusal={}", ksave_format::verdict::code::SNAPSHOT_ONLY);
        return Ok(ExitCode::FAILURE);
    }
    frozen.say("ksave: powering off");
    // No sync(): nothing was written since the freeze, and nothing may be.
    // SAFETY: reboot(POWER_OFF) takes no memory arguments.
    unsafe {
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    // Still running: the system goes on, and so the image must not.
    let e = std::io::Error::last_os_error();
    if let Err(not) = invalidate_while_running(&setup, "the power-off failed: the system ran on") {
        // Neither off nor invalidated: stay frozen, so that the disk still
        // matches the image the next boot will resume.
        frozen.keep();
        bail!("power off failed: {e}; and {not:#}: the system stays frozen; reset the machine (the next boot resumes the image)");
    }
    drop(frozen);
    bail!("power off failed: {e} (image invalidated)")
}

/// What is said, and done, when the system goes on after the jump (user
/// space and file systems thawed): resumed, failed, or a snapshot taken.
fn after_no_power_off(setup: &Setup, verdict: Verdict) -> Result<ExitCode> {
    match verdict {
        Verdict::Resumed(h) => {
            println!("ksave: resumed from the image saved at {} (unix), {} pages", h.created_unix, h.pages_stored);
            // `ksave resume` destroyed the key block before the jump; a
            // resume some other way leaves it: not any more.
            forget_key(setup);
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Saved(h) => {
            for line in complete(&h) {
                println!("{line}");
            }
            println!("ksave: snapshot taken; still running");
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Failed(why, code) => {
            // The key of a half-written image has nothing left to open.
            forget_key(setup);
            eprintln!("ksave: hibernation FAILED, not powering off: {why}");
            if code == Some(ksave_format::header::fail::TOO_SMALL) {
                eprintln!(
                    "ksave: what would help: `ksave hibernate --drop-caches` (the page cache is most of what a used system saves), fewer programs running, or a larger store (`ksave setup --file {} --size SIZE`)",
                    setup.file.as_ref().map_or("/var/lib/ksave/image".into(), |f| f.path.display().to_string())
                );
            }
            // ksave's own code (0: it left none), for the harness.
            println!("ksave-metric save_failed={}", code.unwrap_or(0));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What is said of a complete image: for the user, and for the harness.
fn complete(h: &Header) -> [String; 2] {
    let bytes = h.data_bytes.saturating_add(DATA_OFFSET);
    [
        format!(
            "ksave: image complete: {} pages ({} MiB) stored, {} free and {} zero pages left out, {} MiB on disk, saved in {} ms",
            h.pages_stored,
            (h.pages_stored * PAGE as u64) >> 20,
            h.pages_free,
            h.pages_zero,
            bytes >> 20,
            h.save_us / 1000
        ),
        format!("ksave-metric image_bytes={bytes} pages_stored={} pages_zero={} pages_free={} save_ms={}", h.pages_stored, h.pages_zero, h.pages_free, h.save_us / 1000),
    ]
}

/// hybrid-sleep, the image complete: suspend to RAM. A power loss now
/// leaves the image for the next boot to resume; a wake-up means the system
/// runs on and will change what the image saw, so it is invalidated then,
/// before anything is thawed.
fn suspend_on_the_image(setup: &Setup, iommu_left_on: bool, frozen: Frozen) -> Result<ExitCode> {
    if iommu_left_on {
        // Not resumable after a power loss (see the power-off path): a
        // plain suspend is all this kernel gets.
        invalidate_while_running(setup, "this kernel leaves its IOMMU translating across a kexec jump: the image could not be resumed after a power loss")?;
        drop(frozen);
        println!("ksave: note: this kernel leaves its IOMMU translating across a kexec jump (CONFIG_SUSPEND off): suspending without an image to fall back on");
        sys::suspend()?;
        println!("ksave: woken from suspend");
        return Ok(ExitCode::SUCCESS);
    }
    frozen.say("ksave: image complete; suspending (a power loss now resumes this image at the next boot)");
    let suspended = sys::suspend();
    if let Err(not) = invalidate_while_running(setup, "woken from hybrid-sleep's suspend: the system ran on") {
        // The image is still valid and the disk, frozen, still matches it:
        // powering off makes a hibernation of it, not a stale image.
        frozen.say(&format!("ksave: {not:#}: powering off instead (the next boot resumes the image)"));
        // SAFETY: reboot(POWER_OFF) takes no memory arguments.
        unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
        let e = std::io::Error::last_os_error();
        frozen.keep();
        bail!("power off failed too: {e}: the system stays frozen; reset the machine (the next boot resumes the image)");
    }
    drop(frozen);
    suspended?;
    println!("ksave: woken from suspend; the image is invalidated (the system runs on)");
    Ok(ExitCode::SUCCESS)
}

/// Invalidates the complete image of a system that runs on (it will change
/// what the image saw), and destroys its key block, whatever the
/// invalidation does. Tried a few times: a failure leaves an image the
/// next boot would resume, which is said as loudly as can be.
fn invalidate_while_running(setup: &Setup, why: &str) -> Result<()> {
    let mut tries = 0;
    let result = loop {
        tries += 1;
        match ImageFile::open_setup(setup, true).and_then(|mut f| f.invalidate(Some(why))) {
            Ok(_) => break Ok(()),
            Err(e) if tries < 3 => say(&format!("ksave: invalidating the image failed ({e:#}): trying again")),
            Err(e) => break Err(e),
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    forget_key(setup);
    result.map_err(|e| {
        let warning = format!(
            "ksave: WARNING: the image could not be invalidated ({e:#}) while the system runs on: run `ksave invalidate` now, or boot with ksave.noresume, or the next boot resumes a stale image"
        );
        sys::kernel_log(&warning);
        anyhow::anyhow!(warning)
    })
}

/// An encrypted store: its key block destroyed, if it holds this store's key.
fn forget_key(setup: &Setup) {
    if let Some(volume) = setup.file.as_ref().and_then(|f| f.key.as_ref()) {
        say(&super::forget_key(volume, setup.claim.id));
    }
}

/// Jumps to the loaded ksave; returns when it has come back.
fn jump(kexec_tools: bool) -> Result<()> {
    if kexec_tools {
        // kexec-tools 2.0.25 exits 255 even after a good jump back: only the
        // partition tells what happened.
        let _ = std::process::Command::new("kexec").arg("-e").status();
        return Ok(());
    }
    // SAFETY: reboot(2) with LINUX_REBOOT_CMD_KEXEC and a loaded
    // preserve-context image jumps to it and returns when it comes back.
    let rc = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let _ = load::unload();
        bail!("the jump did not happen: reboot(KEXEC): {e}");
    }
    Ok(())
}

/// What the partition says about attempt `nonce`.
enum Verdict {
    /// A complete image: safe to power off.
    Saved(Header),
    /// Back through a restore: ksave invalidates the image before it jumps
    /// into the saved kernel, which continues right here.
    Resumed(Header),
    /// Anything else: why, and ksave's failure code (`header::fail`) when
    /// ksave left one (on the partition or in the mailbox).
    Failed(String, Option<u32>),
}

/// `mailbox`: what ksave left in the tool's mailbox, which speaks when the
/// partition cannot.
fn verdict(setup: &Setup, nonce: u64, mailbox: Option<(u32, String)>) -> Verdict {
    let posted = mailbox.as_ref().map(|(code, _)| *code);
    let unreachable = |fallback: String| match &mailbox {
        Some((code, why)) => {
            Verdict::Failed(format!("ksave could not save: {why} (from ksave, by the mailbox: nothing on {})", setup.describe()), Some(*code))
        }
        None => Verdict::Failed(fallback, None),
    };
    match ImageFile::open_setup(setup, false).and_then(|mut f| f.header()) {
        Ok(h) if h.nonce == nonce && h.state == State::Invalidated => Verdict::Resumed(h),
        Ok(h) if h.nonce == nonce && h.state == State::Complete => Verdict::Saved(h),
        Ok(h) if h.nonce == nonce && h.state == State::Failed => Verdict::Failed(format!("ksave could not save: {}", h.message()), Some(h.fail_code)),
        Ok(h) if h.nonce == nonce => Verdict::Failed(
            match &mailbox {
                Some((_, why)) => format!("the image was left {}: ksave stopped: {why}", h.state.name()),
                None => format!("the image was left {}: the save did not finish", h.state.name()),
            },
            posted,
        ),
        Ok(_) => unreachable(format!("{} holds no record of this attempt: ksave could not reach the store (its console says why)", setup.describe())),
        Err(e) => unreachable(format!("no record of this attempt on {}: {e:#}", setup.describe())),
    }
}
