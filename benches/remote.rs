//! Remote images over loopback HTTP (nginx) against the same images as local files, both
//! mounted by sifuse, for the targets of issue #15:
//!
//! - mount to a readable root, cold (page cache dropped, chunk cache empty);
//! - bytes fetched by a tree walk and by a Python-import-like read, against the compressed
//!   bytes the workload reads plus the image's metadata tail;
//! - a cold tree walk with 20 ms added to every request (a delaying proxy) against the
//!   same walk without the delay;
//! - a sequential read of a 512 MiB file: cold (chunk cache empty) and warm (chunk cache
//!   full), against the local file; every run with the page cache dropped.
//!
//! ```text
//! sudo cargo bench --bench remote                   # needs root, /dev/fuse, nginx, mksquashfs
//! SIFUSE_BENCH_ROUNDS=5 cargo bench --bench remote  # more rounds (default 3)
//! ```
//!
//! Images are generated into `target/tmp/bench-system` (shared with `benches/system.rs`;
//! SIFUSE_BENCH_DIR moves it). This is a benchmark, never a test: nothing here asserts a
//! timing. It prints a table, the load average before and after, and writes the table to
//! `remote-results.md` there.

#[path = "common/workloads.rs"]
mod workloads;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use workloads::{big_file, drop_caches, mksquashfs, prefault_memory, python_tree, run};

