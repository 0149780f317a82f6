//! Whole saves against the fakes, through the stages as ksave runs them,
//! then resumed; and each stage's refusal, and a disk error mid-save.

mod common;

use bootinfo::kexec::{Coverage, WalkError};
use common::*;
use ksave_core::resume::WhenRefused;
use ksave_core::save::{FoundPartition, HostPartition, MapError, Stages, check_claim, check_partition};
use ksave_format::store::Claim;
use ksave_format::commit::NoneFree;
use ksave_format::header::{DATA_OFFSET, State, fail};
use ksave_format::verdict::code;
use ksave_format::{PAGE, Range};

#[test]
fn a_whole_save_resumes_byte_identical() {
    for (seed, lz4, align) in [(31, false, 512), (32, true, 512), (33, true, 4096)] {
        let kernel = Ram::kernel(seed);
        let mut store = Store::new(CAPACITY, align, &kernel);
        let backup = backup();
        let summary = save(stages(plan(&backup, lz4, CAPACITY, align), &store), &mut store, &kernel, None, &mut NoneFree, 0).expect("saved");

        // The commit protocol: writing, the chunks, complete, each flushed.
        assert_eq!(store.flushes, [Some(State::Writing), Some(State::Writing), Some(State::Complete)]);
        let h = store.header().unwrap();
        assert_eq!((h.state, h.nonce, h.image, h.reentry, h.return_gdt), (State::Complete, NONCE, OWN, REENTRY, GDT));
        assert_eq!((h.pages_stored, h.pages_free, h.free_rule), (summary.totals.pages_stored, 0, 0));
        assert_eq!(h.save_us, summary.us);
        assert!(summary.us > 0);

        let mut ram = Ram::resume_target(seed + 100);
        let before = ram.snapshot();
        let mut disk = onto(&store, &ram);
        resume(&mut disk, &machine(), &mut ram, WhenRefused::KeepImage).expect("resumed");
        let after = ram.snapshot();
        for pfn in 0..(SIZE / PAGE) as u64 {
            let addr = pfn * PAGE as u64;
            let expected = if in_memory(addr) && !OWN.contains(addr) { kernel.page(pfn) } else { before[addr as usize..][..PAGE].to_vec() };
            assert!(after[addr as usize..][..PAGE] == expected[..], "page {pfn:#x}");
        }
    }
}

#[test]
fn free_pages_are_listed_and_come_back_as_zeros() {
    let (kernel, image, summary) = saved_image(34, true, 512);
    let free: u64 = free_blocks().0.values().sum();
    assert_eq!(summary.totals.pages_free, free);
    assert_eq!(image.header().unwrap().free_rule, FREE_RULE);
    // The free pages held noise or text when saved: none of it is in the image.
    assert!(free_blocks().0.keys().any(|&pfn| kernel.page(pfn).iter().any(|&b| b != 0)));
    let mut ram = Ram::resume_target(35);
    let mut disk = onto(&image, &ram);
    resume(&mut disk, &machine(), &mut ram, WhenRefused::KeepImage).expect("resumed");
    for (&first, &n) in &free_blocks().0 {
        for pfn in first..first + n {
            assert!(ram.page(pfn).iter().all(|&b| b == 0), "free page {pfn:#x}");
        }
    }
}

/// Runs a save whose stages `change` altered; it must fail with `code` and
/// have written nothing.
fn refused(change: impl FnOnce(&mut Stages), code: u32) -> String {
    let kernel = Ram::kernel(40);
    let mut store = Store::new(CAPACITY, 512, &kernel);
    let backup = backup();
    let mut stages = stages(plan(&backup, true, CAPACITY, 512), &store);
    change(&mut stages);
    let before = store.bytes.clone();
    let failure = save(stages, &mut store, &kernel, None, &mut NoneFree, 0).unwrap_err();
    assert_eq!(failure.code, code, "{}", failure.message.as_str());
    assert!(store.bytes == before, "{}: written before the stages passed", failure.message.as_str());
    assert!(store.flushes.is_empty());
    failure.message.as_str().to_string()
}

