//! `make bench`: runs scenarios several times and prints each figure's
//! minimum, median and maximum, since single TCG runs are noisy.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::scenarios::Report;

/// Runs `scenario` `runs` times and prints a summary table.
pub fn repeat(title: &str, runs: usize, scenario: fn(bool) -> Result<Report>) -> Result<()> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, (Vec<f64>, &'static str)> = BTreeMap::new();
    for run in 1..=runs {
        eprintln!("bench: {title}: run {run}/{runs}");
        for fig in scenario(false)?.figures {
            if !values.contains_key(&fig.what) {
                order.push(fig.what.clone());
            }
            values.entry(fig.what).or_insert_with(|| (Vec::new(), fig.unit)).0.push(fig.value);
        }
    }
    println!("== {title} ({runs} runs)");
    println!("   {:<44} {:>8} {:>8} {:>8}", "", "min", "median", "max");
    for what in order {
        let (mut v, unit) = values.remove(&what).unwrap();
        v.sort_by(f64::total_cmp);
        println!("   {what:<44} {:>8.0} {:>8.0} {:>8.0} {unit}", v[0], v[v.len() / 2], v[v.len() - 1]);
    }
    Ok(())
}

/// The disk table: ksave's write and read of `mib` MiB on AHCI, NVMe,
/// virtio-blk, IDE DMA and IDE PIO, each next to Linux's `dd` on the same
/// kind of disk; medians of `runs` (PIO, slow under TCG, once).
pub fn disk_table(runs: usize, mib: u64) -> Result<()> {
    use crate::disk::Bus;
    use crate::scenarios::{disk_bench, linux_dd};
    let rates = |r: &Report| (r.figures[0].value, r.figures[1].value);
    let mut rows = Vec::new();
    let paths = [
        ("AHCI", Bus::Ahci, "dma", runs),
        ("NVMe", Bus::Nvme, "dma", runs),
        ("virtio", Bus::Virtio, "dma", runs),
        ("IDE DMA", Bus::IdePrimary, "dma", runs),
        ("IDE PIO", Bus::IdePrimary, "pio", 1),
    ];
    for (label, bus, mode, n) in paths {
        let (mut kw, mut kr, mut dw, mut dr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 1..=n {
            eprintln!("bench: disk {label}: run {run}/{n}");
            let (w, r) = rates(&disk_bench(bus, mode, mib)?);
            kw.push(w);
            kr.push(r);
            let (w, r) = rates(&linux_dd(bus, mib)?);
            dw.push(w);
            dr.push(r);
        }
        rows.push((label, n, median(kw), median(dw), median(kr), median(dr)));
    }
    println!("== disk throughput, {mib} MiB, ksave vs Linux `dd bs=4M oflag/iflag=direct` on the same kind of disk (MB/s, median)");
    println!("   {:<9} {:>4} {:>12} {:>9} {:>6} {:>11} {:>8} {:>6}", "path", "runs", "ksave write", "dd write", "ratio", "ksave read", "dd read", "ratio");
    for (label, n, kw, dw, kr, dr) in rows {
        println!("   {label:<9} {n:>4} {kw:>12.0} {dw:>9.0} {:>6.2} {kr:>11.0} {dr:>8.0} {:>6.2}", kw / dw, kr / dr);
    }
    Ok(())
}

/// The save table: ksave saving a VM holding 256 MiB of memtest data to an
/// AHCI disk, raw and with LZ4, next to Linux's dd on the same kind of disk;
/// medians of `runs`.
pub fn save_table(runs: usize) -> Result<()> {
    use crate::disk::Bus;
    use crate::scenarios::{hibernate_bench, linux_dd};
    let mut by_name: BTreeMap<String, (Vec<f64>, &'static str)> = BTreeMap::new();
    let mut order = Vec::new();
    let mut record = |prefix: &str, r: &Report| {
        for f in &r.figures {
            let key = format!("{prefix}{}", f.what);
            if !by_name.contains_key(&key) {
                order.push(key.clone());
            }
            by_name.entry(key).or_insert_with(|| (Vec::new(), f.unit)).0.push(f.value);
        }
    };
    for run in 1..=runs {
        eprintln!("bench: save: run {run}/{runs}");
        record("raw: ", &hibernate_bench(false)?);
        record("lz4: ", &hibernate_bench(true)?);
        record("dd: ", &linux_dd(Bus::Ahci, 256)?);
    }
    let median_of = |k: &str| by_name.get(k).map(|(v, _)| median(v.clone()));
    println!("== save: kernel A holding 256 MiB of memtest data, AHCI, {runs} runs (median)");
    for key in &order {
        let (_, unit) = &by_name[key];
        println!("   {key:<58} {:>8.0} {unit}", median_of(key).unwrap());
    }
    if let (Some(ms), Some(mib), Some(dd), Some(lz_ms)) =
        (median_of("raw: save time in ksave"), median_of("raw: data stored"), median_of("dd: write"), median_of("lz4: save time in ksave"))
    {
        let rate = mib * 1.048576 / (ms / 1000.0);
        println!("   {:<58} {rate:>8.0} MB/s", "raw: data written / save time");
        println!("   {:<58} {:>8.2}", "raw save rate / Linux dd write rate", rate / dd);
        println!("   {:<58} {:>8.2}", "LZ4 save time / raw save time", lz_ms / ms);
    }
    Ok(())
}

/// ksave's hibernate + resume next to Linux's own hibernation, same VM,
/// same kernel, same load (`memtest_mib` MiB, which Linux's copy-to-RAM
/// snapshot must fit), medians of `runs`.
pub fn hibernation_table(runs: usize, memtest_mib: u64) -> Result<()> {
    use crate::scenarios::{ResumeBy, hibernate_resume_bench, linux_hibernate_resume_on};
    let pick = |r: &Report, what: &str| r.figures.iter().find(|f| f.what == what).map(|f| f.value).unwrap_or(f64::NAN);
    for lived_in in [false, true] {
        let mut rows = Vec::new();
        for (label, by) in
            [("ksave, resumed by QEMU -kernel", Some(ResumeBy::Multiboot1)), ("ksave, resumed by kernel C", Some(ResumeBy::KernelC)), ("Linux (swap)", None)]
        {
            let (mut hib, mut size, mut pages, mut res) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for run in 1..=runs {
                eprintln!("bench: hibernation ({}), {label}: run {run}/{runs}", if lived_in { "lived-in" } else { "fresh" });
                let r = match by {
                    Some(by) => hibernate_resume_bench(by, memtest_mib, lived_in)?,
                    None => linux_hibernate_resume_on(memtest_mib, lived_in, false)?,
                };
                hib.push(pick(&r, "hibernate: start to power-off"));
                size.push(pick(&r, "image size"));
                pages.push(pick(&r, "pages in the image"));
                res.push(pick(&r, if by.is_some() { "resume 1: power-on to A running" } else { "resume: power-on to A running" }));
            }
            rows.push(HibernationRow { label, hibernate_ms: median(hib), image_mib: median(size), pages: median(pages), resume_ms: median(res) });
        }
        let memory = if lived_in { "lived-in memory (most of it churned and freed first)" } else { "fresh memory" };
        print_against_linux(&format!("hibernate + resume, {memtest_mib} MiB memtest in a 512 MiB VM, {memory}, AHCI, {runs} runs (median)"), &rows);
    }
    Ok(())
}

/// The resume's cost against RAM: the same load (`memtest_mib` MiB on
/// lived-in memory) in a 512 MiB and a 5 GiB VM (6.12; q35 for 5 GiB), resumed by QEMU
/// `-kernel`: ksave leaving the free pages as found (the kernel relies on
/// nothing in them), ksave zeroing them (A booted with `init_on_free=1`,
/// as every resume did before), and Linux's own hibernation; medians of
/// `runs`.
pub fn resume_by_ram_table(runs: usize, memtest_mib: u64) -> Result<()> {
    use crate::scenarios::{Kernel, Machine, hibernate_resume_bench_on, linux_hibernate_resume_in};
    let pick = |r: &Report, what: &str| r.figures.iter().find(|f| f.what == what).map(|f| f.value).unwrap_or(f64::NAN);
    let small = Machine { memory_mib: 512, ..Machine::qemu64_high_ram(Kernel::Linux6_12) };
    let large = Machine::qemu64_high_ram(Kernel::Linux6_12);
    let ways = [
        ("ksave, free pages left", small, Some(false)),
        ("ksave, free pages left", large, Some(false)),
        ("ksave, free pages zeroed", small, Some(true)),
        ("ksave, free pages zeroed", large, Some(true)),
        ("Linux (swap)", small, None),
        ("Linux (swap)", large, None),
    ];
    println!("== resume against RAM: {memtest_mib} MiB memtest on lived-in memory, 6.12, AHCI, resumed by QEMU -kernel, {runs} runs (median)");
    println!("   {:<26} {:>8} {:>10} {:>13} {:>13} {:>10} {:>19}", "", "RAM MiB", "image MiB", "pages zeroed", "free left", "load ms", "power-on to A ms");
    for (label, machine, init_on_free) in ways {
        let mut figures: [Vec<f64>; 5] = Default::default();
        for run in 1..=runs {
            eprintln!("bench: resume against RAM, {label}, {} MiB: run {run}/{runs}", machine.memory_mib);
            let (r, running) = match init_on_free {
                Some(zeroed) => (hibernate_resume_bench_on(machine, memtest_mib, zeroed, false, false)?, "resume 1: power-on to A running"),
                None => (linux_hibernate_resume_in(machine, memtest_mib, true, false)?, "resume: power-on to A running"),
            };
            let row = [
                pick(&r, "image size"),
                pick(&r, "resume 1: pages zeroed"),
                pick(&r, "resume 1: free pages left as found"),
                pick(&r, "resume 1: one pass over memory (load)"),
                pick(&r, running),
            ];
            for (column, value) in figures.iter_mut().zip(row) {
                column.push(value);
            }
        }
        let [image, zeroed, left, load, running] = figures.map(|v| match median(v) {
            m if m.is_nan() => "-".to_string(),
            m => format!("{m:.0}"),
        });
        println!("   {label:<26} {:>8} {image:>10} {zeroed:>13} {left:>13} {load:>10} {running:>19}", machine.memory_mib);
    }
    println!("   (load: ksave's one pass, every page loaded, zeroed or left; Linux's resume has no such figure: it boots a kernel first;");
    println!("    the 5 GiB kernel's image is larger by its page structs, 64 bytes a page)");
    Ok(())
}

/// The save and the resume's one pass on one CPU (`ksave hibernate
/// --one-cpu`, `ksave.helpers=0`) and on two (the other coding LZ4 for the
/// save, checking and decoding for the resume: crates/core/src/helpers.rs),
/// the same two-CPU VM otherwise: raw and LZ4 images on 512 MiB, and 5 GiB
/// whose free pages are zeroed (init_on_free=1); medians of `runs`.
pub fn resume_by_cpus_table(runs: usize, memtest_mib: u64) -> Result<()> {
    use crate::scenarios::{Kernel, Machine, hibernate_resume_bench_on};
    let pick = |r: &Report, what: &str| r.figures.iter().find(|f| f.what == what).map(|f| f.value).unwrap_or(f64::NAN);
    let small = Machine { memory_mib: 512, ..Machine::qemu64_high_ram(Kernel::Linux6_12) };
    let large = Machine::qemu64_high_ram(Kernel::Linux6_12);
    let ways = [("raw", small, false, false), ("LZ4", small, false, true), ("raw, free pages zeroed", large, true, false)];
    println!("== save and resume against CPUs: {memtest_mib} MiB memtest on lived-in memory, 6.12, AHCI, resumed by QEMU -kernel, {runs} runs (median)");
    println!("   {:<24} {:>8} {:>5} {:>10} {:>8} {:>13} {:>11} {:>10} {:>13}", "image", "RAM MiB", "CPUs", "image MiB", "save ms", "pages zeroed", "jobs other", "jobs own", "load ms");
    for (label, machine, zeroed, lz4) in ways {
        for cpus in [1, 2] {
            let mut figures: [Vec<f64>; 6] = Default::default();
            for run in 1..=runs {
                eprintln!("bench: resume against CPUs, {label}, {} MiB, {cpus} CPUs: run {run}/{runs}", machine.memory_mib);
                let r = hibernate_resume_bench_on(machine, memtest_mib, zeroed, lz4, cpus == 1)?;
                let row = [
                    pick(&r, "image size"),
                    pick(&r, "save: ksave's save"),
                    pick(&r, "resume 1: pages zeroed"),
                    pick(&r, "resume 1: jobs on the other CPUs"),
                    pick(&r, "resume 1: jobs on the loading CPU"),
                    pick(&r, "resume 1: one pass over memory (load)"),
                ];
                for (column, value) in figures.iter_mut().zip(row) {
                    column.push(value);
                }
            }
            let [image, save, zeroed, other, own, load] = figures.map(|v| format!("{:.0}", median(v)));
            println!("   {label:<24} {:>8} {cpus:>5} {image:>10} {save:>8} {zeroed:>13} {other:>11} {own:>10} {load:>13}", machine.memory_mib);
        }
    }
    println!("   (save: ksave's, from its entry; load: ksave's one pass; a resume's job is a coded chunk's check and decode, a raw chunk's check,");
    println!("    or 2 MiB of zeroing; the save's jobs, the LZ4 coding of 8-page groups, are in the e2e logs)");
    Ok(())
}

/// ksave.efi's choice, measured: the rate it could read the image at
/// through the firmware's Block I/O before leaving the firmware (64 MiB of
/// the disk's start, the image's blocks, 2 MiB requests, OVMF's virtio-blk
/// driver) next to its own one pass after (its virtio driver, the checks,
/// LZ4 and the zeroing), on the same disk and VM; medians of `runs`.
pub fn efi_read_table(runs: usize) -> Result<()> {
    let pick = |r: &Report, what: &str| r.figures.iter().find(|f| f.what == what).map(|f| f.value).unwrap_or(f64::NAN);
    let (mut firmware, mut own) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        eprintln!("bench: ksave.efi's reads: run {run}/{runs}");
        let r = crate::scenarios::efi_read_bench()?;
        firmware.push(pick(&r, "resume 1: firmware Block I/O read"));
        own.push(pick(&r, "resume 1: ksave's one pass, the image's bytes over its time"));
    }
    let (firmware, own) = (median(firmware), median(own));
    println!("== ksave.efi: reading the image through the firmware or with its own driver (OVMF, virtio-blk, 512 MiB, 128 MiB memtest), {runs} runs (median)");
    println!("   {:<62} {firmware:>8.0} MB/s", "firmware Block I/O, before leaving it (64 MiB raw reads)");
    println!("   {:<62} {own:>8.0} MB/s", "ksave's own driver, after (one pass: reads, checks, zeroing)");
    println!("   (the one pass is CPU work under TCG: checks, LZ4, zeroing; ksave's own raw read rate on virtio-blk is in the disk table)");
    Ok(())
}

/// One way to hibernate and resume, medians.
struct HibernationRow {
    label: &'static str,
    hibernate_ms: f64,
    image_mib: f64,
    pages: f64,
    resume_ms: f64,
}

/// Prints `rows` under `title`, each next to the last row, Linux's own
/// hibernation: pages stored, and hibernate + resume time.
fn print_against_linux(title: &str, rows: &[HibernationRow]) {
    let linux = rows.last().expect("a Linux row");
    let linux_total = linux.hibernate_ms + linux.resume_ms;
    println!("== {title}");
    println!(
        "   {:<32} {:>13} {:>10} {:>8} {:>10} {:>13} {:>10} {:>9}",
        "", "hibernate ms", "image MiB", "pages", "vs Linux", "resume ms", "total ms", "vs Linux"
    );
    for row in rows {
        let total = row.hibernate_ms + row.resume_ms;
        println!(
            "   {:<32} {:>13.0} {:>10.0} {:>8.0} {:>10.2} {:>13.0} {total:>10.0} {:>9.2}",
            row.label,
            row.hibernate_ms,
            row.image_mib,
            row.pages,
            row.pages / linux.pages,
            row.resume_ms,
            total / linux_total
        );
    }
}

/// The median of `values` (NaN for none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The Debian table: `systemctl hibernate` to power-off and power-on to
/// `systemctl is-system-running` answering, for ksave (as installed, and
/// with `--drop-caches`) and for Linux's own hibernation to swap on the
/// same disk; `runs` rounds each on one system (medians).
pub fn debian_table(runs: usize) -> Result<()> {
    use crate::scenarios::{Firmware, Hibernator};
    let rows = debian_rows(
        Firmware::Bios,
        &[("ksave", Hibernator::Ksave, false), ("ksave --drop-caches", Hibernator::KsaveDroppingCaches, false), ("Linux (swap partition, LZO)", Hibernator::LinuxSwap, false)],
        runs,
    )?;
    print_against_linux(&format!("Debian bookworm with systemd, 512 MiB, AHCI: systemctl hibernate, power on, {runs} rounds each (median)"), &rows);
    println!("   (hibernate: systemctl hibernate to power-off; resume: power-on to `systemctl is-system-running` answering `running`)");
    Ok(())
}

/// The Debian table on UEFI (OVMF): ksave resumed by ksave.efi from its
/// boot entry, ksave resumed by the initramfs (GRUB, Linux, then ksave),
/// and Linux's own hibernation to swap; the same figures as
/// [`debian_table`], and the resume's ratio to Linux's.
pub fn debian_uefi_table(runs: usize) -> Result<()> {
    use crate::scenarios::{Firmware, Hibernator};
    let rows = debian_rows(
        Firmware::Uefi,
        &[
            ("ksave, resumed by ksave.efi", Hibernator::Ksave, true),
            ("ksave, resumed by the initramfs", Hibernator::Ksave, false),
            ("Linux (swap partition, LZO)", Hibernator::LinuxSwap, false),
        ],
        runs,
    )?;
    print_against_linux(&format!("Debian bookworm with systemd on UEFI (OVMF), 512 MiB, AHCI: systemctl hibernate, power on, {runs} rounds each (median)"), &rows);
    let linux = rows.last().expect("a Linux row").resume_ms;
    for row in &rows[..rows.len() - 1] {
        println!("   resume (power-on to running), {} / Linux's: {:.2}", row.label, row.resume_ms / linux);
    }
    Ok(())
}

/// One row a way (label, hibernator, resumed by ksave.efi), each from
/// its own Debian system on `firmware`, `runs` rounds (medians).
fn debian_rows(firmware: crate::scenarios::Firmware, ways: &[(&'static str, crate::scenarios::Hibernator, bool)], runs: usize) -> Result<Vec<HibernationRow>> {
    let median_of = |r: &Report, what: &str| median(r.figures.iter().filter(|f| f.what == what).map(|f| f.value).collect());
    let mut rows = Vec::new();
    for &(label, by, by_firmware) in ways {
        eprintln!("bench: Debian ({firmware:?}), {label}: {runs} rounds");
        let r = crate::scenarios::debian_hibernation_bench(by, firmware, by_firmware, runs, false)?;
        rows.push(HibernationRow {
            label,
            hibernate_ms: median_of(&r, "hibernate: systemctl hibernate to power-off"),
            image_mib: median_of(&r, "image size"),
            pages: median_of(&r, "pages in the image"),
            resume_ms: median_of(&r, "resume: power-on to systemctl is-system-running: running"),
        });
    }
    Ok(rows)
}

/// Prints, under `r`, one ratio a row: (label, figure, over figure).
fn print_ratios(r: &crate::scenarios::Report, rows: &[(&str, &str, &str)]) {
    let pick = |what: &str| r.figures.iter().find(|f| f.what == what).map(|f| f.value).unwrap_or(f64::NAN);
    for (label, over, under) in rows {
        println!("   {label:<58} {:>8.2}", pick(over) / pick(under));
    }
    println!();
}

/// Sealed against plain (`make bench`): ksave's save and load of the same
/// memory, and the cipher's rate on the host next to OpenSSL's.
pub fn encrypted_table() -> Result<()> {
    eprintln!("bench: sealed vs plain");
    println!("{}", crate::scenarios::seal_host_bench()?);
    // QEMU's default CPU has no AES-NI: software AES on both sides; then
    // with it, as every x86-64 laptop of the last decade.
    for cpu in ["qemu64", "qemu64,+aes,+pclmulqdq"] {
        let r = crate::scenarios::encrypted_bench(cpu, false)?;
        println!("{r}");
        print_ratios(&r, &[
            ("sealed / plain, ksave's save time", "sealed: ksave's save", "plain: ksave's save"),
            ("sealed, two CPUs / one, ksave's save time", "sealed: ksave's save", "sealed, one CPU: ksave's save"),
            ("sealed / plain, ksave's load time", "sealed: ksave's load at the resume", "plain: ksave's load at the resume"),
        ]);
    }
    Ok(())
}

/// The image in a file next to the partition on the same disk, in the
/// same run (one run: a 3.6 GiB file system is filled once), and what
/// finding a file's blocks again costs `ksave hibernate`.
pub fn file_table() -> Result<()> {
    eprintln!("bench: file vs partition");
    let r = crate::scenarios::file_bench(false)?;
    println!("{r}");
    print_ratios(&r, &[
        ("file / partition, save rate", "file: save rate (image / ksave's save time)", "partition: save rate (image / ksave's save time)"),
        ("file / partition, save's disk transfers", "file: save, disk transfers alone", "partition: save, disk transfers alone"),
        ("file / partition, resume rate", "file: resume rate (image / ksave's load time)", "partition: resume rate (image / ksave's load time)"),
    ]);
    Ok(())
}
