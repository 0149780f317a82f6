//! An encrypted store's key block (docs/ENCRYPTION.md): one page of the
//! image file, written and read through the volume the file system is on,
//! so that dm-crypt encrypts it like every other block there. It holds the
//! data key of the image the store holds, and is destroyed after a resume
//! and at any boot that does not resume.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use ksave_format::PAGE;
use ksave_format::seal::{DataKey, KEY_LEN, KeyBlock, KeyBlockError};
use zeroize::Zeroize;

use crate::filestore::dm_device_by_uuid;
use crate::setup::KeyVolume;

/// One page-aligned page, wiped when dropped (it may hold a key).
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

impl Drop for Page {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// The volume's device node: it must be unlocked (and activated).
pub fn device(volume: &KeyVolume) -> Result<PathBuf> {
    dm_device_by_uuid(&volume.dm_uuid)
        .with_context(|| format!("the encrypted volume {} is not there: unlock it first (cryptsetup open, or the initramfs's prompt)", volume.dm_uuid))
}

fn open(volume: &KeyVolume, write: bool) -> Result<File> {
    let dev = device(volume)?;
    // O_DIRECT: the key never sits in the page cache.
    OpenOptions::new().read(true).write(write).custom_flags(libc::O_DIRECT | if write { libc::O_DSYNC } else { 0 }).open(&dev).with_context(|| format!("opening {}", dev.display()))
}

/// A fresh data key, from the kernel's CRNG (blocking until it is seeded).
pub fn fresh_key() -> Result<DataKey> {
    let mut key = DataKey([0; KEY_LEN]);
    // SAFETY: getrandom writes at most KEY_LEN bytes into the key.
    let n = unsafe { libc::getrandom(key.0.as_mut_ptr().cast(), KEY_LEN, 0) };
    ensure!(n == KEY_LEN as isize, "getrandom: {}", std::io::Error::last_os_error());
    Ok(key)
}

/// Writes `block` through the volume and makes it durable.
pub fn write(volume: &KeyVolume, block: &KeyBlock) -> Result<()> {
    let mut page = Page([0; PAGE]);
    block.encode(&mut page.0);
    let file = open(volume, true)?;
    file.write_all_at(&page.0, volume.at).context("writing the key block")?;
    file.sync_all().context("syncing the key block")
}

/// Reads the key block through the (unlocked) volume.
pub fn read(volume: &KeyVolume) -> Result<KeyBlock> {
    let mut page = Page([0; PAGE]);
    open(volume, false)?.read_exact_at(&mut page.0, volume.at).context("reading the key block")?;
    KeyBlock::decode(&page.0).map_err(|e| anyhow::anyhow!("{e}"))
}

/// What [`destroy`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Destroyed {
    /// A key of this store's, now zeros.
    Key,
    /// No key there (destroyed before, or never written).
    NoKey,
    /// Not this store's key block (the file moved, a stale location): the
    /// page is left as it is, whatever it holds.
    NotOurs,
}

/// Destroys the key block of the store `claim_id` names (zeros through the
/// volume): the image it opened can never be read again, not even with the
/// volume's passphrase. Only a page that decodes as that store's key block
/// is written: anything else at the recorded place (the file moved since,
/// a wrong location) is left alone.
pub fn destroy(volume: &KeyVolume, claim_id: [u8; 16]) -> Result<Destroyed> {
    let file = open(volume, true)?;
    let mut page = Page([0; PAGE]);
    file.read_exact_at(&mut page.0, volume.at).context("reading the key block")?;
    match KeyBlock::decode(&page.0) {
        Ok(block) if block.claim_id == claim_id => {}
        Ok(_) | Err(KeyBlockError::Checksum) => return Ok(Destroyed::NotOurs),
        Err(KeyBlockError::NoKey) => return Ok(if page.0.iter().all(|&b| b == 0) { Destroyed::NoKey } else { Destroyed::NotOurs }),
    }
    page.0.zeroize();
    file.write_all_at(&page.0, volume.at).context("destroying the key block")?;
    file.sync_all().context("syncing the key block")?;
    Ok(Destroyed::Key)
}

/// Zeros the key block's page at setup, where `ksave setup` just found the
/// file's page to be (no key yet).
pub fn clear(volume: &KeyVolume) -> Result<()> {
    let file = open(volume, true)?;
    file.write_all_at(&Page([0; PAGE]).0, volume.at).context("clearing the key block")?;
    file.sync_all().context("syncing the key block")
}
