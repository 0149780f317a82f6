//! Preparing a configured ksave.elf and loading it for a kexec jump.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use ksave_format::PAGE;
use ksave_format::config::{Config, MAX_IOMMUS, MAX_NVS, MAX_RANGES};
use object::read::elf::{ElfFile64, SectionHeader};
use object::{Endianness, Object};

use crate::elfimage::ImageLayout;
use crate::setup::Setup;
use crate::sys;

/// The config for one save attempt: the setup, this machine's RAM, a fresh
/// nonce, and where and when it was made.
pub fn attempt_config(setup: &Setup) -> Result<Config> {
    let mut c = Config::new();
    let mut nonce = [0u8; 8];
    getrandom(&mut nonce)?;
    c.nonce = u64::from_le_bytes(nonce);
    c.created_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    c.partition_guid = setup.guid;
    c.partition_first_lba = setup.first_lba;
    c.partition_sectors = setup.sectors;
    c.lz4 = setup.lz4;
    c.claim = setup.claim;
    c.file_map = setup.file.as_ref().map(|f| ksave_format::config::FileMapAt { offset: f.map_offset, crc: f.map_crc });
    // What the mounted file systems say of their mounts, for the header:
    // `ksave resume` refuses an image whose file systems were mounted since.
    let (seen, _) = crate::fs::seen();
    c.fs_count = seen.len();
    c.filesystems[..seen.len()].copy_from_slice(&seen);
    let ram = sys::ram_ranges()?;
    ensure!(ram.len() <= MAX_RANGES, "{} RAM ranges, ksave takes {MAX_RANGES}", ram.len());
    c.ram[..ram.len()].copy_from_slice(&ram);
    c.ram_count = ram.len();
    let nvs = sys::nvs_ranges()?;
    ensure!(nvs.len() <= MAX_NVS, "{} ACPI NVS ranges, ksave takes {MAX_NVS}", nvs.len());
    c.nvs[..nvs.len()].copy_from_slice(&nvs);
    c.nvs_count = nvs.len();
    c.facs_signature = sys::acpi_hardware_signature();
    c.vmcoreinfo = sys::vmcoreinfo().unwrap_or_default();
    c.free_as_found = sys::free_pages_as_found().is_ok();
    let iommus = sys::remapping_units();
    ensure!(iommus.len() <= MAX_IOMMUS, "{} IOMMUs, ksave takes {MAX_IOMMUS}", iommus.len());
    c.iommus[..iommus.len()].copy_from_slice(&iommus);
    c.iommu_count = iommus.len();
    let info = format!("{} {}", hostname(), kernel_release());
    let n = info.len().min(c.info.len());
    c.info[..n].copy_from_slice(&info.as_bytes()[..n]);
    Ok(c)
}

/// A nonce needs to be unique, not secret: GRND_INSECURE never blocks, where
/// /dev/urandom waits for the CRNG to be seeded (a second or more in a
/// fresh VM, seen here).
fn getrandom(buf: &mut [u8]) -> Result<()> {
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_INSECURE) };
    ensure!(n == buf.len() as isize, "getrandom: {}", std::io::Error::last_os_error());
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// ksave.elf with `config` written into its `.ksave_config` section.
pub fn configure(elf: &[u8], config: &Config) -> Result<Vec<u8>> {
    let file = ElfFile64::<Endianness>::parse(elf).context("ksave.elf is not an ELF64 file")?;
    let section = file.section_by_name(".ksave_config").context("ksave.elf has no .ksave_config section")?;
    let header = section.elf_section_header();
    let (offset, size) = (header.sh_offset(file.endian()) as usize, header.sh_size(file.endian()) as usize);
    ensure!(size == PAGE && offset + PAGE <= elf.len(), ".ksave_config is {size} bytes, expected {PAGE}");
    ensure!(elf[offset..offset + 8] == ksave_format::config::MAGIC, ".ksave_config holds no config block");
    // An image of another config layout would misread this one: an older
    // ksave, say, would write a store without checking its claim.
    let shipped = u32::from_le_bytes(elf[offset + 8..offset + 12].try_into().unwrap());
    ensure!(
        shipped == ksave_format::config::VERSION,
        "this ksave.elf reads config version {shipped}, this tool writes {}: use the ksave.elf of the same ksave (the `elf=` in the setup, or --elf)",
        ksave_format::config::VERSION
    );
    let mut out = elf.to_vec();
    let block: &mut [u8; PAGE] = (&mut out[offset..offset + PAGE]).try_into().unwrap();
    config.encode(block);
    Ok(out)
}

