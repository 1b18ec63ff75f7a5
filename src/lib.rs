//! sifuse: read SquashFS images, bare or inside SIF containers, and serve them over FUSE
//! exactly as the kernel's squashfs driver shows them.
//!
//! Layers, bottom to top: [`sif`] (container format), [`source`] (where the image's bytes
//! come from), [`codec`] (decompression), [`cache`] (the one memory budget), [`archive`]
//! (the lazy SquashFS reader), then the tools built on it ([`extract`], [`walk`]), the
//! FUSE adapter ([`fuse`]), the [`mount`] layer with the server's one pipeline, launcher
//! mode's server side ([`control`]) and a launcher ([`launcher`], `sifuse run`).
//! docs/ARCHITECTURE.md says what each may use and where each invariant is kept.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod archive;
pub mod cache;
pub mod codec;
pub mod control;
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
