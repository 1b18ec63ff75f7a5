//! `sifuse run`'s side of the control stream: the server it starts (`sifuse mount
//! --control-fd 3`), what it tells it, and every wait for an answer bounded.

use std::ffi::OsString;
use std::io::{self, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::fdpass::send_line_with_fd;
use crate::control::protocol::{read_line_bounded, Line, Message, MAX_LINE};

use super::sys::{ContainerSyscalls, ServerChild};
use super::LauncherError;

/// How long `sifuse run` waits for the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waits {
    /// For the mount (`ready`) or the session (`serving`): the server opens the image and
    /// reads its superblock and tables first.
    pub mount: Duration,
    /// For any other answer (`detached`, `done`).
    pub answer: Duration,
}

impl Default for Waits {
    fn default() -> Self {
        Waits {
            mount: Duration::from_secs(60),
            answer: Duration::from_secs(30),
        }
    }
}

/// What the server said.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// A message of the protocol.
    Message(Message),
    /// A line that is none (quoted in errors as it came).
    Other(String),
    /// End of file, or a broken stream: the server is gone.
    End,
}

/// The server and the launcher's end of its control stream.
pub struct ServerProcess {
    child: Box<dyn ServerChild>,
    input: BufReader<UnixStream>,
    output: UnixStream,
    waits: Waits,
}

impl ServerProcess {
    /// Start `sifuse mount --control-fd 3 [--serve-fd] MOUNT_ARGS -- IMAGE`.
    pub fn start(
        sys: &dyn ContainerSyscalls,
        image: &Path,
        mount_args: &[OsString],
        serve_fd: bool,
        waits: Waits,
    ) -> Result<ServerProcess, LauncherError> {
        let mut args: Vec<OsString> = ["mount", "--control-fd", "3"].map(OsString::from).into();
        if serve_fd {
            args.push("--serve-fd".into());
        }
        args.extend(mount_args.iter().cloned());
        args.push("--".into());
        args.push(image.into());
        let (child, stream) = sys
            .start_server(&args)
            .map_err(|e| LauncherError::setup("cannot start the sifuse server", e))?;
        let output = stream
            .try_clone()
            .map_err(|e| LauncherError::setup("socketpair", e))?;
        Ok(ServerProcess {
            child,
            input: BufReader::new(stream),
            output,
            waits,
        })
    }

    /// The stream from the server, readable when it says something or ends.
    pub fn stream(&self) -> BorrowedFd<'_> {
        self.input.get_ref().as_fd()
    }

    /// The next thing the server says. A server that says nothing for `limit` is killed
    /// (its watcher cleans up after it) and that is the error.
    pub fn hear(&mut self, limit: Duration) -> Result<Heard, LauncherError> {
        let timed_out = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        };
        let read = self
            .input
            .get_ref()
            .set_read_timeout(Some(limit))
            .and_then(|()| read_line_bounded(&mut self.input, MAX_LINE));
        match read {
            Ok(Line::Text(line)) => Ok(match Message::parse(&line) {
                Some(message) => Heard::Message(message),
                None => Heard::Other(line),
            }),
            Ok(Line::NotUtf8 | Line::TooLong) => Ok(Heard::Other("(an unreadable line)".into())),
            Ok(Line::End) => Ok(Heard::End),
            Err(e) if timed_out(&e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(LauncherError::Server(format!(
                    "did not answer within {} s: stopped",
                    limit.as_secs_f32()
                )))
            }
            // A broken stream: the server is gone.
            Err(_) => Ok(Heard::End),
        }
    }

    /// The next thing the server says, within the wait for an answer.
    pub fn hear_answer(&mut self) -> Result<Heard, LauncherError> {
        self.hear(self.waits.answer)
    }

    /// How the server ended, for a message.
    fn exit_status(&mut self) -> String {
        self.child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string())
    }

    /// Wait for `ready PATH`.
    pub fn wait_ready(&mut self) -> Result<PathBuf, LauncherError> {
        match self.hear(self.waits.mount)? {
            Heard::Message(Message::Ready(path)) => Ok(PathBuf::from(path)),
            Heard::Message(Message::Error(msg)) => {
                let _ = self.child.wait();
                Err(LauncherError::Server(msg))
            }
            Heard::Message(other) => Err(unexpected(&other.to_string())),
            Heard::Other(line) => Err(unexpected(&line)),
            Heard::End => Err(LauncherError::Server(format!(
                "exited before the mount was ready ({})",
                self.exit_status()
            ))),
        }
    }

    /// Hand over the /dev/fuse descriptor of the detached mount and wait for `serving`.
    pub fn hand_over(&mut self, fuse: BorrowedFd<'_>) -> Result<(), LauncherError> {
        send_line_with_fd(self.output.as_fd(), &Message::ServeFd.to_string(), fuse)
            .map_err(|e| LauncherError::Server(format!("cannot send serve-fd: {e}")))?;
        match self.hear(self.waits.mount)? {
            Heard::Message(Message::Serving) => Ok(()),
            Heard::Message(Message::Error(msg)) => Err(LauncherError::Server(msg)),
            Heard::Message(other) => Err(LauncherError::Server(other.to_string())),
            Heard::Other(line) => Err(LauncherError::Server(line)),
            Heard::End => Err(LauncherError::Server(format!(
                "exited before serving ({})",
                self.exit_status()
            ))),
        }
    }

    /// Tell the server `message`.
    pub fn tell(&mut self, message: &Message) -> io::Result<()> {
        self.output.write_all(message.line().as_bytes())
    }

    /// Tell the server the container started, and wait for `detached`. The container runs
    /// whatever the answer: a failure is only reported.
    pub fn tell_started(&mut self) {
        let answer = match self.tell(&Message::Started) {
            Ok(()) => self.hear_answer(),
            Err(e) => Err(LauncherError::Server(format!("cannot send started: {e}"))),
        };
        match answer {
            Ok(Heard::Message(Message::Detached)) => {}
            Ok(Heard::Message(other)) => {
                eprintln!("sifuse: the server did not detach the host copy: {other}")
            }
            Ok(Heard::Other(line)) => {
                eprintln!("sifuse: the server did not detach the host copy: {line}")
            }
            Ok(Heard::End) => eprintln!("sifuse: the server did not answer started"),
            Err(e) => eprintln!("sifuse: {e}"),
        }
    }

    /// Startup failed: ask the server to clean up, and wait for it.
    pub fn clean_up(mut self) {
        if self.tell(&Message::Cleanup).is_ok() {
            match self.hear_answer() {
                Ok(Heard::Message(Message::Done) | Heard::End) => {}
                Ok(Heard::Message(other)) => eprintln!("sifuse: cleanup: {other}"),
                Ok(Heard::Other(line)) => eprintln!("sifuse: cleanup: {line}"),
                Err(e) => eprintln!("sifuse: cleanup: {e}"),
            }
        }
        drop(self.output);
        drop(self.input);
        let _ = self.child.wait();
    }
}

fn unexpected(line: &str) -> LauncherError {
    LauncherError::Server(format!("unexpected message {line:?}"))
}
