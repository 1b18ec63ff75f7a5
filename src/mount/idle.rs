//! `timeout=N`: unmount once the mount has served no request for N seconds and nothing
//! on it is open.

use std::io;
use std::time::Duration;

use crate::fuse::activity::Activity;

/// Whether the mount may be unmounted for idleness now.
pub fn is_idle(activity: &Activity, timeout: Duration) -> bool {
    activity.open_handles() == 0 && activity.idle_for() >= timeout
}

/// How often to look: often enough that the unmount comes close to the timeout.
fn poll_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

/// Watch `activity` until the mount is idle, then call `unmount`; returns once that
/// succeeds. A refused unmount (a process still has its working directory inside) counts as
/// activity, and the watch goes on.
pub fn watch(activity: &Activity, timeout: Duration, mut unmount: impl FnMut() -> io::Result<()>) {
    loop {
        std::thread::sleep(poll_interval(timeout));
        if !is_idle(activity, timeout) {
            continue;
        }
        match unmount() {
            Ok(()) => {
                tracing::info!("idle for {} s: the mount ends", timeout.as_secs_f32());
                return;
            }
            Err(e) => {
                tracing::info!("idle, but cannot unmount yet: {e}");
                activity.touch();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn open_handles_keep_the_mount() {
        let a = Activity::default();
        a.opened();
        assert!(!is_idle(&a, Duration::ZERO));
        a.released();
        assert!(is_idle(&a, Duration::ZERO));
        assert!(!is_idle(&a, Duration::from_secs(3600)));
    }

    #[test]
    fn unmounts_only_after_the_last_release_and_the_timeout() {
        let activity = Arc::new(Activity::default());
        activity.opened();
        let timeout = Duration::from_millis(100);
        let start = Instant::now();
        let releaser = {
            let activity = activity.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                activity.touch();
                activity.released();
            })
        };
        let attempts = AtomicUsize::new(0);
        watch(&activity, timeout, || {
            // The first attempt is refused, as when a process sits in the mount.
            if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(io::Error::from_raw_os_error(libc::EBUSY))
            } else {
                Ok(())
            }
        });
        releaser.join().unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        // Open for 300 ms, then two idle periods (the refusal restarts the clock).
        assert!(
            start.elapsed() >= Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }
}
