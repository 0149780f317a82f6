//! Whole resumes against the fakes: images made by the real save, loaded
//! by `check_and_load` into fake physical memory; and every refusal
//! `check_and_load` can give, each from a crafted image or machine.

mod common;

use common::*;
use ksave_core::resume::{Machine, Refused, WayBack, WhenRefused};
use ksave_format::chunk::Encoding;
use ksave_format::commit;
use ksave_format::header::{CR4_NEEDED, FLAG_FREE_AS_FOUND, FLAG_IOMMU_LEFT_ON, FLAG_RESUME_ATTEMPTED, HeaderError, META_OFFSET, State};
use ksave_format::verdict::{Refusal, code};
use ksave_format::{PAGE, Range};

/// Checks memory after a whole resume of `saved` into `before`: every RAM
/// and NVS page outside ksave's range holds what was saved, or zeros where
/// the saved kernel held the page free; ksave's range and the memory
/// outside the map are as they were.
fn assert_resumed(saved: &Ram, before: &[u8], after: &Ram) {
    let free = free_blocks();
    let is_free = |pfn: u64| free.0.iter().any(|(&first, &n)| (first..first + n).contains(&pfn));
    let after = after.snapshot();
    for pfn in 0..(SIZE / PAGE) as u64 {
        let addr = pfn * PAGE as u64;
        let got = &after[addr as usize..][..PAGE];
        if !in_memory(addr) || OWN.contains(addr) {
            assert_eq!(got, &before[addr as usize..][..PAGE], "page {pfn:#x} (not the saved kernel's) was written");
        } else if is_free(pfn) {
            assert!(got.iter().all(|&b| b == 0), "free page {pfn:#x} not zeroed");
        } else {
            assert_eq!(got, &saved.page(pfn)[..], "page {pfn:#x} not as saved");
        }
    }
}

/// A refusal found before anything was written: this boot's memory and the
/// store are as they were, and the image was not invalidated.
fn assert_nothing_written(refused: &Refused, ram: &Ram, before: &[u8], store: &Store, image: &[u8]) {
    assert!(!refused.memory_lost, "{refused:?}");
    assert_eq!(refused.invalidated, None);
    assert!(ram.snapshot() == before, "{}: memory was written", refused.refusal);
    assert!(store.bytes == image, "{}: the store was written", refused.refusal);
    assert!(store.flushes.is_empty());
}

#[test]
fn a_whole_resume_loads_every_saved_page_and_zeroes_every_other() {
    for (seed, lz4, align, helped) in [(1, false, 512, false), (2, true, 512, false), (3, true, 4096, true), (4, false, 4096, true)] {
        let (saved, image, summary) = saved_image(seed, lz4, align);
        let totals = summary.totals;
        assert!(totals.pages_free > 0 && totals.pages_zero > 0 && totals.pages_stored > 0);
        assert_eq!(totals.pages_lz4 > 0, lz4);
        let mut ram = Ram::resume_target(100 + seed);
        let before = ram.snapshot();
        let mut store = onto(&image, &ram);

        let resumed = resume_with(&mut store, &machine(), &mut ram, WhenRefused::KeepImage, helped).expect("resumed");

        assert_resumed(&saved, &before, &ram);
        assert_eq!(resumed.way_back, Ok(WayBack { reentry: REENTRY, gdt: GDT, la57: false }));
        let l = resumed.loaded;
        assert_eq!((l.pages_stored, l.pages_free, l.pages_zero), (totals.pages_stored, totals.pages_free, totals.pages_zero));
        let pages = RAM.iter().chain(&NVS).flat_map(|r| r.pages()).filter(|p| !OWN.contains(p * PAGE as u64)).count() as u64;
        assert_eq!(l.pages_zeroed, pages - l.pages_stored);
        assert!(l.check_us > 0 && l.load_us > 0 && l.total_us > l.check_us + l.load_us);
        // Raw pages went by DMA straight into place.
        assert_eq!(store.dma_pages as u64, totals.pages_stored - totals.pages_lz4);
        // Coded chunks came through the read-ahead window: far fewer reads
        // than chunks (without it, two a coded chunk and one a raw one).
        let chunks = image.chunks();
        let coded = chunks.iter().filter(|c| c.encoding == Encoding::Lz4).count();
        if lz4 {
            assert!(store.reads < chunks.len() - coded / 2, "{} reads for {} chunks, {coded} coded", store.reads, chunks.len());
        }
        // Invalidated, its message kept; nothing else on the store changed.
        let h = store.header().unwrap();
        assert_eq!((h.state, h.message()), (State::Invalidated, "test host 6.12"));
        assert_eq!(store.flushes, [Some(State::Invalidated)]);
        assert!(store.bytes[PAGE..] == image.bytes[PAGE..]);
    }
}

