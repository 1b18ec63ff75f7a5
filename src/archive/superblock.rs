//! The 96-byte SquashFS 4.0 superblock and the optional compressor options after it.

use serde::Serialize;

use crate::codec::Compressor;
use crate::error::{Error, Result};

/// "hsqs" read as a little-endian u32.
pub const MAGIC: u32 = 0x7371_7368;
/// Size of the superblock on disk.
pub const SUPERBLOCK_LEN: usize = 96;
/// Marks an absent optional table.
pub const NO_TABLE: u64 = u64::MAX;

/// Superblock flag bits.
pub mod flags {
    pub const UNCOMPRESSED_INODES: u16 = 0x0001;
    pub const UNCOMPRESSED_DATA: u16 = 0x0002;
    pub const CHECK: u16 = 0x0004;
    pub const UNCOMPRESSED_FRAGMENTS: u16 = 0x0008;
    pub const NO_FRAGMENTS: u16 = 0x0010;
    pub const ALWAYS_FRAGMENTS: u16 = 0x0020;
    pub const DUPLICATES: u16 = 0x0040;
    pub const EXPORTABLE: u16 = 0x0080;
    pub const UNCOMPRESSED_XATTRS: u16 = 0x0100;
    pub const NO_XATTRS: u16 = 0x0200;
    pub const COMPRESSOR_OPTIONS: u16 = 0x0400;
    pub const UNCOMPRESSED_IDS: u16 = 0x0800;

    /// Names of the set bits, for `inspect`.
    pub fn names(bits: u16) -> Vec<&'static str> {
        const ALL: [(u16, &str); 12] = [
            (UNCOMPRESSED_INODES, "uncompressed-inodes"),
            (UNCOMPRESSED_DATA, "uncompressed-data"),
            (CHECK, "check"),
            (UNCOMPRESSED_FRAGMENTS, "uncompressed-fragments"),
            (NO_FRAGMENTS, "no-fragments"),
            (ALWAYS_FRAGMENTS, "always-fragments"),
            (DUPLICATES, "duplicates"),
            (EXPORTABLE, "exportable"),
            (UNCOMPRESSED_XATTRS, "uncompressed-xattrs"),
            (NO_XATTRS, "no-xattrs"),
            (COMPRESSOR_OPTIONS, "compressor-options"),
            (UNCOMPRESSED_IDS, "uncompressed-ids"),
        ];
        ALL.iter()
            .filter(|(b, _)| bits & b != 0)
            .map(|(_, n)| *n)
            .collect()
    }
}

/// The superblock, validated.
#[derive(Debug, Clone, Serialize)]
pub struct Superblock {
    pub inode_count: u32,
    pub mod_time: u32,
    pub block_size: u32,
    pub block_log: u16,
    pub fragment_count: u32,
    pub compressor: Compressor,
    pub flags: u16,
    pub id_count: u16,
    pub root_inode: u64,
    pub bytes_used: u64,
    pub id_table: u64,
    pub xattr_table: u64,
    pub inode_table: u64,
    pub directory_table: u64,
    pub fragment_table: u64,
    pub export_table: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Superblock {
    /// Parse and validate the superblock against the size of the window it was read from.
    pub fn parse(b: &[u8; SUPERBLOCK_LEN], image_len: u64) -> Result<Superblock> {
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(Error::NotAnImage(format!(
                "no SquashFS magic (found {:?})",
                String::from_utf8_lossy(&b[0..4])
            )));
        }
        let (major, minor) = (u16_at(b, 28), u16_at(b, 30));
        if (major, minor) != (4, 0) {
            return Err(Error::Unsupported(format!(
                "SquashFS version {major}.{minor}; only 4.0 is supported"
            )));
        }
        let comp_id = u16_at(b, 20);
        let compressor = Compressor::from_id(comp_id)
            .ok_or_else(|| Error::Unsupported(format!("unknown compressor id {comp_id}")))?;
        let sb = Superblock {
            inode_count: u32_at(b, 4),
            mod_time: u32_at(b, 8),
            block_size: u32_at(b, 12),
            fragment_count: u32_at(b, 16),
            compressor,
            block_log: u16_at(b, 22),
            flags: u16_at(b, 24),
            id_count: u16_at(b, 26),
            root_inode: u64_at(b, 32),
            bytes_used: u64_at(b, 40),
            id_table: u64_at(b, 48),
            xattr_table: u64_at(b, 56),
            inode_table: u64_at(b, 64),
            directory_table: u64_at(b, 72),
            fragment_table: u64_at(b, 80),
            export_table: u64_at(b, 88),
        };
        sb.validate(image_len)?;
        Ok(sb)
    }

