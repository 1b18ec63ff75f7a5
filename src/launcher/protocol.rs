//! The control stream between a launcher and `sifuse mount --control-fd`: one line per
//! message, each ending in `\n`.
//!
//! sifuse → launcher: `ready <absolute mountpoint>`, `detached`, `done`, `error <message>`.
//! launcher → sifuse: `started`, `cleanup`. End of file before `started` means the
//! launcher is gone: clean up. After `detached` sifuse reads nothing more.

use std::io::{self, BufRead, Write};
use std::path::Path;
use std::sync::Mutex;

use super::host::{HostCopy, HostSyscalls, Stage};

/// What the launcher said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The container's mount namespace holds its own copy.
    Started,
    /// Startup failed: unmount and remove everything.
    Cleanup,
    /// End of file (or a broken stream): the launcher is gone.
    Gone,
    /// Anything else, as received.
    Unknown(String),
}

/// Read one request.
pub fn read_request(input: &mut impl BufRead) -> Request {
    let mut line = String::new();
    match input.read_line(&mut line) {
        Ok(0) | Err(_) => Request::Gone,
        Ok(_) => match line.trim_end_matches(['\n', '\r']) {
            "started" => Request::Started,
            "cleanup" => Request::Cleanup,
            other => Request::Unknown(other.to_string()),
        },
    }
}

/// One line: `error <message>`, with any newline in the message flattened so that the
/// stream stays one message per line.
pub fn error_line(message: &str) -> String {
    format!("error {}\n", message.replace(['\n', '\r'], " "))
}

/// `ready <path>`; a path with a newline in it cannot be sent on this protocol.
pub fn ready_line(path: &Path) -> io::Result<String> {
    let s = path.to_str().filter(|s| !s.contains('\n')).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "mount point {} cannot be sent on the control stream (not UTF-8, or a newline)",
                path.display()
            ),
        )
    })?;
    Ok(format!("ready {s}\n"))
}

/// How the conversation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The host copy is detached; serve the container's copy until the kernel ends it.
    Detached,
    /// The launcher asked for cleanup; done.
    CleanedUp,
    /// The launcher went away before `started`; cleaned up.
    LauncherGone,
    /// Cleaning up failed (the message was sent, where the stream was open).
    CleanupFailed,
}

/// The host side of the protocol once the mount is live: announce it, then act on what the
/// launcher says. `disarm` tells the cleanup watcher there is nothing left for it to do.
/// The host copy is locked for each transition, so that the serving thread, when the
/// mount ends, sees either the state before a transition or after it.
pub fn converse(
    input: &mut impl BufRead,
    output: &mut impl Write,
    host: &Mutex<HostCopy>,
    sys: &dyn HostSyscalls,
    disarm: &mut dyn FnMut(),
) -> Ending {
    let mut send = |line: &str| {
        output
            .write_all(line.as_bytes())
            .and_then(|()| output.flush())
    };
    let ready = {
        let h = host.lock().unwrap_or_else(|e| e.into_inner());
        ready_line(h.mountpoint())
    };
    let announced = match ready {
        Ok(line) => send(&line),
        Err(e) => {
            let _ = send(&error_line(&e.to_string()));
            Err(e)
        }
    };
    if announced.is_err() {
        // Nobody to talk to, or nothing sendable: nobody can start a container on it.
        return clean_up(host, sys, disarm, &mut send, Ending::LauncherGone);
    }
    loop {
        match read_request(input) {
            Request::Started => {
                let mut h = host.lock().unwrap_or_else(|e| e.into_inner());
                match h.detach(sys) {
                    Ok(()) => {
                        disarm();
                        let _ = send("detached\n");
                        return Ending::Detached;
                    }
                    // The launcher decides: `started` again, or `cleanup`.
                    Err(e) => {
                        let _ = send(&error_line(&e.to_string()));
                    }
                }
            }
            Request::Cleanup => {
                return clean_up(host, sys, disarm, &mut send, Ending::CleanedUp);
            }
            Request::Gone => {
                return clean_up(host, sys, disarm, &mut send, Ending::LauncherGone);
            }
            Request::Unknown(line) => {
                let _ = send(&error_line(&format!(
                    "unknown message {line:?}: expected started or cleanup"
                )));
            }
        }
    }
}

