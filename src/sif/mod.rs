//! SIF (Singularity Image Format) header and descriptors, and the choice of the partition
//! to serve. What is read, and the bounds held, are in docs/FORMAT.md; all integers are
//! little-endian and the structures are packed (the offsets are in [`SifImage::parse`]).
//!
//! The Go reference reader checks only magic and version. This one also checks that the
//! descriptor table and every used object lie inside the file and do not overlap, because
//! the partition's offset and size become the window every later read is confined to.

mod writer;

pub use writer::{ObjectData, SifWriter, WriterObject};

use std::fmt;

use serde::Serialize;

use crate::source::ReadAt;

/// Size of the global header.
pub const HEADER_LEN: u64 = 128;
/// Size of one descriptor.
pub const DESCRIPTOR_LEN: u64 = 585;
/// The magic at byte 32.
pub const MAGIC: &[u8; 10] = b"SIF_MAGIC\0";
/// The only version this parser accepts.
pub const VERSION: &[u8; 3] = b"01\0";
/// Bit set in stored group ids and in link ids naming a group.
pub const GROUP_MASK: u32 = 0xf000_0000;
/// A SquashFS superblock is 96 bytes: a partition smaller than that cannot hold one.
const MIN_SQUASHFS_PARTITION: u64 = 96;
/// More descriptors than this is not a real image (the Go tools default to 48).
const MAX_DESCRIPTORS: i64 = 65_536;

/// Why a SIF could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SifError {
    #[error("not a SIF image (no SIF_MAGIC at byte 32)")]
    BadMagic,
    #[error("unsupported SIF version {0:?}: only version 01 is known")]
    UnsupportedVersion(String),
    #[error("SIF file is too short to hold its {0}")]
    Truncated(&'static str),
    #[error("SIF header is corrupt: {0}")]
    BadHeader(String),
    #[error("SIF descriptor table [{offset}, +{size}) lies outside the file ({file_len} bytes)")]
    DescriptorsOutOfBounds {
        offset: i64,
        size: i64,
        file_len: u64,
    },
    #[error("SIF object {id} ({name:?}) at [{offset}, +{size}) lies outside the file ({file_len} bytes): the image is truncated or corrupt")]
    ObjectOutOfBounds {
        id: u32,
        name: String,
        offset: i64,
        size: i64,
        file_len: u64,
    },
    #[error("SIF objects {a} and {b} overlap: the image is corrupt")]
    Overlap { a: String, b: String },
    #[error("SIF image has no SquashFS partition to mount{0}")]
    NoSquashfsPartition(String),
    #[error("SIF image has no partition with id or name {0:?}; `sifuse inspect` lists them")]
    NoSuchPartition(String),
    #[error("SIF object {id} ({name:?}) is not a SquashFS partition ({what})")]
    NotSquashfs { id: u32, name: String, what: String },
    #[error(
        "SIF partition {id} ({name:?}) is {size} bytes, too small to hold a SquashFS superblock"
    )]
    PartitionTooSmall { id: u32, name: String, size: i64 },
    #[error("cannot read the SIF header: {0}")]
    Read(String),
}

/// Object data types (the `data type` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Deffile,
    EnvVar,
    Labels,
    Partition,
    Signature,
    GenericJson,
    Generic,
    CryptoMessage,
    Sbom,
    OciRootIndex,
    OciBlob,
    Unknown(i32),
}

impl DataType {
    pub fn from_raw(v: i32) -> Self {
        match v {
            0x4001 => DataType::Deffile,
            0x4002 => DataType::EnvVar,
            0x4003 => DataType::Labels,
            0x4004 => DataType::Partition,
            0x4005 => DataType::Signature,
            0x4006 => DataType::GenericJson,
            0x4007 => DataType::Generic,
            0x4008 => DataType::CryptoMessage,
            0x4009 => DataType::Sbom,
            0x400A => DataType::OciRootIndex,
            0x400B => DataType::OciBlob,
            other => DataType::Unknown(other),
        }
    }
    pub fn to_raw(self) -> i32 {
        match self {
            DataType::Deffile => 0x4001,
            DataType::EnvVar => 0x4002,
            DataType::Labels => 0x4003,
            DataType::Partition => 0x4004,
            DataType::Signature => 0x4005,
            DataType::GenericJson => 0x4006,
            DataType::Generic => 0x4007,
            DataType::CryptoMessage => 0x4008,
            DataType::Sbom => 0x4009,
            DataType::OciRootIndex => 0x400A,
            DataType::OciBlob => 0x400B,
            DataType::Unknown(v) => v,
        }
    }
    /// The name the Go tools print.
    pub fn name(self) -> String {
        match self {
            DataType::Deffile => "Def.FILE".into(),
            DataType::EnvVar => "Env.Vars".into(),
            DataType::Labels => "JSON.Labels".into(),
            DataType::Partition => "FS".into(),
            DataType::Signature => "Signature".into(),
            DataType::GenericJson => "JSON.Generic".into(),
            DataType::Generic => "Generic/Raw".into(),
            DataType::CryptoMessage => "Cryptographic Message".into(),
            DataType::Sbom => "SBOM".into(),
            DataType::OciRootIndex => "OCI.RootIndex".into(),
            DataType::OciBlob => "OCI.Blob".into(),
            DataType::Unknown(v) => format!("unknown(0x{v:x})"),
        }
    }
}