/// A saved kernel proven to rely on nothing in its free pages: the free
/// runs the image lists ahead of the load are left as found (this boot's
/// data stays there), every other page is loaded or zeroed as before.
#[test]
fn free_pages_are_left_as_found_where_the_kernel_relies_on_nothing_in_them() {
    // Large blocks, as a lived-in kernel's are, and small ones.
    let blocks = || Blocks(std::collections::BTreeMap::from([(0x10, 1), (0x120, 8), (0x300, 600), (0x5ff, 1), (0x640, 160)]));
    let is_free = |pfn: u64| blocks().0.iter().any(|(&first, &n)| (first..first + n).contains(&pfn));
    for (seed, lz4, align) in [(11, true, 512), (12, false, 4096)] {
        let saved = Ram::kernel(seed);
        let mut store = Store::new(CAPACITY, align, &saved);
        let backup = backup();
        let plan = commit::Plan { free_as_found: true, ..plan(&backup, lz4, CAPACITY, align) };
        let summary = save(stages(plan, &store), &mut store, &saved, None, &mut blocks(), FREE_RULE).expect("the save");
        assert_ne!(store.header().unwrap().flags & FLAG_FREE_AS_FOUND, 0);
        let mut ram = Ram::resume_target(seed);
        let before = ram.snapshot();
        let mut store = onto(&store, &ram);

        let l = resume(&mut store, &machine(), &mut ram, WhenRefused::KeepImage).expect("resumed").loaded;

        let after = ram.snapshot();
        let mut left = 0;
        for pfn in 0..(SIZE / PAGE) as u64 {
            let addr = pfn * PAGE as u64;
            let (got, was) = (&after[addr as usize..][..PAGE], &before[addr as usize..][..PAGE]);
            if !in_memory(addr) || OWN.contains(addr) {
                assert_eq!(got, was, "page {pfn:#x} (not the saved kernel's) was written");
            } else if is_free(pfn) {
                // Left as found, or zeroed (a run the loader reached first).
                assert!(got == was || got.iter().all(|&b| b == 0), "free page {pfn:#x} written with data");
                left += (got == was && was.iter().any(|&b| b != 0)) as u64;
            } else {
                assert_eq!(got, &saved.page(pfn)[..], "page {pfn:#x} not as saved");
            }
        }
        let pages = RAM.iter().chain(&NVS).flat_map(|r| r.pages()).filter(|p| !OWN.contains(p * PAGE as u64)).count() as u64;
        assert_eq!(l.pages_free, summary.totals.pages_free);
        assert_eq!(l.pages_zeroed + l.pages_left, pages - l.pages_stored);
        // The large run went ahead of the stored pages past it; the runs
        // of fewer pages than FREE_AHEAD_PAGES may wait for the last chunk.
        assert!(l.pages_left >= 600 && left == l.pages_left, "{l:?}, {left} found");
    }
    // Not proven: every free page is zeroed, as every older image's are.
    let (_, image, _) = saved_image(13, true, 512);
    assert_eq!(image.header().unwrap().flags & FLAG_FREE_AS_FOUND, 0);
}

#[test]
fn an_image_is_never_resumed_twice() {
    let (_, image, _) = saved_image(5, true, 512);
    let mut ram = Ram::resume_target(6);
    let mut store = onto(&image, &ram);
    resume(&mut store, &machine(), &mut ram, WhenRefused::KeepImage).expect("the first resume");

    let (before, image) = (ram.snapshot(), store.bytes.clone());
    store.flushes.clear();
    let refused = resume(&mut store, &machine(), &mut ram, WhenRefused::KeepImage).unwrap_err();
    assert_eq!(refused.refusal.code(), code::ALREADY_RESUMED);
    assert_nothing_written(&refused, &ram, &before, &store, &image);
}

