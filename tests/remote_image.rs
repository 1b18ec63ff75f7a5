//! Images read as remote objects (an in-memory store, so every request is counted) through
//! the chunk cache: extraction reproduces the source tree exactly for every fixture image,
//! SIF partition choice and offsets work as on a local file, each chunk is fetched once,
//! and a reopen with the cache warm asks the store for nothing but the version.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::fixtures::{fixtures, Fixtures};
use common::tree_compare::{compare_trees, CompareOptions};
use sifuse::extract::{extract, ExtractOptions};
use sifuse::image::{self, ImageSpec, OpenImage};
use sifuse::sif::{arch_code, FsType, PartType, PartitionInfo, SifWriter, WriterObject};
use sifuse::source::remote::{CacheSettings, MemoryObject};

fn scratch(name: &str) -> tempfile::TempDir {
    let base = common::fixtures::target_tmpdir();
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(base)
        .unwrap()
}

fn cache_in(dir: &Path) -> CacheSettings {
    CacheSettings {
        dir: Some(dir.join("cache")),
        ..Default::default()
    }
}

/// Open `object` as the image `spec` describes (its path unused), through `cache`.
fn open_remote(object: &Arc<MemoryObject>, spec: &ImageSpec) -> OpenImage {
    let whole = image::open_whole_object(object.clone(), &spec.cache).unwrap();
    let located = image::locate_in(whole, spec).unwrap();
    image::open_located(located, 32 << 20).unwrap()
}

fn extract_and_compare(img: &OpenImage, dest: &Path, name: &str) {
    let opts = ExtractOptions {
        progress: false,
        owners: true,
    };
    extract(&img.archive, b"/", dest, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let problems = compare_trees(
        &fixtures().tree,
        dest,
        &CompareOptions {
            xattrs: Fixtures::has_xattrs(name),
            ..Default::default()
        },
    );
    assert!(
        problems.is_empty(),
        "{name} read remotely differs from its source tree:\n{}",
        problems.join("\n")
    );
}

fn check_image(name: &str) {
    let fx = fixtures();
    let dir = scratch("remote-");
    let bytes = std::fs::read(fx.image(name)).unwrap();
    let len = bytes.len() as u64;
    let object = Arc::new(MemoryObject::new(bytes));
    let spec = ImageSpec {
        cache: cache_in(dir.path()),
        ..Default::default()
    };
    let img = open_remote(&object, &spec);
    extract_and_compare(&img, &dir.path().join("out"), name);
    // Every chunk at most once (the in-memory part is far smaller than these images'
    // metadata, so a chunk read again came from disk).
    assert!(
        object.bytes_served() <= len,
        "{name}: {} bytes fetched of a {len}-byte image",
        object.bytes_served()
    );
    drop(img);

    // Reopened with the cache warm: one request, the version, whatever is read.
    let before = object.requests();
    let img = open_remote(&object, &spec);
    extract_and_compare(&img, &dir.path().join("again"), name);
    assert_eq!(object.requests() - before, 1, "{name}: reopen fetched");
}

#[test]
fn without_a_disk_cache_the_same_tree_comes_out() {
    let dir = scratch("remote-memory-");
    for name in ["gzip", "zstd-b1m"] {
        let object = Arc::new(MemoryObject::new(
            std::fs::read(fixtures().image(name)).unwrap(),
        ));
        let memory_only = ImageSpec {
            cache: CacheSettings {
                disk: false,
                ..cache_in(dir.path())
            },
            ..Default::default()
        };
        let img = open_remote(&object, &memory_only);
        assert!(!img.located.remote.as_ref().unwrap().has_disk_cache());
        extract_and_compare(&img, &dir.path().join(name), name);
        assert!(!dir.path().join("cache").exists(), "a disk cache was made");
    }
}

one_test_per_fixture_image!(check_image);

#[test]
fn sif_partitions_and_offsets_work_as_on_a_local_file() {
    let fx = fixtures();
    let dir = scratch("remote-sif-");
    let sif = dir.path().join("image.sif");
    let info = PartitionInfo {
        fs_type: FsType::Squashfs,
        part_type: PartType::PrimarySystem,
        arch: arch_code("amd64").unwrap(),
    };
    let mut data = WriterObject::partition("data", "/dev/null".into(), info);
    data.partition = Some(PartitionInfo {
        part_type: PartType::Data,
        ..info
    });
    SifWriter {
        objects: vec![
            data,
            WriterObject::partition("rootfs", fx.image("zstd").to_path_buf(), info),
        ],
        ..Default::default()
    }
    .write_file(&sif)
    .unwrap();
    let object = Arc::new(MemoryObject::new(std::fs::read(&sif).unwrap()));
    let spec = ImageSpec {
        cache: cache_in(dir.path()),
        ..Default::default()
    };
    let local = image::locate(&ImageSpec::new(&sif)).unwrap();

    let img = open_remote(&object, &spec);
    assert_eq!(img.located.start, local.start);
    assert_eq!(
        img.located.partition.as_ref().map(|d| &d.name),
        Some(&"rootfs".to_string())
    );
    assert!(img.located.remote.is_some());
    assert_eq!(img.located.name, "memory object");
    extract_and_compare(&img, &dir.path().join("default"), "zstd");

    let by_offset = ImageSpec {
        offset: Some(local.start),
        ..spec.clone()
    };
    extract_and_compare(
        &open_remote(&object, &by_offset),
        &dir.path().join("offset"),
        "zstd",
    );

    let whole = image::open_whole_object(object.clone(), &spec.cache).unwrap();
    let e = image::locate_in(
        whole,
        &ImageSpec {
            partition: Some("nonesuch".into()),
            ..spec.clone()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("nonesuch"), "{e}");
}

#[test]
fn opening_fetches_the_metadata_tail_in_few_requests() {
    let fx = fixtures();
    let dir = scratch("remote-open-");
    let object = Arc::new(MemoryObject::new(std::fs::read(fx.image("gzip")).unwrap()));
    let spec = ImageSpec {
        cache: cache_in(dir.path()),
        ..Default::default()
    };
    let img = open_remote(&object, &spec);
    let sb = img.archive.superblock().clone();
    // The version, the superblock's chunk and the tail (these fixtures' tails are small).
    assert!(
        object.requests() <= 3,
        "{} requests to open an image",
        object.requests()
    );
    // Listing the whole tree now needs nothing more: the tables are all cached.
    let before = object.requests();
    let mut entries = 0;
    sifuse::walk::walk(&img.archive, img.archive.root(), b"", &mut |_| {
        entries += 1;
        Ok(())
    })
    .unwrap();
    assert!(entries > 10);
    assert_eq!(
        object.requests(),
        before,
        "a tree walk fetched beyond the metadata tail ({} bytes from {})",
        sb.bytes_used - sb.inode_table,
        sb.inode_table
    );
}
