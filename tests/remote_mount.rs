//! Remote images mounted over real HTTP servers started by the test (nginx on 127.0.0.1):
//! what the mount shows is what the kernel shows of the local copy, byte for byte and stat
//! for stat; the chunk cache survives damage and pruning while mounted; two mounts share
//! it; an unreachable store means EIO for what is not cached and recovery without a
//! remount; a second node behind a caching proxy reaches the origin for nothing; and an
//! oras:// image comes from a plain-HTTP registry only with --no-https, with the
//! credentials --registry-auth names.

mod common;
mod mount_util;
mod remote_util;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fixtures::fixtures;
use mount_util::hammer::assert_peak_within_budget;
use mount_util::images::{random_data_image, read_spread};
use mount_util::{
    assert_no_differences, compare_views, require_mount, scratch, wrap_in_sif, KernelMount,
    SifuseMount, ViewExceptions,
};
use remote_util::proxy::{Fault, FaultProxy};
use remote_util::servers::{
    basic, Nginx, Registry, RegistryAuth, HTPASSWD_PASSWORD, HTPASSWD_USER,
};

/// Bytes nginx sent for ranged requests for data, from its access log (`... "bytes=A-B"
/// ...`). The HTTP store asks an object's version with a one-byte range (`bytes=0-0`), which
/// is the revalidation, not data: not counted.
fn ranged_bytes(log: &[String]) -> u64 {
    log.iter()
        .filter_map(|l| {
            let range = l.split('"').nth(1)?.strip_prefix("bytes=")?;
            if range == "0-0" {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some(b.parse::<u64>().ok()? - a.parse::<u64>().ok()? + 1)
        })
        .sum()
}

/// Read every file under `root` (contents only), so the mount fetches what it needs.
fn read_all(root: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                n += fs::read(e.path()).map(|b| b.len() as u64).unwrap_or(0);
            }
        }
    }
    n
}

fn drop_page_cache() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

struct Served {
    _root: tempfile::TempDir,
    nginx: Nginx,
    local: PathBuf,
}

/// The image `name` (optionally wrapped in a SIF), served by nginx.
fn serve(name: &str, sif: bool) -> Served {
    let root = scratch("remote-root");
    let image = fixtures().image(name);
    let local = if sif {
        wrap_in_sif(image, root.path())
    } else {
        let p = root.path().join("image.sqfs");
        fs::copy(image, &p).unwrap();
        p
    };
    let nginx = Nginx::serve(root.path());
    Served {
        _root: root,
        nginx,
        local,
    }
}

impl Served {
    fn url(&self) -> String {
        self.nginx.url(&format!(
            "/{}",
            self.local.file_name().unwrap().to_str().unwrap()
        ))
    }
}

#[test]
fn a_remote_mount_shows_what_the_kernel_shows_of_the_local_copy() {
    require_mount();
    for (name, sif) in [("gzip", false), ("zstd", true), ("xz", false)] {
        let served = serve(name, sif);
        let cache = scratch("remote-cache");
        let kernel = KernelMount::new(fixtures().image(name));
        let m = SifuseMount::daemon(
            Path::new(&served.url()),
            &["--cache-dir", cache.path().to_str().unwrap()],
        );
        assert_no_differences(
            &format!("{name} over http{}", if sif { ", in a SIF" } else { "" }),
            &compare_views(&kernel.mountpoint, &m.mountpoint, ViewExceptions::default()),
        );
        let info = mount_util::mountinfo(&m.mountpoint).unwrap();
        assert!(info.contains(&served.url()), "mountinfo: {info}");
        // Every byte read once over the network, however often the views read it.
        let fetched = ranged_bytes(&served.nginx.access_log());
        let len = fs::metadata(&served.local).unwrap().len();
        assert!(fetched <= len, "{name}: {fetched} bytes fetched of {len}");
        drop(m);
        // Remounted: one revalidation and no range request.
        let before = served.nginx.access_log().len();
        let m = SifuseMount::daemon(
            Path::new(&served.url()),
            &["--cache-dir", cache.path().to_str().unwrap()],
        );
        drop_page_cache();
        read_all(&m.mountpoint);
        let log = served.nginx.access_log();
        let new: Vec<_> = log[before..].to_vec();
        assert_eq!(new.len(), 1, "a warm remount asked: {new:?}");
        assert_eq!(ranged_bytes(&new), 0, "{new:?}");
    }
}

