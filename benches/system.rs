//! Whole-system comparison: the same images mounted by sifuse, squashfuse_ll and the
//! kernel's squashfs driver in turn (A B C A B C ...), every run cold (page cache, dentries
//! and inodes dropped; each FUSE server freshly started, so its own cache is empty too).
//! Prints the median of each workload per server, the ratios sifuse/squashfuse_ll and
//! sifuse/kernel, and each FUSE server's peak RSS (VmHWM before unmount).
//!
//! ```text
//! sudo cargo bench --bench system                  # needs root, /dev/fuse, squashfuse_ll
//! SIFUSE_BENCH_ROUNDS=5 cargo bench --bench system # more rounds (default 3)
//! SIFUSE_BENCH_ONLY=seq,random cargo bench --bench system  # a subset of workloads
//! SIFUSE_BENCH_PREFAULT_GIB=0 cargo bench --bench system   # no memory prefault (see
//!                                                          # prefault_memory)
//! ```
//!
//! Workloads are generated once into `target/tmp/bench-system` (SIFUSE_BENCH_DIR to move
//! it) and reused. The images live on disk, not tmpfs, so a dropped page cache really means
//! reading the image again, for the kernel driver as for the FUSE servers. The results
//! table is also written to `results.md` there.
//!
//! This is a benchmark, never a test: nothing here asserts a timing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/workloads.rs"]
mod workloads;

use workloads::{big_file, drop_caches, mksquashfs, prefault_memory, python_tree, run, Rng};

const SIFUSE: &str = env!("CARGO_BIN_EXE_sifuse");

/// The three ways to mount an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Server {
    Sifuse,
    Squashfuse,
    Kernel,
}

impl Server {
    const ALL: [Server; 3] = [Server::Sifuse, Server::Squashfuse, Server::Kernel];
    fn name(self) -> &'static str {
        match self {
            Server::Sifuse => "sifuse",
            Server::Squashfuse => "squashfuse_ll",
            Server::Kernel => "kernel",
        }
    }
}

/// 100k small files in 100 directories.
fn many_entries(root: &Path) {
    for d in 0..100 {
        let dir = root.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..1000 {
            fs::write(dir.join(format!("f{f:04}")), format!("{d} {f}\n")).unwrap();
        }
    }
}

/// The images, generated on first use: (python tree, 1 GiB file, 100k entries).
struct Images {
    tree: PathBuf,
    big: PathBuf,
    many: PathBuf,
}

fn images(dir: &Path) -> Images {
    let imgs = Images {
        tree: dir.join("python-tree.sqfs"),
        big: dir.join("big-file.sqfs"),
        many: dir.join("100k-entries.sqfs"),
    };
    fs::create_dir_all(dir).unwrap();
    // Sources go to tmpfs (quick to write, removed once packed); images stay on disk.
    let scratch = PathBuf::from("/dev/shm/sifuse-bench-src");
    if !imgs.tree.exists() {
        let _ = fs::remove_dir_all(&scratch);
        eprintln!("generating the Python-like tree ...");
        let n = python_tree(&scratch);
        eprintln!("  {n} files; packing");
        mksquashfs(&scratch, &imgs.tree, &[]);
        fs::remove_dir_all(&scratch).unwrap();
    }
    if !imgs.big.exists() {
        let _ = fs::remove_dir_all(&scratch);
        eprintln!("generating the 1 GiB file ...");
        fs::create_dir_all(&scratch).unwrap();
        big_file(&scratch.join("big.bin"), 1 << 30);
        mksquashfs(&scratch, &imgs.big, &[]);
        fs::remove_dir_all(&scratch).unwrap();
    }
    if !imgs.many.exists() {
        let _ = fs::remove_dir_all(&scratch);
        eprintln!("generating the 100k-entry tree ...");
        many_entries(&scratch);
        // mksquashfs's duplicate check is quadratic in files of one size.
        mksquashfs(&scratch, &imgs.many, &["-no-duplicates"]);
        fs::remove_dir_all(&scratch).unwrap();
    }
    imgs
}

/// Load the executables (and their libraries) that mount with `server` into the page cache.
fn warm_executables(server: Server) {
    let (exe, arg) = match server {
        Server::Sifuse => (SIFUSE, "--version"),
        Server::Squashfuse => ("squashfuse_ll", "--version"),
        Server::Kernel => ("mount", "--version"),
    };
    // squashfuse_ll --version exits 1 after printing; only the loading matters.
    let _ = Command::new(exe)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if server == Server::Kernel {
        let _ = Command::new("losetup")
            .arg("--version")
            .stdout(Stdio::null())
            .status();
    }
}

