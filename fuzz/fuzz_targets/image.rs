#![no_main]
//! Any bytes as a partition: the decoder must refuse or accept, never panic.

use ksave_format::header::META_BLOCKS;
use ksave_format::reader::{self, Buffers};
use ksave_format::chunk::{LZ4_GROUP, LZ4_OUT};
use ksave_format::PAGE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut src = data;
    let mut block = [0u8; PAGE];
    let Ok(h) = reader::read_header(&mut src, &mut block) else { return };
    let mut meta_buf = Box::new([0u8; META_BLOCKS as usize * PAGE]);
    let Ok(meta) = reader::read_meta(&mut src, &h, &mut meta_buf) else { return };
    let (mut hb, mut li, mut lo) = (Box::new([0u8; PAGE]), Box::new([0u8; LZ4_OUT]), Box::new([0u8; LZ4_GROUP * PAGE]));
    let bufs = Buffers { header: &mut hb, lz4_in: &mut li, lz4_out: &mut lo };
    let _ = reader::visit_chunks(&mut src, &h, &meta, bufs, |_, _| {}, |_| {});
});
