//! Micro-benchmarks of the reader, no FUSE involved: decompression per compressor with
//! reused contexts, metadata lookup, lookup and readdir in a big directory, random 4 KiB
//! reads and sequential reads. Images are generated at start with mksquashfs.
//!
//! `cargo bench --bench reader`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sifuse::codec::Compressor;
use sifuse::source::FileWindow;
use sifuse::Archive;

struct Images {
    _dir: tempfile::TempDir,
    by_comp: Vec<(Compressor, PathBuf)>,
}

/// Deterministic mixed data: text-like runs and pseudo-random bytes.
fn mixed(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (v.len() / 65536) % 2 == 0 {
            v.extend_from_slice(format!("line {} of some python source\n", x % 1000).as_bytes());
        } else {
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    v.truncate(len);
    v
}

fn build() -> Images {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("big")).unwrap();
    std::fs::write(tree.join("data.bin"), mixed(32 << 20)).unwrap();
    for i in 0..20_000 {
        std::fs::write(
            tree.join("big").join(format!("mod_{i:05}.py")),
            format!("x = {i}\n"),
        )
        .unwrap();
    }
    let mut by_comp = Vec::new();
    for comp in [
        Compressor::Gzip,
        Compressor::Xz,
        Compressor::Lzo,
        Compressor::Lz4,
        Compressor::Zstd,
    ] {
        let img = dir.path().join(format!("{}.sqfs", comp.name()));
        let st = Command::new("mksquashfs")
            .arg(&tree)
            .arg(&img)
            .args([
                "-noappend",
                "-quiet",
                "-no-progress",
                "-no-duplicates",
                "-comp",
                comp.name(),
            ])
            .status()
            .expect("mksquashfs (apt-get install squashfs-tools)");
        assert!(st.success());
        by_comp.push((comp, img));
    }
    Images { _dir: dir, by_comp }
}

fn open(path: &Path, cache: u64) -> Archive {
    let f = Arc::new(std::fs::File::open(path).unwrap());
    let len = f.metadata().unwrap().len();
    Archive::open(Arc::new(FileWindow::new(f, 0, len).unwrap()), cache).unwrap()
}

fn benches(c: &mut Criterion) {
    let images = build();

    let mut g = c.benchmark_group("sequential_read_32MiB_cold_cache");
    g.throughput(Throughput::Bytes(32 << 20));
    g.sample_size(10);
    for (comp, img) in &images.by_comp {
        g.bench_function(comp.name(), |b| {
            b.iter_batched(
                || open(img, 1 << 20),
                |a| {
                    let inode = a.resolve(b"data.bin").unwrap();
                    let f = inode.as_file().unwrap();
                    let mut buf = vec![0u8; 128 << 10];
                    let mut off = 0;
                    while off < f.file_size {
                        off += a.read_file_at(f, off, &mut buf).unwrap() as u64;
                    }
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();

    let zstd = &images
        .by_comp
        .iter()
        .find(|(c, _)| *c == Compressor::Zstd)
        .unwrap()
        .1;
    let a = open(zstd, 64 << 20);
    let big = a.resolve(b"big").unwrap();
    c.bench_function("lookup_in_20k_dir_warm", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = (i + 7919) % 20_000;
            a.lookup(&big, format!("mod_{i:05}.py").as_bytes())
                .unwrap()
                .unwrap()
        })
    });
    c.bench_function("readdir_20k_warm", |b| {
        b.iter(|| a.read_dir(&big).unwrap().len())
    });
    c.bench_function("resolve_and_decode_inode_warm", |b| {
        b.iter(|| a.resolve(b"big/mod_12345.py").unwrap().number)
    });
    let data = a.resolve(b"data.bin").unwrap();
    let f = data.as_file().unwrap().clone();
    let mut g = c.benchmark_group("random_4k_read");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("warm_cache", |b| {
        let mut x: u64 = 1;
        let mut buf = [0u8; 4096];
        b.iter(|| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % (f.file_size - 4096);
            a.read_file_at(&f, off, &mut buf).unwrap()
        })
    });
    let small = open(zstd, 256 << 10);
    g.bench_function("cache_256KiB", |b| {
        let mut x: u64 = 1;
        let mut buf = [0u8; 4096];
        b.iter(|| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % (f.file_size - 4096);
            small.read_file_at(&f, off, &mut buf).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("decompress_128KiB_block");
    let block = mixed(128 << 10);
    g.throughput(Throughput::Bytes(block.len() as u64));
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&block).unwrap();
        e.finish().unwrap()
    };
    let zs = zstd::bulk::compress(&block, 15).unwrap();
    let l4 = lz4_flex::block::compress(&block);
    for (comp, bytes) in [
        (Compressor::Gzip, gz),
        (Compressor::Zstd, zs),
        (Compressor::Lz4, l4),
    ] {
        let mut out = Vec::new();
        g.bench_function(comp.name(), |b| {
            b.iter(|| comp.decompress(&bytes, &mut out, block.len()).unwrap())
        });
    }
    g.finish();
}

criterion_group!(reader, benches);
criterion_main!(reader);