/// One way to make an image or a machine that is refused before loading.
struct Case {
    label: &'static str,
    change_image: fn(&mut Store),
    change_machine: fn(&mut Machine<'static>),
    code: u32,
    detail: Option<&'static str>,
}

fn nothing(_: &mut Store) {}
fn same(_: &mut Machine<'static>) {}

const OTHER_OWN: Range = Range { start: 0x30_0000, end: 0x38_0000 };
const FEWER_RAM: [Range; 1] = [RAM[1]];
const OTHER_NVS: [Range; 1] = [Range { start: 0x7f_0000, end: 0x7f_8000 }];

fn cases() -> Vec<Case> {
    vec![
        Case { label: "no header", change_image: |s| s.bytes.fill(0), change_machine: same, code: code::NO_IMAGE, detail: None },
        Case {
            label: "the header unreadable",
            change_image: |s| s.fail_read_at = Some(100),
            change_machine: same,
            code: code::UNREADABLE,
            detail: Some("I/O error at byte 100"),
        },
        Case {
            label: "the metadata unreadable",
            change_image: |s| s.fail_read_at = Some(META_OFFSET),
            change_machine: same,
            code: code::UNREADABLE,
            detail: Some("I/O error at byte 4096"),
        },
        Case {
            label: "the last save failed",
            change_image: |s| commit::record_failure(s, &claimed(s), NONCE, 0, 4, "disk error: timeout", &mut [0; PAGE]).unwrap(),
            change_machine: same,
            code: code::SAVE_FAILED,
            detail: Some("disk error: timeout"),
        },
        Case {
            label: "never committed",
            change_image: |s| s.change_header(|h| h.state = State::Writing),
            change_machine: same,
            code: code::INCOMPLETE,
            detail: Some("test host 6.12"),
        },
        Case {
            label: "invalidated",
            change_image: |s| {
                ksave_core::resume::invalidate(s, Some("image damaged: chunk 3: payload hash"), &mut [0; PAGE]).unwrap();
            },
            change_machine: same,
            code: code::ALREADY_RESUMED,
            detail: Some("image damaged: chunk 3: payload hash"),
        },
        Case { label: "another ksave", change_image: nothing, change_machine: |m| m.own = OTHER_OWN, code: code::OTHER_KSAVE, detail: None },
        Case {
            label: "a snapshot only",
            change_image: |s| s.change_header(|h| h.flags |= FLAG_IOMMU_LEFT_ON),
            change_machine: same,
            code: code::SNAPSHOT_ONLY,
            detail: None,
        },
        Case {
            label: "another CPU vendor",
            change_image: nothing,
            change_machine: |m| m.cpu_vendor = *b"GenuineIntel",
            code: code::OTHER_CPU_VENDOR,
            detail: None,
        },
        Case { label: "no LA57", change_image: |s| s.change_header(|h| h.cr4_needed = CR4_NEEDED), change_machine: same, code: code::NO_LA57, detail: None },
        Case {
            label: "the hardware changed",
            change_image: nothing,
            change_machine: |m| m.facs_signature = Ok(FACS ^ 1),
            code: code::HARDWARE_CHANGED,
            detail: None,
        },
        Case {
            label: "the hardware unknown",
            change_image: nothing,
            change_machine: |m| m.facs_signature = Err("no RSDP found"),
            code: code::HARDWARE_UNKNOWN,
            detail: Some("no RSDP found"),
        },
        Case {
            label: "bad metadata",
            change_image: |s| s.bytes[META_OFFSET as usize + 3] ^= 0x10,
            change_machine: same,
            code: code::BAD_METADATA,
            detail: None,
        },
        Case { label: "another RAM map", change_image: nothing, change_machine: |m| m.ram = &FEWER_RAM, code: code::RAM_MAP_DIFFERS, detail: None },
        Case { label: "another NVS map", change_image: nothing, change_machine: |m| m.nvs = &OTHER_NVS, code: code::NVS_MAP_DIFFERS, detail: None },
        Case { label: "beyond reach", change_image: nothing, change_machine: |m| m.reach = 4 << 20, code: code::BEYOND_REACH, detail: None },
    ]
}

#[test]
fn every_refusal_before_loading_writes_nothing() {
    let (_, image, _) = saved_image(7, true, 512);
    let mut codes = Vec::new();
    for case in cases() {
        let mut ram = Ram::resume_target(8);
        let before = ram.snapshot();
        let mut store = onto(&image, &ram);
        (case.change_image)(&mut store);
        store.flushes.clear();
        let changed = store.bytes.clone();
        let mut machine = machine();
        (case.change_machine)(&mut machine);

        let refused = resume(&mut store, &machine, &mut ram, WhenRefused::KeepImage).unwrap_err();

        assert_eq!(refused.refusal.code(), case.code, "{}: {}", case.label, refused.refusal);
        assert_eq!(refused.detail.as_ref().map(|d| d.as_str()), case.detail, "{}", case.label);
        assert_nothing_written(&refused, &ram, &before, &store, &changed);
        codes.push(case.code);
    }
    // Every code check_and_load can give before loading (not 1, the store
    // not found, which is the caller's; not 7, the host tool's alone).
    codes.sort();
    codes.dedup();
    assert_eq!(codes, [2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]);
}

#[test]
fn the_kexec_way_in_invalidates_a_refused_image_with_the_reason() {
    let (_, image, _) = saved_image(9, false, 512);
    let mut ram = Ram::resume_target(10);
    let before = ram.snapshot();
    let mut store = onto(&image, &ram);
    let intel = Machine { cpu_vendor: *b"GenuineIntel", ..machine() };

    let refused = resume(&mut store, &intel, &mut ram, WhenRefused::Invalidate).unwrap_err();

    assert_eq!(refused.refusal, Refusal::OtherCpuVendor);
    assert!(!refused.memory_lost);
    assert_eq!(refused.invalidated, Some(Ok(())));
    assert!(ram.snapshot() == before, "memory was written");
    let h = store.header().unwrap();
    assert_eq!((h.state, h.message()), (State::Invalidated, "the image was saved on another CPU vendor"));
    assert!(store.bytes[PAGE..] == image.bytes[PAGE..]);

    // With no image there is nothing to invalidate, and the refusal says so.
    let mut blank = Store::new(CAPACITY, 512, &ram);
    blank.bytes[..PAGE].fill(0);
    let refused = resume(&mut blank, &machine(), &mut ram, WhenRefused::Invalidate).unwrap_err();
    assert_eq!(refused.refusal, Refusal::NoImage(HeaderError::BadMagic));
    assert_eq!(refused.invalidated.unwrap().unwrap_err().as_str(), "no image header");
}

#[test]
fn the_resume_attempted_mark_is_the_host_tools_alone() {
    let (saved, mut image, _) = saved_image(11, true, 512);
    image.change_header(|h| h.flags |= FLAG_RESUME_ATTEMPTED);
    let mut ram = Ram::resume_target(12);
    let before = ram.snapshot();
    let mut store = onto(&image, &ram);
    resume(&mut store, &machine(), &mut ram, WhenRefused::KeepImage).expect("resumed despite the mark");
    assert_resumed(&saved, &before, &ram);
}

#[test]
fn a_kernel_in_5_level_paging_resumes_on_a_cpu_with_la57() {
    let (saved, mut image, _) = saved_image(13, false, 512);
    image.change_header(|h| h.cr4_needed = CR4_NEEDED);
    let mut ram = Ram::resume_target(14);
    let before = ram.snapshot();
    let mut store = onto(&image, &ram);
    let la57 = Machine { la57: true, ..machine() };
    let resumed = resume(&mut store, &la57, &mut ram, WhenRefused::KeepImage).expect("resumed");
    assert!(resumed.way_back.unwrap().la57);
    assert_resumed(&saved, &before, &ram);
}

/// A refusal after loading began: this boot's memory is given up, and the
/// image, invalidated with the reason, holds nothing else changed.
fn assert_lost_and_invalidated(refused: &Refused, store: &Store, image: &[u8]) {
    assert!(refused.memory_lost, "{refused:?}");
    assert_eq!(refused.invalidated, Some(Ok(())));
    let h = store.header().unwrap();
    assert_eq!(h.state, State::Invalidated);
    assert_eq!(h.message(), refused.why().as_str());
    assert_eq!(store.flushes, [Some(State::Invalidated)]);
    assert!(store.bytes[PAGE..] == image[PAGE..], "the refusal wrote beyond the header");
}

#[test]
fn a_damaged_chunk_found_while_loading_gives_up_memory_and_invalidates_the_image() {
    let (_, image, _) = saved_image(15, true, 512);
    let chunks = image.chunks();
    for (encoding, helped) in [(Encoding::Raw, false), (Encoding::Lz4, false), (Encoding::Raw, true), (Encoding::Lz4, true)] {
        // A chunk in the middle, so that loading has begun.
        let candidates: Vec<_> = chunks.iter().filter(|c| c.encoding == encoding).collect();
        let chunk = candidates[candidates.len() / 2];
        let mut ram = Ram::resume_target(16);
        let before = ram.snapshot();
        let mut store = onto(&image, &ram);
        store.bytes[(chunk.offset as usize) + encoding.header_len() + 100] ^= 0x08;
        let damaged = store.bytes.clone();

        let refused = resume_with(&mut store, &machine(), &mut ram, WhenRefused::KeepImage, helped).unwrap_err();

        assert_eq!(refused.refusal, Refusal::Damaged { chunk: chunk.index, what: "payload checksum" }, "{encoding:?}, helped: {helped}");
        assert_eq!(refused.refusal.code(), code::DAMAGED);
        assert_lost_and_invalidated(&refused, &store, &damaged);
        assert_eq!(store.header().unwrap().message(), format!("image damaged: chunk {}: payload checksum", chunk.index));
        assert!(ram.snapshot() != before, "loading had begun");
    }
}

/// A sealed image (an encrypted store's), raw and LZ4: resumed with its
/// key on one CPU and through the helpers' queue (the tag checked over the
/// pages where the disk put them, then decrypted in place); a chunk whose
/// ciphertext changed is refused as forged either way.
#[test]
fn a_sealed_image_resumes_through_the_helpers_and_a_forged_chunk_is_refused() {
    for lz4 in [false, true] {
        let saved = Ram::kernel(21);
        let mut image = Store::new(CAPACITY, 512, &saved);
        let backup = backup();
        let plan = commit::Plan { sealed: true, ..plan(&backup, lz4, CAPACITY, 512) };
        let ready = stages(plan, &image).check().expect("the stages");
        ready.write(&mut image, &saved.reader(None), &mut free_blocks(), &mut commit::NoneFree, FREE_RULE, Bufs::sealed().save(), clock).expect("the save");
        let chunks = image.chunks();
        for helped in [false, true] {
            let mut ram = Ram::resume_target(22);
            let before = ram.snapshot();
            let mut store = onto(&image, &ram);
            resume_in(&mut Bufs::sealed(), &mut store, &machine(), &mut ram, WhenRefused::KeepImage, helped).expect("resumed");
            assert_resumed(&saved, &before, &ram);

            let encoding = if lz4 { Encoding::Lz4 } else { Encoding::Raw };
            let chunk = chunks.iter().filter(|c| c.encoding == encoding).nth(1).expect("a chunk");
            let mut ram = Ram::resume_target(23);
            let mut store = onto(&image, &ram);
            store.bytes[chunk.offset as usize + encoding.header_len() + 77] ^= 0x20;
            let refused = resume_in(&mut Bufs::sealed(), &mut store, &machine(), &mut ram, WhenRefused::KeepImage, helped).unwrap_err();
            assert_eq!(refused.refusal, Refusal::Damaged { chunk: chunk.index, what: "tag does not check (another key, or forged)" }, "lz4 {lz4}, helped {helped}");
            assert!(refused.memory_lost);
        }
    }
}

#[test]
fn a_read_error_while_loading_gives_up_memory_and_invalidates_the_image() {
    let (_, image, _) = saved_image(17, false, 512);
    // The second raw chunk (of up to 500 pages each): loading has begun.
    let chunk = image.chunks().into_iter().filter(|c| c.encoding == Encoding::Raw).nth(1).unwrap();
    let mut ram = Ram::resume_target(18);
    let mut store = onto(&image, &ram);
    let at = chunk.offset + PAGE as u64 + 512;
    store.fail_read_at = Some(at);

    let refused = resume(&mut store, &machine(), &mut ram, WhenRefused::KeepImage).unwrap_err();

    assert_eq!(refused.refusal, Refusal::Unreadable);
    assert_eq!(refused.detail.as_ref().unwrap().as_str(), format!("I/O error at byte {at}"));
    assert_lost_and_invalidated(&refused, &store, &image.bytes);
}

#[test]
fn chunks_that_do_not_add_up_to_the_header_refuse_after_the_last_chunk() {
    let (_, mut image, _) = saved_image(19, true, 512);
    image.change_header(|h| h.pages_zero += 1);
    let mut ram = Ram::resume_target(20);
    let mut store = onto(&image, &ram);

    let refused = resume(&mut store, &machine(), &mut ram, WhenRefused::KeepImage).unwrap_err();

    assert!(matches!(refused.refusal, Refusal::Damaged { chunk: u64::MAX, .. }), "{refused:?}");
    assert_lost_and_invalidated(&refused, &store, &image.bytes);
}

#[test]
fn an_image_that_cannot_be_invalidated_has_no_way_back() {
    let (saved, image, _) = saved_image(21, true, 512);
    let mut ram = Ram::resume_target(22);
    let before = ram.snapshot();
    let mut store = onto(&image, &ram);
    store.fail_write_at = Some(0);

    let resumed = resume(&mut store, &machine(), &mut ram, WhenRefused::KeepImage).expect("loaded");

    assert_eq!(resumed.way_back.unwrap_err().as_str(), "I/O error at byte 0");
    assert_resumed(&saved, &before, &ram);
    assert_eq!(store.header().unwrap().state, State::Complete);
}
