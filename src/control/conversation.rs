//! The host-path hand-off's conversation, once the mount is live: sifuse announces
//! `ready PATH`, then acts on what the launcher says — `started` (detach the host copy,
//! answer `detached`, read nothing more), `cleanup` or end of file (clean up, answer
//! `done`), anything else (answer `error unknown message ...`).

use std::io::{self, BufRead, Write};
use std::sync::Mutex;

use super::host::{HostCopy, HostSyscalls, Stage};
use super::protocol::{read_line_bounded, Line, Message, MAX_LINE};

/// How much of an unknown line an error answer quotes.
const QUOTED: usize = 64;

/// What the launcher said.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    /// The container's mount namespace holds its own copy.
    Started,
    /// Startup failed: unmount and remove everything.
    Cleanup,
    /// End of file (or a broken stream): the launcher is gone.
    Gone,
    /// Anything else, described for the answer (quoted, at most [`QUOTED`] characters).
    Unknown(String),
}

/// Read one request.
fn read_request(input: &mut impl BufRead) -> Request {
    match read_line_bounded(input, MAX_LINE) {
        Ok(Line::End) | Err(_) => Request::Gone,
        Ok(Line::Text(line)) => match Message::parse(&line) {
            Some(Message::Started) => Request::Started,
            Some(Message::Cleanup) => Request::Cleanup,
            _ => Request::Unknown(quote(&line)),
        },
        Ok(Line::NotUtf8) => Request::Unknown("(a line not in UTF-8)".into()),
        Ok(Line::TooLong) => Request::Unknown(format!("(a line longer than {MAX_LINE} bytes)")),
    }
}

/// `line` quoted, cut to its first [`QUOTED`] characters.
fn quote(line: &str) -> String {
    match line.char_indices().nth(QUOTED) {
        Some((cut, _)) => format!("{:?}...", &line[..cut]),
        None => format!("{line:?}"),
    }
}

/// How the conversation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationEnd {
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
) -> ConversationEnd {
    let mut send = |message: Message| {
        output
            .write_all(message.line().as_bytes())
            .and_then(|()| output.flush())
    };
    let ready = {
        let h = host.lock().unwrap_or_else(|e| e.into_inner());
        Message::ready(h.mountpoint())
    };
    let announced = match ready {
        Ok(message) => send(message),
        Err(e) => {
            let _ = send(Message::error(&e));
            Err(e)
        }
    };
    if announced.is_err() {
        // Nobody to talk to, or nothing sendable: nobody can start a container on it.
        return clean_up(host, sys, disarm, &mut send, ConversationEnd::LauncherGone);
    }
    loop {
        match read_request(input) {
            Request::Started => {
                let mut h = host.lock().unwrap_or_else(|e| e.into_inner());
                match h.detach(sys) {
                    Ok(()) => {
                        disarm();
                        let _ = send(Message::Detached);
                        return ConversationEnd::Detached;
                    }
                    // The launcher decides: `started` again, or `cleanup`.
                    Err(e) => {
                        let _ = send(Message::error(&e));
                    }
                }
            }
            Request::Cleanup => {
                return clean_up(host, sys, disarm, &mut send, ConversationEnd::CleanedUp);
            }
            Request::Gone => {
                return clean_up(host, sys, disarm, &mut send, ConversationEnd::LauncherGone);
            }
            Request::Unknown(line) => {
                let _ = send(Message::error(format!(
                    "unknown message {line}: expected started or cleanup"
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
    send: &mut dyn FnMut(Message) -> io::Result<()>,
    ending: ConversationEnd,
) -> ConversationEnd {
    let mut h = host.lock().unwrap_or_else(|e| e.into_inner());
    match h.clean_up(sys, true) {
        Ok(()) => {
            debug_assert_eq!(h.stage(), Stage::CleanedUp);
            disarm();
            let _ = send(Message::Done);
            ending
        }
        Err(e) => {
            // The watcher stays armed: when this process exits it tries once more.
            tracing::error!("{e}");
            let _ = send(Message::error(&e));
            ConversationEnd::CleanupFailed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::host::tests::{created, FakeHost};

    /// Run a conversation on `input`; what was sent, how it ended, the calls after the
    /// directories were made, and how often the watcher was disarmed.
    fn talk(sys: &FakeHost, input: &str) -> (String, ConversationEnd, Vec<String>, usize, Stage) {
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
        assert_eq!(ending, ConversationEnd::Detached);
        assert_eq!(calls, DETACH, "the cleanup after started is never read");
        assert_eq!((disarmed, stage), (1, Stage::Detached));
    }

    #[test]
    fn cleanup_and_end_of_file_before_started_clean_up() {
        for (input, expected) in [
            ("cleanup\n", ConversationEnd::CleanedUp),
            ("", ConversationEnd::LauncherGone),
            ("cleanup", ConversationEnd::CleanedUp),
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
        assert_eq!(ending, ConversationEnd::Detached);
    }

    /// A line of 1 MiB without a newline, then non-UTF-8 bytes: each answered `error
    /// unknown message` in one short line, and the conversation goes on (a non-UTF-8 line
    /// used to count as end of file, and a long line was kept whole and echoed back).
    #[test]
    fn long_and_non_utf8_lines_are_unknown_messages() {
        let sys = FakeHost::default();
        let mut input = vec![b'x'; 1 << 20];
        input.extend_from_slice(b"\n\xff\xfe hello\nstarted\n");
        let host = Mutex::new(created(&sys));
        let mut out = Vec::new();
        let ending = converse(&mut &input[..], &mut out, &host, &sys, &mut || {});
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "error unknown message (a line longer than 4096 bytes): expected started or cleanup",
                "error unknown message (a line not in UTF-8): expected started or cleanup",
                "detached",
            ]
        );
        assert_eq!(ending, ConversationEnd::Detached);
    }

    #[test]
    fn unknown_lines_are_quoted_in_part() {
        assert_eq!(quote(&"z".repeat(100)), format!("{:?}...", "z".repeat(64)));
        assert_eq!(quote("start"), "\"start\"");
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
        assert_eq!(ending, ConversationEnd::CleanedUp);
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
        assert_eq!(ending, ConversationEnd::CleanupFailed);
        assert_eq!((disarmed, stage), (0, Stage::Prepared));
        // A failed detach followed by end of file: cleanup is tried, and fails, too.
        let (out, ending, _, disarmed, _) = talk(&sys, "started\n");
        assert_eq!(out.lines().count(), 3, "{out}");
        assert_eq!((ending, disarmed), (ConversationEnd::CleanupFailed, 0));
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
        assert_eq!(ending, ConversationEnd::LauncherGone);
        assert_eq!(sys.calls()[2..], DETACH);
        assert_eq!(disarmed, 1);
    }

    #[test]
    fn requests_are_read_as_messages() {
        assert_eq!(read_request(&mut "cleanup\n".as_bytes()), Request::Cleanup);
        assert_eq!(
            read_request(&mut "started\r\n".as_bytes()),
            Request::Started
        );
        assert_eq!(read_request(&mut "".as_bytes()), Request::Gone);
        // A message of the other direction is no request.
        assert_eq!(
            read_request(&mut "done\n".as_bytes()),
            Request::Unknown("\"done\"".into())
        );
    }
}
