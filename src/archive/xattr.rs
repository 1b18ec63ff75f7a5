//! Extended attributes: an id table maps an inode's xattr index to a run of key/value
//! pairs in the xattr metadata area; shared values are stored once, out of line.
//!
//! Pairs are scanned, never collected: a lookup reads names until one matches and then
//! reads that one value, a listing reads names only. The image says how many pairs an
//! inode has (up to 2^29) and an out-of-line value may be shared by all of them, so every
//! request is bounded: it reads at most [`MAX_XATTR_SCAN`] bytes of pairs, a listing is at
//! most [`MAX_XATTR_LIST`] bytes (what the kernel could ever pass on), and a value at most
//! [`MAX_XATTR_VALUE`].

use std::sync::OnceLock;

use crate::error::{Error, Result};

use super::inode::Inode;
use super::metadata::{Fields, MetaPos, MetadataReader};
use super::superblock::NO_TABLE;
use super::table::LookupTable;
use super::Archive;

/// Largest name a key may carry (the kernel's XATTR_NAME_MAX).
const MAX_XATTR_NAME: usize = 255;
/// Largest value (the kernel's XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 65536;
/// Largest list of names (the kernel's XATTR_LIST_MAX).
pub const MAX_XATTR_LIST: usize = 65536;
/// Most bytes of an inode's pairs (headers, names, in-line values) one request reads.
pub const MAX_XATTR_SCAN: u64 = 8 << 20;
/// Most bytes of values [`Archive::xattrs`] returns for one inode (the command-line tools
/// copy whole sets; a mount never asks for one).
pub const MAX_XATTR_SET: usize = 16 << 20;
/// Flag of a key whose value is a reference to a value stored elsewhere.
const OUT_OF_LINE: u16 = 0x100;
/// Longest prefix ("security.").
const MAX_PREFIX: usize = 9;

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

/// Where a pair's value is.
#[derive(Debug, Clone, Copy)]
enum ValueAt {
    /// Right after the pair's header, this many bytes.
    InLine(u32),
    /// Out of line, at this reference in the key/value area.
    Elsewhere(u64),
}

/// Reads one inode's pairs in order.
struct XattrScan<'a> {
    archive: &'a Archive,
    table: &'a XattrTable,
    reader: MetadataReader<'a>,
    left: u32,
    /// In-line value bytes of the last pair not read, skipped before the next.
    unread: u64,
    scanned: u64,
    inode: u32,
    /// The last pair's full name (prefix included) and its length; 0 for a namespace the
    /// kernel does not know, which is skipped as the kernel skips it.
    name: [u8; MAX_PREFIX + MAX_XATTR_NAME],
    name_len: usize,
}

impl<'a> XattrScan<'a> {
    fn count(&mut self, n: u64) -> Result<()> {
        self.scanned += n;
        if self.scanned > MAX_XATTR_SCAN {
            return Err(Error::XattrsTooLarge(format!(
                "the extended attributes of inode {} take more than {MAX_XATTR_SCAN} bytes",
                self.inode
            )));
        }
        Ok(())
    }

    /// The next pair: its full name (empty for an unknown namespace) and where its value
    /// is; `None` after the last.
    fn next(&mut self) -> Result<Option<(&[u8], ValueAt)>> {
        if self.unread > 0 {
            self.reader.skip(std::mem::take(&mut self.unread))?;
        }
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let h: [u8; 4] = self.reader.array()?;
        let h = Fields(&h);
        let (kind, name_len) = (h.u16(0), h.u16(2) as usize);
        if name_len > MAX_XATTR_NAME {
            return Err(Error::corrupt(format!("xattr name of {name_len} bytes")));
        }
        self.count(8 + name_len as u64)?;
        let full = match prefix(kind & 0xff) {
            Some(p) => {
                self.name[..p.len()].copy_from_slice(p);
                self.reader
                    .read(&mut self.name[p.len()..p.len() + name_len])?;
                p.len() + name_len
            }
            None => {
                self.reader.skip(name_len as u64)?;
                0
            }
        };
        self.name_len = full;
        let value_len = self.reader.u32()?;
        let at = if kind & OUT_OF_LINE != 0 {
            if value_len != 8 {
                return Err(Error::corrupt("out-of-line xattr reference is not 8 bytes"));
            }
            self.count(8)?;
            ValueAt::Elsewhere(self.reader.u64()?)
        } else {
            if value_len as usize > MAX_XATTR_VALUE {
                return Err(Error::corrupt(format!("xattr value of {value_len} bytes")));
            }
            self.count(u64::from(value_len))?;
            self.unread = u64::from(value_len);
            ValueAt::InLine(value_len)
        };
        Ok(Some((&self.name[..full], at)))
    }

