//! squashfuse's `notify_pipe=FIFO`: the caller opens a FIFO for reading and learns the
//! outcome from one byte, `s` once the mount is live or `f` if mounting failed.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The FIFO to report to.
#[derive(Debug, Clone)]
pub struct NotifyPipe(PathBuf);

impl NotifyPipe {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        NotifyPipe(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Report that the mount is live. Opening blocks until the caller has the FIFO open
    /// for reading, as with squashfuse.
    pub fn ready(&self) -> io::Result<()> {
        self.send(b's')
    }

    /// Report that mounting failed; a failure to report is only logged, since the mount
    /// error is what the caller needs to see.
    pub fn failed(&self) {
        if let Err(e) = self.send(b'f') {
            tracing::warn!("cannot report the failure to {}: {e}", self.0.display());
        }
    }

    fn send(&self, byte: u8) -> io::Result<()> {
        // Never create it: a regular file at that path is not the caller's pipe.
        let mut fifo = OpenOptions::new().write(true).open(&self.0)?;
        fifo.write_all(&[byte])
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

    #[test]
    fn a_missing_fifo_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = NotifyPipe::new(dir.path().join("absent"));
        assert!(pipe.ready().is_err());
        assert!(!pipe.path().exists(), "nothing is created");
    }
}
