//! Extended attributes read the way the mount reads them: names first, then one value by
//! name, checked against the whole set.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = sifuse_fuzz::squashfs_bytes(data) {
        sifuse_fuzz::look_up_xattrs(&bytes);
    }
});
