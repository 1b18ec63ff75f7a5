//! SIGTERM, SIGINT and SIGHUP end the mount, as they end a libfuse file system. They are
//! blocked in every thread and taken by one watcher thread with sigwait, so the handling
//! runs as ordinary code rather than in a signal handler.

use std::io;
use std::thread::JoinHandle;

use nix::sys::signal::{SigSet, Signal};

/// The signals that end the mount.
pub fn exit_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Block the exit signals in the calling thread. Threads started afterwards inherit the
/// mask, so call this before starting any.
pub fn block_exit_signals() -> io::Result<SigSet> {
    let set = exit_signals();
    set.thread_block()?;
    Ok(set)
}

/// On a thread of its own, wait for one of `set` and call `on_signal` with it.
pub fn spawn_signal_thread(
    set: SigSet,
    on_signal: impl FnOnce(Signal) + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("sifuse-signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(signal) => return on_signal(signal),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("cannot wait for signals: {e}");
                    return;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::mpsc;

    #[test]
    fn the_watcher_gets_the_signal() {
        // Directed at the watcher thread only, so the test process is never at risk.
        let set = block_exit_signals().unwrap();
        let (tx, rx) = mpsc::channel();
        let watcher = spawn_signal_thread(set, move |s| tx.send(s).unwrap()).unwrap();
        // SAFETY: the thread is alive until it has received the signal.
        let rc = unsafe { libc::pthread_kill(watcher.as_pthread_t(), libc::SIGTERM) };
        assert_eq!(rc, 0);
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            Signal::SIGTERM
        );
        watcher.join().unwrap();
        set.thread_unblock().unwrap();
    }
}
