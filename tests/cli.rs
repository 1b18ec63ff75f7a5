//! The command line over the committed demo and tiny images: output, and one clear line on
//! stderr with a non-zero exit for every kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sifuse::sif::{DataType, SifWriter, WriterObject};

fn sifuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sifuse"))
        .args(args)
        .output()
        .expect("run sifuse")
}

fn fixture(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
        .display()
        .to_string()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "quiet on success: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A failure: non-zero exit, nothing on stdout, exactly one line on stderr.
fn fails(out: &Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.starts_with("sifuse: "), "{err}");
    err
}

#[test]
fn inspect_shows_descriptors_and_superblock() {
    let text = ok(&sifuse(&["inspect", &fixture("demo.sif")]));
    for want in [
        "SIF image, version 01",
        "Def.FILE",
        "rootfs",
        "Squashfs",
        "*System",
        "amd64",
        "compressor:  zstd",
        "inodes:      28",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&sifuse(&["inspect", "--json", &fixture("demo.sif")]))).unwrap();
    assert_eq!(json["sif"]["descriptors"][1]["name"], "rootfs");
    assert_eq!(json["sif"]["descriptors"][1]["partition_type"], "*System");
    assert_eq!(json["squashfs"]["superblock"]["compressor"], "zstd");
    assert_eq!(json["squashfs"]["superblock"]["block_size"], 131072);
    let bare: serde_json::Value = serde_json::from_str(&ok(&sifuse(&[
        "inspect",
        "--json",
        &fixture("tiny/tiny-gzip.sqfs"),
    ])))
    .unwrap();
    assert!(bare["sif"].is_null());
    assert_eq!(bare["squashfs"]["superblock"]["inode_count"], 615);
}

#[test]
fn ls_stat_cat() {
    let demo = fixture("demo.sif");
    let names = ok(&sifuse(&["ls", &demo, "/"]));
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["bin", "dev", "etc", "proc", "root", "sys", "tmp"]
    );
    let long = ok(&sifuse(&["ls", "-l", &demo, "/bin"]));
    assert!(long.contains("sh -> busybox"), "{long}");
    let rec = ok(&sifuse(&["ls", "-R", &demo]));
    assert!(rec.lines().any(|l| l == "etc/os-release"), "{rec}");
    assert_eq!(
        ok(&sifuse(&["cat", &demo, "/etc/motd"])),
        "Hello from inside a SIF image served by sifuse.\n"
    );
    let st = ok(&sifuse(&[
        "stat",
        &fixture("tiny/tiny-gzip.sqfs"),
        "hello.txt",
    ]));
    assert!(
        st.contains("Links: 2") && st.contains("Uid: 1000") && st.contains("user.greeting=\"hi\""),
        "{st}"
    );
    let dev = ok(&sifuse(&["stat", &fixture("tiny/tiny-gzip.sqfs"), "chr"]));
    assert!(dev.contains("Device type: 4095,1048575"), "{dev}");
}

#[test]
fn clear_errors() {
    let demo = fixture("demo.sif");
    let e = fails(&sifuse(&["ls", "/nonexistent/image.sif"]));
    assert!(e.contains("No such file"), "{e}");
    let e = fails(&sifuse(&["cat", &demo, "/nope"]));
    assert!(e.contains("/nope: no such file"), "{e}");
    let e = fails(&sifuse(&["cat", &demo, "/etc"]));
    assert!(e.contains("not a regular file"), "{e}");
    let e = fails(&sifuse(&["ls", &demo, "/etc/motd/x"]));
    assert!(e.contains("not a directory"), "{e}");
    let e = fails(&sifuse(&["ls", "--partition", "9", &demo]));
    assert!(e.contains("no partition with id or name \"9\""), "{e}");
    let e = fails(&sifuse(&["ls", env!("CARGO_MANIFEST_DIR")]));
    assert!(e.contains("directory"), "{e}");
    let e = fails(&sifuse(&["ls", &fixture("make-tiny.sh")]));
    assert!(e.contains("not a SIF or SquashFS image"), "{e}");
    let e = fails(&sifuse(&[
        "ls",
        "--offset",
        "4096",
        &fixture("tiny/tiny-gzip.sqfs"),
    ]));
    assert!(
        e.contains("not a SIF or SquashFS image") || e.contains("magic"),
        "{e}"
    );
}

#[test]
fn sif_without_squashfs_partition() {
    let dir = tempfile::tempdir().unwrap();
    let sif: PathBuf = dir.path().join("defonly.sif");
    SifWriter {
        objects: vec![WriterObject::bytes(
            DataType::Deffile,
            "",
            b"bootstrap: scratch\n".to_vec(),
        )],
        ..Default::default()
    }
    .write_file(&sif)
    .unwrap();
    let sif = sif.display().to_string();
    let text = ok(&sifuse(&["inspect", &sif]));
    assert!(
        text.contains("Def.FILE") && text.contains("no SquashFS partition"),
        "{text}"
    );
    let e = fails(&sifuse(&["ls", &sif]));
    assert!(e.contains("no SquashFS partition"), "{e}");
}

#[test]
fn truncated_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("cut.sqfs");
    let bytes = std::fs::read(fixture("tiny/tiny-gzip.sqfs")).unwrap();
    std::fs::write(&img, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&sifuse(&["ls", &img.display().to_string()]));
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn extract_via_cli_to_a_new_directory() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    ok(&sifuse(&[
        "extract",
        &fixture("demo.sif"),
        &dest.display().to_string(),
    ]));
    assert_eq!(
        std::fs::read_link(dest.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        std::fs::read(dest.join("etc/motd")).unwrap(),
        b"Hello from inside a SIF image served by sifuse.\n"
    );
    let e = fails(&sifuse(&[
        "extract",
        &fixture("demo.sif"),
        &dest.display().to_string(),
    ]));
    assert!(e.contains("non-empty"), "{e}");
}

/// `sifuse --version`: the version, the commit HEAD was at when it was built (this tree is
/// a checkout wherever the tests run from one; otherwise the commit is "unknown" unless a
/// packager named it), and the compressors; `-V` the version alone.
#[test]
fn version_names_commit_and_compressors() {
    let long = ok(&sifuse(&["--version"]));
    let recorded = env!("SIFUSE_GIT_COMMIT");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string())
    };
    let checkout = git(&["rev-parse", "--show-toplevel"])
        .is_some_and(|top| Path::new(&top).canonicalize().unwrap() == dir.canonicalize().unwrap());
    let commit = if checkout && std::env::var_os("SIFUSE_GIT_COMMIT").is_none() {
        let mut head = git(&["rev-parse", "HEAD"]).expect("git rev-parse HEAD");
        head.truncate(12);
        assert_eq!(
            recorded, head,
            "the binary names another commit than HEAD: build.rs did not run again when \
             HEAD moved (or HEAD moved after this build)"
        );
        head
    } else if recorded.is_empty() {
        "unknown (not built from a git checkout)".to_string()
    } else {
        recorded.to_string()
    };
    assert_eq!(
        long,
        format!(
            "sifuse {}\ncommit: {commit}\ncompressors: gzip lzma lzo xz lz4 zstd\n",
            env!("CARGO_PKG_VERSION")
        )
    );
    let short = ok(&sifuse(&["-V"]));
    assert_eq!(short, format!("sifuse {}\n", env!("CARGO_PKG_VERSION")));
}
