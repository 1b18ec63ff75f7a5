//! What the idle timeout needs to know: when the mount last served a request, and how many
//! files and directories are open on it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Request activity of one mount, shared between the request threads and the idle watcher.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the latest request.
    last_ms: AtomicU64,
    open: AtomicUsize,
    /// Requests served so far.
    requests: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// A request arrived.
    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A file or directory was opened.
    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    /// A file or directory was released.
    pub fn released(&self) {
        // Never below zero, even if the kernel released a handle it was not given.
        let _ = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Files and directories open now.
    pub fn open_handles(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Time since the latest request (or since the mount started, before any).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_open_handles_and_never_underflows() {
        let a = Activity::default();
        a.opened();
        a.opened();
        a.released();
        assert_eq!(a.open_handles(), 1);
        a.released();
        a.released();
        assert_eq!(a.open_handles(), 0);
    }

    #[test]
    fn touch_resets_idle_time() {
        let a = Activity::default();
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.idle_for() >= Duration::from_millis(30));
        a.touch();
        assert!(a.idle_for() < Duration::from_millis(30));
    }
}
