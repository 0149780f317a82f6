//! `memtest`: runs in kernel A during the e2e tests. Fills memory with
//! known data, records where each page sits physically, and checks the data
//! again whenever asked, to show a save or resume changed nothing.
//!
//!   memtest fill --mib N --seed S --manifest PATH
//!
//! Then: touch /tmp/memtest.check to verify (answer, with a counter that
//! ticks every 50 ms, on stdout and in /tmp/memtest.result), touch
//! /tmp/memtest.stop to exit.

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
    ensure!(args.get(1).map(String::as_str) == Some("fill"), "usage: memtest fill --mib N --seed S --manifest PATH");
    let mib: usize = arg(&args, "--mib")?.parse()?;
    let seed: u64 = arg(&args, "--seed")?.parse()?;
    let manifest_path = arg(&args, "--manifest")?;
    let pages = mib * 256;
    let len = pages * PAGE;
    // SAFETY: an anonymous private mapping of `len` bytes, used only here.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
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