const SIFUSE: &str = env!("CARGO_BIN_EXE_sifuse");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nginx serving `root` on loopback, logging the body bytes of every answer.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    fn serve(root: &Path, dir: &Path) -> Nginx {
        let _ = fs::remove_dir_all(dir);
        for sub in [
            "tmp/body",
            "tmp/proxy",
            "tmp/fastcgi",
            "tmp/uwsgi",
            "tmp/scgi",
        ] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format bytes '$status $body_bytes_sent "$http_range"';
    access_log {d}/access.log bytes;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"#,
            root = root.display()
        );
        fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nginx did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Nginx {
            child,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Requests and body bytes served since the last call.
    fn take_log(&self) -> (u64, u64) {
        let path = self.dir.join("access.log");
        let text = fs::read_to_string(&path).unwrap_or_default();
        let _ = fs::write(&path, "");
        let mut requests = 0;
        let mut bytes = 0;
        for line in text.lines() {
            requests += 1;
            bytes += line
                .split(' ')
                .nth(1)
                .and_then(|b| b.parse::<u64>().ok())
                .unwrap_or(0);
        }
        (requests, bytes)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy that holds every chunk of request bytes for `delay` before passing it on:
/// each HTTP request then takes `delay` longer, as over a network with that latency.
struct DelayProxy {
    port: u16,
}

impl DelayProxy {
    fn start(upstream: u16, delay: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(client, server, Some(delay)));
                std::thread::spawn(move || pump(s2, c2, None));
            }
        });
        DelayProxy { port }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, delay: Option<Duration>) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn is_mounted(dir: &Path) -> bool {
    match (fs::metadata(dir), fs::metadata(dir.join(".."))) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

/// A foreground sifuse mount.
struct Mount {
    dir: PathBuf,
    child: Child,
}

impl Mount {
    /// Mount `image` (a path or URL) on `dir` with the chunk cache in `cache`; returns the
    /// mount and the time until its root was readable.
    fn new(image: &str, dir: &Path, cache: &Path) -> (Mount, Duration) {
        fs::create_dir_all(dir).unwrap();
        assert!(
            !is_mounted(dir),
            "{} is already a mount point",
            dir.display()
        );
        let start = Instant::now();
        let mut child = Command::new(SIFUSE)
            .args(["mount", "-f", image])
            .arg(dir)
            .arg("--cache-dir")
            .arg(cache)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        loop {
            if is_mounted(dir) && fs::read_dir(dir).is_ok() {
                break;
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!("sifuse mount {image} exited before mounting: {st}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{image} did not mount"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let took = start.elapsed();
        (
            Mount {
                dir: dir.to_path_buf(),
                child,
            },
            took,
        )
    }

    fn unmount(mut self) {
        run(Command::new("umount").arg(&self.dir));
        let st = self.child.wait().unwrap();
        assert!(st.success(), "sifuse exited with {st}");
    }
}

fn timed_sh(dir: &Path, script: &str) -> Duration {
    let start = Instant::now();
    run(Command::new("sh").arg("-c").arg(script).current_dir(dir));
    start.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The files the Python-import-like workload reads: every `__init__` module and its
/// bytecode in the first 60 site-packages packages, as importing them would.
const IMPORT_SCRIPT: &str = "find usr/lib/python3.12/site-packages -path '*package_0[0-5]*' \
     -name '__init__*' -type f -exec cat {} + > /dev/null";
const WALK_SCRIPT: &str = "find . -printf '%p %s %m %u %g %T@ %i\\n' > /dev/null";

/// Compressed bytes of the data the import workload reads (each fragment block once),
/// and the image's metadata tail, from the local image.
fn compressed_bytes_read(image: &Path, mnt: &Path) -> (u64, u64) {
    let img = sifuse::image::open(&sifuse::image::ImageSpec::new(image), 64 << 20).unwrap();
    let a = &img.archive;
    let sb = a.superblock();
    let tail = sb.bytes_used - sb.inode_table;
    let out = Command::new("sh")
        .arg("-c")
        .arg(IMPORT_SCRIPT.replace("-exec cat {} + > /dev/null", "-print"))
        .current_dir(mnt)
        .output()
        .unwrap();
    let mut bytes = 0;
    let mut fragments = BTreeSet::new();
    for path in String::from_utf8(out.stdout).unwrap().lines() {
        let inode = a.resolve(path.as_bytes()).unwrap();
        let file = inode.as_file().unwrap();
        for i in 0..file.block_count {
            bytes += a.block_location(file, i).unwrap().disk_len() as u64;
        }
        if let Some(f) = &file.fragment {
            fragments.insert(f.index);
        }
    }
    for index in fragments {
        let (_, word) = a.fragment_entry(index).unwrap();
        bytes += (word & 0x00ff_ffff) as u64;
    }
    (bytes, tail)
}

fn main() {
    let Some((rounds, dir)) = workloads::bench_setup(
        "remote",
        &[("nginx", "nginx-light"), ("mksquashfs", "squashfs-tools")],
    ) else {
        return;
    };
    fs::create_dir_all(&dir).unwrap();
    let tree_img = dir.join("python-tree.sqfs");
    let big_img = dir.join("big-512m.sqfs");
    let scratch = PathBuf::from("/dev/shm/sifuse-bench-src");
    if !tree_img.exists() {
        let _ = fs::remove_dir_all(&scratch);
        eprintln!("generating the Python-like tree ...");
        python_tree(&scratch);
        mksquashfs(&scratch, &tree_img, &[]);
        fs::remove_dir_all(&scratch).unwrap();
    }
    if !big_img.exists() {
        let _ = fs::remove_dir_all(&scratch);
        eprintln!("generating the 512 MiB file ...");
        fs::create_dir_all(&scratch).unwrap();
        big_file(&scratch.join("big.bin"), 512 << 20);
        mksquashfs(&scratch, &big_img, &[]);
        fs::remove_dir_all(&scratch).unwrap();
    }
    let load_before = loadavg();
    let nginx = Nginx::serve(&dir, &dir.join("nginx"));
    let proxy = DelayProxy::start(nginx.port, Duration::from_millis(20));
    let url = |port: u16, img: &Path| {
        format!(
            "http://127.0.0.1:{port}/{}",
            img.file_name().unwrap().to_str().unwrap()
        )
    };
    let mnt = dir.join("mnt");
    let cache = dir.join("remote-cache");
    let empty_cache = || {
        let _ = fs::remove_dir_all(&cache);
    };
    let local = |img: &Path| img.to_str().unwrap().to_string();

    let mut rows: Vec<(String, String)> = Vec::new();
    let mut times: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut note = |k: &'static str, t: Duration| {
        eprintln!("  {k:<28} {:.3} s", t.as_secs_f64());
        times.entry(k).or_default().push(t.as_secs_f64());
    };
    let mut fetched_walk = 0;
    let mut fetched_import = 0;
    let mut requests_walk = 0;
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        // Mount latency.
        for (key, image) in [
            ("mount local", local(&tree_img)),
            ("mount http", url(nginx.port, &tree_img)),
        ] {
            empty_cache();
            drop_caches();
            let (m, t) = Mount::new(&image, &mnt, &cache);
            note(key, t);
            m.unmount();
        }
        // Tree walk: local, http, http + 20 ms.
        for (key, image) in [
            ("walk local", local(&tree_img)),
            ("walk http", url(nginx.port, &tree_img)),
            ("walk http +20ms", url(proxy.port, &tree_img)),
        ] {
            empty_cache();
            drop_caches();
            // What the mount fetches (the metadata tail) counts: the walk needs it.
            nginx.take_log();
            let (m, _) = Mount::new(&image, &mnt, &cache);
            prefault_memory();
            note(key, timed_sh(&m.dir, WALK_SCRIPT));
            m.unmount();
            let (r, b) = nginx.take_log();
            if key == "walk http" {
                (requests_walk, fetched_walk) = (r, b);
            }
        }
        // Python-import-like reads: bytes fetched (mount included: the tail comes then).
        empty_cache();
        drop_caches();
        nginx.take_log();
        let (m, _) = Mount::new(&url(nginx.port, &tree_img), &mnt, &cache);
        note("import http", timed_sh(&m.dir, IMPORT_SCRIPT));
        m.unmount();
        fetched_import = nginx.take_log().1;
        // Sequential 512 MiB: local, http cold, http warm (chunk cache full).
        empty_cache();
        for (key, image) in [
            ("seq local", local(&big_img)),
            ("seq http cold", url(nginx.port, &big_img)),
            ("seq http warm", url(nginx.port, &big_img)),
        ] {
            drop_caches();
            let (m, _) = Mount::new(&image, &mnt, &cache);
            prefault_memory();
            note(key, timed_sh(&m.dir, "cat big.bin > /dev/null"));
            m.unmount();
        }
    }
    // What the workloads read, from the local image.
    let (m, _) = Mount::new(&local(&tree_img), &mnt, &cache);
    let (import_compressed, tail) = compressed_bytes_read(&tree_img, &m.dir);
    m.unmount();
    let _ = fs::remove_dir_all(&cache);

    let med = |k: &str| median(times[k].clone());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    rows.push((
        "mount to readable root, cold (s)".into(),
        format!(
            "local {:.3}, http {:.3}: {:.2}× (target ≤ 2×)",
            med("mount local"),
            med("mount http"),
            med("mount http") / med("mount local")
        ),
    ));
    rows.push((
        "bytes fetched, tree walk".into(),
        format!(
            "{:.1} MiB in {requests_walk} requests; metadata tail {:.1} MiB: {:.2}× (target ≤ 1.25×)",
            mib(fetched_walk),
            mib(tail),
            fetched_walk as f64 / tail as f64
        ),
    ));
    rows.push((
        "bytes fetched, Python-import-like reads".into(),
        format!(
            "{:.1} MiB; compressed data read {:.1} MiB + tail {:.1} MiB: {:.2}× (target ≤ 1.25×)",
            mib(fetched_import),
            mib(import_compressed),
            mib(tail),
            fetched_import as f64 / (import_compressed + tail) as f64
        ),
    ));
    rows.push((
        "cold tree walk (s)".into(),
        format!(
            "local {:.3}, http {:.3}, http +20 ms/request {:.3}: {:.2}× the no-delay walk (target ≤ 3×)",
            med("walk local"),
            med("walk http"),
            med("walk http +20ms"),
            med("walk http +20ms") / med("walk http")
        ),
    ));
    let speed = |k: &str| 512.0 / med(k);
    rows.push((
        "sequential read of 512 MiB (MiB/s)".into(),
        format!(
            "local {:.0}, http cold {:.0} ({:.0}% of local; target ≥ 70%), http warm {:.0} \
             (time {:.2}× local; target ≤ 1.2×)",
            speed("seq local"),
            speed("seq http cold"),
            100.0 * speed("seq http cold") / speed("seq local"),
            speed("seq http warm"),
            med("seq http warm") / med("seq local")
        ),
    ));
    let load_after = loadavg();
    let mut table = format!(
        "{rounds} rounds, medians; page cache dropped before every run; load average {load_before} \
         before, {load_after} after.\n\n| workload | result |\n|---|---|\n"
    );
    for (k, v) in rows {
        table += &format!("| {k} | {v} |\n");
    }
    println!("{table}");
    fs::write(dir.join("remote-results.md"), &table).unwrap();
}
