//! Workloads and machine chores shared by the system benchmarks (`system.rs`,
//! `remote.rs`): deterministic file trees shaped like real ones, packing them, and
//! emptying caches between runs.

#![allow(dead_code)] // each benchmark uses some of these

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Deterministic pseudo-random numbers (xorshift64*), so every run generates the same trees.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

const WORDS: [&str; 24] = [
    "def", "self", "return", "import", "from", "class", "None", "if", "else", "for", "in", "value",
    "result", "config", "path", "name", "args", "kwargs", "raise", "try", "except", "True",
    "False", "yield",
];

/// Python-source-like text: compresses about as well as real source.
pub fn source_text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    while v.len() < len {
        let indent = (rng.below(4) * 4) as usize;
        v.extend(std::iter::repeat_n(b' ', indent));
        for _ in 0..1 + rng.below(9) {
            v.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
            if rng.below(5) == 0 {
                v.extend_from_slice(format!("_{}", rng.below(1000)).as_bytes());
            }
            v.push(b' ');
        }
        v.push(b'\n');
    }
    v.truncate(len);
    v
}

/// Bytecode- or object-code-like data: mostly compressible with a share of random bytes.
pub fn binary_data(rng: &mut Rng, len: usize, random_share: u64) -> Vec<u8> {
    let mut v = source_text(rng, len);
    let mut at = 0;
    while at < len {
        let run = (256 + rng.below(4096) as usize).min(len - at);
        if rng.below(100) < random_share {
            rng.fill(&mut v[at..at + run]);
        }
        at += run;
    }
    v
}

pub fn write(path: &Path, data: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

/// A tree shaped like a Python installation: an interpreter, the standard library and
/// site-packages with deep packages, every module with its .pyc, a few shared libraries.
pub fn python_tree(root: &Path) -> usize {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut files = 0;
    let lib = root.join("usr/lib/python3.12");
    write(
        &root.join("usr/bin/python3.12"),
        &binary_data(&mut rng, 6 << 20, 40),
    );
    files += 1;
    let module = |dir: &Path, name: &str, rng: &mut Rng, files: &mut usize| {
        // Mostly small modules, a long tail of big ones.
        let len = match rng.below(100) {
            0..=59 => 200 + rng.below(4000),
            60..=94 => 4000 + rng.below(30_000),
            _ => 30_000 + rng.below(200_000),
        } as usize;
        write(&dir.join(format!("{name}.py")), &source_text(rng, len));
        write(
            &dir.join("__pycache__")
                .join(format!("{name}.cpython-312.pyc")),
            &binary_data(rng, len * 2 / 3 + 64, 15),
        );
        *files += 2;
    };
    // Standard library: ~3.5k modules.
    for p in 0..180 {
        let pkg = lib.join(format!("std{p:03}"));
        for m in 0..10 {
            module(&pkg, &format!("mod{m}"), &mut rng, &mut files);
        }
    }
    let dynload = lib.join("lib-dynload");
    for i in 0..60 {
        let len = 20_000 + rng.below(300_000) as usize;
        write(
            &dynload.join(format!("_ext{i:02}.cpython-312-x86_64-linux-gnu.so")),
            &binary_data(&mut rng, len, 30),
        );
        files += 1;
    }
    // site-packages: packages of varying depth until the tree holds ~40k files.
    let site = lib.join("site-packages");
    let mut p = 0;
    while files < 40_000 {
        let pkg = site.join(format!("package_{p:03}"));
        write(
            &site.join(format!("package_{p:03}-1.0.dist-info/METADATA")),
            &source_text(&mut rng, 2000),
        );
        write(
            &site.join(format!("package_{p:03}-1.0.dist-info/RECORD")),
            &source_text(&mut rng, 6000),
        );
        files += 2;
        let subpackages = 1 + rng.below(12);
        for s in 0..subpackages {
            let depth = 1 + rng.below(4);
            let mut dir = pkg.clone();
            for d in 0..depth {
                dir = dir.join(format!("sub{s}_{d}"));
            }
            module(&dir, "__init__", &mut rng, &mut files);
            for m in 0..rng.below(14) {
                module(&dir, &format!("module_{m}"), &mut rng, &mut files);
            }
        }
        if rng.below(6) == 0 {
            let len = 100_000 + rng.below(4 << 20) as usize;
            write(
                &pkg.join(format!("_native{p}.cpython-312-x86_64-linux-gnu.so")),
                &binary_data(&mut rng, len, 35),
            );
            files += 1;
        }
        p += 1;
    }
    files
}

/// `len` bytes (a multiple of 4 MiB): alternating 4 MiB spans of source-like text and
/// random bytes.
pub fn big_file(path: &Path, len: u64) {
    let mut rng = Rng(0xb16_f11e);
    let mut f = fs::File::create(path).unwrap();
    let span = 4 << 20;
    for i in 0..len / span as u64 {
        let chunk = if i % 2 == 0 {
            source_text(&mut rng, span)
        } else {
            let mut v = vec![0u8; span];
            rng.fill(&mut v);
            v
        };
        f.write_all(&chunk).unwrap();
    }
}

pub fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?}: {st}");
}

