//! End-to-end scenarios, by story. Each returns a [`Report`] of what it
//! measured, or an error with the console lines that led to it. ksave and
//! the CLI print their figures as `ksave-metric key=value` lines, which the
//! scenarios read ([`crate::Metrics`]); they never parse prose.

use std::fmt;
use std::time::Duration;

use anyhow::Result;

use crate::{VmConfig, build_input};

mod bench;
mod boot;
mod disks;
mod refusals;
mod resume;
mod roundtrip;
mod save;

pub use bench::{disk_bench, hibernate_bench, linux_dd, linux_hibernate_resume};
pub use boot::{exception_report, multiboot1_boot, multiboot2_grub_boot};
pub use disks::{disk_error, disk_self_test};
pub use refusals::{grub_no_image_boots_normally, restore_refusals};
pub use resume::{ResumeBy, hibernate_resume};
pub use roundtrip::kexec_round_trip;
pub use save::{Expect, hibernate_snapshot};

/// What a scenario measured, for the demo, the test log and `make bench`.
#[derive(Debug, Default)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Measurements, in order.
    pub figures: Vec<Figure>,
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What was measured.
    pub what: String,
    /// Its value, in `unit`.
    pub value: f64,
    /// "ms", "KiB", "MiB".
    pub unit: &'static str,
}

impl Report {
    fn new(name: &str) -> Self {
        Self { name: name.into(), figures: Vec::new() }
    }

    fn add(&mut self, what: impl Into<String>, value: f64, unit: &'static str) {
        self.figures.push(Figure { what: what.into(), value, unit });
    }

    fn add_ms(&mut self, what: impl Into<String>, d: Duration) {
        self.add(what, d.as_secs_f64() * 1000.0, "ms");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== {}", self.name)?;
        for fig in &self.figures {
            writeln!(f, "   {:<44} {:>8.0} {}", fig.what, fig.value, fig.unit)?;
        }
        Ok(())
    }
}

pub(super) const SECOND: Duration = Duration::from_secs(1);

/// Kernel A with its initramfs, running `ksave.test=SCENARIO` (the rest of
/// `scenario` goes on the command line too).
pub(super) fn kernel_a(name: &str, scenario: &str) -> Result<VmConfig> {
    Ok(VmConfig::new(name).arg([
        "-kernel".to_string(),
        build_input("bzImage")?.display().to_string(),
        "-initrd".into(),
        build_input("initramfs.cpio.gz")?.display().to_string(),
        "-append".into(),
        // quiet: kernel info messages (link resets, ...) would otherwise land in
        // the middle of the lines the tests read.
        format!("console=ttyS0,115200 panic=-1 quiet ksave.test={scenario}"),
    ]))
}

/// A VM booting build/grub-resume.iso. CD first: SeaBIOS would otherwise try
/// the test disk, whose protective MBR has a boot signature but no code.
pub(super) fn grub_resume_menu(name: &str) -> Result<VmConfig> {
    Ok(VmConfig::new(name).arg(["-boot".to_string(), "d".into(), "-cdrom".into(), build_input("grub-resume.iso")?.display().to_string()]))
}
