//! The config block the host tool writes into ksave.elf (docs/FORMAT.md).

use core::cell::UnsafeCell;

use ksave_format::PAGE;
use ksave_format::config::{Config, ConfigError, DATA_KEY_AT, SHIPPED};
use core::mem::MaybeUninit;

use ksave_format::seal::{KEY_LEN, Seal};

use crate::work::Exclusive;
use zeroize::Zeroize;

/// In an UnsafeCell so the compiler treats the contents as changeable: the
/// host tool rewrites these bytes in the file after the build, and the value
/// compiled in must not be folded into the code.
#[repr(C, align(4096))]
struct Block(UnsafeCell<[u8; PAGE]>);

// SAFETY: only read, by the one CPU ksave runs on.
unsafe impl Sync for Block {}

#[used]
#[unsafe(link_section = ".ksave_config")]
static KSAVE_CONFIG: Block = Block(UnsafeCell::new(SHIPPED));

/// The config, checked. A sealed image's data key is not in the copy
/// (its bytes are zero there, `Some` only says there is one): ksave takes
/// it from the block alone ([`seal`]), where [`wipe_key`] wipes it.
pub fn load() -> Result<Config, ConfigError> {
    // SAFETY: only [`wipe_key`] writes the block, never while this borrow
    // lives (ksave runs on one CPU).
    let mut config = Config::decode(unsafe { &*KSAVE_CONFIG.0.get() })?;
    if let Some(key) = config.data_key.as_mut() {
        key.0.zeroize();
    }
    Ok(config)
}

/// The cipher of a sealed image, where [`forget`] wipes it: in a static,
/// never moved (a value moved about the stack leaves copies of its key
/// schedule where it was).
static SEAL: Exclusive<MaybeUninit<Seal>> = Exclusive::new(MaybeUninit::zeroed());

/// The cipher of a sealed image, keyed from the config block (none: the
/// image is not to be sealed, or the key was wiped: [`wipe_key`]). Once per
/// entry.
pub fn seal() -> Option<&'static Seal> {
    // SAFETY: as in load().
    let block = unsafe { &*KSAVE_CONFIG.0.get() };
    let key = Config::decode(block).ok()?.data_key?;
    Some(SEAL.take().write(Seal::new(&key)))
}

/// Wipes the key: in the config block ([`wipe_key`]) and the cipher's key
/// schedule where [`seal`] put it. On ksave's way out, after every use.
pub fn forget() {
    wipe_key();
    // All zeros is a valid MaybeUninit; nothing reads the cipher after this.
    SEAL.wipe();
}

/// Wipes the data key in the config block (and so breaks its CRC: a second
/// `kexec -e` of the same loaded ksave finds no config and saves nothing,
/// rather than seal a second image under the same key and nonces).
pub fn wipe_key() {
    let at = KSAVE_CONFIG.0.get().cast::<u8>();
    for i in 0..KEY_LEN {
        // SAFETY: inside the block (DATA_KEY_AT + KEY_LEN <= PAGE, asserted
        // in ksave-format), which nothing borrows now: ksave calls this on
        // its way out, after every use of the config.
        unsafe { core::ptr::write_volatile(at.add(DATA_KEY_AT + i), 0) };
    }
}
