//! Helpers shared by the integration tests: `mod common;` in a test file.
#![allow(dead_code)]

pub mod fixtures;
pub mod tree_compare;

/// Calls the macro `$m` with `test_name => "image name",` for every image that
/// fixtures/generate.sh builds, so each test file gets one test per image from one list.
#[macro_export]
macro_rules! with_fixture_images {
    ($m:ident) => {
        $m! {
            gzip => "gzip",
            lzo => "lzo",
            lz4 => "lz4",
            lz4_hc => "lz4-hc",
            xz => "xz",
            zstd => "zstd",
            lzma => "lzma",
            gzip_b4k => "gzip-b4k",
            zstd_b1m => "zstd-b1m",
            gzip_no_fragments => "gzip-no-fragments",
            zstd_always_fragments => "zstd-always-fragments",
            zstd_no_xattrs => "zstd-no-xattrs",
            gzip_uncompressed => "gzip-uncompressed",
            gzip_nopad => "gzip-nopad",
            gzip_no_exports => "gzip-no-exports",
            gzip_no_sparse => "gzip-no-sparse",
            zstd_no_duplicates => "zstd-no-duplicates",
            xz_bcj_dict => "xz-bcj-dict",
            gzip_level1_window10 => "gzip-level1-window10",
        }
    };
}
