//! `sifuse cache info`, `sifuse cache prune` and `sifuse fetch` from the command line, over
//! a chunk cache filled through the library (an in-memory store), and their refusals.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use sifuse::source::remote::{CacheSettings, MemoryObject, RemoteConfig, RemoteSource};
use sifuse::source::ReadAt;

fn sifuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sifuse"))
        .args(args)
        .env_remove("SIFUSE_CACHE_DIR")
        .output()
        .expect("run sifuse")
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// One line on stderr, non-zero exit.
fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

/// Read all of a 3 MiB object through the cache under `dir`.
fn fill(dir: &Path) -> Arc<MemoryObject> {
    let object = Arc::new(MemoryObject::new(vec![7u8; 3 << 20]));
    let cache = CacheSettings {
        dir: Some(dir.to_path_buf()),
        ..Default::default()
    }
    .open()
    .unwrap();
    let src = RemoteSource::open(object.clone(), Some(cache), RemoteConfig::default()).unwrap();
    let mut buf = vec![0u8; 3 << 20];
    src.read_exact_at(&mut buf, 0).unwrap();
    object
}

#[test]
fn info_lists_what_the_cache_holds_and_prune_trims_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let empty = stdout_of(&sifuse(&["cache", "info", "--cache-dir", d]));
    assert!(empty.contains("in 0 images"), "{empty}");

    fill(dir.path());
    let info = stdout_of(&sifuse(&["cache", "info", "--cache-dir", d]));
    assert!(info.contains("memory object"), "{info}");
    assert!(info.contains("3 chunks"), "{info}");
    assert!(info.contains("in 1 images"), "{info}");

    // Each full chunk takes 1 MiB and its 4 KiB header: 2 MiB holds one.
    let pruned = stdout_of(&sifuse(&[
        "cache",
        "prune",
        "--cache-dir",
        d,
        "--max",
        "2M",
    ]));
    assert!(pruned.contains("removed 2 chunks"), "{pruned}");
    let info = stdout_of(&sifuse(&["cache", "info", "--cache-dir", d]));
    assert!(info.contains("1 chunks"), "{info}");

    let emptied = stdout_of(&sifuse(&["cache", "prune", "--cache-dir", d, "--max", "0"]));
    assert!(emptied.contains("removed 1 chunks"), "{emptied}");
    let info = stdout_of(&sifuse(&["cache", "info", "--cache-dir", d]));
    assert!(info.contains("in 0 images"), "{info}");
}

#[test]
fn bad_sizes_and_non_urls_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let e =
        String::from_utf8(sifuse(&["cache", "prune", "--cache-dir", d, "--max", "lots"]).stderr)
            .unwrap();
    assert!(e.contains("not a size"), "{e}");
    let e = one_line_error(&sifuse(&["fetch", "/images/local.sif", "--cache-dir", d]));
    assert!(e.contains("not a URL"), "{e}");
    let e = one_line_error(&sifuse(&[
        "fetch",
        "https://127.0.0.1:9/a.sif",
        "--no-disk-cache",
    ]));
    assert!(e.contains("--no-disk-cache"), "{e}");
}

#[test]
fn a_cache_directory_open_to_others_is_refused_by_the_cache_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    fill(dir.path());
    let mine = dir.path().join(nix::unistd::geteuid().to_string());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = one_line_error(&sifuse(&["cache", "info", "--cache-dir", d]));
    assert!(e.contains("lets other users in"), "{e}");
}
