//! Opening arbitrary bytes as SquashFS (superblock, compressor options, root inode) and the
//! lookup tables: ids, fragments, exports.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use sifuse::archive::{Archive, CompressorOptions, Superblock};
use sifuse::codec::Compressor;

fuzz_target!(|data: &[u8]| {
    if let Some(raw) = data.get(..96) {
        let raw: &[u8; 96] = raw.try_into().expect("96 bytes");
        for len in [data.len() as u64, u64::MAX, 96] {
            let _ = Superblock::parse(raw, len);
        }
    }
    if let Some(opts) = data.get(96..104) {
        for id in 1..=6 {
            let _ = CompressorOptions::parse(Compressor::from_id(id).expect("1..=6"), opts);
        }
    }
    let Ok(a) = Archive::open(Arc::new(data.to_vec()), sifuse_fuzz::CACHE_BYTES) else {
        return;
    };
    let sb = a.superblock().clone();
    for i in (0..sb.id_count).take(64).chain([sb.id_count, u16::MAX]) {
        let _ = a.id(i);
    }
    for i in (0..sb.fragment_count)
        .take(64)
        .chain([sb.fragment_count, u32::MAX])
    {
        let _ = a.fragment_entry(i);
    }
    for n in (0..sb.inode_count)
        .take(64)
        .chain([sb.inode_count, u32::MAX])
    {
        if let Ok(Some(r)) = a.inode_ref_by_number(n) {
            let _ = a.inode(r);
        }
    }
    let root = a.root().clone();
    let _ = a.read_dir(&root);
    let _ = a.xattrs(&root);
    let _ = a.statfs();
});