#[test]
fn the_cache_survives_damage_and_pruning_while_mounted() {
    require_mount();
    let served = serve("gzip", false);
    let cache = scratch("remote-cache");
    let kernel = KernelMount::new(fixtures().image("gzip"));
    let m = SifuseMount::daemon(
        Path::new(&served.url()),
        &["--cache-dir", cache.path().to_str().unwrap()],
    );
    read_all(&m.mountpoint);
    // Damage every chunk file: truncate one, flip bytes in the others.
    let mut files: Vec<PathBuf> = Vec::new();
    for d in fs::read_dir(cache.path()).unwrap() {
        for obj in fs::read_dir(d.unwrap().path()).unwrap() {
            let obj = obj.unwrap().path();
            if obj.is_dir() {
                for f in fs::read_dir(&obj).unwrap() {
                    let f = f.unwrap().path();
                    if f.extension().is_none() && f.file_name().unwrap().len() == 12 {
                        files.push(f);
                    }
                }
            }
        }
    }
    assert!(!files.is_empty());
    for (k, f) in files.iter().enumerate() {
        let mut b = fs::read(f).unwrap();
        if k == 0 {
            b.truncate(b.len() / 2);
        } else {
            let at = b.len() - 1 - k % (b.len() / 2);
            b[at] ^= 0x55;
            b[100] ^= 0x55;
        }
        fs::write(f, b).unwrap();
    }
    drop_page_cache();
    assert_no_differences(
        "after damage",
        &compare_views(&kernel.mountpoint, &m.mountpoint, ViewExceptions::default()),
    );
    // Pruned to nothing while mounted, then read again.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sifuse"))
        .args(["cache", "prune", "--max", "0", "--cache-dir"])
        .arg(cache.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop_page_cache();
    assert_no_differences(
        "after prune",
        &compare_views(&kernel.mountpoint, &m.mountpoint, ViewExceptions::default()),
    );
}

/// Eight readers at once over a remote image of incompressible data, with a small
/// `cache_size`, with the chunk cache on disk and in memory only: the server's peak stays
/// within cache_size + 96 MiB, request buffers, read-ahead and pages kept in memory
/// included.
#[test]
fn a_remote_mount_stays_within_its_memory_budget() {
    require_mount();
    let root = scratch("remote-memory");
    random_data_image(root.path());
    let nginx = Nginx::serve(root.path());
    let url = nginx.url("/random.sqfs");
    let cache = scratch("remote-cache");
    let cache_dir = cache.path().to_str().unwrap();
    for (what, store) in [
        ("disk cache", ["--cache-dir", cache_dir]),
        ("memory only", ["-o", "no_disk_cache"]),
    ] {
        let mut args = vec!["-o", "cache_size=4"];
        args.extend(store);
        let m = SifuseMount::daemon(Path::new(&url), &args);
        let pid = m.daemon_pid();
        let readers: Vec<_> = (0..8u64)
            .map(|r| {
                let file = m.mountpoint.join(format!("r{}.bin", r % 6));
                std::thread::spawn(move || {
                    if r < 6 {
                        // Whole files in order: read-ahead at full stretch.
                        fs::read(&file).unwrap();
                    } else {
                        // 64 KiB here and there.
                        read_spread(&file, r, 37);
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        assert_peak_within_budget(pid, 4 << 20, what);
    }
}

#[test]
fn two_mounts_of_one_image_share_the_cache() {
    require_mount();
    let served = serve("zstd", false);
    let cache = scratch("remote-cache");
    let args = ["--cache-dir", cache.path().to_str().unwrap()];
    let a = SifuseMount::daemon(Path::new(&served.url()), &args);
    let b = SifuseMount::daemon(Path::new(&served.url()), &args);
    let (pa, pb) = (a.mountpoint.clone(), b.mountpoint.clone());
    let ta = std::thread::spawn(move || read_all(&pa));
    let tb = std::thread::spawn(move || read_all(&pb));
    assert_eq!(ta.join().unwrap(), tb.join().unwrap());
    let fetched = ranged_bytes(&served.nginx.access_log());
    let len = fs::metadata(&served.local).unwrap().len();
    assert!(
        fetched <= len,
        "two mounts fetched {fetched} bytes of a {len}-byte image"
    );
}

#[test]
fn an_unreachable_store_means_eio_for_what_is_missing_and_recovery_without_a_remount() {
    require_mount();
    let served = serve("gzip", false);
    let proxy = FaultProxy::forward_to(served.nginx.addr());
    let url = format!(
        "{}/{}",
        proxy.url(),
        served.local.file_name().unwrap().to_str().unwrap()
    );
    let cache = scratch("remote-cache");
    let m = SifuseMount::daemon(
        Path::new(&url),
        &["--cache-dir", cache.path().to_str().unwrap()],
    );
    let kernel = KernelMount::new(fixtures().image("gzip"));
    // Some files read while the store answers; the rest after it stops.
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(kernel.mountpoint.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r);
            } else if e.file_type().unwrap().is_file() && e.metadata().unwrap().len() > 100_000 {
                files.push(r);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    // The start of the early files is read while the store answers (small reads: no
    // read-ahead reaches the late files); the late files after it stops.
    let (early, late) = files.split_at(files.len() / 2);
    let head = |root: &Path, f: &Path| -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let mut b = vec![0u8; 4096];
        let n = fs::File::open(root.join(f))?.read(&mut b)?;
        b.truncate(n);
        Ok(b)
    };
    for f in early {
        assert_eq!(
            head(&m.mountpoint, f).unwrap(),
            head(&kernel.mountpoint, f).unwrap()
        );
    }
    proxy.set_default(Fault::status(503));
    drop_page_cache();
    let t = Instant::now();
    let e = fs::read(m.mountpoint.join(late.last().unwrap())).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    for f in early {
        assert_eq!(
            head(&m.mountpoint, f).unwrap(),
            head(&kernel.mountpoint, f).unwrap(),
            "a cached file failed while the store was down"
        );
    }
    proxy.set_default(Fault::Pass);
    for f in late.iter().chain(early) {
        assert_eq!(
            fs::read(m.mountpoint.join(f)).unwrap(),
            fs::read(kernel.mountpoint.join(f)).unwrap(),
            "no recovery once the store came back"
        );
    }
}

#[test]
fn a_second_node_behind_a_caching_proxy_reaches_the_origin_for_nothing() {
    require_mount();
    let served = serve("zstd", false);
    let proxy = Nginx::caching_proxy(&format!("http://{}", served.nginx.addr()));
    let url = proxy.url(&format!(
        "/{}",
        served.local.file_name().unwrap().to_str().unwrap()
    ));
    let node_a = scratch("node-a");
    let a = SifuseMount::daemon(
        Path::new(&url),
        &["--cache-dir", node_a.path().to_str().unwrap()],
    );
    let bytes_a = read_all(&a.mountpoint);
    drop(a);
    let origin_before = served.nginx.access_log().len();
    let node_b = scratch("node-b");
    let b = SifuseMount::daemon(
        Path::new(&url),
        &["--cache-dir", node_b.path().to_str().unwrap()],
    );
    assert_eq!(read_all(&b.mountpoint), bytes_a);
    let origin_after = served.nginx.access_log();
    let ranged: Vec<_> = origin_after[origin_before..]
        .iter()
        .filter(|l| l.contains("bytes="))
        .collect();
    assert!(
        ranged.is_empty(),
        "the second node's cold mount reached the origin: {ranged:?}"
    );
}

#[test]
fn an_oras_image_needs_no_https_for_a_plain_registry_and_takes_registry_auth() {
    require_mount();
    let registry = Registry::start(RegistryAuth::Basic);
    let dir = scratch("oras");
    let sif = wrap_in_sif(fixtures().image("zstd"), dir.path());
    registry.push_sif("lab/zstd", "1", &fs::read(&sif).unwrap());
    let url = format!("oras://{}/lab/zstd:1", registry.host());
    let auth = dir.path().join("registry-auth.json");
    let encoded = basic(HTPASSWD_USER, HTPASSWD_PASSWORD);
    fs::write(
        &auth,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
            registry.host(),
            encoded.trim_start_matches("Basic ")
        ),
    )
    .unwrap();
    let auth = auth.to_str().unwrap();
    // No docker config of the user's may answer for us.
    let home = scratch("home");
    let cache = scratch("oras-cache");
    let ls = |extra: &[&str]| {
        let started = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sifuse"))
            .arg("ls")
            .args(extra)
            .args([url.as_str(), "/"])
            .env("HOME", home.path())
            .env("DOCKER_CONFIG", home.path())
            .env("SIFUSE_CACHE_DIR", cache.path())
            .output()
            .unwrap();
        (out, started.elapsed())
    };
    let refused = |out: &std::process::Output, took: Duration, why: &str, hint: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{why}: listed anyway");
        assert_eq!(err.trim_end().lines().count(), 1, "{why}: {err}");
        assert!(took < Duration::from_secs(30), "{why}: took {took:?}");
        // The message says what to do.
        assert!(err.contains(hint), "{why}: no {hint} in {err}");
    };
    let (out, took) = ls(&["--registry-auth", auth]);
    refused(&out, took, "HTTPS to a plain-HTTP registry", "--no-https");
    let (out, took) = ls(&["--no-https"]);
    refused(&out, took, "no credentials", "--registry-auth");
    let (out, _) = ls(&["--no-https", "--registry-auth", auth]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let kernel = KernelMount::new(fixtures().image("zstd"));
    let mut names: Vec<String> = fs::read_dir(&kernel.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        assert!(listed.contains(name.as_str()), "ls lacks {name}: {listed}");
    }
    // The mount options say the same.
    let options = format!("registry_auth={auth},no_https");
    let m = SifuseMount::daemon(
        Path::new(&url),
        &[
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "-o",
            options.as_str(),
        ],
    );
    assert_no_differences(
        "oras over plain HTTP",
        &compare_views(&kernel.mountpoint, &m.mountpoint, ViewExceptions::default()),
    );
}

/// A remote image through the ways launchers call sifuse: the squashfuse_ll command line
/// (with owners mapped), and launcher mode's control stream, which mounts on a directory
/// sifuse makes and removes again when asked to clean up.
#[test]
fn launchers_mount_a_remote_image_as_a_local_one() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};
    require_mount();
    let served = serve("zstd", true);
    let url = served.url();
    let cache = scratch("launch-cache");
    let kernel = KernelMount::new(fixtures().image("zstd"));
    let names = |dir: &Path| {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    // squashfuse_ll, as SingularityCE calls it, through the compat link.
    let links = scratch("compat-links");
    let out = Command::new(env!("CARGO_BIN_EXE_sifuse"))
        .arg("install-compat")
        .arg(links.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "install-compat: {out:?}");
    let (_dir, mnt) = SifuseMount::new_mountpoint("compat-remote");
    let out = Command::new(links.path().join("squashfuse_ll"))
        .args(["-o", "uid=4242,gid=4242"])
        .arg(&url)
        .arg(&mnt)
        .env("SIFUSE_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "squashfuse_ll URL: {out:?}");
    assert_eq!(names(&mnt), names(&kernel.mountpoint));
    let first = fs::read_dir(&mnt).unwrap().next().unwrap().unwrap().path();
    assert_eq!(fs::symlink_metadata(&first).unwrap().uid(), 4242);
    mount_util::force_unmount(&mnt);

    // Launcher mode: ready PATH, then cleanup.
    let tmp = scratch("launch-tmp");
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sifuse"));
    cmd.args(["mount", "--control-fd", "3", "--cache-dir"])
        .arg(cache.path())
        .arg(&url)
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    mount_util::pass_as_fd3(&mut cmd, theirs.as_raw_fd());
    let mut server = cmd.spawn().unwrap();
    drop(theirs);
    let mut input = BufReader::new(ours.try_clone().unwrap());
    let mut line = String::new();
    input.read_line(&mut line).unwrap();
    let path = PathBuf::from(
        line.trim_end()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("expected ready, got {line:?}")),
    );
    assert_eq!(names(&path), names(&kernel.mountpoint));
    (&ours).write_all(b"cleanup\n").unwrap();
    line.clear();
    input.read_line(&mut line).unwrap();
    assert_eq!(line, "done\n");
    assert!(server.wait().unwrap().success());
    assert!(!path.exists(), "the host mount point is left behind");
}
