//! Encrypted machines (docs/ENCRYPTION.md): the image in a file on ext4 on
//! LUKS2, sealed. Between the boots the harness reads the disk image for
//! what must not be there (memtest's pages, the data key) and tampers with
//! what ksave wrote, as anyone with the powered-off disk can
//! (qemu/initramfs/scenarios/encrypted-store.sh).

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use ksave_format::PAGE;
use ksave_format::chunk;
use ksave_format::verdict::code;

use super::{Kernel, Machine, Report, SECOND, complete_header, damage_first_chunk, kernel_on};
use crate::disk::{Bus, TestDisk};
use crate::{Vm, VmConfig, build_input};

/// memtest's seed in the scenarios (qemu/initramfs/lib/test.sh).
const MEMTEST_SEED: u64 = 42;

/// The test volumes' passphrase, as qemu/initramfs/lib/test.sh has it.
pub const LUKS_PASSPHRASE: &str = "ksave-test-passphrase";

/// How many of `disk`'s sectors begin with the first 64 bytes of one of
/// memtest's first `pages` pages: a page of the test's memory in
/// plaintext, wherever it lies (an image writes pages on sector
/// boundaries).
pub fn memtest_pages_on(disk: &Path, pages: u64) -> Result<usize> {
    let mut wanted = std::collections::HashSet::new();
    let mut page = [0u8; PAGE];
    for i in (0..pages).filter(|&i| !crate::memdata::is_zero_page(i)) {
        crate::memdata::fill_page(MEMTEST_SEED, i, &mut page);
        wanted.insert(<[u8; 64]>::try_from(&page[..64]).unwrap());
    }
    let bytes = std::fs::read(disk).with_context(|| format!("reading {}", disk.display()))?;
    Ok(bytes.chunks_exact(512).filter(|s| wanted.contains(&<[u8; 64]>::try_from(&s[..64]).unwrap())).count())
}

/// Whether `needle` lies anywhere in `disk`.
fn disk_holds(disk: &Path, needle: &[u8]) -> Result<bool> {
    let bytes = std::fs::read(disk)?;
    Ok(bytes.windows(needle.len()).any(|w| w == needle))
}

/// Rewrites the image's header with the re-entry address an attacker
/// wants, its CRC made good: only the header's tag can tell.
fn forge_reentry(disk: &Path) -> Result<()> {
    let (at, mut header) = complete_header(disk)?;
    ensure!(header.sealed(), "the image is not sealed");
    header.reentry = 0x4141_4141;
    let mut block = [0u8; PAGE];
    header.encode(&mut block);
    std::fs::OpenOptions::new().write(true).open(disk)?.write_all_at(&block, at)?;
    Ok(())
}

/// `vm` hibernated (round `round`) and powered off.
fn hibernated(vm: &mut Vm, round: &str) -> Result<()> {
    vm.expect(&format!("ksave-test: hibernating ({round})"), 600 * SECOND)?;
    vm.expect("ksave: powering off", 300 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)
}

/// `vm`'s boot (kernel C) resumed nothing: no jump, it carried on.
fn not_resumed(vm: &mut Vm) -> Result<()> {
    vm.expect("ksave-test: nothing resumed", 60 * SECOND)?;
    vm.refute_seen("ksave: resume: jumping")?;
    vm.expect_exit(0, 60 * SECOND)
}

