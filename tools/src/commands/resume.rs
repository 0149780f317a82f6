//! `ksave resume`: from a freshly booted kernel, hand the machine to ksave
//! if the partition holds a resumable image (does not return); else say
//! why and exit 1, and the boot carries on.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use diskdrv::part::Guid;
use ksave_format::header::FLAG_RESUME_ATTEMPTED;
use ksave_format::verdict::Refusal;
use ksave_tools::imagefile::ImageFile;
use ksave_tools::setup::{FileStore, KeyVolume};
use ksave_tools::setup::{self, Setup};
use ksave_tools::{inspect, load, sys};

pub fn run(partuuid: Option<String>, elf: Option<PathBuf>, file_at: Option<u64>, key_at: Option<String>, or_invalidate: bool) -> Result<ExitCode> {
    // From an initramfs (--or-invalidate) what is said goes to the kernel
    // log too, so that the journal of the boot has it. Said here, before
    // any kexec: a pipe to a logger would lose the line the kexec cuts off.
    let say = |line: String| {
        println!("{line}");
        if or_invalidate {
            sys::kernel_log(&line);
        }
    };
    // attempt() returns only when it did not resume.
    let key = match key_at.as_deref().map(parse_key_at).transpose() {
        Ok(key) => key,
        Err(e) if or_invalidate => {
            say(format!("ksave: {e:#}"));
            None
        }
        Err(e) => return Err(e),
    };
    // ksave.efi's reason for not resuming at this boot's start, once.
    if or_invalidate {
        ksave_tools::uefi::mount_efivarfs();
        if let Some(why) = ksave_tools::uefi::take_refusal() {
            say(format!("ksave: ksave.efi did not resume at this boot's start: {why}"));
        }
    }
    // Asked not to resume: this boot carries on (and invalidates, below).
    let noresume = if or_invalidate { sys::noresume() } else { None };
    let outcome = match noresume {
        Some(word) => Ok(NotResumed { refusal: None, why: format!("{word} on the kernel command line") }),
        None => attempt(partuuid.clone(), elf, file_at, key.clone(), &say),
    };
    let why = match outcome {
        Ok(NotResumed { refusal, why }) => {
            if let Some(r) = refusal {
                say(format!("ksave-metric refusal={}", r.code()));
            }
            why
        }
        Err(e) if or_invalidate => format!("{e:#}"),
        Err(e) => return Err(e),
    };
    say(format!("ksave: nothing to resume: {why}"));
    if or_invalidate {
        // This boot's initramfs resumes from this setup (it just tried):
        // `ksave can-hibernate` and `hibernate` look for that.
        if let Ok(setup) = Setup::load(&setup::path()) {
            let _ = ksave_tools::ready::mark_resume_path(&setup);
        }
        // This boot carries on and will change the file systems the image
        // saw: whatever stopped the resume, it must never happen later.
        say(super::invalidate::invalidate(None, partuuid, file_at, key, Some(format!("not resumed by the boot that found it: {why}")))?);
    }
    Ok(ExitCode::FAILURE)
}

/// `--key-at DM-UUID:BYTES`.
fn parse_key_at(text: &str) -> Result<KeyVolume> {
    let (uuid, at) = text.rsplit_once(':').with_context(|| format!("--key-at {text}: not DM-UUID:BYTES"))?;
    Ok(KeyVolume { dm_uuid: uuid.to_string(), at: at.parse().with_context(|| format!("--key-at {text}: {at} is not a byte offset"))? })
}

/// Why there was no resume: the verdict's refusal when there was one to
/// give, and the sentence.
struct NotResumed {
    refusal: Option<Refusal>,
    why: String,
}