#[test]
fn a_partition_the_host_saw_elsewhere_is_refused() {
    let why = refused(|s| s.found.first_lba += 1, fail::PARTITION);
    assert_eq!(why, format!("partition is LBA {}+{} here but {}+{} to the host: refusing", FIRST_SECTOR + 1, CAPACITY / 512, FIRST_SECTOR, CAPACITY / 512));
    refused(|s| s.host.sectors -= 8, fail::PARTITION);
    // The host counts 512-byte sectors whatever the disk's block size.
    let host = HostPartition { first_sector: 2048, sectors: 16384 };
    assert_eq!(check_partition(&FoundPartition { first_lba: 256, blocks: 2048, block_size: 4096 }, &host), Ok(()));
    assert!(check_partition(&FoundPartition { first_lba: 2048, blocks: 16384, block_size: 4096 }, &host).is_err());
}

/// A store is written only while it carries the claim its config names:
/// a file system made on it since setup, another setup's claim, a header
/// from before claims or a store found on another disk is refused, and
/// not one byte is written there.
#[test]
fn a_store_without_its_claim_is_never_written() {
    let kernel = Ram::kernel(41);
    let mut ext4 = Store::new(CAPACITY, 512, &kernel);
    // mkfs.ext4 since: its superblock at byte 1024 (magic 0xEF53 at 0x38).
    ext4.bytes[1024..2048].fill(0x11);
    ext4.bytes[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
    let other = Claim { id: [0x77; 16], ..CLAIM };
    let cases: [(&str, Store, [u8; 16], Claim, &str); 4] = [
        ("a file system made since", ext4, CLAIM.disk, CLAIM, "does not carry ksave's claim (header checksum mismatch"),
        ("another setup's claim", Store::new(CAPACITY, 512, &kernel), CLAIM.disk, other, "another setup's claim"),
        ("found on another disk", Store::new(CAPACITY, 512, &kernel), [0xd2; 16], CLAIM, "names another disk"),
        ("an unclaimed config", Store::new(CAPACITY, 512, &kernel), CLAIM.disk, Claim::default(), "carries no claim"),
    ];
    for (label, store, disk, expected, why) in cases {
        let failure = check_claim(store.bytes[..PAGE].try_into().unwrap(), disk, &expected).unwrap_err();
        assert_eq!(failure.code, fail::NOT_CLAIMED, "{label}");
        assert!(failure.message.as_str().contains(why) && failure.message.as_str().ends_with(": nothing written"), "{label}: {}", failure.message.as_str());
    }
}

#[test]
fn memory_beyond_reach_is_refused() {
    let why = refused(|s| s.reach = 4 << 20, fail::MEMORY);
    assert_eq!(why, "memory 0x100000-0x700000 is beyond ksave's identity map (0 GiB)");
}

#[test]
fn a_backup_map_that_is_not_exactly_ksaves_pages_is_refused() {
    let why = refused(|s| s.backup = Ok(Coverage { outside: 1, uncovered: 1, ..exact() }), fail::BACKUP_MAP);
    assert_eq!(why, "backup map is not exactly ksave's pages (1 outside, 0 twice, 1 uncovered, 0 sources inside): refusing");
    let why = refused(|s| s.backup = Err(MapError::Walk(WalkError::NotRam(0x1000))), fail::BACKUP_MAP);
    assert_eq!(why, "backup map rejected: NotRam(4096)");
    let why = refused(|s| s.backup = Err(MapError::TooLong { limit: 256 }), fail::BACKUP_MAP);
    assert_eq!(why, "backup map lists more than 256 pages: refusing");
}

#[test]
fn a_store_below_the_worst_case_holds_a_save_that_fits_and_refuses_one_that_does_not_before_writing() {
    for (seed, lz4, align) in [(36, false, 512), (37, true, 512), (38, true, 4096)] {
        let kernel = Ram::kernel(seed);
        let backup = backup();
        let worst = plan(&backup, lz4, CAPACITY, align).worst_case_bytes();
        // What this save needs, counted as ksave counts: free and zero
        // pages take no room, and coded groups never more than raw.
        let needed = plan(&backup, lz4, CAPACITY, align).needed(&kernel.reader(None), &mut free_blocks()).unwrap();
        assert!(needed.bytes < worst && needed.stored > 0 && needed.free_runs == free_blocks().0.len() as u64, "{needed:?} of {worst}");
        // A store of exactly that size holds it.
        let fits = needed.bytes as usize;
        let mut store = Store::new(fits, align, &kernel);
        let summary = save_counting(stages(plan(&backup, lz4, fits, align), &store), &mut store, &kernel, None, &mut free_blocks(), &mut free_blocks(), FREE_RULE).expect("it fits");
        assert_eq!(summary.totals.pages_stored, needed.stored);
        assert!(DATA_OFFSET + summary.totals.data_bytes <= needed.bytes, "lz4 {lz4}, align {align}");
        // One page less: refused with the figures, and not a byte written.
        let short = fits - PAGE;
        let mut store = Store::new(short, align, &kernel);
        let before = store.bytes.clone();
        let failure = save_counting(stages(plan(&backup, lz4, short, align), &store), &mut store, &kernel, None, &mut free_blocks(), &mut free_blocks(), FREE_RULE).unwrap_err();
        assert_eq!(failure.code, fail::TOO_SMALL);
        let why = failure.message.as_str();
        assert!(why.starts_with(&format!("this save needs {} MiB ({} pages in use and not zero", needed.bytes.div_ceil(1 << 20), needed.stored)) && why.ends_with("nothing written"), "{why}");
        assert!(store.bytes == before, "the refused save wrote to the store");
        assert!(store.flushes.is_empty());
    }
}

#[test]
fn the_first_stage_that_fails_says_why() {
    let all = |s: &mut Stages| {
        s.plan.capacity = 1 << 20;
        s.backup = Err(MapError::TooLong { limit: 256 });
        s.reach = 1 << 20;
    };
    refused(
        |s| {
            all(s);
            s.found.blocks += 1;
        },
        fail::PARTITION,
    );
    refused(all, fail::MEMORY);
    refused(
        |s| {
            all(s);
            s.reach = 1 << 32;
        },
        fail::BACKUP_MAP,
    );
}

#[test]
fn a_disk_error_mid_save_fails_and_leaves_no_image() {
    let kernel = Ram::kernel(41);
    let mut store = Store::new(CAPACITY, 512, &kernel);
    let at = DATA_OFFSET + (1 << 20);
    store.fail_write_at = Some(at);
    let backup = backup();
    let failure = save(stages(plan(&backup, false, CAPACITY, 512), &store), &mut store, &kernel, None, &mut NoneFree, 0).unwrap_err();
    assert_eq!(failure.code, fail::IO);
    assert_eq!(failure.message.as_str(), format!("disk error: I/O error at byte {at}"));
    // The writing header stands: a resume refuses the image as incomplete.
    assert_eq!(store.header().unwrap().state, State::Writing);
    let mut ram = Ram::resume_target(42);
    let before = ram.snapshot();
    let mut disk = onto(&store, &ram);
    let refusal = resume(&mut disk, &machine(), &mut ram, WhenRefused::KeepImage).unwrap_err();
    assert_eq!(refusal.refusal.code(), code::INCOMPLETE);
    assert!(ram.snapshot() == before);
}

#[test]
fn an_unreachable_page_fails_the_save() {
    let kernel = Ram::kernel(43);
    let mut store = Store::new(CAPACITY, 512, &kernel);
    let backup = backup();
    // A page of noise (kind 2 for its run), which is stored, not left out as zero.
    let pfn = RAM[1].pages().find(|&p| !OWN.contains(p * PAGE as u64) && kernel.page(p).iter().any(|&b| b != 0)).unwrap();
    let failure = save(stages(plan(&backup, true, CAPACITY, 512), &store), &mut store, &kernel, Some(pfn), &mut NoneFree, 0).unwrap_err();
    assert_eq!((failure.code, failure.message.as_str()), (fail::MEMORY, format!("page {pfn:#x} unreachable").as_str()));
    assert_eq!(store.header().unwrap().state, State::Writing);
}

#[test]
fn nvs_is_saved_and_put_back() {
    let (kernel, image, _) = saved_image(44, false, 512);
    let mut ram = Ram::resume_target(45);
    let mut disk = onto(&image, &ram);
    resume(&mut disk, &machine(), &mut ram, WhenRefused::KeepImage).expect("resumed");
    let nvs: Vec<u64> = NVS.iter().flat_map(Range::pages).collect();
    assert!(nvs.iter().all(|&pfn| ram.page(pfn) == kernel.page(pfn)));
}