/// The encrypted story: a plaintext store refused; an image in a file on
/// LUKS2 sealed (no memtest page and no key on the disk); refused by a
/// bootloader start (which cannot unlock), resumed by kernel C after the
/// unlock, its key block destroyed; a wrong passphrase three times: not
/// resumed then, nor later; a live system's mount of the volume refuses
/// the image; a forged header and a damaged chunk refused.
pub fn encrypted_store_story(echo: bool) -> Result<Report> {
    let bus = Bus::Virtio;
    // The images that are resumed are made and loaded on a CPU with AES-NI,
    // as every laptop's (ksave's AES-NI path); the later ones (a snapshot
    // read back, a damaged chunk refused) on QEMU's default CPU, without
    // (ksave's software AES). One CPU model from a save to its resume.
    let with_aes_ni = Machine { memory_mib: 320, cpu: "qemu64,+aes,+pclmulqdq", ..Machine::qemu64(Kernel::Linux6_12).on(bus) };
    let without = Machine { cpu: "qemu64", ..with_aes_ni };
    let mut machine = with_aes_ni;
    let name = "encrypted";
    let disk = TestDisk::create_on(bus, name, 16 + 900, 16)?;
    let mut report = Report::new("an image file on LUKS2: sealed, resumed only after the unlock, tampering refused");
    let boot = |machine: &Machine, vm_name: &str, scenario: &str| -> Result<Vm> {
        let config = kernel_on(machine.kernel, vm_name, scenario)?.arg(disk.qemu_args(bus, None));
        Vm::start(VmConfig { echo, ..machine.apply(config)? })
    };
    let mut vm = boot(&machine, name, "encrypted-store ksave.memtest_mib=64")?;
    vm.expect("ksave-test: refused: a plaintext store", 300 * SECOND)?;
    let store = vm.expect("ksave-test: encrypted store:", 300 * SECOND)?;
    // "--partuuid G --file-at F --key-at UUID:BYTES"
    let words: Vec<&str> = store.text.split("encrypted store: ").nth(1).context("no store")?.split_whitespace().collect();
    let value = |flag: &str| words.iter().position(|w| *w == flag).and_then(|i| words.get(i + 1)).map(|s| s.to_string()).with_context(|| format!("no {flag} in {words:?}"));
    let (guid, file_at, key_at) = (value("--partuuid")?, value("--file-at")?, value("--key-at")?);
    let resume_c = |round: &str, extra: &str| format!("resume-c ksave.partuuid={guid} ksave.file={file_at} ksave.key_at={key_at} ksave.luks=2{extra} ksave.round={round}");

    // Round 1: sealed on the disk; a bootloader start refuses it and keeps
    // it; kernel C resumes it after the unlock.
    vm.expect("ksave-test: hibernating (1)", 600 * SECOND)?;
    // The file system on the volume is recorded by its own UUID (it has no
    // PARTUUID): a mount since is found at the resume.
    vm.expect("ksave: recorded: ext4 UUID", 60 * SECOND)?;
    // The other CPU, offline for the jump, sealed its share of the chunks.
    let jobs = vm.expect_metrics("jobs_helped", 300 * SECOND)?;
    let (helped, own) = (jobs.get("jobs_helped")?, jobs.get("jobs_own")?);
    ensure!(helped > 0.0, "2 CPUs, yet the save sealed every chunk on one ({own} chunks)");
    report.add("save 1: chunks sealed by the other CPU", helped, "chunks");
    report.add("save 1: chunks sealed by the saving CPU", own, "chunks");
    // Sealing is the deepest job a helper runs, on a stack with no guard
    // page below it: a quarter of it stays unused.
    let stack = vm.expect_metrics("helper_stack_kib", 60 * SECOND)?.get("helper_stack_kib")?;
    ensure!(stack <= 24.0, "the other CPU used {stack} KiB of its 32 KiB stack");
    report.add("save 1: the other CPU's stack used", stack, "KiB");
    let saved = vm.expect_metrics("image_bytes", 300 * SECOND)?;
    vm.expect("ksave: powering off", 60 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    report.add("image 1", saved.get("image_bytes")? / 1048576.0, "MiB");
    let plaintext = memtest_pages_on(&disk.path, 64 << 8)?;
    ensure!(plaintext == 0, "{plaintext} of memtest's pages lie on the disk in plaintext");
    let multiboot = VmConfig::new(&format!("{name}-multiboot"))
        .arg(["-kernel".to_string(), build_input("ksave.elf")?.display().to_string(), "-append".into(), format!("ksave.resume={guid} ksave.file={file_at}")])
        .arg(disk.qemu_args(bus, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(multiboot)? })?;
    vm.expect_refusal(code::SEALED, 300 * SECOND).context("a bootloader start of an encrypted image")?;
    vm.refute_seen("image invalidated")?;
    // ksave.elf alone names no way back to a normal boot: it stops
    // (isa-debug-exit, ExitCode::NoImage).
    vm.expect_exit(39, 60 * SECOND)?;
    let mut vm = boot(&machine, &format!("{name}-1"), &resume_c("1", ""))?;
    let key = vm.expect("ksave-test: key block holds", 300 * SECOND)?;
    let key_hex = key.text.split("holds ").nth(1).context("no key")?.trim().to_string();
    ensure!(key_hex.len() == 64 && key_hex != "0".repeat(64), "the key block held no key: {key_hex}");
    let key: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16)).collect::<Result<_, _>>()?;
    let jump = vm.expect("ksave: resume: jumping to the saved kernel", 300 * SECOND)?;
    report.add_ms("resume 1 by kernel C after the unlock: power-on to the jump", jump.at);
    vm.expect("ksave-test: resumed (1)", 300 * SECOND)?;
    // The key was on the disk only in its key block, through dm-crypt, and
    // is not even there now.
    ensure!(!disk_holds(&disk.path, &key)?, "the data key lies on the disk in plaintext");

    // Round 2, and a wrong passphrase, three times: no resume, the image
    // invalidated; the next boot with the right one does not resume it.
    hibernated(&mut vm, "2")?;
    let mut vm = boot(&machine, &format!("{name}-wrong"), &resume_c("2", " ksave.luks_pass=not-the-passphrase"))?;
    vm.expect("ksave-test: the volume stays locked", 300 * SECOND)?;
    vm.expect_refusal(code::SEALED, 120 * SECOND).context("the boot whose unlock failed")?;
    not_resumed(&mut vm)?;
    let again = format!("encrypted-store ksave.phase=again ksave.memtest_mib=64 ksave.partuuid={guid} ksave.file={file_at} ksave.key_at={key_at}");
    machine = without;
    let mut vm = boot(&machine, &format!("{name}-again"), &format!("{again} ksave.export=1"))?;
    vm.expect("ksave: the key block is destroyed", 300 * SECOND)?;
    vm.expect("ksave-test: not resumed later: invalidated, key block destroyed", 300 * SECOND)?;
    // Set up again, the file where it was: the same places.
    let store_again = vm.expect("ksave-test: encrypted store:", 300 * SECOND)?;
    ensure!(store_again.text == store.text, "set up again, the store moved: {:?}, then {:?}", store.text, store_again.text);

    vm.expect("ksave-test: snapshot verified and exported", 600 * SECOND)?;
    // Round 3: while hibernated, a live system unlocks the volume and
    // mounts it: the next boot refuses the image (its ext4 was mounted
    // since) and keeps what the live system wrote.
    hibernated(&mut vm, "3")?;
    let mut vm = boot(&machine, &format!("{name}-live"), "encrypted-store ksave.phase=live")?;
    vm.expect("ksave-test: mounted the hibernated system's volume", 300 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    let mut vm = boot(&machine, &format!("{name}-after-live"), &resume_c("3", ""))?;
    vm.expect_refusal(code::FILESYSTEM_MOUNTED, 300 * SECOND).context("the boot after a live system mounted the volume")?;
    vm.expect("ksave: the key block is destroyed", 60 * SECOND)?;
    not_resumed(&mut vm)?;
    // Round 4: its header forged (the re-entry address, the CRC made
    // good): refused by its tag before anything is written.
    let mut vm = boot(&machine, &format!("{name}-again-2"), &again)?;
    vm.expect("ksave: the key block holds no key", 300 * SECOND)?;
    vm.expect("ksave-test: what the live system wrote is there", 300 * SECOND)?;
    hibernated(&mut vm, "3")?;
    forge_reentry(&disk.path)?;
    let mut vm = boot(&machine, &format!("{name}-forged"), &resume_c("4", ""))?;
    vm.expect_refusal(code::SEALED, 300 * SECOND).context("a forged header")?;
    not_resumed(&mut vm)?;
    // Round 5: a chunk's payload damaged: ksave refuses it by its tag
    // while loading; the image is invalidated and the next boot is normal.
    let mut vm = boot(&machine, &format!("{name}-again-3"), &again)?;
    vm.expect("ksave-test: not resumed later: invalidated, key block destroyed", 300 * SECOND)?;
    hibernated(&mut vm, "3")?;
    damage_first_chunk(&disk.path)?;
    let mut vm = boot(&machine, &format!("{name}-damaged"), &resume_c("5", ""))?;
    vm.expect("ksave: resuming the image", 300 * SECOND)?;
    vm.expect("ksave: image invalidated, so no later boot tries it again", 300 * SECOND)?;
    let line = vm.expect("ksave: not resuming: image damaged: chunk 0: tag does not check", 5 * SECOND)?;
    let refused = vm.expect_refusal(code::DAMAGED, 5 * SECOND)?;
    ensure!(refused.get("memory_lost")? == 1.0, "a chunk refused while loading gives up this boot's memory");
    report.add_ms("damaged chunk: power-on to its refusal", line.at);
    vm.refute_seen("ksave: resume: jumping")?;
    vm.expect_exit(0, 60 * SECOND)?;
    Ok(report)
}

