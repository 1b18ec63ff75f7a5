//! Images the memory tests build: incompressible data, which a read cannot skim.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `len` incompressible bytes, continuing the sequence `state` is at.
pub fn random_bytes(state: &mut u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    for chunk in data.chunks_exact_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    data
}

/// The gzip SquashFS image `name` of the tree `src`, beside it.
pub fn pack(src: &Path, name: &str) -> PathBuf {
    let img = src.parent().unwrap().join(name);
    let st = Command::new("mksquashfs")
        .arg(src)
        .arg(&img)
        .args(["-noappend", "-quiet", "-no-progress", "-comp", "gzip"])
        .status()
        .unwrap();
    assert!(st.success(), "mksquashfs failed");
    img
}

/// An image of 48 MiB of incompressible files, which random reads spread over the cache.
pub fn random_data_image(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir(&src).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for f in 0..6 {
        fs::write(src.join(format!("r{f}.bin")), random_bytes(&mut x, 8 << 20)).unwrap();
    }
    pack(&src, "random.sqfs")
}

/// 128 reads of 64 KiB spread over `file`, one of [`random_data_image`]'s: the `i`th at
/// 64 KiB block `(i * stride + seed) % 128`, so readers with different seeds or strides
/// meet in different orders.
pub fn read_spread(file: &Path, seed: u64, stride: u64) {
    let f = fs::File::open(file).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    for i in 0..128u64 {
        let at = ((i * stride + seed) % 128) * (64 << 10);
        f.read_exact_at(&mut buf, at).unwrap();
    }
}
