//! sifuse: read SquashFS images, bare or inside SIF containers, and serve them over FUSE
//! exactly as the kernel's squashfs driver shows them.
//!
//! Layers, bottom to top: [`sif`] (container format), [`source`] (positioned reads over a
//! window of a file), [`codec`] (decompression), [`cache`] (decompressed blocks),
//! [`archive`] (the lazy SquashFS reader), then the tools built on it ([`extract`],
//! [`walk`]) and the FUSE adapter and mount layers.

pub mod archive;
pub mod cache;
pub mod codec;
pub mod error;
pub mod extract;
pub mod fuse;
pub mod image;
pub mod launcher;
pub mod mount;
pub mod sif;
pub mod source;
pub mod walk;

pub use archive::Archive;
pub use error::{Error, Result};
