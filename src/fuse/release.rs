//! Giving memory back when a mount goes idle. Launchers start one server per container and
//! a node runs many containers, most of them idle most of the time: a server that has
//! answered nothing for a while drops everything it keeps for speed alone (cached blocks,
//! read-ahead state, spare buffers) and hands the freed heap back to the system. The next
//! requests read what they need again.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::archive::Archive;

use super::activity::Activity;
use super::streams::Streams;

/// Idle time after which memory is given back, unless the mount says otherwise.
pub const DEFAULT_IDLE_RELEASE: Duration = Duration::from_secs(30);

/// What the release drops.
pub(super) struct Held {
    pub archive: Arc<Archive>,
    pub streams: Arc<Streams>,
    pub activity: Arc<Activity>,
}

/// The idle release of one mount: a thread started at the first request (so that it
/// inherits the request threads' blocked exit signals and is not lost in the daemon's
/// fork), which looks at the mount's activity now and then.
pub struct IdleRelease {
    after: Option<Duration>,
    started: OnceLock<()>,
}

impl IdleRelease {
    /// Release after `after` without a request; `None`: never.
    pub fn new(after: Option<Duration>) -> Self {
        IdleRelease {
            after,
            started: OnceLock::new(),
        }
    }

    /// Start watching, once.
    pub(super) fn start(&self, held: impl FnOnce() -> Held) {
        let Some(after) = self.after else { return };
        self.started.get_or_init(|| {
            let held = held();
            let spawned = std::thread::Builder::new()
                .name("sifuse-release".into())
                .spawn(move || watch(&held, after));
            if let Err(e) = spawned {
                tracing::warn!("cannot start the idle memory release: {e}");
            }
        });
    }
}

fn watch(held: &Held, after: Duration) {
    // Requests answered when memory was last given back: nothing to give until more come.
    let mut released_at = None;
    let tick = (after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        std::thread::sleep(tick);
        let requests = held.activity.requests();
        if held.activity.idle_for() < after || released_at == Some(requests) {
            continue;
        }
        let freed = release(held);
        released_at = Some(requests);
        tracing::debug!("idle for {after:?}: released {} KiB", freed >> 10);
    }
}

/// Drop what is kept for speed and give the heap back; returns the bytes let go by the
/// caches and pools (what the allocator returns to the system comes on top).
pub(super) fn release(held: &Held) -> u64 {
    let cached = held.archive.cache_weight();
    held.archive.drop_caches();
    held.streams.clear();
    let spare = crate::cache::release_spare_buffers() + super::buffers::release_assembly_buffers();
    trim_heap();
    cached + spare
}

/// Return free heap memory to the system (glibc keeps freed memory for reuse).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's free lists and releases pages it does
    // not use; it has no preconditions and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
