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

/// The longest line either side reads, newline included. The protocol's messages are a
/// few bytes (`ready` carries a path): anything longer is not a message, and reading no
/// more of it keeps memory bounded whatever a peer sends.
pub const MAX_LINE: usize = 4096;

/// How much of an unknown line an error answer quotes.
const QUOTED: usize = 64;

/// One line as read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line in UTF-8, without its `\n` (or `\r\n`).
    Text(String),
    /// A line that is not UTF-8 (its bytes are dropped).
    NotUtf8,
    /// A line longer than [`MAX_LINE`]: read to its end and dropped.
    TooLong,
    /// End of file before any byte.
    End,
}

/// Read one line of at most `max` bytes (newline included), keeping no more than that in
/// memory: the rest of a longer line is read and thrown away up to its newline. A last
/// line without a newline counts as a line.
pub fn read_line_bounded(input: &mut impl BufRead, max: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    let mut any = false;
    loop {
        let chunk = match input.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if !too_long {
            if line.len() + part.len() < max {
                line.extend_from_slice(part);
            } else {
                too_long = true;
                line = Vec::new();
            }
        }
        let used = done.unwrap_or(chunk.len());
        input.consume(used);
        if done.is_some() {
            break;
        }
    }
    if !any {
        return Ok(Line::End);
    }
    if too_long {
        return Ok(Line::TooLong);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(String::from_utf8(line).map_or(Line::NotUtf8, Line::Text))
}

/// What the launcher said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
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
pub fn read_request(input: &mut impl BufRead) -> Request {
    match read_line_bounded(input, MAX_LINE) {
        Ok(Line::End) | Err(_) => Request::Gone,
        Ok(Line::Text(line)) => match line.as_str() {
            "started" => Request::Started,
            "cleanup" => Request::Cleanup,
            other => Request::Unknown(quote(other)),
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
        assert_eq!(ending, Ending::Detached);
    }

    #[test]
    fn lines_are_read_within_the_bound() {
        let read = |bytes: &[u8], max| {
            let mut input = io::BufReader::with_capacity(7, bytes);
            let mut lines = Vec::new();
            loop {
                match read_line_bounded(&mut input, max).unwrap() {
                    Line::End => return lines,
                    l => lines.push(l),
                }
            }
        };
        let text = |s: &str| Line::Text(s.into());
        assert_eq!(
            read(b"abc\r\n\ndef", 8),
            [text("abc"), text(""), text("def")]
        );
        // Seven bytes and the newline fit in eight; eight do not.
        assert_eq!(
            read(b"1234567\n12345678\nok\n", 8),
            [text("1234567"), Line::TooLong, text("ok")]
        );
        assert_eq!(read(&[b'y'; 100], 8), [Line::TooLong]);
        assert_eq!(read(b"\xc3\n", 8), [Line::NotUtf8]);
        assert_eq!(quote(&"z".repeat(100)), format!("{:?}...", "z".repeat(64)));
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
