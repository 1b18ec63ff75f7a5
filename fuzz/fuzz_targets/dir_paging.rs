//! Directory listings read the way the mount reads them: page by page from a position,
//! checked against the whole listing, and resumed by a fresh reader.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = sifuse_fuzz::squashfs_bytes(data) {
        sifuse_fuzz::page_directories(&bytes);
    }
});