    fn validate(&self, image_len: u64) -> Result<()> {
        let bs = self.block_size;
        if !(4096..=1 << 20).contains(&bs) || !bs.is_power_of_two() {
            return Err(Error::corrupt(format!(
                "block size {bs} is not a power of two from 4 KiB to 1 MiB"
            )));
        }
        if 1u32.checked_shl(self.block_log as u32) != Some(bs) {
            return Err(Error::corrupt(format!(
                "block size {bs} and block log {} disagree",
                self.block_log
            )));
        }
        if self.bytes_used > image_len {
            return Err(Error::corrupt(format!(
                "the superblock says the image is {} bytes but only {image_len} are there: truncated image or wrong offset",
                self.bytes_used
            )));
        }
        if self.bytes_used < SUPERBLOCK_LEN as u64 {
            return Err(Error::corrupt(format!(
                "image size {} is smaller than a superblock",
                self.bytes_used
            )));
        }
        if self.inode_count == 0 {
            return Err(Error::corrupt("inode count is 0"));
        }
        if self.id_count == 0 {
            return Err(Error::corrupt("id count is 0"));
        }
        let inside = |name: &str, start: u64| -> Result<()> {
            if start < SUPERBLOCK_LEN as u64 || start >= self.bytes_used {
                return Err(Error::corrupt(format!(
                    "{name} at byte {start} lies outside the image (0..{})",
                    self.bytes_used
                )));
            }
            Ok(())
        };
        inside("inode table", self.inode_table)?;
        inside("directory table", self.directory_table)?;
        inside("id table", self.id_table)?;
        if self.directory_table < self.inode_table {
            return Err(Error::corrupt(
                "directory table starts before the inode table",
            ));
        }
        for (name, start) in [
            ("fragment table", self.fragment_table),
            ("export table", self.export_table),
            ("xattr table", self.xattr_table),
        ] {
            if start != NO_TABLE {
                inside(name, start)?;
            }
        }
        // The root inode reference must point into the inode table.
        let root_block = self.root_inode >> 16;
        if self
            .inode_table
            .checked_add(root_block)
            .is_none_or(|b| b >= self.directory_table)
            || (self.root_inode & 0xffff) >= 8192
        {
            return Err(Error::corrupt(format!(
                "root inode reference {:#x} points outside the inode table",
                self.root_inode
            )));
        }
        Ok(())
    }

    /// True when a flag bit is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Compressor options stored after the superblock (flag COMPRESSOR_OPTIONS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "compressor", rename_all = "lowercase")]
pub enum CompressorOptions {
    Gzip {
        level: u32,
        window_size: u16,
        strategies: u16,
    },
    Xz {
        dictionary_size: u32,
        filters: u32,
    },
    Lz4 {
        version: u32,
        flags: u32,
    },
    Zstd {
        level: u32,
    },
    Lzo {
        algorithm: u32,
        level: u32,
    },
}

impl CompressorOptions {
    /// Parse the options block for `compressor`. Values that would make the data
    /// undecodable (e.g. an lz4 format other than the legacy one) are errors.
    pub fn parse(compressor: Compressor, b: &[u8]) -> Result<CompressorOptions> {
        let need = |n: usize| -> Result<()> {
            if b.len() < n {
                Err(Error::corrupt(format!(
                    "{} compressor options are {} bytes, expected {n}",
                    compressor.name(),
                    b.len()
                )))
            } else {
                Ok(())
            }
        };
        Ok(match compressor {
            Compressor::Gzip => {
                need(8)?;
                let window_size = u16_at(b, 4);
                if !(8..=15).contains(&window_size) {
                    return Err(Error::corrupt(format!(
                        "gzip window size {window_size} is not 8..15"
                    )));
                }
                CompressorOptions::Gzip {
                    level: u32_at(b, 0),
                    window_size,
                    strategies: u16_at(b, 6),
                }
            }
            Compressor::Xz => {
                need(8)?;
                CompressorOptions::Xz {
                    dictionary_size: u32_at(b, 0),
                    filters: u32_at(b, 4),
                }
            }
            Compressor::Lz4 => {
                need(8)?;
                let version = u32_at(b, 0);
                if version != 1 {
                    return Err(Error::Unsupported(format!(
                        "lz4 format version {version}; only the legacy format 1 exists"
                    )));
                }
                CompressorOptions::Lz4 {
                    version,
                    flags: u32_at(b, 4),
                }
            }
            Compressor::Zstd => {
                need(4)?;
                CompressorOptions::Zstd {
                    level: u32_at(b, 0),
                }
            }
            Compressor::Lzo => {
                need(8)?;
                CompressorOptions::Lzo {
                    algorithm: u32_at(b, 0),
                    level: u32_at(b, 4),
                }
            }
            Compressor::Lzma => {
                return Err(Error::corrupt("lzma images carry no compressor options"));
            }
        })
    }
}