/// `make bench`: the same memory (256 MiB of memtest data in a 512 MiB VM,
/// two CPUs, virtio-blk) saved plain into ksave's partition, sealed into a
/// file on ext4 on LUKS2 on the same disk, and sealed there on one CPU
/// (`ksave hibernate --one-cpu`), in turns, three times each; the plain
/// ones too resumed by kernel C after the unlock (the file system on the
/// volume, which every image saw, is checked there); ksave's own save and
/// load times compared (medians), with the
/// kernel's dm-crypt rate in the same VM (qemu/initramfs/scenarios/encrypted-bench.sh).
/// `cpu`: QEMU's CPU model; with `+aes,+pclmulqdq` ksave and the kernel
/// take their AES-NI paths (emulated by TCG's helpers).
pub fn encrypted_bench(cpu: &'static str, echo: bool) -> Result<Report> {
    let bus = Bus::Virtio;
    let machine = Machine { cpu, ..Machine::qemu64(Kernel::Linux6_12).on(bus) };
    let name = if cpu == "qemu64" { "bench-encrypted" } else { "bench-encrypted-aesni" };
    let part_mib = 700;
    let disk = TestDisk::create_allocated(name, part_mib + 1000, part_mib)?;
    let mut report = Report::new(&format!("the same memory saved plain (partition) and sealed (a file on LUKS2), same disk (virtio-blk), -cpu {cpu}"));
    let config = kernel_on(machine.kernel, name, "encrypted-bench ksave.memtest_mib=256")?.arg(disk.qemu_args(bus, None));
    let mut vm = Vm::start(VmConfig { echo, ..machine.apply(config)? })?;
    let store = vm.expect("ksave-test: encrypted store:", 600 * SECOND)?;
    let words: Vec<&str> = store.text.split("encrypted store: ").nth(1).context("no store")?.split_whitespace().collect();
    let value = |flag: &str| words.iter().position(|w| *w == flag).and_then(|i| words.get(i + 1)).map(|s| s.to_string()).with_context(|| format!("no {flag} in {words:?}"));
    let (guid, file_at, key_at) = (value("--partuuid")?, value("--file-at")?, value("--key-at")?);
    let dm_crypt = vm.expect_metrics("dm_crypt_encrypt_mib_s", 300 * SECOND)?;
    // Per store: save ms, load ms, image bytes.
    const KINDS: [(&str, &str); 3] = [("plain", ""), ("sealed", ""), ("sealed", ", one CPU")];
    let mut runs: [Vec<[f64; 3]>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for round in 1..=9 {
        let index = (round - 1) % 3;
        let (store, cpus) = KINDS[index];
        vm.expect(&format!("ksave-test: hibernating ({round}, {store}{cpus})"), 600 * SECOND)?;
        let saved = vm.expect_metrics("save_ms", 600 * SECOND)?;
        vm.expect("ksave: powering off", 60 * SECOND)?;
        vm.expect_exit(0, 60 * SECOND)?;
        // Both by kernel C after the unlock: the plain image too saw the
        // file system on the volume, which a bootloader start cannot check.
        let args = if store == "plain" {
            format!("resume-c ksave.partuuid={} ksave.luks=2", crate::disk::PART_GUID)
        } else {
            format!("resume-c ksave.partuuid={guid} ksave.file={file_at} ksave.key_at={key_at} ksave.luks=2")
        };
        let resume = kernel_on(machine.kernel, &format!("{name}-{round}"), &args)?;
        vm = Vm::start(VmConfig { echo, ..machine.apply(resume.arg(disk.qemu_args(bus, None)))? })?;
        let loaded = vm.expect_metrics("resume_load_ms", 600 * SECOND)?;
        vm.expect(&format!("ksave-test: resumed ({round})"), 300 * SECOND)?;
        runs[index].push([saved.get("save_ms")?, loaded.get("resume_load_ms")?, saved.get("image_bytes")?]);
    }
    vm.expect("ksave-test: bench done", 300 * SECOND)?;
    vm.expect_exit(0, 60 * SECOND)?;
    for (index, (store, cpus)) in KINDS.into_iter().enumerate() {
        let store = format!("{store}{cpus}");
        let median = |k: usize| {
            let mut v: Vec<f64> = runs[index].iter().map(|r| r[k]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        report.add(format!("{store}: image (median of 3)"), median(2) / 1048576.0, "MiB");
        report.add(format!("{store}: ksave's save"), median(0), "ms");
        report.add(format!("{store}: ksave's load at the resume"), median(1), "ms");
        report.add(format!("{store}: save rate"), median(2) / 1e3 / median(0).max(1.0), "MB/s");
        report.add(format!("{store}: load rate"), median(2) / 1e3 / median(1).max(1.0), "MB/s");
    }
    report.add("dm-crypt aes-xts-512 in this VM, encrypt (cryptsetup benchmark)", dm_crypt.get("dm_crypt_encrypt_mib_s")? * 1.048576, "MB/s");
    report.add("dm-crypt aes-xts-512 in this VM, decrypt", dm_crypt.get("dm_crypt_decrypt_mib_s")? * 1.048576, "MB/s");
    Ok(report)
}

/// The cipher's own rate on the host CPU, one core: ksave's sealing
/// (AES-256-GCM, 64-page chunks, AES-NI when the CPU has it) over 256 MiB,
/// next to OpenSSL's AES-256-GCM on the same CPU (`cryptsetup benchmark`
/// needs the kernel's AF_ALG, which this host does not offer; the VM bench
/// runs it there).
pub fn seal_host_bench() -> Result<Report> {
    use ksave_format::seal::{DataKey, KEY_LEN, Seal, Sealed};
    let mut report = Report::new("AES-256-GCM on the host CPU, one core");
    let seal = Seal::new(&DataKey([7; KEY_LEN]));
    let mut chunk = vec![0x5au8; chunk::SEALED_RAW_PAGES * PAGE];
    let total = 256u64 << 20;
    let start = std::time::Instant::now();
    for i in 0..total / chunk.len() as u64 {
        std::hint::black_box(seal.seal(Sealed::Chunk(i), &[0u8; 64], &mut chunk));
    }
    report.add("ksave's sealing (RustCrypto aes-gcm)", total as f64 / 1e6 / start.elapsed().as_secs_f64(), "MB/s");
    let out = std::process::Command::new("openssl").args(["speed", "-evp", "aes-256-gcm", "-seconds", "2", "-bytes", "262144"]).output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(k) = text.lines().find_map(|l| l.strip_prefix("AES-256-GCM")).and_then(|v| v.trim().trim_end_matches('k').parse::<f64>().ok()) {
            report.add("OpenSSL AES-256-GCM (openssl speed -evp)", k * 1000.0 / 1e6, "MB/s");
        }
    }
    Ok(report)
}
