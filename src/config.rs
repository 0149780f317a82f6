//! The config block the host tool writes into ksave.elf (docs/FORMAT.md).

use core::cell::UnsafeCell;

use ksave_format::PAGE;
use ksave_format::config::{Config, ConfigError, SHIPPED};

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

/// The config, checked.
pub fn load() -> Result<Config, ConfigError> {
    // SAFETY: nothing in ksave writes the block; a shared borrow is sound.
    Config::decode(unsafe { &*KSAVE_CONFIG.0.get() })
}