/// kexec_load(2) flags: keep the caller's context, and the architecture
/// field (include/uapi/linux/kexec.h: KEXEC_ARCH_X86_64 is EM_X86_64 << 16).
const KEXEC_PRESERVE_CONTEXT: u64 = libc::KEXEC_PRESERVE_CONTEXT as u64;
const KEXEC_ARCH_X86_64: u64 = (libc::EM_X86_64 as u64) << 16;

#[repr(C)]
struct KexecSegment {
    buf: *const u8,
    bufsz: usize,
    mem: usize,
    memsz: usize,
}

/// Loads the image with kexec_load(2) directly for a jump (preserving the
/// caller's context): one segment, exactly the image's pages, no purgatory
/// and no backup segments.
pub fn load_with_syscall(elf: &[u8]) -> Result<ImageLayout> {
    load_segment(elf, KEXEC_PRESERVE_CONTEXT)
}

/// Loads the image with a plain kexec: the kernel that loads it does not
/// come back (used to resume an image from a fresh kernel).
pub fn load_for_resume(elf: &[u8]) -> Result<ImageLayout> {
    load_segment(elf, 0)
}

fn load_segment(elf: &[u8], flags: u64) -> Result<ImageLayout> {
    let layout = ImageLayout::parse(elf)?;
    let data = &elf[layout.file_offset as usize..(layout.file_offset + layout.file_size) as usize];
    let seg = KexecSegment { buf: data.as_ptr(), bufsz: data.len(), mem: layout.start as usize, memsz: layout.footprint() as usize };
    // The kernel takes its control pages with __GFP_NORETRY
    // (KEXEC_CONTROL_MEMORY_GFP, arch/x86/include/asm/kexec.h): under
    // memory pressure (a large page cache being reclaimed) it fails at once
    // where a moment later it would not. A few tries, with reclaim between.
    for attempt in 1.. {
        // SAFETY: kexec_load reads one segment descriptor and `bufsz` bytes
        // at `buf`, both alive for the call.
        let rc = unsafe { libc::syscall(libc::SYS_kexec_load, layout.entry, 1u64, &seg as *const KexecSegment, flags | KEXEC_ARCH_X86_64) };
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOMEM) || attempt == 5 {
            bail!("kexec_load: {e} (needs root and a kernel with CONFIG_KEXEC_JUMP)");
        }
        println!("ksave: kexec_load: {e}: trying again");
        std::thread::sleep(std::time::Duration::from_millis(100 * attempt));
    }
    Ok(layout)
}

/// Frees a loaded image (kexec_load with no segments).
pub fn unload() -> Result<()> {
    // SAFETY: no segments: nothing is read.
    let rc = unsafe { libc::syscall(libc::SYS_kexec_load, 0u64, 0u64, std::ptr::null::<KexecSegment>(), KEXEC_PRESERVE_CONTEXT | KEXEC_ARCH_X86_64) };
    if rc != 0 {
        return Err(anyhow::Error::new(std::io::Error::last_os_error()).context("unloading the kexec image"));
    }
    Ok(())
}