/// A mounted image.
struct Mount {
    server: Server,
    dir: PathBuf,
    child: Option<Child>,
}

fn is_mounted(dir: &Path) -> bool {
    match (fs::metadata(dir), fs::metadata(dir.join(".."))) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

impl Mount {
    /// Mount `img` on `dir` and wait until the root answers; returns the mount and how long
    /// that took.
    fn new(server: Server, img: &Path, dir: &Path) -> (Mount, Duration) {
        fs::create_dir_all(dir).unwrap();
        assert!(
            !is_mounted(dir),
            "{} is already a mount point",
            dir.display()
        );
        let start = Instant::now();
        let child = match server {
            // Foreground servers, so the harness holds their pid for VmHWM.
            Server::Sifuse | Server::Squashfuse => {
                let mut cmd = if server == Server::Sifuse {
                    let mut c = Command::new(SIFUSE);
                    c.arg("mount");
                    c
                } else {
                    Command::new("squashfuse_ll")
                };
                Some(
                    cmd.arg("-f")
                        .arg(img)
                        .arg(dir)
                        .stdout(Stdio::null())
                        .spawn()
                        .unwrap(),
                )
            }
            Server::Kernel => {
                run(Command::new("mount")
                    .args(["-t", "squashfs", "-o", "loop,ro"])
                    .arg(img)
                    .arg(dir));
                None
            }
        };
        let mut m = Mount {
            server,
            dir: dir.to_path_buf(),
            child,
        };
        loop {
            if is_mounted(dir) && fs::read_dir(dir).is_ok() {
                break;
            }
            if let Some(c) = &mut m.child {
                if let Some(st) = c.try_wait().unwrap() {
                    panic!("{} exited before mounting: {st}", server.name());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} did not mount",
                server.name()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let took = start.elapsed();
        (m, took)
    }

    /// Peak resident set of the FUSE server so far, in KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    /// Resident set of the FUSE server now, in KiB.
    fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    fn unmount(mut self) {
        run(Command::new("umount").arg(&self.dir));
        if let Some(mut c) = self.child.take() {
            let st = c.wait().unwrap();
            assert!(st.success(), "{} exited with {st}", self.server.name());
        }
    }
}

/// Run a shell command in `dir`, timed.
fn timed_sh(dir: &Path, script: &str) -> Duration {
    let start = Instant::now();
    run(Command::new("sh").arg("-c").arg(script).current_dir(dir));
    start.elapsed()
}

/// `count` random 4 KiB reads of `path`, at page-aligned offsets from a fixed seed.
fn random_reads(path: &Path, count: usize) -> Duration {
    let start = Instant::now();
    let f = fs::File::open(path).unwrap();
    let pages = f.metadata().unwrap().len() / 4096;
    let mut rng = Rng(0x4a4d_0001);
    let mut buf = [0u8; 4096];
    for _ in 0..count {
        let at = rng.below(pages) * 4096;
        f.read_exact_at(&mut buf, at).unwrap();
    }
    start.elapsed()
}

/// Results: workload -> server -> (seconds per round, peak RSS KiB per round).
#[derive(Default)]
struct Results {
    times: BTreeMap<(usize, Server), Vec<f64>>,
    rss: BTreeMap<(usize, Server), u64>,
    /// Resident set (KiB) of a server idle for [`IDLE`], per round.
    idle_rss: BTreeMap<Server, Vec<u64>>,
}

impl Results {
    fn add(&mut self, w: usize, s: Server, t: Duration, rss: Option<u64>) {
        self.times.entry((w, s)).or_default().push(t.as_secs_f64());
        if let Some(r) = rss {
            let e = self.rss.entry((w, s)).or_default();
            *e = (*e).max(r);
        }
    }
    fn median(&self, w: usize, s: Server) -> Option<f64> {
        let mut v = self.times.get(&(w, s))?.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }
}

const WORKLOADS: [(&str, &str); 11] = [
    ("mount", "mount latency, 100k-entry image"),
    (
        "mount-exe",
        "mount latency, 100k-entry image, executables cached",
    ),
    ("mount-small", "mount latency, 1 GiB-file image"),
    ("walk", "cold metadata walk (find -printf)"),
    ("read", "cold tree read (tar | cat)"),
    ("warm", "warm re-read (tar | cat)"),
    ("parallel", "two parallel readers, cold"),
    ("seq", "cold sequential read, 1 GiB file"),
    ("random", "random 4 KiB reads (2000), cold"),
    ("many", "eight mounts, a tar of each at once, cold"),
    ("idle", "a mount idle 35 s after a tree read"),
];

/// Mounts in the node-scale workload.
const MANY: usize = 8;
/// How long the idle workload leaves the mount alone before reading its RSS.
const IDLE: Duration = Duration::from_secs(35);

fn wanted(key: &str) -> bool {
    match std::env::var("SIFUSE_BENCH_ONLY") {
        Ok(list) => list.split(',').any(|k| k.trim() == key),
        Err(_) => true,
    }
}

/// The site-packages packages of the tree split in two halves, for the parallel readers.
fn halves(mnt: &Path) -> (String, String) {
    let site = mnt.join("usr/lib/python3.12/site-packages");
    let mut names: Vec<String> = fs::read_dir(&site)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (i, n) in names.into_iter().enumerate() {
        let p = format!("usr/lib/python3.12/site-packages/{n}");
        if i % 2 == 0 {
            a.push(p)
        } else {
            b.push(p)
        }
    }
    // The standard library goes with the second half, which has one package fewer.
    b.push("usr/lib/python3.12/std*".into());
    (a.join(" "), b.join(" "))
}

/// Mount the tree [`MANY`] times with one server, drop every cache, and run a tar of each
/// mount at once: the time they take together and the servers' peak RSS summed (KiB).
fn many_mounts(server: Server, img: &Path, dir: &Path) -> (Duration, u64) {
    let mounts: Vec<Mount> = (0..MANY)
        .map(|i| Mount::new(server, img, &dir.join(format!("mnt-many-{i}"))).0)
        .collect();
    drop_caches();
    prefault_memory();
    let mut script = String::new();
    for m in &mounts {
        script += &format!("tar cf - -C {} . | cat > /dev/null & ", m.dir.display());
    }
    script += "wait";
    let t = timed_sh(dir, &script);
    let rss = mounts.iter().filter_map(Mount::peak_rss_kib).sum();
    for m in mounts {
        m.unmount();
    }
    (t, rss)
}

fn main() {
    let Some((rounds, dir)) = workloads::bench_setup(
        "system",
        &[
            ("squashfuse_ll", "squashfuse"),
            ("mksquashfs", "squashfs-tools"),
        ],
    ) else {
        return;
    };
    let imgs = images(&dir);
    let mnt = dir.join("mnt");
    let walk_out = PathBuf::from("/dev/shm/sifuse-bench-walk");
    let mut res = Results::default();
    let mut walks: BTreeMap<Server, String> = BTreeMap::new();
    let (half_a, half_b) = {
        let (m, _) = Mount::new(Server::Kernel, &imgs.tree, &mnt);
        let h = halves(&m.dir);
        m.unmount();
        h
    };

    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        for (w, (key, _)) in WORKLOADS.iter().enumerate() {
            if *key == "warm" || !wanted(key) {
                continue;
            }
            for s in Server::ALL {
                if *key == "idle" && s == Server::Kernel {
                    continue;
                }
                let img = match *key {
                    "mount" | "mount-exe" => &imgs.many,
                    "mount-small" | "seq" | "random" => &imgs.big,
                    _ => &imgs.tree,
                };
                drop_caches();
                if *key == "mount-exe" {
                    // The image stays cold; only the programs that mount are loaded (the
                    // sifuse binary is 3 MiB of code, squashfuse_ll 43 KiB plus libraries).
                    warm_executables(s);
                }
                if *key == "many" {
                    let (t, rss) = many_mounts(s, img, &dir);
                    eprintln!(
                        "  {key:<12} {:<14} {:.3} s, summed peak RSS {:.1} MiB",
                        s.name(),
                        t.as_secs_f64(),
                        rss as f64 / 1024.0
                    );
                    res.add(w, s, t, (s != Server::Kernel).then_some(rss));
                    continue;
                }
                let (m, mount_time) = Mount::new(s, img, &mnt);
                let t = match *key {
                    "mount" | "mount-exe" | "mount-small" => mount_time,
                    _ => {
                        drop_caches();
                        prefault_memory();
                        match *key {
                            "walk" => timed_sh(
                                &m.dir,
                                &format!(
                                    "find . -printf '%p %s %m %u %g %T@ %i\\n' > {}",
                                    walk_out.display()
                                ),
                            ),
                            "read" => {
                                let cold = timed_sh(&m.dir, "tar cf - . | cat > /dev/null");
                                if wanted("warm") {
                                    let warm = timed_sh(&m.dir, "tar cf - . | cat > /dev/null");
                                    res.add(w + 1, s, warm, m.peak_rss_kib());
                                }
                                cold
                            }
                            "parallel" => timed_sh(
                                &m.dir,
                                &format!(
                                    "tar cf - {half_a} | cat > /dev/null & \
                                     tar cf - {half_b} | cat > /dev/null & wait"
                                ),
                            ),
                            "seq" => timed_sh(&m.dir, "cat big.bin > /dev/null"),
                            "random" => random_reads(&m.dir.join("big.bin"), 2000),
                            "idle" => {
                                let t = timed_sh(&m.dir, "tar cf - . | cat > /dev/null");
                                std::thread::sleep(IDLE);
                                if let Some(kib) = m.rss_kib() {
                                    eprintln!(
                                        "  {key:<12} {:<14} RSS {:.1} MiB after {IDLE:?} idle",
                                        s.name(),
                                        kib as f64 / 1024.0
                                    );
                                    res.idle_rss.entry(s).or_default().push(kib);
                                }
                                t
                            }
                            _ => unreachable!(),
                        }
                    }
                };
                eprintln!("  {key:<12} {:<14} {:.3} s", s.name(), t.as_secs_f64());
                if *key == "walk" && round == 0 {
                    walks.insert(s, fs::read_to_string(&walk_out).unwrap());
                }
                res.add(w, s, t, m.peak_rss_kib());
                m.unmount();
            }
        }
    }
    let _ = fs::remove_file(&walk_out);
    if let (Some(a), Some(b)) = (walks.get(&Server::Sifuse), walks.get(&Server::Kernel)) {
        if a != b {
            eprintln!("WARNING: the metadata walk through sifuse differs from the kernel's");
        }
    }

    let mut table = String::new();
    table += &format!(
        "{rounds} rounds, medians in seconds; ratio < 1 means sifuse is faster. \
         Peak RSS is the FUSE server's VmHWM (max over rounds).\n\n"
    );
    table += "| workload | sifuse | squashfuse_ll | kernel | sifuse / squashfuse_ll \
              | sifuse / kernel | sifuse peak RSS | squashfuse_ll peak RSS |\n";
    table += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (w, (key, label)) in WORKLOADS.iter().enumerate() {
        if *key == "idle" {
            continue;
        }
        let [a, b, c] = Server::ALL.map(|s| res.median(w, s));
        let Some(a) = a else { continue };
        let (b, c) = (b.unwrap(), c.unwrap());
        let mib = |s| {
            res.rss
                .get(&(w, s))
                .map_or("-".into(), |k| format!("{:.1} MiB", *k as f64 / 1024.0))
        };
        table += &format!(
            "| {label} | {a:.3} | {b:.3} | {c:.3} | {:.2}× | {:.2}× | {} | {} |\n",
            a / b,
            a / c,
            mib(Server::Sifuse),
            mib(Server::Squashfuse)
        );
    }
    if !res.idle_rss.is_empty() {
        table += &format!(
            "\nResident set of a mount left idle for {} s after a cold tree read (median over \
             rounds): ",
            IDLE.as_secs()
        );
        let idle: Vec<String> = res
            .idle_rss
            .iter()
            .map(|(s, v)| {
                let mut v = v.clone();
                v.sort_unstable();
                format!("{} {:.1} MiB", s.name(), v[v.len() / 2] as f64 / 1024.0)
            })
            .collect();
        table += &idle.join(", ");
        table += ".\n";
    }
    if res.rss.contains_key(&(9, Server::Sifuse)) {
        table += &format!(
            "\nFor \"{}\", peak RSS is summed over the {MANY} servers.\n",
            WORKLOADS[9].1
        );
    }
    println!("{table}");
    fs::write(dir.join("results.md"), &table).unwrap();
}