/// Hands the machine to ksave (does not return) or says why not.
fn attempt(partuuid: Option<String>, elf: Option<PathBuf>, file_at: Option<u64>, key: Option<KeyVolume>, say: &dyn Fn(String)) -> Result<NotResumed> {
    let setup = match (&partuuid, Setup::load(&setup::path())) {
        (Some(text), _) => {
            let guid = Guid::try_parse(text).ok().with_context(|| format!("{text} is not a GUID"))?;
            let part = sys::partition_by_guid(guid)?;
            match Setup::load(&setup::path()) {
                // The setup of that partition says whether it holds a file.
                Ok(s) if s.guid == guid && file_at.is_none() => Setup { device: part.device, ..s },
                // A resume reads the image only: its header is the evidence,
                // no claim is needed to find it.
                _ => {
                    let mut setup = Setup::new(&part, Default::default(), false, elf.clone().unwrap_or_else(|| "/usr/lib/ksave/ksave.elf".into()));
                    if let Some(map_offset) = file_at {
                        // The map's CRC as read: the one ksave is to use.
                        let (_, map_crc) = ImageFile::open_file_map(&part.device, map_offset, false)?;
                        setup.file = Some(FileStore { path: "(the image file)".into(), map_offset, map_crc, key });
                    }
                    setup
                }
            }
        }
        (None, Ok(s)) => s,
        (None, Err(e)) => return Err(e),
    };
    let elf_path = elf.unwrap_or(setup.elf.clone());
    let mut file = ImageFile::open_setup(&setup, false)?;
    let image = match inspect::read(&mut file) {
        Ok(i) => i,
        Err(e) => return Ok(NotResumed { refusal: None, why: format!("{e:#}") }),
    };
    // The host checks all it can, by the same verdict as ksave; ksave
    // checks everything again, and every checksum, before it writes a byte.
    match image.verdict_here()? {
        Ok(()) => {}
        Err(refusal @ Refusal::EarlierAttemptUnfinished) => {
            // An earlier boot handed it to ksave, which neither resumed it
            // nor could mark it (no disk it drives, a reset): never loop.
            ImageFile::open_setup(&setup, true)?.invalidate(Some(&refusal.to_string()))?;
            if let Some(volume) = setup.file.as_ref().and_then(|f| f.key.as_ref()) {
                say(super::forget_key(volume, image.header.claim.id));
            }
            return Ok(NotResumed { refusal: Some(refusal), why: format!("{refusal}; image invalidated") });
        }
        Err(refusal @ (Refusal::SaveFailed | Refusal::AlreadyResumed | Refusal::Incomplete)) => {
            return Ok(NotResumed { refusal: Some(refusal), why: format!("{refusal} ({})", image.header.message()) });
        }
        Err(refusal @ Refusal::Sealed(_)) => {
            return Ok(NotResumed { refusal: Some(refusal), why: format!("{refusal} ({})", image.sealed_note().unwrap_or_default()) });
        }
        Err(refusal) => return Ok(NotResumed { refusal: Some(refusal), why: refusal.to_string() }),
    }
    // The file systems the image saw must not have been mounted since.
    if let Some(refusal) = ksave_tools::fs::mounted_since(image.header.filesystems()) {
        return Ok(NotResumed { refusal: Some(refusal), why: refusal.to_string() });
    }
    let mut config = load::attempt_config(&setup)?;
    // An encrypted store: the key from the key block (its tags checked by
    // the verdict above), for ksave's config in RAM only.
    let key_volume = setup.file.as_ref().and_then(|f| f.key.clone());
    if key_volume.is_some() {
        config.data_key = Some(file.key.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?.key.clone());
    }
    let bytes = std::fs::read(&elf_path).with_context(|| format!("reading {}", elf_path.display()))?;
    let configured = zeroize::Zeroizing::new(load::configure(&bytes, &config)?);
    config.data_key = None;
    load::load_for_resume(&configured)?;
    drop(configured);
    let mut marked = image.header.clone();
    marked.flags |= FLAG_RESUME_ATTEMPTED;
    // The key now lives only in the kernel's copy of ksave: the key block
    // goes before the jump, so that not even the passphrase opens this
    // image once it is resumed (a resume that fails invalidates it anyway).
    // On any failure here ksave goes, key and all.
    let handed_over = ImageFile::open_setup(&setup, true).and_then(|mut f| f.write_header(&marked)).and_then(|()| match &key_volume {
        Some(volume) => ksave_tools::keyblock::destroy(volume, image.header.claim.id).map(drop),
        None => Ok(()),
    });
    if let Err(e) = handed_over {
        let _ = load::unload();
        return Err(e);
    }
    say(format!("ksave: resuming the image saved at {} (unix): {} pages", image.header.created_unix, image.header.pages_stored));
    // SAFETY: sync and reboot(KEXEC) take no memory arguments; with a plain
    // kexec image loaded the kernel hands the machine to ksave.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
    }
    let why = std::io::Error::last_os_error();
    let _ = load::unload();
    // Still here: ksave never ran, so the image was not tried; take the mark
    // back, or the next boot would invalidate an image nobody attempted.
    ImageFile::open_setup(&setup, true)?.write_header(&image.header)?;
    if let (Some(volume), Ok(block)) = (&key_volume, &file.key) {
        ksave_tools::keyblock::write(volume, block)?;
    }
    bail!("the kexec into ksave did not happen: {why}")
}
