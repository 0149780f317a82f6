//! Whether this machine can hibernate with ksave now, before anything is
//! written or jumped to: what logind is told (a systemd generator offers
//! hibernation only then) and what `ksave hibernate` checks first. Three
//! things can stop it: a kernel in lockdown, one built without
//! CONFIG_KEXEC_JUMP, and an initramfs with no ksave to resume from.

use std::path::Path;

use crate::setup::Setup;
use crate::sys;

/// The initramfs generators ksave's packages hook into (dist/), in the
/// order the packages pick the first that is there (dist/maintscript.sh):
/// the file each installs, and the command that rebuilds every installed kernel's
/// initramfs with it (-k all, --regenerate-all: an older kernel picked at
/// boot without the setup would mount the root under a valid image;
/// kernels installed later get it from their own postinst).
pub const INITRAMFS_GENERATORS: [(&str, &[&str]); 2] = [
    ("/usr/share/initramfs-tools/hooks/ksave", &["update-initramfs", "-u", "-k", "all"]),
    ("/usr/lib/dracut/modules.d/90ksave/module-setup.sh", &["dracut", "--regenerate-all", "--force"]),
];

/// Left by this boot's initramfs (`ksave resume`, in /run, which the root
/// inherits) or by `ksave setup` once it rebuilt them all: the claim of the
/// setup that the initramfs resumes from.
pub const RESUME_PATH_MARK: &str = "/run/ksave/initramfs";

/// Whether one of ksave's initramfs hooks is installed: ksave came from a
/// package, and a next boot resumes only through that initramfs.
pub fn initramfs_hooked() -> bool {
    INITRAMFS_GENERATORS.iter().any(|(hook, _)| Path::new(hook).exists())
}

/// Records that the initramfs resumes from `setup`'s store.
pub fn mark_resume_path(setup: &Setup) -> std::io::Result<()> {
    std::fs::create_dir_all(Path::new(RESUME_PATH_MARK).parent().unwrap())?;
    std::fs::write(RESUME_PATH_MARK, claim_text(setup))
}

fn claim_text(setup: &Setup) -> String {
    setup.claim.id.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n"
}

/// Why the next boot would not resume an image of `setup`, if it would
/// not: with ksave's initramfs hook installed, this boot's initramfs ran no
/// `ksave resume` of this setup, and no setup has rebuilt it since.
pub fn resume_path_missing(setup: &Setup) -> Option<String> {
    let mark = std::fs::read_to_string(RESUME_PATH_MARK).ok();
    resume_path_verdict(initramfs_hooked(), mark.as_deref(), setup)
}

/// [`resume_path_missing`] of what was found: a hook installed or not, the
/// mark's text if there is one.
fn resume_path_verdict(hooked: bool, mark: Option<&str>, setup: &Setup) -> Option<String> {
    const REBUILD: &str = "rebuild it (ksave setup again, or update-initramfs -u -k all / dracut --regenerate-all --force)";
    match mark {
        _ if !hooked => None,
        Some(text) if text == claim_text(setup) => None,
        Some(_) => Some(format!("this boot's initramfs resumes from another setup of ksave's: {REBUILD}")),
        None => Some(format!(
            "this boot's initramfs has no ksave in it (no `ksave resume` ran before the root was mounted), so the next boot could not resume: {REBUILD}"
        )),
    }
}

/// Why this machine cannot hibernate with ksave now, if it cannot.
pub fn why_not(setup: &Setup) -> Option<String> {
    sys::lockdown().or_else(crate::load::jump_unavailable).or_else(|| resume_path_missing(setup))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksave_format::store::Claim;

    fn setup_with_claim(id: [u8; 16]) -> Setup {
        let guid = diskdrv::part::Guid::try_parse("9B3C2C1A-5E1F-4B4A-8C6F-2A1D3E4F5A6B").unwrap();
        let part = crate::sys::PartInfo {
            device: "/dev/sda1".into(),
            disk: "/dev/sda".into(),
            guid,
            first_lba: 2048,
            sectors: 1 << 20,
            number: 1,
            type_guid: diskdrv::part::KSAVE_STORE_TYPE,
            disk_guid: guid,
        };
        Setup::new(&part, Claim { id, disk: [0; 16] }, false, "/usr/lib/ksave/ksave.elf".into())
    }

    #[test]
    fn the_resume_path_must_be_this_setups_where_an_initramfs_hook_is_installed() {
        let setup = setup_with_claim(*b"0123456789abcdef");
        let mark = claim_text(&setup);
        assert_eq!(resume_path_verdict(true, Some(&mark), &setup), None);
        assert!(resume_path_verdict(true, None, &setup).unwrap().contains("no ksave in it"));
        let other = claim_text(&setup_with_claim(*b"fedcba9876543210"));
        assert!(resume_path_verdict(true, Some(&other), &setup).unwrap().contains("another setup"));
        // No hook (ksave not from a package): nothing to ask of an initramfs.
        assert_eq!(resume_path_verdict(false, None, &setup), None);
    }
}
