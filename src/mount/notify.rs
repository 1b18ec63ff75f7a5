//! squashfuse's `notify_pipe=FIFO`: the caller opens a FIFO for reading and learns the
//! outcome from one byte, `s` once the mount is live or `f` if mounting failed.
//!
//! The path comes from the command line of a process that may run as root, so it is
//! written only if it is a FIFO: it is first opened without following a final symlink and
//! without opening the file itself (O_PATH), checked, and then reopened for writing
//! through that very descriptor, so that nothing can be swapped in between. Opening for
//! writing does not block (O_NONBLOCK): while no reader has the FIFO open it is retried,
//! for a bounded time.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for the caller to open the FIFO for reading.
pub const READER_WAIT: Duration = Duration::from_secs(10);

/// How often to look for a reader meanwhile.
const RETRY: Duration = Duration::from_millis(10);

/// The FIFO to report to.
#[derive(Debug, Clone)]
pub struct NotifyPipe {
    path: PathBuf,
    reader_wait: Duration,
}

impl NotifyPipe {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        NotifyPipe {
            path: path.into(),
            reader_wait: READER_WAIT,
        }
    }

    /// The same pipe, waiting at most `wait` for a reader.
    pub fn with_reader_wait(mut self, wait: Duration) -> Self {
        self.reader_wait = wait;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Report that the mount is live, once the caller has the FIFO open for reading.
    pub fn ready(&self) -> io::Result<()> {
        self.send(b's')
    }

    /// Report that mounting failed; a failure to report is only logged, since the mount
    /// error is what the caller needs to see.
    pub fn failed(&self) {
        if let Err(e) = self.send(b'f') {
            tracing::warn!("cannot report the failure to {}: {e}", self.path.display());
        }
    }

    fn send(&self, byte: u8) -> io::Result<()> {
        let mut fifo = self.open_fifo()?;
        let deadline = Instant::now() + self.reader_wait;
        loop {
            match fifo.write(&[byte]) {
                Ok(1) => return Ok(()),
                Ok(_) => return Err(io::Error::other("the FIFO took no byte")),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Full of bytes nobody read: give the reader a moment.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(RETRY)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The FIFO open for writing, once a reader has it open. Refuses anything that is not
    /// a FIFO (a regular file, a device, a symlink to either) without writing to it.
    fn open_fifo(&self) -> io::Result<File> {
        // Never create it, never follow a final symlink, and do not open the file itself
        // (a device's open may act): only a reference to check.
        let pinned = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(&self.path)?;
        let kind = pinned.metadata()?.file_type();
        if !kind.is_fifo() {
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_file() {
                "a regular file"
            } else if kind.is_dir() {
                "a directory"
            } else {
                "not a FIFO"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what}, not a FIFO: nothing written"),
            ));
        }
        // Reopen the very FIFO checked above through its descriptor.
        let reopen = format!("/proc/self/fd/{}", pinned.as_raw_fd());
        let deadline = Instant::now() + self.reader_wait;
        loop {
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&reopen)
            {
                Ok(f) => return Ok(f),
                // ENXIO: no reader yet.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "no reader opened the FIFO within {} s",
                                self.reader_wait.as_secs_f32()
                            ),
                        ));
                    }
                    std::thread::sleep(RETRY);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn writes_one_byte_to_the_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        for (report, byte) in [(true, b's'), (false, b'f')] {
            let reader = {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    std::fs::File::open(path)
                        .unwrap()
                        .read_to_end(&mut got)
                        .unwrap();
                    got
                })
            };
            let pipe = NotifyPipe::new(&path);
            if report {
                pipe.ready().unwrap();
            } else {
                pipe.failed();
            }
            assert_eq!(reader.join().unwrap(), [byte]);
        }
    }

    /// A symlink to a regular file, a regular file, a directory and a character device:
    /// refused, nothing written.
    #[test]
    fn only_a_fifo_is_ever_written() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("precious");
        std::fs::write(&file, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for (path, what) in [
            (link.as_path(), "symbolic link"),
            (file.as_path(), "regular file"),
            (dir.path(), "directory"),
            (Path::new("/dev/null"), "not a FIFO"),
        ] {
            let pipe = NotifyPipe::new(path);
            let err = pipe.ready().unwrap_err().to_string();
            assert!(err.contains(what), "{}: {err}", path.display());
            pipe.failed();
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn a_fifo_nobody_reads_is_given_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let pipe = NotifyPipe::new(&path).with_reader_wait(Duration::from_millis(200));
        let err = pipe.ready().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("no reader"), "{err}");
    }

    #[test]
    fn a_missing_fifo_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = NotifyPipe::new(dir.path().join("absent"));
        assert!(pipe.ready().is_err());
        assert!(!pipe.path().exists(), "nothing is created");
    }
}