    /// The value of the pair `next` returned last.
    fn value(&mut self, at: ValueAt) -> Result<Vec<u8>> {
        match at {
            ValueAt::InLine(len) => {
                self.unread = 0;
                self.reader.bytes(len as usize)
            }
            ValueAt::Elsewhere(vref) => {
                let mut vr =
                    MetadataReader::new(self.archive, self.archive.xattr_pos(self.table, vref)?);
                let len = vr.u32()? as usize;
                if len > MAX_XATTR_VALUE {
                    return Err(Error::corrupt(format!("xattr value of {len} bytes")));
                }
                vr.bytes(len)
            }
        }
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

    /// A scan of `inode`'s pairs, or `None` when it has none.
    fn xattr_scan(&self, inode: &Inode) -> Result<Option<XattrScan<'_>>> {
        let Some(index) = inode.xattr_index else {
            return Ok(None);
        };
        let table = self.xattr_table()?.ok_or_else(|| {
            Error::corrupt(format!(
                "inode {} has xattrs but the image has no xattr table",
                inode.number
            ))
        })?;
        let (xref, count, total) = self.xattr_entry(table, index)?;
        // Each pair takes at least 8 bytes, so `total` bounds the count honestly.
        if count as usize > total as usize / 8 + 1 {
            return Err(Error::corrupt(format!(
                "xattr entry {index} claims {count} attributes in {total} bytes"
            )));
        }
        Ok(Some(XattrScan {
            archive: self,
            table,
            reader: MetadataReader::new(self, self.xattr_pos(table, xref)?),
            left: count,
            unread: 0,
            scanned: 0,
            inode: inode.number,
            name: [0; MAX_PREFIX + MAX_XATTR_NAME],
            name_len: 0,
        }))
    }

    /// The value of `inode`'s attribute `name` (prefix included), if it has one.
    pub fn xattr_value(&self, inode: &Inode, name: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(mut scan) = self.xattr_scan(inode)? else {
            return Ok(None);
        };
        while let Some((found, at)) = scan.next()? {
            if !found.is_empty() && found == name {
                return scan.value(at).map(Some);
            }
        }
        Ok(None)
    }

    /// The names of `inode`'s attributes that `keep` accepts, each followed by a NUL, in
    /// stored order: what listxattr answers. A list longer than the kernel could pass on
    /// is refused ([`Error::XattrsTooLarge`]).
    pub fn xattr_names(&self, inode: &Inode, keep: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let Some(mut scan) = self.xattr_scan(inode)? else {
            return Ok(out);
        };
        while let Some((name, _)) = scan.next()? {
            if name.is_empty() || !keep(name) {
                continue;
            }
            if out.len() + name.len() + 1 > MAX_XATTR_LIST {
                return Err(Error::XattrsTooLarge(format!(
                    "the attribute names of inode {} exceed {MAX_XATTR_LIST} bytes",
                    inode.number
                )));
            }
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    /// Every extended attribute of `inode`, in stored order, with its value: for tools that
    /// copy whole sets. At most [`MAX_XATTR_SET`] bytes of values.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        let mut out = Vec::new();
        let Some(mut scan) = self.xattr_scan(inode)? else {
            return Ok(out);
        };
        let mut held = 0usize;
        while let Some((name, at)) = scan.next()? {
            if name.is_empty() {
                continue;
            }
            let name = name.to_vec();
            let value = scan.value(at)?;
            held += name.len() + value.len();
            if held > MAX_XATTR_SET {
                return Err(Error::XattrsTooLarge(format!(
                    "the extended attributes of inode {} exceed {MAX_XATTR_SET} bytes",
                    inode.number
                )));
            }
            out.push(Xattr { name, value });
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
