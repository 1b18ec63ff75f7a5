//! Typed errors of the library. Every message says what went wrong and, where the
//! user can act, what to do about it.

use std::io;

use crate::sif::SifError;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while opening or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying file could not be read.
    #[error("cannot read the image at byte {offset}: {source}")]
    Read { offset: u64, source: io::Error },

    /// The image file could not be opened or inspected.
    #[error("{path}: {source}")]
    Open { path: String, source: io::Error },

    /// A problem with the SIF container around the SquashFS image.
    #[error(transparent)]
    Sif(#[from] SifError),

    /// Neither a SIF container nor a SquashFS image.
    #[error("not a SIF or SquashFS image: {0}")]
    NotAnImage(String),

    /// A SquashFS feature or version this reader does not implement.
    #[error("unsupported SquashFS image: {0}")]
    Unsupported(String),

    /// The image contradicts itself: a size, offset or count read from it is impossible.
    #[error("corrupt SquashFS image: {0}")]
    Corrupt(String),

    /// A compressed block did not decompress to what the image promised.
    #[error(
        "corrupt SquashFS image: {compressor} block at byte {offset} does not decompress: {detail}"
    )]
    Decompress {
        compressor: &'static str,
        offset: u64,
        detail: String,
    },

    /// An inode's extended attributes exceed what one request may read or the kernel could
    /// pass on.
    #[error("{0}")]
    XattrsTooLarge(String),

    /// A path inside the image does not exist.
    #[error("{0}: no such file or directory in the image")]
    NotFound(String),

    /// A path component inside the image is not a directory.
    #[error("{0}: not a directory in the image")]
    NotADirectory(String),

    /// An operation needed a regular file.
    #[error("{0}: not a regular file")]
    NotAFile(String),

    /// Plain I/O while writing output (extract, cat).
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Error {
    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound(_) => libc::ENOENT,
            Error::NotADirectory(_) => libc::ENOTDIR,
            Error::NotAFile(_) => libc::EISDIR,
            Error::XattrsTooLarge(_) => libc::E2BIG,
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }

    /// Shorthand for a corruption error.
    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }
}