/// Partition filesystem types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Squashfs,
    Ext3,
    ImmutableObject,
    Raw,
    EncryptedSquashfs,
    Unknown(i32),
}

impl FsType {
    pub fn from_raw(v: i32) -> Self {
        match v {
            1 => FsType::Squashfs,
            2 => FsType::Ext3,
            3 => FsType::ImmutableObject,
            4 => FsType::Raw,
            5 => FsType::EncryptedSquashfs,
            o => FsType::Unknown(o),
        }
    }
    pub fn to_raw(self) -> i32 {
        match self {
            FsType::Squashfs => 1,
            FsType::Ext3 => 2,
            FsType::ImmutableObject => 3,
            FsType::Raw => 4,
            FsType::EncryptedSquashfs => 5,
            FsType::Unknown(o) => o,
        }
    }
    pub fn name(self) -> String {
        match self {
            FsType::Squashfs => "Squashfs".into(),
            FsType::Ext3 => "Ext3".into(),
            FsType::ImmutableObject => "Data.Archive".into(),
            FsType::Raw => "Raw.Data".into(),
            FsType::EncryptedSquashfs => "Encrypted squashfs".into(),
            FsType::Unknown(o) => format!("unknown({o})"),
        }
    }
}

/// Partition types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartType {
    System,
    PrimarySystem,
    Data,
    Overlay,
    Unknown(i32),
}

impl PartType {
    pub fn from_raw(v: i32) -> Self {
        match v {
            1 => PartType::System,
            2 => PartType::PrimarySystem,
            3 => PartType::Data,
            4 => PartType::Overlay,
            o => PartType::Unknown(o),
        }
    }
    pub fn to_raw(self) -> i32 {
        match self {
            PartType::System => 1,
            PartType::PrimarySystem => 2,
            PartType::Data => 3,
            PartType::Overlay => 4,
            PartType::Unknown(o) => o,
        }
    }
    pub fn name(self) -> String {
        match self {
            PartType::System => "System".into(),
            PartType::PrimarySystem => "*System".into(),
            PartType::Data => "Data".into(),
            PartType::Overlay => "Overlay".into(),
            PartType::Unknown(o) => format!("unknown({o})"),
        }
    }
}

/// Architecture names by SIF code.
const ARCHES: [&str; 14] = [
    "unknown", "386", "amd64", "arm", "arm64", "ppc64", "ppc64le", "mips", "mipsle", "mips64",
    "mips64le", "s390x", "riscv64", "loong64",
];

/// The Go architecture name of a two-digit SIF arch code, as stored (`b"02\0"`).
pub fn arch_name(code: &[u8]) -> String {
    let digits = trim_nul(code);
    match std::str::from_utf8(&digits)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        Some(n) if n < ARCHES.len() => ARCHES[n].to_string(),
        _ => format!("unknown({})", String::from_utf8_lossy(&digits)),
    }
}

/// The SIF code of a Go architecture name (`"amd64"` → `"02"`).
pub fn arch_code(name: &str) -> Option<[u8; 3]> {
    let n = ARCHES.iter().position(|a| *a == name)?;
    let s = format!("{n:02}");
    let b = s.as_bytes();
    Some([b[0], b[1], 0])
}

/// The host's architecture as a Go name.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "loongarch64" => "loong64",
        "mips" => "mips",
        "mips64" => "mips64",
        _ => "unknown",
    }
}

fn trim_nul(b: &[u8]) -> Vec<u8> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b[..end].to_vec()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(&trim_nul(b)).into_owned()
}

fn le_i32(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le_i64(b: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The 128-byte global header.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub launch_script: String,
    pub version: String,
    pub arch: String,
    pub uuid: String,
    pub created: i64,
    pub modified: i64,
    pub descriptors_free: i64,
    pub descriptors_total: i64,
    pub descriptors_offset: i64,
    pub descriptors_size: i64,
    pub data_offset: i64,
    pub data_size: i64,
}

/// Partition details from a descriptor's `extra` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    pub fs_type: FsType,
    pub part_type: PartType,
    pub arch: [u8; 3],
}

