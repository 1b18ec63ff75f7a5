//! The cleanup watcher: a small process forked before the mount exists, holding the read
//! end of a pipe whose write end only the server has. The server tells it which mount it
//! made (`m`, the mount id), before that mount is attached where the kernel allows. If
//! the server dies — even by SIGKILL — before the host copy is detached, the pipe reaches
//! end of file and the watcher lazily unmounts that mount, if it is still at the mount
//! point, and removes the directories; before it knows of a mount it unmounts nothing.
//! The server disarms it (one byte, `d`) once the host copy is detached or cleaned up,
//! and it exits.
//!
//! It is forked while the server has a single thread, before the mount exists, so it holds
//! neither the FUSE descriptor (which would keep the connection alive) nor the control
//! stream (the launcher must see end of file when the server dies).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

use super::host::{HostCopy, HostSyscalls};
use crate::mount::sys::MountId;

/// The byte that disarms the watcher.
const DISARM: u8 = b'd';

/// The byte before a mount id (8 bytes, little-endian) and its kind (1 if never reused).
const MOUNTED: u8 = b'm';

/// What the watcher did.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    /// The server disarmed it: nothing to do.
    Disarmed,
    /// The server went away armed: the host copy was cleaned up.
    CleanedUp,
    /// The server went away armed, and cleaning up failed with this message.
    Failed(String),
}

/// The watcher's work: wait for the server's word or its end, then act on it.
pub fn watch(pipe: &mut impl Read, host: &mut HostCopy, sys: &dyn HostSyscalls) -> Watched {
    loop {
        let mut tag = [0u8; 1];
        // End of file, a broken pipe or anything unexpected: the server is gone.
        if pipe.read_exact(&mut tag).is_err() {
            break;
        }
        match tag[0] {
            DISARM => return Watched::Disarmed,
            MOUNTED => {
                let mut id = [0u8; 9];
                if pipe.read_exact(&mut id).is_err() {
                    break;
                }
                let (number, kind) = id.split_at(8);
                host.set_mount(MountId {
                    id: u64::from_le_bytes(number.try_into().expect("8 bytes")),
                    unique: kind[0] == 1,
                });
            }
            _ => break,
        }
    }
    match host.clean_up(sys, true) {
        Ok(()) => Watched::CleanedUp,
        Err(e) => Watched::Failed(e.to_string()),
    }
}

/// The server's handle on its watcher. Dropping it without [`Watcher::disarm`] is the same
/// as the server dying: the watcher cleans up.
#[derive(Debug)]
pub struct Watcher {
    pipe: File,
    pid: Pid,
}

impl Watcher {
    /// Tell the watcher which mount the server made: the only one it may unmount.
    pub fn tell_mount(&self, id: MountId) {
        let mut message = vec![MOUNTED];
        message.extend_from_slice(&id.id.to_le_bytes());
        message.push(u8::from(id.unique));
        if let Err(e) = (&self.pipe).write_all(&message) {
            tracing::warn!("cannot tell the cleanup watcher of the mount: {e}");
        }
    }

    /// Tell the watcher the host copy needs it no more, and reap it.
    pub fn disarm(mut self) {
        if let Err(e) = self.pipe.write_all(&[DISARM]) {
            tracing::warn!("cannot disarm the cleanup watcher: {e}");
        }
        drop(self.pipe);
        let _ = waitpid(self.pid, None);
    }
}

/// Whether this process has exactly one thread (forking is safe).
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

/// Fork the watcher for `host`. Must be called while the process has one thread.
pub fn spawn(host: &HostCopy, sys: &dyn HostSyscalls) -> io::Result<Watcher> {
    if !single_threaded() {
        return Err(io::Error::other(
            "the cleanup watcher must be forked while the process has one thread",
        ));
    }
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: the process has one thread (checked above), so the child's memory is
    // consistent and it may allocate.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => {
            drop(read);
            Ok(Watcher {
                pipe: File::from(write),
                pid: child,
            })
        }
        ForkResult::Child => {
            drop(write);
            let code = watcher_process(read, host, sys);
            // Skip the parent's exit handlers and buffered output: they are not ours.
            // SAFETY: _exit(2) ends this (forked) process without running any code of it;
            // it touches no memory.
            unsafe { libc::_exit(code) }
        }
    }
}