pub fn mksquashfs(src: &Path, img: &Path, extra: &[&str]) {
    let comp = std::env::var("SIFUSE_BENCH_COMP").unwrap_or_else(|_| "gzip".into());
    run(Command::new("mksquashfs")
        .arg(src)
        .arg(img)
        .args(["-noappend", "-quiet", "-no-progress", "-comp", &comp])
        .args(extra)
        .stdout(Stdio::null()));
}

/// Empty the page cache, dentries and inodes, after writing back anything dirty.
pub fn drop_caches() {
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").expect("write /proc/sys/vm/drop_caches");
}

/// Touch and free SIFUSE_BENCH_PREFAULT_GIB (default 4) GiB of memory, so that every run
/// starts with free memory the host has backed. These machines are VMs whose balloon
/// driver reports freed memory to the host (free page reporting), which takes it back;
/// the first run to touch it again pays a host fault per page. Measured on sifuse's 1 GiB
/// sequential read right after a tree read: 1.96 and 2.42 s (server sys time 1.6 to 2.6 s)
/// without this, 0.92 and 0.95 s (sys 0.4 s) with it. Which server paid depended on the
/// order, not on the server. Bare-metal nodes have no such cost. Done right before a timed
/// workload (not before a timed mount): two seconds after memory is freed, the guest
/// reports it to the host in the background, which would disturb a mount's few ms.
pub fn prefault_memory() {
    let gib: usize = std::env::var("SIFUSE_BENCH_PREFAULT_GIB")
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or(4);
    if gib > 0 {
        let touched = vec![1u8; gib << 30];
        std::hint::black_box(&touched);
    }
}

/// What a system benchmark needs before it starts: root, /dev/fuse and `tools` on PATH.
/// `None` (having said what is missing) when the machine lacks any; otherwise the rounds
/// to run (`SIFUSE_BENCH_ROUNDS`, default 3) and the directory for images
/// (`SIFUSE_BENCH_DIR`, default under the target directory).
pub fn bench_setup(bench: &str, tools: &[(&str, &str)]) -> Option<(usize, PathBuf)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        eprintln!(
            "benches/{bench}: needs root and /dev/fuse (it mounts and drops caches); skipped"
        );
        return None;
    }
    for (tool, package) in tools {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool} >/dev/null")])
            .status()
            .map_or(true, |s| !s.success())
        {
            eprintln!("benches/{bench}: {tool} is missing (apt-get install {package}); skipped");
            return None;
        }
    }
    let rounds = std::env::var("SIFUSE_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let dir = std::env::var_os("SIFUSE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-system"));
    Some((rounds, dir))
}
