//! `memtest`: runs in kernel A during the e2e tests. Fills memory with
//! known data, records where each page sits physically, and checks the data
//! again whenever asked, to show a save or resume changed nothing.
//!
//!   memtest fill --mib N --seed S --manifest PATH
//!
//! Then: touch /tmp/memtest.check to verify (answer, with a counter that
//! ticks every 50 ms, on stdout and in /tmp/memtest.result), touch
//! /tmp/memtest.stop to exit.
//!
//!   memtest churn --percent P --procs N
//!
//! Makes memory lived-in: N processes together fill P% of the available
//! memory with non-zero data and exit, so that the kernel's free pages hold
//! old data, as on a machine that has run for a while.
//!
//!   memtest zeroed --percent P
//!
//! Takes P% of the available memory as new anonymous pages and fails if
//! any is not zero. With `init_on_free=1` the kernel hands such pages out
//! without clearing them (mm/page_alloc.c: post_alloc_hook skips __GFP_ZERO
//! when free pages are zeroed at free), so after a resume this checks that
//! ksave zeroed the pages it left out as free.
//!
//!   memtest used --pid PID > FILE
//!   memtest prove --used FILE --free-runs FILE
//!
//! `used` lists the page frames in use (every present page of process PID,
//! and the kernel's code, data and bss from /proc/iomem); `prove` fails if
//! any of them is in the runs an image left out as free (`ksave inspect
//! --free-runs`).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use ksave_qemu::memdata::{Manifest, PAGE, fill_page, is_zero_page};

fn arg(args: &[String], name: &str) -> Result<String> {
    let at = args.iter().position(|a| a == name).with_context(|| format!("missing {name}"))?;
    args.get(at + 1).cloned().with_context(|| format!("{name} needs a value"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("fill") => fill(&args),
        Some("churn") => churn(&args),
        Some("churn-one") => churn_one(arg(&args, "--mib")?.parse()?, arg(&args, "--seed")?.parse()?),
        Some("zeroed") => zeroed(arg(&args, "--percent")?.parse()?),
        Some("used") => used(arg(&args, "--pid")?.parse()?),
        Some("prove") => prove(&arg(&args, "--used")?, &arg(&args, "--free-runs")?),
        Some("cached") => cached(&arg(&args, "--file")?),
        _ => bail!("usage: memtest fill|churn|zeroed|used|prove|cached ..."),
    }
}

/// Prints how many of `path`'s pages the page cache holds (mincore).
fn cached(path: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    let len = file.metadata()?.len() as usize;
    ensure!(len > 0, "{path} is empty");
    // SAFETY: a fresh shared read-only mapping of the whole file, unmapped
    // below; only mincore looks at it (no page is touched, none read in).
    let at = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    ensure!(at != libc::MAP_FAILED, "mmap {path}: {}", std::io::Error::last_os_error());
    let mut resident = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: the mapping above, and one byte a page in `resident`.
    let rc = unsafe { libc::mincore(at, len, resident.as_mut_ptr()) };
    // SAFETY: the mapping above, used no more.
    unsafe { libc::munmap(at, len) };
    ensure!(rc == 0, "mincore {path}: {}", std::io::Error::last_os_error());
    println!("memtest: cached: {} of {} pages of {path}", resident.iter().filter(|&&b| b & 1 != 0).count(), resident.len());
    Ok(())
}

fn available_kib() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemAvailable in /proc/meminfo")
}

fn zeroed(percent: u64) -> Result<()> {
    let pages = (available_kib()? * percent / 100 / 4) as usize;
    let len = pages * PAGE;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    ensure!(base != libc::MAP_FAILED, "mmap of {len} bytes: {}", std::io::Error::last_os_error());
    let mut dirty = 0usize;
    for i in 0..pages {
        // SAFETY: page i lies inside the mapping, which is ours alone. The
        // first write faults it in; the rest of the page is what the kernel
        // gave, read through volatile so that it is really read.
        let holds_old_data = unsafe {
            let page = (base as *mut u64).add(i * PAGE / 8);
            page.write_volatile(1);
            (1..PAGE / 8).any(|k| page.add(k).read_volatile() != 0)
        };
        dirty += holds_old_data as usize;
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base, len) };
    println!("memtest: zeroed: {pages} new pages, {dirty} not zero");
    ensure!(dirty == 0, "{dirty} of {pages} new pages held old data");
    Ok(())
}

fn churn(args: &[String]) -> Result<()> {
    let percent: u64 = arg(args, "--percent")?.parse()?;
    let procs: u64 = arg(args, "--procs")?.parse()?;
    let available_kib = available_kib()?;
    let each_mib = available_kib * percent / 100 / 1024 / procs;
    let me = std::env::current_exe()?;
    let children: Vec<_> = (0..procs)
        .map(|i| std::process::Command::new(&me).args(["churn-one", "--mib", &each_mib.to_string(), "--seed", &(1000 + i).to_string()]).spawn())
        .collect::<Result<_, _>>()?;
    for mut c in children {
        ensure!(c.wait()?.success(), "a churn process failed");
    }
    println!("memtest: churned {} MiB in {procs} processes (of {} MiB available), freed", each_mib * procs, available_kib / 1024);
    Ok(())
}

/// Fills `mib` MiB with non-zero data, then exits (the kernel frees it).
fn churn_one(mib: usize, seed: u64) -> Result<()> {
    let mut mem = vec![0u64; mib << 17];
    let mut x = seed | 1;
    for w in mem.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    std::hint::black_box(&mem);
    Ok(())
}

