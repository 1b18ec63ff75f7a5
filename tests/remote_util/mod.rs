//! Helpers of the remote-image tests (`mod remote_util;`): real servers on 127.0.0.1
//! ([`servers`]: nginx, docker-registry, an S3 server), a fault-injecting proxy and tiny
//! origin ([`proxy`]), a store configuration with short timeouts, and a bound on waits.
#![allow(dead_code)]

pub mod proxy;
pub mod servers;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sifuse::source::remote::{Environment, RetryPolicy, StoreConfig};

/// A port on 127.0.0.1 free right now, for servers that must be told theirs. (Another
/// process could take it before the server binds; the server then fails to start loudly.)
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

/// The path of `name`, searched on PATH and in the sbin directories; panics naming the
/// Debian package to install when it is missing, since a test that cannot run must not pass.
pub fn program(name: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not installed: the remote-image tests need it (scripts/test.sh \
                 installs it; or apt-get install {package})"
        )
    })
}

/// A scratch directory under the cargo target directory.
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(&format!("remote-{prefix}-"))
        .tempdir_in(base)
        .unwrap()
}

/// Store settings for tests: short timeouts and retries (a fault costs seconds, not
/// minutes), plain HTTP allowed, and an empty environment (no credentials of the machine).
pub fn test_config() -> StoreConfig {
    let mut c = StoreConfig::new(Environment::empty());
    c.connect_timeout = Duration::from_secs(2);
    c.idle_timeout = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(10);
    c.retry = RetryPolicy {
        attempts: 5,
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        max_retry_after: Duration::from_secs(2),
        budget: Duration::from_secs(8),
    };
    c.credential_helper_timeout = Duration::from_secs(5);
    c.allow_http = true;
    c
}

/// Run `f` on another thread and wait for it at most `limit`: a hang fails the test instead
/// of stalling the suite.
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (send, recv) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(f());
    });
    match recv.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("did not finish within {limit:?}"),
    }
}

/// `len` bytes in which no two aligned 4-byte words are equal (within 16 GiB), different
/// for each `seed`: a shifted, stale or mixed range never compares equal by chance.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 4);
    let mut i: u32 = 0;
    while out.len() < len {
        // A bijection of i: xor with the seed, then multiply by an odd constant.
        let word = (i ^ seed.wrapping_mul(0x9e37_79b9)).wrapping_mul(2_654_435_761);
        out.extend_from_slice(&word.to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}
