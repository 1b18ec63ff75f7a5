//! A whole image, bare or in a SIF: open, walk every entry, read every file to the end,
//! every symlink and xattr, through a small cache.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = sifuse_fuzz::squashfs_bytes(data) else {
        return;
    };
    if let Some(a) = sifuse_fuzz::open(bytes) {
        sifuse_fuzz::exercise(&a, true);
    }
});
