//! Inode and directory decoding: a committed tiny image (chosen by the first input byte)
//! with the rest of the input written over its inode and directory tables, then opened,
//! walked, listed and looked up in. Metadata of the raw seed is stored uncompressed, so the
//! input bytes are the inodes and directory entries themselves.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(image) = sifuse_fuzz::spliced_image(data) else {
        return;
    };
    if let Some(a) = sifuse_fuzz::open(image) {
        sifuse_fuzz::exercise(&a, false);
    }
});