/// One used descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    pub data_type: DataType,
    pub id: u32,
    pub group_id: u32,
    pub linked_id: u32,
    pub offset: i64,
    pub size: i64,
    pub size_with_padding: i64,
    pub created: i64,
    pub modified: i64,
    pub name: String,
    pub extra: Vec<u8>,
}

impl Descriptor {
    /// Partition details, for partition objects.
    pub fn partition(&self) -> Option<PartitionInfo> {
        if self.data_type != DataType::Partition || self.extra.len() < 11 {
            return None;
        }
        Some(PartitionInfo {
            fs_type: FsType::from_raw(le_i32(&self.extra, 0)),
            part_type: PartType::from_raw(le_i32(&self.extra, 4)),
            arch: [self.extra[8], self.extra[9], self.extra[10]],
        })
    }

    /// A readable label: `id 3 ("rootfs")`.
    pub fn label(&self) -> String {
        format!("{} ({:?})", self.id, self.name)
    }

    fn end(&self) -> Option<i64> {
        self.offset.checked_add(self.size)
    }
}

/// A parsed SIF: header plus used descriptors, in table order.
#[derive(Debug, Clone)]
pub struct SifImage {
    pub header: Header,
    pub descriptors: Vec<Descriptor>,
    /// Length of the file the SIF was read from.
    pub file_len: u64,
}

/// True when the first bytes of a file carry the SIF magic.
pub fn has_sif_magic(first: &[u8]) -> bool {
    first.len() >= 42 && &first[32..42] == MAGIC
}

impl SifImage {
    /// Read and check the header and the descriptor table.
    pub fn parse(src: &dyn ReadAt) -> Result<SifImage, SifError> {
        let file_len = src.len();
        if file_len < HEADER_LEN {
            if file_len >= 42 {
                let mut b = vec![0u8; file_len as usize];
                src.read_exact_at(&mut b, 0)
                    .map_err(|e| SifError::Read(e.to_string()))?;
                if !has_sif_magic(&b) {
                    return Err(SifError::BadMagic);
                }
            }
            return Err(SifError::Truncated("128-byte header"));
        }
        let mut h = [0u8; HEADER_LEN as usize];
        src.read_exact_at(&mut h, 0)
            .map_err(|e| SifError::Read(e.to_string()))?;
        if !has_sif_magic(&h) {
            return Err(SifError::BadMagic);
        }
        if &h[42..45] != VERSION {
            return Err(SifError::UnsupportedVersion(text(&h[42..45])));
        }
        let uuid = h[48..64]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let header = Header {
            launch_script: text(&h[0..32]),
            version: text(&h[42..45]),
            arch: arch_name(&h[45..48]),
            uuid: format!(
                "{}-{}-{}-{}-{}",
                &uuid[0..8],
                &uuid[8..12],
                &uuid[12..16],
                &uuid[16..20],
                &uuid[20..32]
            ),
            created: le_i64(&h, 64),
            modified: le_i64(&h, 72),
            descriptors_free: le_i64(&h, 80),
            descriptors_total: le_i64(&h, 88),
            descriptors_offset: le_i64(&h, 96),
            descriptors_size: le_i64(&h, 104),
            data_offset: le_i64(&h, 112),
            data_size: le_i64(&h, 120),
        };
        let total = header.descriptors_total;
        if !(0..=MAX_DESCRIPTORS).contains(&total) {
            return Err(SifError::BadHeader(format!(
                "descriptor count {total} is impossible"
            )));
        }
        if header.descriptors_free < 0 || header.descriptors_free > total {
            return Err(SifError::BadHeader(format!(
                "{} free descriptors out of {total}",
                header.descriptors_free
            )));
        }
        let table_len = total as u64 * DESCRIPTOR_LEN;
        let off = header.descriptors_offset;
        let table_end = u64::try_from(off)
            .ok()
            .and_then(|o| o.checked_add(table_len));
        match table_end {
            Some(end) if off >= HEADER_LEN as i64 && end <= file_len => {}
            _ => {
                return Err(SifError::DescriptorsOutOfBounds {
                    offset: off,
                    size: table_len as i64,
                    file_len,
                })
            }
        }
        if header.descriptors_size < table_len as i64 {
            return Err(SifError::BadHeader(format!(
                "descriptor area of {} bytes cannot hold {total} descriptors",
                header.descriptors_size
            )));
        }
        let mut table = vec![0u8; table_len as usize];
        src.read_exact_at(&mut table, off as u64)
            .map_err(|e| SifError::Read(e.to_string()))?;
        let mut descriptors = Vec::new();
        for raw in table.chunks_exact(DESCRIPTOR_LEN as usize) {
            if raw[4] == 0 {
                continue; // unused slot
            }
            descriptors.push(Descriptor {
                data_type: DataType::from_raw(le_i32(raw, 0)),
                id: le_u32(raw, 5),
                group_id: le_u32(raw, 9) & !GROUP_MASK,
                linked_id: le_u32(raw, 13),
                offset: le_i64(raw, 17),
                size: le_i64(raw, 25),
                size_with_padding: le_i64(raw, 33),
                created: le_i64(raw, 41),
                modified: le_i64(raw, 49),
                name: text(&raw[73..201]),
                extra: raw[201..585].to_vec(),
            });
        }
        Ok(SifImage {
            header,
            descriptors,
            file_len,
        })
    }

