//! `sifuse extract` of every generated image reproduces its source tree exactly, and agrees
//! with `unsquashfs` on the same image. Also through a SIF wrapper and an offset.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures::{fixtures, Fixtures};
use common::tree_compare::{compare_trees, sparse_allocated_bytes, CompareOptions};
use sifuse::extract::{extract, ExtractOptions};
use sifuse::image::{self, ImageSpec};
use sifuse::sif::{arch_code, FsType, PartType, PartitionInfo, SifWriter, WriterObject};

fn scratch(name: &str) -> tempfile::TempDir {
    let base = common::fixtures::target_tmpdir();
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(base)
        .unwrap()
}

fn options_for(name: &str) -> CompareOptions {
    CompareOptions {
        xattrs: Fixtures::has_xattrs(name),
        ..Default::default()
    }
}

fn extract_spec(spec: &ImageSpec, dest: &Path) {
    let img =
        image::open(spec, 64 << 20).unwrap_or_else(|e| panic!("{}: {e}", spec.path.display()));
    let opts = ExtractOptions {
        progress: false,
        owners: true,
    };
    extract(&img.archive, b"/", dest, &opts)
        .unwrap_or_else(|e| panic!("{}: {e}", spec.path.display()));
}

fn assert_same(expected: &Path, actual: &Path, opts: &CompareOptions, what: &str) {
    let diffs = compare_trees(expected, actual, opts);
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// The sparse file's 200 MB hole stays a hole.
fn assert_sparse(root: &Path) {
    let fx = fixtures();
    let mut found = false;
    for entry in std::fs::read_dir(fx.tree.join("sparse")).unwrap() {
        let rel = entry
            .unwrap()
            .path()
            .strip_prefix(&fx.tree)
            .unwrap()
            .to_path_buf();
        let src = fx.tree.join(&rel);
        let meta = std::fs::metadata(&src).unwrap();
        if meta.len() > 100 << 20 {
            found = true;
            let got = sparse_allocated_bytes(&root.join(&rel));
            assert!(
                got < 16 << 20,
                "{}: {got} bytes allocated for a file that is mostly hole",
                rel.display()
            );
        }
    }
    assert!(found, "the fixture tree has a large sparse file");
}

fn check_image(name: &str) {
    let fx = fixtures();
    let img = fx.image(name);
    let dir = scratch(&format!("extract-{name}-"));
    let ours = dir.path().join("ours");
    extract_spec(&ImageSpec::new(img), &ours);
    assert_same(
        &fx.tree,
        &ours,
        &options_for(name),
        &format!("{name}: source tree vs sifuse extract"),
    );
    if !name.contains("no-sparse") {
        assert_sparse(&ours);
    }

    let theirs = dir.path().join("unsquashfs");
    let out = Command::new("unsquashfs")
        .args(["-no-progress", "-quiet", "-d"])
        .arg(&theirs)
        .arg(img)
        .output()
        .expect("run unsquashfs");
    assert!(
        out.status.success(),
        "unsquashfs {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(
        &theirs,
        &ours,
        &options_for(name),
        &format!("{name}: unsquashfs vs sifuse extract"),
    );
}

one_test_per_fixture_image!(check_image);

fn wrap_in_sif(image: &Path, sif: &Path) {
    let info = PartitionInfo {
        fs_type: FsType::Squashfs,
        part_type: PartType::PrimarySystem,
        arch: arch_code("amd64").unwrap(),
    };
    let mut data = WriterObject::partition("data", PathBuf::from("/dev/null"), info);
    data.partition = Some(PartitionInfo {
        part_type: PartType::Data,
        ..info
    });
    let w = SifWriter {
        objects: vec![
            WriterObject::bytes(
                sifuse::sif::DataType::Deffile,
                "",
                b"bootstrap: scratch\n".to_vec(),
            ),
            data,
            WriterObject::partition("rootfs", image.to_path_buf(), info),
        ],
        ..Default::default()
    };
    w.write_file(sif).unwrap();
}

#[test]
fn extract_through_sif_and_offset() {
    let fx = fixtures();
    let dir = scratch("extract-sif-");
    let sif = dir.path().join("image.sif");
    wrap_in_sif(fx.image("zstd"), &sif);
    let opts = options_for("zstd");

    let by_default = dir.path().join("default");
    extract_spec(&ImageSpec::new(&sif), &by_default);
    assert_same(&fx.tree, &by_default, &opts, "SIF, primary partition");

    let by_name = dir.path().join("name");
    extract_spec(
        &ImageSpec {
            partition: Some("rootfs".into()),
            ..ImageSpec::new(&sif)
        },
        &by_name,
    );
    assert_same(&fx.tree, &by_name, &opts, "SIF, --partition rootfs");

    let located = image::locate(&ImageSpec::new(&sif)).unwrap();
    let by_offset = dir.path().join("offset");
    extract_spec(
        &ImageSpec {
            offset: Some(located.start),
            ..ImageSpec::new(&sif)
        },
        &by_offset,
    );
    assert_same(&fx.tree, &by_offset, &opts, "SIF, --offset");

    // The data partition is empty: choosing it names the problem.
    let e = image::open(
        &ImageSpec {
            partition: Some("data".into()),
            ..ImageSpec::new(&sif)
        },
        1 << 20,
    )
    .unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");
}

#[test]
fn extract_refuses_a_non_empty_destination() {
    let fx = fixtures();
    let dir = scratch("extract-nonempty-");
    std::fs::write(dir.path().join("x"), b"x").unwrap();
    let img = image::open(&ImageSpec::new(fx.image("gzip")), 1 << 20).unwrap();
    let e = extract(
        &img.archive,
        b"/",
        dir.path(),
        &ExtractOptions {
            progress: false,
            owners: true,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("non-empty"), "{e}");
}

#[test]
fn extract_of_a_subdirectory() {
    let fx = fixtures();
    let dir = scratch("extract-sub-");
    let dest = dir.path().join("out");
    let img = image::open(&ImageSpec::new(fx.image("gzip")), 1 << 20).unwrap();
    let sub = std::fs::read_dir(&fx.tree)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_type().unwrap().is_dir())
        .unwrap()
        .file_name();
    let sub = sub.to_str().unwrap();
    extract(
        &img.archive,
        sub.as_bytes(),
        &dest,
        &ExtractOptions {
            progress: false,
            owners: true,
        },
    )
    .unwrap();
    assert_same(
        &fx.tree.join(sub),
        &dest,
        &options_for("gzip"),
        "subdirectory extract",
    );
}
