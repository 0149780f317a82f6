//! `ksave status`: the store `ksave setup` recorded (a partition, or a file
//! and where it lies) and its image header; or the header on a given
//! partition, disk or image file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use ksave_tools::imagefile::ImageFile;
use ksave_tools::setup::Setup;
use serde_json::json;

use super::show;

pub fn run(path: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let Some(path) = path else { return run_setup(json) };
    let header = super::open_store(Some(path), false)?.header()?;
    if json {
        println!("{}", show::header_json(&header));
    } else {
        show::print_header(&header);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ksave can-hibernate`: "yes", or why not (exit 1).
pub fn can_hibernate() -> Result<ExitCode> {
    let why = match Setup::load(&ksave_tools::setup::path()) {
        Err(e) => Some(format!("ksave is not set up ({e:#}): ksave setup --file /var/lib/ksave/image, or --partuuid ...")),
        Ok(setup) => ksave_tools::ready::why_not(&setup),
    };
    match why {
        None => {
            println!("yes");
            Ok(ExitCode::SUCCESS)
        }
        Some(why) => {
            println!("no: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The setup's store, then its header.
fn run_setup(json: bool) -> Result<ExitCode> {
    let setup = Setup::load(&ksave_tools::setup::path())?;
    let mut image = ImageFile::open_setup(&setup, false)?;
    let header = image.header()?;
    let extents = image.extents().len();
    let store = match &setup.file {
        Some(f) => json!({
            "kind": "file",
            "file": f.path,
            "file_system": ksave_tools::filestore::file_system_name(&f.path).ok(),
            "partition": setup.device,
            "partuuid": setup.guid.to_string(),
            "map_offset": f.map_offset,
            "extents": extents,
            "bytes": image.bytes(),
            // A bootloader cannot unlock an encrypted store: no line for it.
            "boot_args": f.key.is_none().then(|| setup.resume_args()),
            "encrypted": f.key.is_some(),
            "key_volume": f.key.as_ref().map(|k| k.dm_uuid.clone()),
            "key_block": f.key.as_ref().map(|_| match &image.key { Ok(_) => "present".to_string(), Err(e) => e.clone() }),
        }),
        None => json!({
            "kind": "partition",
            "partition": setup.device,
            "partuuid": setup.guid.to_string(),
            "bytes": image.bytes(),
            "boot_args": setup.resume_args(),
        }),
    };
    if json {
        let mut all = show::header_json(&header);
        all["store"] = store;
        println!("{all}");
        return Ok(ExitCode::SUCCESS);
    }
    match &setup.file {
        Some(f) => {
            let fs = ksave_tools::filestore::file_system_name(&f.path).unwrap_or("?");
            println!("store        {} ({fs}), {} MiB in {extents} extents, in {} (PARTUUID {}) at byte {}", f.path.display(), image.bytes() >> 20, setup.device.display(), setup.guid, f.map_offset);
        }
        None => println!("store        {} (PARTUUID {}), {} MiB", setup.device.display(), setup.guid, image.bytes() >> 20),
    }
    match ksave_tools::ready::why_not(&setup) {
        None => println!("hibernate    yes"),
        Some(why) => println!("hibernate    no: {why}"),
    }
    match setup.file.as_ref().and_then(|f| f.key.as_ref()) {
        Some(k) => {
            let block = match &image.key {
                Ok(_) => "present".to_string(),
                Err(e) => e.clone(),
            };
            println!("encrypted    yes: images sealed, key block on {} ({block}); resumed by the initramfs after the unlock", k.dm_uuid);
            println!("resume args  --partuuid {} --file-at {} --key-at {}:{} (`ksave resume` without a setup)", setup.guid, setup.file.as_ref().map_or(0, |f| f.map_offset), k.dm_uuid, k.at);
        }
        None => println!("boot args    {} (a bootloader's ksave line)", setup.resume_args()),
    }
    show::print_header(&header);
    Ok(ExitCode::SUCCESS)
}
