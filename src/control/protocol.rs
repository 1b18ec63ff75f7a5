//! The control stream between a launcher and `sifuse mount --control-fd`, as both ends
//! speak it: one message per line, each ending in `\n` ([`Message`]), read within a bound
//! ([`read_line_bounded`]). A line with a descriptor attached travels by [`super::fdpass`].
//!
//! sifuse → launcher: `ready PATH`, `ready-fd`, `detached`, `done`, `serving`,
//! `error MESSAGE`. launcher → sifuse: `started`, `cleanup`, `serve-fd`. Which are said
//! when is up to each hand-off ([`super::conversation`], [`super::by_descriptor`], and the
//! launcher's side in [`crate::launcher`]).

use std::fmt;
use std::io::{self, BufRead};
use std::path::Path;

/// The longest line either side reads, newline included. The protocol's messages are a
/// few bytes (`ready` carries a path): anything longer is not a message, and reading no
/// more of it keeps memory bounded whatever a peer sends.
pub const MAX_LINE: usize = 4096;

/// One message of the protocol, either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// sifuse: the mount is live at this absolute path (build it with [`Message::ready`]).
    Ready(String),
    /// sifuse: the detached mount's descriptor comes with this line (`--detached`).
    ReadyFd,
    /// sifuse: the host copy is detached and the directories sifuse made are removed.
    Detached,
    /// sifuse: cleaned up.
    Done,
    /// sifuse: the FUSE session on the descriptor the launcher sent has started.
    Serving,
    /// sifuse: something failed; the message says what.
    Error(String),
    /// launcher: the container's mount namespace holds its own copy.
    Started,
    /// launcher: startup failed; unmount and remove everything.
    Cleanup,
    /// launcher: an open /dev/fuse descriptor, with a mount made on it, comes with this
    /// line (`--serve-fd`).
    ServeFd,
}

impl Message {
    /// `ready PATH`; a path that is not UTF-8, or holds a newline, cannot be sent.
    pub fn ready(path: &Path) -> io::Result<Message> {
        let s = path.to_str().filter(|s| !s.contains('\n')).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "mount point {} cannot be sent on the control stream (not UTF-8, or a newline)",
                    path.display()
                ),
            )
        })?;
        Ok(Message::Ready(s.to_string()))
    }

    /// `error MESSAGE`.
    pub fn error(message: impl fmt::Display) -> Message {
        Message::Error(message.to_string())
    }

    /// The message a line (without its newline) carries, if it is one of the protocol's.
    pub fn parse(line: &str) -> Option<Message> {
        Some(match line {
            "ready-fd" => Message::ReadyFd,
            "detached" => Message::Detached,
            "done" => Message::Done,
            "serving" => Message::Serving,
            "started" => Message::Started,
            "cleanup" => Message::Cleanup,
            "serve-fd" => Message::ServeFd,
            _ => {
                if let Some(path) = line.strip_prefix("ready ") {
                    Message::Ready(path.to_string())
                } else {
                    Message::Error(line.strip_prefix("error ")?.to_string())
                }
            }
        })
    }

    /// The message as sent: one line, newline included.
    pub fn line(&self) -> String {
        format!("{self}\n")
    }
}

/// The message without its newline. A newline inside an error message is flattened, so
/// that the stream stays one message per line.
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Ready(path) => write!(f, "ready {path}"),
            Message::ReadyFd => f.write_str("ready-fd"),
            Message::Detached => f.write_str("detached"),
            Message::Done => f.write_str("done"),
            Message::Serving => f.write_str("serving"),
            Message::Error(message) => write!(f, "error {}", message.replace(['\n', '\r'], " ")),
            Message::Started => f.write_str("started"),
            Message::Cleanup => f.write_str("cleanup"),
            Message::ServeFd => f.write_str("serve-fd"),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn every_message_parses_back_from_its_line() {
        let all = [
            Message::Ready("/a b".into()),
            Message::ReadyFd,
            Message::Detached,
            Message::Done,
            Message::Serving,
            Message::Error("it failed".into()),
            Message::Started,
            Message::Cleanup,
            Message::ServeFd,
        ];
        for m in all {
            let line = m.line();
            assert_eq!(line.matches('\n').count(), 1, "{line:?}");
            assert_eq!(Message::parse(line.trim_end_matches('\n')), Some(m));
        }
        for other in [
            "",
            "start",
            "ready",
            "error",
            "Started",
            "started ",
            "ready-fd x",
        ] {
            assert_eq!(Message::parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn messages_are_single_lines() {
        assert_eq!(Message::error("a\nb\rc").line(), "error a b c\n");
        assert_eq!(
            Message::ready(Path::new("/a b")).unwrap().line(),
            "ready /a b\n"
        );
        assert!(Message::ready(Path::new("/a\nb")).is_err());
    }
}
