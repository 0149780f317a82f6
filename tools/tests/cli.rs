//! The built `ksave` on crafted images and disks, as a user runs it: bad
//! input gets a clear error and a non-zero status, never a hang, a panic or
//! an abort; a closed pipe ends quietly; an export is the owner's alone.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ksave_format::codec::Lz4;
use ksave_format::commit::{self, Device, NoneFree, Plan};
use ksave_format::header::{Header, META_BYTES};
use ksave_format::store::{Claim, Claimed};
use ksave_format::writer::{self, GROUPS_IN_FLIGHT, GroupBuffers, Inline, Memory, Sink};
use ksave_format::{PAGE, Range};

const RAM: [Range; 1] = [Range { start: 0x10_0000, end: 0x40_0000 }];
const CLAIM: Claim = Claim { id: [3; 16], disk: [4; 16] };

/// Pages of noise, a different word in each.
struct Noise;

impl Memory for Noise {
    fn page(&self, pfn: u64) -> Option<&[u8; PAGE]> {
        let page: &'static mut [u8; PAGE] = Box::leak(Box::new([0u8; PAGE]));
        for (i, word) in page.chunks_mut(8).enumerate() {
            word.copy_from_slice(&(pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
        }
        Some(page)
    }
}

/// An image store in a `Vec`.
struct Store(Vec<u8>);

impl Sink for Store {
    type Error = std::io::Error;
    fn write_raw(&mut self, offset: u64, header: &[u8], pfns: &[u64]) -> std::io::Result<()> {
        self.write_bytes(offset, header)?;
        for (i, pfn) in pfns.iter().enumerate() {
            self.write_bytes(offset + (header.len() + i * PAGE) as u64, Noise.page(*pfn).unwrap())?;
        }
        Ok(())
    }
    fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.0[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

impl Device for Store {
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A complete image of [`RAM`] in a partition image file of 8 MiB.
fn image_file(dir: &Path) -> std::path::PathBuf {
    let mut store = Store(vec![0; 8 << 20]);
    Header::claiming(CLAIM, "claimed").encode((&mut store.0[..PAGE]).try_into().unwrap());
    let claimed = Claimed::check(store.0[..PAGE].try_into().unwrap(), CLAIM.disk, &CLAIM).unwrap();
    let plan = Plan {
        nonce: 1,
        created_unix: 1_700_000_000,
        lz4: true,
        capacity: 8 << 20,
        align: 512,
        ram: &RAM,
        nvs: &[],
        image: Range { start: 0x30_0000, end: 0x31_0000 },
        backup: &[],
        reentry: 0x10_0000,
        info: "cli test",
        cpu_vendor: *b"GenuineIntel",
        return_gdt: (0, 0),
        cr4_needed: 0,
        facs_signature: None,
        iommu_left_on: false,
        free_rule: 0,
        filesystems: &[],
        sealed: false,
        free_as_found: false,
    };
    let (mut block, mut raw_header) = (Box::new([0u8; PAGE]), Box::new([0u8; PAGE]));
    let (mut meta, mut scratch) = (Box::new([0u8; META_BYTES]), Box::new([0u8; META_BYTES]));
    let (mut lz4, mut groups) = (Lz4, Box::new([GroupBuffers::EMPTY; GROUPS_IN_FLIGHT + 1]));
    let mut coder = Inline::new(&mut lz4, &mut groups);
    let writer = writer::Buffers { raw_header: &mut raw_header, coder: Some(&mut coder), write_behind: None, seal: None };
    let bufs = commit::Buffers { block: &mut block, meta: &mut meta, scratch: &mut scratch, writer };
    commit::save(&plan, &claimed, &Noise, &mut NoneFree, &mut store, bufs, || 0, 0).expect("the image");
    let path = dir.join("image.img");
    std::fs::write(&path, &store.0).unwrap();
    path
}

fn ksave(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ksave")).args(args).output().expect("ksave runs")
}

/// No Rust panic, backtrace or `Debug` output reaches the user.
fn assert_plain(out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE") && !err.contains("Error {") && !err.contains("Some("), "{err}");
}

#[test]
fn a_truncated_image_fails_inspect_and_verify_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = image_file(dir.path());
    let good = ksave(&["inspect", path.to_str().unwrap()]);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    // Cut inside the chunks: the header still says complete.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(64 << 10).unwrap();
    for command in ["inspect", "verify"] {
        let out = ksave(&[command, path.to_str().unwrap()]);
        assert!(!out.status.success(), "{command} of a truncated image exited {}", out.status);
        assert_plain(&out);
    }
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = image_file(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ksave")).args(["inspect", path.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // `| head -0`: the reader goes away before anything is read.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_plain(&out);
    assert!(out.status.success() || out.status.signal() == Some(libc::SIGPIPE), "{}", out.status);
}

#[test]
fn an_export_is_the_owners_alone_and_never_overwrites_unasked() {
    let dir = tempfile::tempdir().unwrap();
    let path = image_file(dir.path());
    let core = dir.path().join("core.elf");
    let out = ksave(&["export", "--elf", core.to_str().unwrap(), path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&core).unwrap().permissions().mode() & 0o777, 0o600);
    let again = ksave(&["export", "--elf", core.to_str().unwrap(), path.to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"));
    std::fs::set_permissions(&core, std::fs::Permissions::from_mode(0o644)).unwrap();
    let forced = ksave(&["export", "--force", "--elf", core.to_str().unwrap(), path.to_str().unwrap()]);
    assert!(forced.status.success());
    assert_eq!(std::fs::metadata(&core).unwrap().permissions().mode() & 0o777, 0o600);
}

/// A GPT whose header asks for 16,384 entries of 0xFFFFFF80 bytes (70 TB):
/// an error naming the damage, not an allocation abort.
#[test]
fn a_hostile_gpt_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let file = std::fs::File::create(&disk).unwrap();
    file.set_len(16 << 20).unwrap();
    let mut h = [0u8; 512];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&((16u64 << 20) / 512 - 1).to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&((16u64 << 20) / 512 - 34).to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&16384u32.to_le_bytes());
    h[84..88].copy_from_slice(&0xFFFF_FF80u32.to_le_bytes());
    let crc = crc32(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&h, 512).unwrap();
    let t = Instant::now();
    let out = ksave(&["inspect", disk.to_str().unwrap()]);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(!out.status.success() && out.status.code().is_some(), "{}", out.status);
    assert_plain(&out);
}

/// GPT's CRC32 (zlib's), bit by bit: a test needs no table.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