/// Unmount, remove the directories, disarm the watcher, answer `done` (or the error).
fn clean_up(
    host: &Mutex<HostCopy>,
    sys: &dyn HostSyscalls,
    disarm: &mut dyn FnMut(),
    send: &mut dyn FnMut(&str) -> io::Result<()>,
    ending: Ending,
) -> Ending {
    let mut h = host.lock().unwrap_or_else(|e| e.into_inner());
    match h.clean_up(sys, true) {
        Ok(()) => {
            debug_assert_eq!(h.stage(), Stage::CleanedUp);
            disarm();
            let _ = send("done\n");
            ending
        }
        Err(e) => {
            // The watcher stays armed: when this process exits it tries once more.
            tracing::error!("{e}");
            let _ = send(&error_line(&e.to_string()));
            Ending::CleanupFailed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::host::tests::{created, FakeHost};

    /// Run a conversation on `input`; what was sent, how it ended, the calls after the
    /// directories were made, and how often the watcher was disarmed.
    fn talk(sys: &FakeHost, input: &str) -> (String, Ending, Vec<String>, usize, Stage) {
        let host = Mutex::new(created(sys));
        let mut out = Vec::new();
        let mut disarmed = 0;
        let ending = converse(&mut input.as_bytes(), &mut out, &host, sys, &mut || {
            disarmed += 1
        });
        let stage = host.lock().unwrap().stage();
        (
            String::from_utf8(out).unwrap(),
            ending,
            sys.calls()[2..].to_vec(),
            disarmed,
            stage,
        )
    }

    const READY: &str = "ready /t/sifuse-abc123/root\n";
    const DETACH: [&str; 3] = [
        "umount -l /t/sifuse-abc123/root",
        "rmdir /t/sifuse-abc123/root",
        "rmdir /t/sifuse-abc123",
    ];

    #[test]
    fn started_detaches_and_then_nothing_more_is_read() {
        let sys = FakeHost::default();
        let (out, ending, calls, disarmed, stage) = talk(&sys, "started\ncleanup\n");
        assert_eq!(out, format!("{READY}detached\n"));
        assert_eq!(ending, Ending::Detached);
        assert_eq!(calls, DETACH, "the cleanup after started is never read");
        assert_eq!((disarmed, stage), (1, Stage::Detached));
    }

    #[test]
    fn cleanup_and_end_of_file_before_started_clean_up() {
        for (input, expected) in [
            ("cleanup\n", Ending::CleanedUp),
            ("", Ending::LauncherGone),
            ("cleanup", Ending::CleanedUp),
        ] {
            let sys = FakeHost::default();
            let (out, ending, calls, disarmed, stage) = talk(&sys, input);
            assert_eq!(out, format!("{READY}done\n"), "{input:?}");
            assert_eq!(ending, expected);
            assert_eq!(calls, DETACH);
            assert_eq!((disarmed, stage), (1, Stage::CleanedUp));
        }
    }

    #[test]
    fn unknown_messages_are_answered_and_ignored() {
        let sys = FakeHost::default();
        let (out, ending, _, _, _) = talk(&sys, "start\r\nstarted\r\n");
        assert_eq!(
            out,
            format!(
                "{READY}error unknown message \"start\": expected started or cleanup\ndetached\n"
            )
        );
        assert_eq!(ending, Ending::Detached);
    }

    #[test]
    fn a_failed_detach_reports_and_waits_for_the_launcher() {
        // umount fails: error, and the launcher's cleanup then still removes everything.
        let sys = FakeHost {
            unmount_errno: Some(libc::EBUSY),
            ..Default::default()
        };
        let (out, ending, calls, disarmed, stage) = talk(&sys, "started\ncleanup\n");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[1].starts_with("error cannot unmount"), "{out}");
        // The unmount is refused again, but removing the (unmounted) directory works,
        // which is what cleanup needs.
        assert_eq!(lines[2], "done");
        assert_eq!(ending, Ending::CleanedUp);
        assert_eq!(calls.len(), 4, "{calls:?}");
        assert_eq!((disarmed, stage), (1, Stage::CleanedUp));
    }

    #[test]
    fn a_failed_cleanup_keeps_the_watcher_armed() {
        let sys = FakeHost {
            rmdir_errno: Some(libc::EBUSY),
            ..Default::default()
        };
        let (out, ending, _, disarmed, stage) = talk(&sys, "cleanup\n");
        assert!(
            out.ends_with("error cannot remove /t/sifuse-abc123/root: Device or resource busy (os error 16)\n"),
            "{out}"
        );
        assert_eq!(ending, Ending::CleanupFailed);
        assert_eq!((disarmed, stage), (0, Stage::Prepared));
        // A failed detach followed by end of file: cleanup is tried, and fails, too.
        let (out, ending, _, disarmed, _) = talk(&sys, "started\n");
        assert_eq!(out.lines().count(), 3, "{out}");
        assert_eq!((ending, disarmed), (Ending::CleanupFailed, 0));
    }

    #[test]
    fn a_launcher_gone_before_ready_gets_a_cleanup() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sys = FakeHost::default();
        let host = Mutex::new(created(&sys));
        let mut disarmed = 0;
        let ending = converse(
            &mut "started\n".as_bytes(),
            &mut Closed,
            &host,
            &sys,
            &mut || disarmed += 1,
        );
        assert_eq!(ending, Ending::LauncherGone);
        assert_eq!(sys.calls()[2..], DETACH);
        assert_eq!(disarmed, 1);
    }

    #[test]
    fn messages_are_single_lines() {
        assert_eq!(error_line("a\nb\rc"), "error a b c\n");
        assert_eq!(ready_line(Path::new("/a b")).unwrap(), "ready /a b\n");
        assert!(ready_line(Path::new("/a\nb")).is_err());
        assert_eq!(read_request(&mut "cleanup\n".as_bytes()), Request::Cleanup);
        assert_eq!(read_request(&mut "".as_bytes()), Request::Gone);
    }
}
