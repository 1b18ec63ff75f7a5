//! Extended attributes: an id table maps an inode's xattr index to a run of key/value
//! pairs in the xattr metadata area; shared values are stored once, out of line.

use std::sync::OnceLock;

use crate::error::{Error, Result};

use super::inode::Inode;
use super::metadata::{MetaPos, MetadataReader};
use super::superblock::NO_TABLE;
use super::table::LookupTable;
use super::Archive;

/// Largest name a key may carry (the kernel's XATTR_NAME_MAX).
const MAX_XATTR_NAME: usize = 255;
/// Largest value (the kernel's XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 65536;
/// Flag of a key whose value is a reference to a value stored elsewhere.
const OUT_OF_LINE: u16 = 0x100;

/// One attribute, with its namespace prefix in the name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// The xattr id table and where the key/value area starts.
#[derive(Debug)]
pub(crate) struct XattrTable {
    kv_start: u64,
    ids: LookupTable,
}

fn prefix(kind: u16) -> Option<&'static [u8]> {
    match kind {
        0 => Some(b"user."),
        1 => Some(b"trusted."),
        2 => Some(b"security."),
        _ => None,
    }
}

impl Archive {
    fn xattr_table(&self) -> Result<Option<&XattrTable>> {
        if self.sb.xattr_table == NO_TABLE {
            return Ok(None);
        }
        if let Some(t) = self.xattr.get() {
            return Ok(Some(t));
        }
        let mut h = [0u8; 16];
        if self
            .sb
            .xattr_table
            .checked_add(16)
            .is_none_or(|e| e > self.sb.bytes_used)
        {
            return Err(Error::corrupt(
                "xattr table header runs past the end of the image",
            ));
        }
        self.read_at(&mut h, self.sb.xattr_table)?;
        let kv_start = u64::from_le_bytes(h[0..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if kv_start >= self.sb.bytes_used {
            return Err(Error::corrupt("xattr table starts outside the image"));
        }
        let table = XattrTable {
            kv_start,
            ids: LookupTable::new("xattr id table", self.sb.xattr_table + 16, count as u64, 16),
        };
        Ok(Some(self.xattr.get_or_init(|| table)))
    }

    /// Every extended attribute of `inode`, in stored order.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        let Some(index) = inode.xattr_index else {
            return Ok(Vec::new());
        };
        let table = self.xattr_table()?.ok_or_else(|| {
            Error::corrupt(format!(
                "inode {} has xattrs but the image has no xattr table",
                inode.number
            ))
        })?;
        let (xref, count, total) = self.xattr_entry(table, index)?;
        let total = total as usize;
        let mut r = MetadataReader::new(self, self.xattr_pos(table, xref)?);
        // Each pair takes at least 8 bytes, so `total` bounds the count honestly.
        if count as usize > total / 8 + 1 {
            return Err(Error::corrupt(format!(
                "xattr entry {index} claims {count} attributes in {total} bytes"
            )));
        }
        // `count` comes from disk (up to 2^29 passes the check above): grow as pairs are
        // actually read rather than reserving for it.
        let mut out = Vec::with_capacity((count as usize).min(64));
        for _ in 0..count {
            let kind = r.u16()?;
            let name_len = r.u16()? as usize;
            if name_len > MAX_XATTR_NAME {
                return Err(Error::corrupt(format!("xattr name of {name_len} bytes")));
            }
            let name = r.bytes(name_len)?;
            let value_len = r.u32()? as usize;
            let value = if kind & OUT_OF_LINE != 0 {
                if value_len != 8 {
                    return Err(Error::corrupt("out-of-line xattr reference is not 8 bytes"));
                }
                let vref = r.u64()?;
                let mut vr = MetadataReader::new(self, self.xattr_pos(table, vref)?);
                let len = vr.u32()? as usize;
                if len > MAX_XATTR_VALUE {
                    return Err(Error::corrupt(format!("xattr value of {len} bytes")));
                }
                vr.bytes(len)?
            } else {
                if value_len > MAX_XATTR_VALUE {
                    return Err(Error::corrupt(format!("xattr value of {value_len} bytes")));
                }
                r.bytes(value_len)?
            };
            // Unknown namespaces are skipped, as the kernel does.
            if let Some(p) = prefix(kind & 0xff) {
                let mut full = p.to_vec();
                full.extend_from_slice(&name);
                out.push(Xattr { name: full, value });
            }
        }
        Ok(out)
    }

    /// st_blocks as the kernel reports it: the data blocks plus, for an inode with xattrs,
    /// the 512-byte units its xattr set takes (squashfs_read_inode adds them to i_blocks,
    /// with the kernel's unsigned 32-bit arithmetic).
    pub fn stat_blocks(&self, inode: &Inode) -> Result<u64> {
        let data = inode.blocks_512();
        // The kernel ignores an xattr index when the image has no xattr table.
        let (Some(index), Some(table)) = (inode.xattr_index, self.xattr_table()?) else {
            return Ok(data);
        };
        let (_, _, size) = self.xattr_entry(table, index)?;
        Ok(data + u64::from((size.wrapping_sub(1) >> 9) + 1))
    }

    /// Entry `index` of the xattr id table: where the key/value pairs start, how many there
    /// are, and how many bytes they take.
    fn xattr_entry(&self, table: &XattrTable, index: u32) -> Result<(u64, u32, u32)> {
        let mut e = [0u8; 16];
        table.ids.read_entry(self, index as u64, &mut e)?;
        let xref = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(e[12..16].try_into().expect("4 bytes"));
        Ok((xref, count, size))
    }

    fn xattr_pos(&self, table: &XattrTable, xref: u64) -> Result<MetaPos> {
        let block = table
            .kv_start
            .checked_add(xref >> 16)
            .filter(|&b| b < self.sb.bytes_used)
            .ok_or_else(|| Error::corrupt("xattr reference points outside the image"))?;
        Ok(MetaPos {
            block,
            offset: (xref & 0xffff) as usize,
        })
    }
}

/// Lazily loaded xattr table slot on the archive.
pub(crate) type XattrSlot = OnceLock<XattrTable>;