    /// Every used object inside the file, and no two objects (nor an object and the
    /// header or descriptor table) overlapping.
    pub fn check_layout(&self) -> Result<(), SifError> {
        let table_end =
            self.header.descriptors_offset + self.header.descriptors_total * DESCRIPTOR_LEN as i64;
        let mut spans: Vec<(i64, i64, String)> =
            vec![(0, table_end, "the header and descriptor table".into())];
        for d in &self.descriptors {
            let inside =
                d.offset >= 0 && d.size >= 0 && d.end().is_some_and(|e| e as u64 <= self.file_len);
            if !inside {
                return Err(SifError::ObjectOutOfBounds {
                    id: d.id,
                    name: d.name.clone(),
                    offset: d.offset,
                    size: d.size,
                    file_len: self.file_len,
                });
            }
            if d.size > 0 {
                spans.push((d.offset, d.offset + d.size, format!("object {}", d.label())));
            }
        }
        spans.sort_by_key(|s| s.0);
        for pair in spans.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err(SifError::Overlap {
                    a: pair[0].2.clone(),
                    b: pair[1].2.clone(),
                });
            }
        }
        Ok(())
    }

    /// The SquashFS partition to serve: the one whose id or name is `selector`, or else
    /// the primary system partition (or the only SquashFS partition when none is marked
    /// primary). The layout is checked first, so the result lies inside the file.
    pub fn select_partition(&self, selector: Option<&str>) -> Result<&Descriptor, SifError> {
        self.check_layout()?;
        let chosen = match selector {
            Some(sel) => {
                let by_id = sel.parse::<u32>().ok();
                self.descriptors
                    .iter()
                    .find(|d| Some(d.id) == by_id)
                    .or_else(|| self.descriptors.iter().find(|d| d.name == sel))
                    .ok_or_else(|| SifError::NoSuchPartition(sel.to_string()))?
            }
            None => {
                let squash: Vec<&Descriptor> = self
                    .descriptors
                    .iter()
                    .filter(|d| d.partition().is_some_and(|p| p.fs_type == FsType::Squashfs))
                    .collect();
                let primary = squash.iter().copied().find(|d| {
                    d.partition()
                        .is_some_and(|p| p.part_type == PartType::PrimarySystem)
                });
                match (primary, squash.as_slice()) {
                    (Some(d), _) => d,
                    (None, [only]) => *only,
                    (None, []) => {
                        let has_encrypted = self.descriptors.iter().any(|d| {
                            d.partition()
                                .is_some_and(|p| p.fs_type == FsType::EncryptedSquashfs)
                        });
                        let why = if has_encrypted {
                            " (its root filesystem is encrypted, which sifuse does not decrypt)"
                        } else {
                            ""
                        };
                        return Err(SifError::NoSquashfsPartition(why.to_string()));
                    }
                    (None, _) => {
                        return Err(SifError::NoSquashfsPartition(
                            " marked primary; choose one with --partition ID|NAME".into(),
                        ))
                    }
                }
            }
        };
        match chosen.partition() {
            Some(p) if p.fs_type == FsType::Squashfs => {}
            Some(p) => {
                return Err(SifError::NotSquashfs {
                    id: chosen.id,
                    name: chosen.name.clone(),
                    what: format!("its filesystem is {}", p.fs_type.name()),
                })
            }
            None => {
                return Err(SifError::NotSquashfs {
                    id: chosen.id,
                    name: chosen.name.clone(),
                    what: format!("it is a {} object", chosen.data_type.name()),
                })
            }
        }
        if (chosen.size as u64) < MIN_SQUASHFS_PARTITION {
            return Err(SifError::PartitionTooSmall {
                id: chosen.id,
                name: chosen.name.clone(),
                size: chosen.size,
            });
        }
        Ok(chosen)
    }
}

impl fmt::Display for Descriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.label())
    }
}

#[cfg(test)]
mod tests;