/// Why this kernel cannot load ksave for a jump and come back, if it
/// cannot: kexec_load(2) switched off (kernel.kexec_load_disabled), or a
/// kernel built without CONFIG_KEXEC_JUMP, as its config file in /boot says
/// or, without one, as kexec_load(2) says: asked with no segments (an
/// unload, which changes nothing while no kexec image is loaded; with one
/// loaded, nothing is asked and the load itself will tell) and
/// KEXEC_PRESERVE_CONTEXT, a flag the kernel accepts only when built with
/// CONFIG_KEXEC_JUMP (KEXEC_FLAGS, include/linux/kexec.h; kexec_load_check,
/// kernel/kexec.c). (A lockdown is `sys::lockdown`'s to say.)
pub fn jump_unavailable() -> Option<String> {
    if std::fs::read_to_string("/proc/sys/kernel/kexec_load_disabled").is_ok_and(|t| t.trim() == "1") {
        return Some("kexec_load(2) is switched off on this boot (kernel.kexec_load_disabled = 1, which stays until the next boot): ksave cannot be loaded".into());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if let Ok(config) = std::fs::read_to_string(format!("/boot/config-{}", release.trim())) {
        return (!config.lines().any(|l| l == "CONFIG_KEXEC_JUMP=y")).then(|| NO_KEXEC_JUMP.into());
    }
    if std::fs::read_to_string("/sys/kernel/kexec_loaded").is_ok_and(|t| t.trim() != "0") {
        return None;
    }
    unload().err().and_then(|e| e.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error)).and_then(kexec_refusal)
}

const NO_KEXEC_JUMP: &str = "this kernel is built without CONFIG_KEXEC_JUMP: it could not come back from ksave (a kernel that can: Fedora's, RHEL's, Ubuntu's, NixOS's)";

/// What kexec_load(2)'s `errno` says about jumping to ksave.
fn kexec_refusal(errno: i32) -> Option<String> {
    match errno {
        libc::EINVAL => Some(NO_KEXEC_JUMP.into()),
        libc::ENOSYS => Some("this kernel is built without CONFIG_KEXEC: it cannot load ksave".into()),
        libc::EPERM => Some(
            "kexec_load(2) is not permitted here (not root, kernel.kexec_load_disabled set, or a security module's policy): ksave cannot be loaded".into(),
        ),
        // EBUSY (another kexec under way) and the like: the load will say.
        _ => None,
    }
}

/// The kexec-tools command that loads `path` for a jump, with the memory
/// range kept tight around the image (kexec-tools adds backup segments over
/// the whole --mem-min..--mem-max range).
pub fn kexec_tools_command(path: &Path, layout: &ImageLayout) -> Vec<String> {
    let [min, max] = layout.kexec_range_args();
    ["kexec", "-t", "elf-x86_64", "--load-preserve-context", "--args-none", &min, &max, &path.display().to_string()].iter().map(|s| s.to_string()).collect()
}

/// Runs a kexec-tools command.
pub fn run_kexec_tools(cmd: &[String]) -> Result<()> {
    let status = Command::new(&cmd[0]).args(&cmd[1..]).status().context("running kexec (is kexec-tools installed?)")?;
    ensure!(status.success(), "{} failed: {status}", cmd.join(" "));
    Ok(())
}

/// Bytes the kernel holds while `layout` is loaded by kexec_load(2) for a
/// jump (kernel/kexec_core.c, arch/x86/kernel/machine_kexec_64.c): a source
/// page for every image page, one control page, one swap page, the
/// indirection pages (511 entries each), and the identity page tables
/// (`init_pgtable`: about one table page per level, one PMD page per GiB of
/// RAM). MemFree cannot show it: such small allocations come from per-CPU
/// page lists it does not count.
pub fn held_bytes(layout: &ImageLayout, ram_bytes: u64) -> u64 {
    let pages = layout.footprint() / PAGE as u64;
    let entries = pages + 2; // sources, the destination entry, done
    let indirection = entries.div_ceil(511);
    let tables = 3 + ram_bytes.div_ceil(1 << 30);
    (pages + 2 + indirection + tables) * PAGE as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kexec_refusals_name_their_cause() {
        assert!(kexec_refusal(libc::EINVAL).unwrap().contains("CONFIG_KEXEC_JUMP"));
        assert!(kexec_refusal(libc::ENOSYS).unwrap().contains("CONFIG_KEXEC"));
        assert!(kexec_refusal(libc::EPERM).unwrap().contains("not permitted"));
        assert_eq!(kexec_refusal(libc::EBUSY), None);
    }
}
