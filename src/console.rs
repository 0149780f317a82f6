//! The serial console on COM1. Stateless: every write builds the port handle
//! afresh, so the exception handler can print even if it interrupted a print.

use core::fmt;
use uart_16550::{BaudRate, Config, Uart16550};

const COM1: u16 = 0x3f8;

fn port() -> Uart16550<uart_16550::backend::PioBackend> {
    // SAFETY: COM1's eight ports are the legacy PC UART; nothing else in
    // ksave uses them, and no interrupts are enabled.
    unsafe { Uart16550::new_port(COM1) }.expect("COM1 is a valid port range")
}

/// Programs COM1 for 115200 8N1 if `reprogram` (after a bootloader); else
/// keeps the settings the caller's kernel gave it.
pub fn init(reprogram: bool) {
    if reprogram {
        let config = Config { baud_rate: BaudRate::Baud115200, ..Config::DEFAULT };
        // No console is no reason to stop: ksave's work does not need it.
        let _ = port().init(config);
    }
}

/// `fmt::Write` onto COM1, turning `\n` into `\r\n`.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut uart = port();
        for (i, line) in s.split('\n').enumerate() {
            if i > 0 {
                uart.send_bytes_exact(b"\r\n");
            }
            uart.send_bytes_exact(line.as_bytes());
        }
        Ok(())
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::console::Console, $($arg)*);
    }};
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}

/// One line of figures for scripts and the test harness, which read them
/// instead of the prose: `ksave-metric key=value ...`.
#[macro_export]
macro_rules! metric {
    ($($key:ident = $value:expr),+ $(,)?) => {
        $crate::println!(concat!("ksave-metric", $(" ", stringify!($key), "={}"),+), $($value),+)
    };
}