/// Page frames of every present page of process `pid` (its pagemap), then
/// the kernel's own ranges.
fn used(pid: u32) -> Result<()> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut out = String::new();
    let mut entry = [0u8; 8];
    for line in maps.lines() {
        let range = line.split_whitespace().next().context("maps line")?;
        let (start, end) = range.split_once('-').context("maps range")?;
        let (start, end) = (u64::from_str_radix(start, 16)?, u64::from_str_radix(end, 16)?);
        if line.ends_with("[vsyscall]") {
            continue;
        }
        for va in (start..end).step_by(PAGE) {
            if pagemap.read_exact_at(&mut entry, va / PAGE as u64 * 8).is_err() {
                break;
            }
            let e = u64::from_le_bytes(entry);
            if e >> 63 == 1 && e & ((1 << 55) - 1) != 0 {
                out += &format!("process {:#x}\n", e & ((1 << 55) - 1));
            }
        }
    }
    // /proc/iomem names the kernel's image: "Kernel code", "Kernel rodata",
    // "Kernel data", "Kernel bss" (arch/x86/kernel/setup.c).
    for line in std::fs::read_to_string("/proc/iomem")?.lines() {
        let Some((range, name)) = line.trim().split_once(" : ") else { continue };
        if !name.starts_with("Kernel ") {
            continue;
        }
        let (start, end) = range.split_once('-').context("iomem range")?;
        let (start, end) = (u64::from_str_radix(start, 16)?, u64::from_str_radix(end, 16)?);
        ensure!(end > start, "/proc/iomem hides addresses (need root)");
        for pfn in start / PAGE as u64..=end / PAGE as u64 {
            out += &format!("{} {pfn:#x}\n", name.replace(' ', "-"));
        }
    }
    print!("{out}");
    Ok(())
}

/// Fails if any page frame in `used` lies in a free run.
fn prove(used: &str, free_runs: &str) -> Result<()> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for line in std::fs::read_to_string(free_runs)?.lines() {
        let (first, n) = line.split_once(' ').context("free-runs line")?;
        runs.push((u64::from_str_radix(first.trim_start_matches("0x"), 16)?, n.parse()?));
    }
    runs.sort();
    let free_pages: u64 = runs.iter().map(|r| r.1).sum();
    let mut counts = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(used)?.lines() {
        let (what, pfn) = line.split_once(' ').context("used line")?;
        let pfn = u64::from_str_radix(pfn.trim_start_matches("0x"), 16)?;
        let i = runs.partition_point(|r| r.0 <= pfn);
        if i > 0 && pfn < runs[i - 1].0 + runs[i - 1].1 {
            bail!("{what} page frame {pfn:#x} is in use but the image left it out as free (run {:#x}+{})", runs[i - 1].0, runs[i - 1].1);
        }
        *counts.entry(what.to_string()).or_insert(0u64) += 1;
    }
    println!("memtest: none of {counts:?} page frames in use is among the {free_pages} pages left out as free ({} runs)", runs.len());
    Ok(())
}

fn fill(args: &[String]) -> Result<()> {
    let args = args.to_vec();
    let mib: usize = arg(&args, "--mib")?.parse()?;
    let seed: u64 = arg(&args, "--seed")?.parse()?;
    let manifest_path = arg(&args, "--manifest")?;
    let pages = mib * 256;
    let len = pages * PAGE;
    // SAFETY: an anonymous private mapping of `len` bytes, used only here.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    ensure!(base != libc::MAP_FAILED, "mmap {mib} MiB: {}", std::io::Error::last_os_error());
    // SAFETY: the mapping above, `len` bytes, ours alone.
    let mem = unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), len) };
    let mut page = [0u8; PAGE];
    for i in 0..pages {
        fill_page(seed, i as u64, &mut page);
        mem[i * PAGE..(i + 1) * PAGE].copy_from_slice(&page); // zero pages are written too: real frames
    }
    // SAFETY: locks our own mapping in RAM, so frames stay put.
    if unsafe { libc::mlock(base, len) } != 0 {
        bail!("mlock: {}", std::io::Error::last_os_error());
    }
    let pagemap = std::fs::File::open("/proc/self/pagemap").context("opening /proc/self/pagemap")?;
    let mut pfns = Vec::with_capacity(pages);
    let mut entry = [0u8; 8];
    for i in 0..pages {
        let vaddr = base as u64 + (i * PAGE) as u64;
        pagemap.read_exact_at(&mut entry, vaddr / PAGE as u64 * 8)?;
        let e = u64::from_le_bytes(entry);
        ensure!(e >> 63 == 1, "page {i} not present");
        let pfn = e & ((1 << 55) - 1);
        ensure!(pfn != 0, "pagemap hides frame numbers (need root)");
        pfns.push(pfn);
    }
    std::fs::write(&manifest_path, Manifest { seed, pfns }.encode())?;
    let zero = (0..pages as u64).filter(|&i| is_zero_page(i)).count();
    println!("memtest: ready: {pages} pages ({zero} zero) at known frames, manifest {manifest_path}");
    std::fs::write("/tmp/memtest.ready", "")?;
    // Keeps counting, so a resumed system shows the process carried on.
    let mut count: u64 = 0;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        count += 1;
        if Path::new("/tmp/memtest.stop").exists() {
            return Ok(());
        }
        if Path::new("/tmp/memtest.check").exists() {
            let bad = (0..pages).find(|&i| {
                fill_page(seed, i as u64, &mut page);
                mem[i * PAGE..(i + 1) * PAGE] != page
            });
            let result = match bad {
                None => format!("memtest: data intact ({pages} pages), count {count}"),
                Some(i) => format!("memtest: DATA CHANGED at page {i}"),
            };
            println!("{result}");
            std::io::stdout().flush()?;
            std::fs::write("/tmp/memtest.result", &result)?;
            std::fs::remove_file("/tmp/memtest.check")?;
        }
    }
}
