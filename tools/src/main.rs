//! `ksave`: the host side of kexec-jump hibernation.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use diskdrv::part::Guid;
use ksave_format::header::{Header, State};
use ksave_format::writer::worst_case_bytes;
use ksave_format::PAGE;
use ksave_tools::elfimage::ImageLayout;
use ksave_tools::imagefile::ImageFile;
use ksave_tools::setup::{self, Setup};
use ksave_tools::{export, inspect, load, sys};
use serde_json::json;

#[derive(Parser)]
#[command(name = "ksave", version, about = "kexec-jump hibernation: save the running kernel's RAM with a tiny image, restore it later")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Choose the partition images go to (recorded in /etc/ksave.conf or $KSAVE_CONF).
    Setup {
        /// The partition's device, e.g. /dev/sda2.
        #[arg(long, conflicts_with = "partuuid", required_unless_present = "partuuid")]
        partition: Option<PathBuf>,
        /// Or its PARTUUID (GPT unique partition GUID).
        #[arg(long)]
        partuuid: Option<String>,
        /// Compress with LZ4 where it pays.
        #[arg(long)]
        lz4: bool,
        /// The ksave image to load.
        #[arg(long, default_value = "/usr/lib/ksave/ksave.elf")]
        elf: PathBuf,
        /// Record the partition even if the host's checks (size) fail. For
        /// testing ksave's own checks.
        #[arg(long)]
        no_precheck: bool,
    },
    /// Load a configured ksave for a jump (and say how much memory it holds).
    Load {
        /// Load with kexec-tools instead of kexec_load(2).
        #[arg(long)]
        kexec_tools: bool,
    },
    /// Save the system: load, sync, jump to ksave, check what it wrote.
    Hibernate {
        /// Power off after a complete image (the default).
        #[arg(long, conflicts_with = "snapshot")]
        poweroff: bool,
        /// Keep running after the image is written.
        #[arg(long)]
        snapshot: bool,
        /// Load with kexec-tools instead of kexec_load(2).
        #[arg(long)]
        kexec_tools: bool,
        /// Skip the host's own checks of the partition (size, identity), so
        /// that ksave's checks decide. For testing ksave.
        #[arg(long)]
        no_precheck: bool,
    },
    /// From a freshly booted kernel: if the partition holds a resumable
    /// image, hand the machine to ksave to restore it (does not return);
    /// else say why and exit 1, and the boot carries on.
    Resume {
        /// The image partition's PARTUUID (default: the one set up).
        #[arg(long)]
        partuuid: Option<String>,
        /// The ksave image to load (default: the one set up).
        #[arg(long)]
        elf: Option<PathBuf>,
    },
    /// Show the image header on the configured partition (or DEV|FILE).
    Status {
        /// A partition, disk or image file; default: the configured partition.
        path: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's header, RAM ranges and chunks.
    Inspect {
        /// A partition, disk or image file.
        path: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum of an image; the exit code tells.
    Verify {
        /// A partition, disk or image file.
        path: PathBuf,
    },
    /// Mark an image as never to be restored.
    Invalidate {
        /// A partition, disk or image file; default: the configured partition.
        path: Option<PathBuf>,
    },
    /// Write an image's RAM as an ELF64 core file (PT_LOAD per RAM range at its physical address).
    Export {
        /// The core file to write.
        #[arg(long)]
        elf: PathBuf,
        /// A partition, disk or image file.
        path: PathBuf,
    },
    /// Show a ksave.elf's load range, footprint and the kexec arguments that load it.
    Image {
        /// Path to ksave.elf.
        elf: PathBuf,
        /// Print only the kexec range arguments, for scripts.
        #[arg(long)]
        kexec_args: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ksave: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Setup { partition, partuuid, lz4, elf, no_precheck } => {
            let part = match (partition, partuuid) {
                (Some(dev), _) => sys::partition_info(&dev)?,
                (_, Some(text)) => sys::partition_by_guid(Guid::parse(&text).with_context(|| format!("{text} is not a GUID"))?)?,
                _ => unreachable!("clap requires one"),
            };
            ensure!(elf.exists(), "{} does not exist (--elf)", elf.display());
            let setup = Setup::new(&part, lz4, elf);
            if !no_precheck {
                precheck(&setup)?;
            }
            setup.save(&setup::path())?;
            println!(
                "ksave: images go to {} (PARTUUID {}, LBA {}, {} MiB) on {}; recorded in {}",
                part.device.display(),
                part.guid,
                part.first_lba,
                part.sectors / 2048,
                part.disk.display(),
                setup::path().display()
            );
        }
        Command::Load { kexec_tools } => {
            let setup = Setup::load(&setup::path())?;
            let (config, _, held) = load_ksave(&setup, kexec_tools)?;
            println!("ksave: loaded for nonce {:#018x}; the kernel holds about {held} KiB for it until it is unloaded", config.nonce);
        }
        Command::Hibernate { poweroff: _, snapshot, kexec_tools, no_precheck } => return hibernate(snapshot, kexec_tools, no_precheck),
        Command::Resume { partuuid, elf } => return resume(partuuid, elf),
        Command::Status { path, json } => {
            let path = path_or_setup(path)?;
            let header = ImageFile::open(&path, false)?.header()?;
            if json {
                println!("{}", header_json(&header));
            } else {
                print_header(&header);
            }
        }
        Command::Inspect { path, json } => inspect_cmd(&path, json)?,
        Command::Verify { path } => {
            let mut file = ImageFile::open(&path, false)?;
            let image = inspect::read(&mut file)?;
            if image.header.state != State::Complete {
                println!("ksave: {}: image is {}, not restorable: {}", file.description, image.header.state.name(), image.header.message());
                return Ok(ExitCode::FAILURE);
            }
            let mut pages = 0u64;
            let mut chunks = 0u64;
            match inspect::walk(&mut file, &image, |_, _| pages += 1, |_| chunks += 1) {
                Ok(()) => println!("ksave: {}: OK: {pages} pages in {chunks} chunks, every checksum right", file.description),
                Err(e) => {
                    println!("ksave: BAD: {e:#}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Invalidate { path } => {
            let path = path_or_setup(path)?;
            let mut file = ImageFile::open(&path, true)?;
            let mut header = file.header()?;
            let was = header.state;
            header.state = State::Invalidated;
            file.write_header(&header)?;
            println!("ksave: {}: image {} -> invalidated", file.description, was.name());
        }
        Command::Export { elf, path } => {
            let mut file = ImageFile::open(&path, false)?;
            let (pages, bytes) = export::export(&mut file, &elf)?;
            println!("ksave: wrote {} ({pages} stored pages, {} MiB of address space)", elf.display(), bytes >> 20);
        }
        Command::Image { elf, kexec_args } => {
            let data = std::fs::read(&elf).with_context(|| format!("reading {}", elf.display()))?;
            let layout = ImageLayout::parse(&data).with_context(|| format!("{} is not a ksave image", elf.display()))?;
            let [min, max] = layout.kexec_range_args();
            if kexec_args {
                println!("{min} {max}");
            } else {
                println!("load range   {:#x}..{:#x}", layout.start, layout.end);
                println!("footprint    {} KiB ({} KiB from the file)", layout.footprint() / 1024, layout.file_size.div_ceil(1024));
                println!("entry        {:#x}", layout.entry);
                println!("kexec load   kexec -t elf-x86_64 --load-preserve-context --args-none {min} {max} {}", elf.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `path`, or the partition `ksave setup` recorded.
fn path_or_setup(path: Option<PathBuf>) -> Result<PathBuf> {
    match path {
        Some(p) => Ok(p),
        None => Ok(Setup::load(&setup::path())?.device),
    }
}

/// The host's own checks before a jump: the partition is still the one set
/// up, and it holds the worst case for this machine's RAM.
fn precheck(setup: &Setup) -> Result<()> {
    let part = sys::partition_info(&setup.device).with_context(|| format!("the configured partition {}", setup.device.display()))?;
    ensure!(
        part.guid == setup.guid && part.first_lba == setup.first_lba && part.sectors == setup.sectors,
        "{} is no longer the partition set up (PARTUUID {} LBA {}+{}, now {} {}+{}): run `ksave setup` again",
        setup.device.display(),
        setup.guid,
        setup.first_lba,
        setup.sectors,
        part.guid,
        part.first_lba,
        part.sectors
    );
    let pages: u64 = sys::ram_ranges()?.iter().map(|r| r.pages().count() as u64).sum();
    let worst = worst_case_bytes(pages);
    ensure!(
        worst <= setup.sectors * 512,
        "{} holds {} MiB, an image of this machine's {} MiB of RAM may need {} MiB",
        setup.device.display(),
        setup.sectors / 2048,
        pages * PAGE as u64 >> 20,
        worst.div_ceil(1 << 20)
    );
    Ok(())
}

/// Configures and loads ksave; returns the config, how long it took, and the
/// KiB of memory the loaded image holds.
fn load_ksave(setup: &Setup, kexec_tools: bool) -> Result<(ksave_format::config::Config, std::time::Duration, u64)> {
    let t = Instant::now();
    let config = load::attempt_config(setup)?;
    let elf = std::fs::read(&setup.elf).with_context(|| format!("reading {}", setup.elf.display()))?;
    let configured = load::configure(&elf, &config)?;
    let prepared = t.elapsed();
    let layout = ImageLayout::parse(&configured)?;
    if kexec_tools {
        let path = Path::new("/run/ksave/ksave.elf");
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(path, &configured)?;
        let cmd = load::kexec_tools_command(path, &layout);
        println!("ksave: {}", cmd.join(" "));
        load::run_kexec_tools(&cmd)?;
    } else {
        load::load_with_syscall(&configured)?;
    }
    let ram: u64 = config.ram().iter().map(|r| r.end - r.start).sum();
    let held = load::held_bytes(&layout, ram) / 1024;
    eprintln!("ksave: prepared the image in {} ms, kexec load took {} ms", prepared.as_millis(), (t.elapsed() - prepared).as_millis());
    Ok((config, t.elapsed(), held))
}

fn hibernate(snapshot: bool, kexec_tools: bool, no_precheck: bool) -> Result<ExitCode> {
    let setup = Setup::load(&setup::path())?;
    if !no_precheck {
        precheck(&setup)?;
    }
    let (config, load_time, held) = load_ksave(&setup, kexec_tools)?;
    println!("ksave: loaded in {} ms, holding about {held} KiB; saving to {}", load_time.as_millis(), setup.device.display());
    // SAFETY: sync has no memory arguments.
    unsafe { libc::sync() };
    if kexec_tools {
        // kexec-tools 2.0.25 exits 255 even after a good jump back: only the
        // partition tells what happened.
        let _ = std::process::Command::new("kexec").arg("-e").status();
    } else {
        // SAFETY: reboot(2) with LINUX_REBOOT_CMD_KEXEC and a loaded
        // preserve-context image jumps to it and returns when it comes back.
        let rc = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = load::unload();
            bail!("the jump did not happen: reboot(KEXEC): {e}");
        }
    }
    // No "time away" here: Linux's clocks stand still across the jump.
    let _ = load::unload(); // give the memory back
    let header = ImageFile::open(&setup.device, false).and_then(|mut f| f.header());
    let verdict = match header {
        // Back through a restore: ksave invalidates the image before it
        // jumps into the saved kernel, which continues right here.
        Ok(h) if h.nonce == config.nonce && h.state == State::Invalidated => {
            println!("ksave: resumed from the image saved at {} (unix), {} pages", h.created_unix, h.pages_stored);
            return Ok(ExitCode::SUCCESS);
        }
        Ok(h) if h.nonce == config.nonce && h.state == State::Complete => Ok(h),
        Ok(h) if h.nonce == config.nonce && h.state == State::Failed => Err(format!("ksave could not save: {}", h.message())),
        Ok(h) if h.nonce == config.nonce => Err(format!("the image was left {}: the save did not finish", h.state.name())),
        Ok(_) => Err(format!("{} holds no record of this attempt: ksave could not reach the partition (its console says why)", setup.device.display())),
        Err(e) => Err(format!("no record of this attempt on {}: {e:#}", setup.device.display())),
    };
    match verdict {
        Ok(h) => {
            println!(
                "ksave: image complete: {} pages ({} MiB) stored, {} zero pages left out, {} MiB on disk, saved in {} ms",
                h.pages_stored,
                h.pages_stored * PAGE as u64 >> 20,
                h.pages_zero,
                (h.data_bytes + ksave_format::header::DATA_OFFSET) >> 20,
                h.save_us / 1000
            );
            if snapshot {
                println!("ksave: snapshot taken; still running");
            } else {
                println!("ksave: powering off");
                // SAFETY: sync and reboot(POWER_OFF) take no memory arguments.
                unsafe {
                    libc::sync();
                    libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
                }
                bail!("power off failed: {}", std::io::Error::last_os_error());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            eprintln!("ksave: hibernation FAILED, not powering off: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn resume(partuuid: Option<String>, elf: Option<PathBuf>) -> Result<ExitCode> {
    let setup = match (&partuuid, Setup::load(&setup::path())) {
        (Some(text), _) => {
            let guid = Guid::parse(text).with_context(|| format!("{text} is not a GUID"))?;
            let part = sys::partition_by_guid(guid)?;
            Setup::new(&part, false, elf.clone().unwrap_or_else(|| "/usr/lib/ksave/ksave.elf".into()))
        }
        (None, Ok(s)) => s,
        (None, Err(e)) => return Err(e),
    };
    let elf_path = elf.unwrap_or(setup.elf.clone());
    let mut file = ImageFile::open(&setup.device, false)?;
    let image = match inspect::read(&mut file) {
        Ok(i) => i,
        Err(e) => {
            println!("ksave: nothing to resume: {e:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // The host checks all it can; ksave checks everything again, and every
    // checksum, before it writes a byte.
    let why_not = if image.header.state != State::Complete {
        Some(format!("the image is {} ({})", image.header.state.name(), image.header.message()))
    } else if image.ram != sys::ram_ranges()? {
        Some("the image was made with another RAM map".to_string())
    } else if image.header.cpu_vendor != ksave_format::cpu_vendor() {
        Some("the image was made on another CPU vendor".to_string())
    } else {
        None
    };
    if let Some(why) = why_not {
        println!("ksave: nothing to resume: {why}");
        return Ok(ExitCode::FAILURE);
    }
    let config = load::attempt_config(&setup)?;
    let bytes = std::fs::read(&elf_path).with_context(|| format!("reading {}", elf_path.display()))?;
    load::load_for_resume(&load::configure(&bytes, &config)?)?;
    println!("ksave: resuming the image saved at {} (unix): {} pages", image.header.created_unix, image.header.pages_stored);
    // SAFETY: sync and reboot(KEXEC) take no memory arguments; with a plain
    // kexec image loaded the kernel hands the machine to ksave.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
    }
    bail!("the kexec into ksave did not happen: {}", std::io::Error::last_os_error())
}

fn header_json(h: &Header) -> serde_json::Value {
    json!({
        "state": h.state.name(),
        "nonce": format!("{:#018x}", h.nonce),
        "created_unix": h.created_unix,
        "pages_stored": h.pages_stored,
        "pages_zero": h.pages_zero,
        "chunks": h.chunks,
        "bytes": h.data_bytes + ksave_format::header::DATA_OFFSET,
        "save_us": h.save_us,
        "lz4": h.flags & ksave_format::header::FLAG_LZ4 != 0,
        "ksave_range": [h.image.start, h.image.end],
        "reentry": format!("{:#x}", h.reentry),
        "cpu_vendor": String::from_utf8_lossy(&h.cpu_vendor).trim_end_matches('\0').to_string(),
        "fail_code": h.fail_code,
        "message": h.message(),
    })
}

fn print_header(h: &Header) {
    println!("state        {}", h.state.name());
    println!("nonce        {:#018x}", h.nonce);
    println!("created      {} (unix)", h.created_unix);
    println!("message      {}", h.message());
    if h.state == State::Complete || h.state == State::Invalidated {
        println!("pages        {} stored, {} zero", h.pages_stored, h.pages_zero);
        println!("size         {} MiB in {} chunks{}", (h.data_bytes + ksave_format::header::DATA_OFFSET) >> 20, h.chunks, if h.flags & 1 != 0 { ", some LZ4" } else { "" });
        println!("saved in     {} ms", h.save_us / 1000);
        println!("ksave range  {:#x}-{:#x}, re-entry {:#x}", h.image.start, h.image.end, h.reentry);
        println!("CPU          {}", String::from_utf8_lossy(&h.cpu_vendor).trim_end_matches('\0'));
    }
}

fn inspect_cmd(path: &Path, json: bool) -> Result<()> {
    let mut file = ImageFile::open(path, false)?;
    let image = inspect::read(&mut file)?;
    let (mut raw, mut lz4, mut raw_bytes, mut lz4_bytes, mut lz4_pages) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let walked = if image.header.state == State::Complete {
        inspect::walk(&mut file, &image, |_, _| {}, |c| {
            if c.encoding == 0 {
                raw += 1;
                raw_bytes += c.bytes;
            } else {
                lz4 += 1;
                lz4_bytes += c.bytes;
                lz4_pages += c.pages as u64;
            }
        })
        .map_err(|e| format!("{e:#}"))
    } else {
        Err(format!("image is {}", image.header.state.name()))
    };
    if json {
        let mut v = header_json(&image.header);
        v["ram_ranges"] = json!(image.ram.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>());
        v["backup_pairs"] = json!(image.backup.len());
        v["chunks_raw"] = json!(raw);
        v["chunks_lz4"] = json!(lz4);
        v["lz4_pages"] = json!(lz4_pages);
        v["lz4_bytes"] = json!(lz4_bytes);
        v["raw_bytes"] = json!(raw_bytes);
        v["checks"] = json!(walked.clone().err().unwrap_or_else(|| "ok".into()));
        println!("{v}");
    } else {
        println!("image        {}", file.description);
        print_header(&image.header);
        for r in &image.ram {
            println!("RAM          {:#014x}-{:#014x} ({} MiB)", r.start, r.end, (r.end - r.start) >> 20);
        }
        println!("backup map   {} pages under ksave, held in source pages", image.backup.len());
        println!("chunks       {raw} raw ({} MiB), {lz4} LZ4 ({} MiB holding {} MiB)", raw_bytes >> 20, lz4_bytes >> 20, lz4_pages * PAGE as u64 >> 20);
        println!("checks       {}", walked.err().unwrap_or_else(|| "every checksum right".into()));
    }
    Ok(())
}