/// The child: let go of everything but the pipe and stderr, then watch.
fn watcher_process(read: OwnedFd, host: &HostCopy, sys: &dyn HostSyscalls) -> i32 {
    // Out of the server's session and process group, so that signals aimed at those
    // (a terminal's ^C, a group kill) leave the watcher to do its job.
    let _ = nix::unistd::setsid();
    let _ = std::env::set_current_dir("/");
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
    }
    // Every other descriptor goes: the control stream above all, whose end of file tells
    // the launcher the server is gone.
    let keep = read.as_raw_fd();
    close_all_but(keep);
    let mut pipe = File::from(read);
    let mut host = host.clone();
    match watch(&mut pipe, &mut host, sys) {
        Watched::Disarmed | Watched::CleanedUp => 0,
        Watched::Failed(msg) => {
            eprintln!("sifuse: cleanup watcher: {msg}");
            1
        }
    }
}

/// Close every descriptor from 3 up except `keep`.
fn close_all_but(keep: i32) {
    let close_range = |first: u32, last: u32| {
        if first <= last {
            // SAFETY: close_range(2) takes integers only and closes descriptors; this
            // process (the freshly forked watcher) uses none of them afterwards.
            unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        }
    };
    let keep = keep as u32;
    close_range(3, keep.saturating_sub(1));
    close_range(keep.saturating_add(1), u32::MAX);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::host::tests::{created, FakeHost, MADE};
    use crate::control::host::Stage;

    #[test]
    fn disarmed_does_nothing() {
        let sys = FakeHost::default();
        let mut host = created(&sys);
        assert_eq!(watch(&mut &b"d"[..], &mut host, &sys), Watched::Disarmed);
        let told_then_disarmed = [&mounted()[..], b"d"].concat();
        assert_eq!(
            watch(&mut &told_then_disarmed[..], &mut host, &sys),
            Watched::Disarmed
        );
        assert_eq!(sys.calls().len(), 2, "only the creation: {:?}", sys.calls());
    }

    /// The message a server sends once it made mount [`MADE`].
    fn mounted() -> Vec<u8> {
        let mut m = vec![MOUNTED];
        m.extend_from_slice(&MADE.id.to_le_bytes());
        m.push(1);
        m
    }

    /// Killed before it mounted anything (or before it could say which mount it made):
    /// the directories go, and nothing is unmounted — a mount point the launcher gave may
    /// have its own file system, which is not sifuse's.
    #[test]
    fn the_server_gone_before_its_mount_unmounts_nothing() {
        for input in [&b""[..], b"m\x2a\x00"] {
            let sys = FakeHost::default();
            let mut host = HostCopy::create(&sys, std::path::Path::new("/t")).unwrap();
            assert_eq!(watch(&mut &*input, &mut host, &sys), Watched::CleanedUp);
            assert_eq!(
                sys.calls()[2..],
                ["rmdir /t/sifuse-abc123/root", "rmdir /t/sifuse-abc123"]
            );
            let sys = FakeHost::default();
            let mut host = HostCopy::given("/mnt/tmpfs".into());
            assert_eq!(watch(&mut &*input, &mut host, &sys), Watched::CleanedUp);
            assert!(sys.calls().is_empty(), "{:?}", sys.calls());
        }
    }

    #[test]
    fn the_server_gone_armed_means_cleanup() {
        let told = mounted();
        let told_then_junk = [&told[..], b"x"].concat();
        for input in [&told[..], &told_then_junk[..]] {
            let sys = FakeHost::default();
            let mut host = HostCopy::create(&sys, std::path::Path::new("/t")).unwrap();
            assert_eq!(watch(&mut &*input, &mut host, &sys), Watched::CleanedUp);
            assert_eq!(
                sys.calls()[2..],
                [
                    "umount -l /t/sifuse-abc123/root",
                    "rmdir /t/sifuse-abc123/root",
                    "rmdir /t/sifuse-abc123"
                ]
            );
            assert_eq!(host.stage(), Stage::CleanedUp);
        }
    }

    #[test]
    fn a_failed_cleanup_is_reported() {
        let sys = FakeHost {
            rmdir_errno: Some(libc::EBUSY),
            ..Default::default()
        };
        let mut host = created(&sys);
        let Watched::Failed(msg) = watch(&mut &b""[..], &mut host, &sys) else {
            panic!("should fail");
        };
        assert!(msg.contains("cannot remove"), "{msg}");
    }

    #[test]
    fn a_real_pipe_end_of_file_is_seen() {
        let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        drop(write);
        let sys = FakeHost::default();
        let mut host = created(&sys);
        assert_eq!(
            watch(&mut File::from(read), &mut host, &sys),
            Watched::CleanedUp
        );
    }
}
