//! A small SquashFS 4.0 writer for crafted images: trees mksquashfs cannot make quickly
//! (a directory of a million entries, files of millions of sparse blocks) or will not make
//! at all (an inode with 60,000 out-of-line xattrs sharing one 64 KiB value). The images
//! are valid: the kernel's driver mounts them, which `craft_selfcheck` in
//! tests/hostile_images.rs checks. Metadata is gzip-compressed where that helps; no data
//! blocks, fragments or compressor options are written.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;

const METADATA_SIZE: usize = 8192;
const NO_TABLE: u64 = u64::MAX;
const NO_INDEX: u32 = u32::MAX;

/// A node of the tree to write.
#[derive(Debug, Clone)]
pub enum Node {
    /// A regular file whose every block is sparse (reads as zeros).
    SparseFile { size: u64 },
    /// A directory.
    Dir(BTreeMap<Vec<u8>, Node>),
}

impl Node {
    pub fn dir(entries: impl IntoIterator<Item = (Vec<u8>, Node)>) -> Node {
        Node::Dir(entries.into_iter().collect())
    }
}

/// Extended attributes of every regular file: `pairs` pairs, named `user.x<i>`, whose
/// values are all one shared value of `value_len` bytes stored once, out of line.
#[derive(Debug, Clone, Copy)]
pub struct XattrBomb {
    pub pairs: u32,
    pub value_len: u32,
}

/// How to write the image.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub block_size: u32,
    pub exports: bool,
    /// Write directory indexes (as mksquashfs does) for listings that span blocks.
    pub dir_index: bool,
    pub xattrs: Option<XattrBomb>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            block_size: 4096,
            exports: true,
            dir_index: true,
            xattrs: None,
        }
    }
}

/// A metadata stream being written: bytes, cut into blocks when the table is finished.
#[derive(Default)]
struct Stream {
    bytes: Vec<u8>,
}

impl Stream {
    /// (index of the 8 KiB block, offset inside it) of the next byte.
    fn pos(&self) -> (usize, usize) {
        (
            self.bytes.len() / METADATA_SIZE,
            self.bytes.len() % METADATA_SIZE,
        )
    }

    /// The blocks as stored, and the on-disk offset of each relative to the first.
    fn finish(&self) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for chunk in self.bytes.chunks(METADATA_SIZE) {
            starts.push(out.len() as u64);
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(chunk).unwrap();
            let packed = z.finish().unwrap();
            if packed.len() < chunk.len() {
                out.extend_from_slice(&(packed.len() as u16).to_le_bytes());
                out.extend_from_slice(&packed);
            } else {
                out.extend_from_slice(&(chunk.len() as u16 | 0x8000).to_le_bytes());
                out.extend_from_slice(chunk);
            }
        }
        // A reference to the end of the stream points at a block that would follow.
        starts.push(out.len() as u64);
        (out, starts)
    }
}

/// A reference (block start relative to the table << 16 | offset) to stream position
/// `(block, offset)`, once the block starts are known.
fn reference(starts: &[u64], (block, offset): (usize, usize)) -> u64 {
    starts[block] << 16 | offset as u64
}

struct Written {
    number: u32,
    /// Position of the inode in the inode stream.
    at: (usize, usize),
    kind: u16,
}

struct Writer {
    opts: Options,
    inodes: Stream,
    dirs: Stream,
    /// Inode stream positions, by inode number, for the export table.
    by_number: Vec<(usize, usize)>,
    next_number: u32,
}

/// Write the image whose root directory holds `root`.
pub fn build(root: Node, opts: Options) -> Vec<u8> {
    let count = count_nodes(&root);
    // Inode and listing references need the on-disk offsets of metadata blocks, known only
    // once a stream is compressed, and the layout of the streams depends on them (runs
    // break where the inode block changes): write until the offsets stop changing.
    let mut starts: Option<(Vec<u64>, Vec<u64>)> = None;
    let mut passes = 0;
    let (w, root_written, inode_bytes, dir_bytes, inode_starts) = loop {
        let mut w = Writer {
            opts,
            inodes: Stream::default(),
            dirs: Stream::default(),
            by_number: vec![(0, 0); count as usize + 1],
            next_number: 1,
        };
        let given = starts.as_ref().map(|(i, d)| (i.as_slice(), d.as_slice()));
        let root_written = w.write(&root, count + 1, given);
        let (inode_bytes, inode_starts) = w.inodes.finish();
        let (dir_bytes, dir_starts) = w.dirs.finish();
        let found = (inode_starts.clone(), dir_starts);
        if starts.as_ref() == Some(&found) {
            break (w, root_written, inode_bytes, dir_bytes, inode_starts);
        }
        passes += 1;
        assert!(passes < 10, "the layout does not settle");
        starts = Some(found);
    };
    let w2 = w;
    let root2 = root_written;

    let mut img = vec![0u8; 96];
    let inode_table = img.len() as u64;
    img.extend_from_slice(&inode_bytes);
    let directory_table = img.len() as u64;
    img.extend_from_slice(&dir_bytes);

    let mut export_table = NO_TABLE;
    if opts.exports {
        let mut s = Stream::default();
        for n in 1..=count {
            let r = reference(&inode_starts, w2.by_number[n as usize]);
            s.bytes.extend_from_slice(&r.to_le_bytes());
        }
        export_table = write_table(&mut img, &s);
    }
    let mut ids = Stream::default();
    ids.bytes.extend_from_slice(&0u32.to_le_bytes());
    let id_table = write_table(&mut img, &ids);

    let mut xattr_table = NO_TABLE;
    if let Some(bomb) = opts.xattrs {
        xattr_table = write_xattrs(&mut img, bomb);
    }
    let bytes_used = img.len() as u64;
    let mut flags: u16 = 0x0010; // no fragments
    if opts.exports {
        flags |= 0x0080;
    }
    if opts.xattrs.is_none() {
        flags |= 0x0200;
    }
    let sb = &mut img[..96];
    sb[0..4].copy_from_slice(b"hsqs");
    sb[4..8].copy_from_slice(&count.to_le_bytes());
    sb[8..12].copy_from_slice(&1_700_000_000u32.to_le_bytes());
    sb[12..16].copy_from_slice(&opts.block_size.to_le_bytes());
    sb[16..20].copy_from_slice(&0u32.to_le_bytes());
    sb[20..22].copy_from_slice(&1u16.to_le_bytes()); // gzip
    sb[22..24].copy_from_slice(&(opts.block_size.trailing_zeros() as u16).to_le_bytes());
    sb[24..26].copy_from_slice(&flags.to_le_bytes());
    sb[26..28].copy_from_slice(&1u16.to_le_bytes());
    sb[28..30].copy_from_slice(&4u16.to_le_bytes());
    sb[30..32].copy_from_slice(&0u16.to_le_bytes());
    sb[32..40].copy_from_slice(&reference(&inode_starts, root2.at).to_le_bytes());
    sb[40..48].copy_from_slice(&bytes_used.to_le_bytes());
    sb[48..56].copy_from_slice(&id_table.to_le_bytes());
    sb[56..64].copy_from_slice(&xattr_table.to_le_bytes());
    sb[64..72].copy_from_slice(&inode_table.to_le_bytes());
    sb[72..80].copy_from_slice(&directory_table.to_le_bytes());
    sb[80..88].copy_from_slice(&NO_TABLE.to_le_bytes());
    sb[88..96].copy_from_slice(&export_table.to_le_bytes());
    // Loop devices and the kernel like whole 4 KiB pages.
    img.resize(img.len().div_ceil(4096) * 4096, 0);
    img
}

/// Inodes of the tree under `n`, `n` included.
fn count_nodes(n: &Node) -> u32 {
    match n {
        Node::SparseFile { .. } => 1,
        Node::Dir(entries) => entries.values().map(count_nodes).sum::<u32>() + 1,
    }
}

/// A lookup table: its metadata blocks, then the index of their offsets. Returns where the
/// index is (what the superblock points at).
fn write_table(img: &mut Vec<u8>, s: &Stream) -> u64 {
    let start = img.len() as u64;
    let (bytes, starts) = s.finish();
    img.extend_from_slice(&bytes);
    let index = img.len() as u64;
    for st in &starts[..starts.len() - 1] {
        img.extend_from_slice(&(start + st).to_le_bytes());
    }
    index
}

fn write_xattrs(img: &mut Vec<u8>, bomb: XattrBomb) -> u64 {
    // The key/value stream: the shared value first, then the pairs that point at it.
    let mut kv = Stream::default();
    kv.bytes.extend_from_slice(&bomb.value_len.to_le_bytes());
    kv.bytes
        .extend(std::iter::repeat_n(b'v', bomb.value_len as usize));
    let pairs_at = kv.pos();
    let mut size = 0u32;
    for i in 0..bomb.pairs {
        let name = format!("x{i}");
        kv.bytes.extend_from_slice(&(0x100u16).to_le_bytes()); // user., out of line
        kv.bytes
            .extend_from_slice(&(name.len() as u16).to_le_bytes());
        kv.bytes.extend_from_slice(name.as_bytes());
        kv.bytes.extend_from_slice(&8u32.to_le_bytes());
        kv.bytes.extend_from_slice(&0u64.to_le_bytes()); // the value, at block 0 offset 0
        size = size.saturating_add(5 + name.len() as u32 + bomb.value_len);
    }
    let kv_start = img.len() as u64;
    let (kv_bytes, kv_starts) = kv.finish();
    img.extend_from_slice(&kv_bytes);
    // One id: every inode with xattrs uses index 0.
    let mut ids = Stream::default();
    ids.bytes
        .extend_from_slice(&reference(&kv_starts, pairs_at).to_le_bytes());
    ids.bytes.extend_from_slice(&bomb.pairs.to_le_bytes());
    ids.bytes
        .extend_from_slice(&size.max(bomb.pairs.saturating_mul(8)).to_le_bytes());
    let ids_start = img.len() as u64;
    let (id_bytes, id_starts) = ids.finish();
    img.extend_from_slice(&id_bytes);
    let header = img.len() as u64;
    img.extend_from_slice(&kv_start.to_le_bytes());
    img.extend_from_slice(&1u32.to_le_bytes());
    img.extend_from_slice(&0u32.to_le_bytes());
    for st in &id_starts[..id_starts.len() - 1] {
        img.extend_from_slice(&(ids_start + st).to_le_bytes());
    }
    header
}

impl Writer {
    /// Write `node` (its children first) with `parent` as its parent's number; returns
    /// where its inode went. `starts` are the block starts of the inode and directory
    /// streams, from the first pass (`None` in it: references are then placeholders).
    fn write(&mut self, node: &Node, parent: u32, starts: Option<(&[u64], &[u64])>) -> Written {
        match node {
            Node::SparseFile { size } => {
                let number = self.take_number();
                self.sparse_file(number, *size)
            }
            Node::Dir(entries) => {
                // Children are numbered before their directory, as mksquashfs does; the
                // directory's own number is reserved after them.
                let first_child = self.next_number;
                let own = first_child + entries.values().map(count_nodes).sum::<u32>();
                let mut children = Vec::new();
                for (name, child) in entries {
                    let written = self.write(child, own, starts);
                    children.push((name.clone(), written));
                }
                assert_eq!(self.next_number, own);
                let number = self.take_number();
                self.directory(number, parent, &children, starts)
            }
        }
    }

    fn take_number(&mut self) -> u32 {
        let n = self.next_number;
        self.next_number += 1;
        n
    }

    fn sparse_file(&mut self, number: u32, size: u64) -> Written {
        let at = self.inodes.pos();
        self.by_number[number as usize] = at;
        let blocks = size.div_ceil(u64::from(self.opts.block_size));
        let b = &mut self.inodes.bytes;
        let extended = size > u64::from(u32::MAX) || self.opts.xattrs.is_some();
        let kind = if extended { 9u16 } else { 2 };
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&0o644u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&1_700_000_000u32.to_le_bytes());
        b.extend_from_slice(&number.to_le_bytes());
        if extended {
            b.extend_from_slice(&96u64.to_le_bytes()); // blocks_start
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes()); // sparse: every byte
            b.extend_from_slice(&1u32.to_le_bytes()); // nlink
            b.extend_from_slice(&NO_INDEX.to_le_bytes()); // no fragment
            b.extend_from_slice(&0u32.to_le_bytes());
            let xattr = if self.opts.xattrs.is_some() {
                0
            } else {
                NO_INDEX
            };
            b.extend_from_slice(&xattr.to_le_bytes());
        } else {
            b.extend_from_slice(&96u32.to_le_bytes());
            b.extend_from_slice(&NO_INDEX.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&(size as u32).to_le_bytes());
        }
        b.resize(b.len() + blocks as usize * 4, 0);
        Written {
            number,
            at,
            kind: 2,
        }
    }

    fn directory(
        &mut self,
        number: u32,
        parent: u32,
        children: &[(Vec<u8>, Written)],
        starts: Option<(&[u64], &[u64])>,
    ) -> Written {
        let (inode_starts, dir_starts) = starts.unwrap_or((&[], &[]));
        let block_of = |at: (usize, usize)| -> u64 { inode_starts.get(at.0).copied().unwrap_or(0) };
        let listing_at = self.dirs.pos();
        let listing_begin = self.dirs.bytes.len();
        // (listing byte offset of a header, its stream block, first name)
        let mut index: Vec<(u32, usize, Vec<u8>)> = Vec::new();
        let mut i = 0;
        while i < children.len() {
            // One run: up to 256 entries in one inode block, within i16 of the base, and
            // (like mksquashfs) not crossing into a new directory block unannounced.
            let (name0, first) = &children[i];
            let header_pos = self.dirs.pos();
            let run_block = block_of(first.at);
            let mut n = 0;
            while i + n < children.len() && n < 256 {
                let (_, c) = &children[i + n];
                if block_of(c.at) != run_block
                    || (i64::from(c.number) - i64::from(first.number)).abs() > 32767
                {
                    break;
                }
                n += 1;
            }
            // Cut the run where it would spill into the next directory block.
            let mut bytes = 12;
            let mut fit = 0;
            for (name, _) in &children[i..i + n] {
                let add = 8 + name.len();
                if fit > 0 && header_pos.1 + bytes + add > METADATA_SIZE {
                    break;
                }
                bytes += add;
                fit += 1;
            }
            let n = fit.max(1);
            if index
                .last()
                .map_or(header_pos.0 != listing_at.0, |(_, b, _)| *b != header_pos.0)
            {
                index.push((
                    (self.dirs.bytes.len() - listing_begin) as u32,
                    header_pos.0,
                    name0.clone(),
                ));
            }
            let d = &mut self.dirs.bytes;
            d.extend_from_slice(&(n as u32 - 1).to_le_bytes());
            d.extend_from_slice(&(run_block as u32).to_le_bytes());
            d.extend_from_slice(&first.number.to_le_bytes());
            for (name, c) in &children[i..i + n] {
                d.extend_from_slice(&(c.at.1 as u16).to_le_bytes());
                d.extend_from_slice(
                    &((c.number as i64 - first.number as i64) as i16).to_le_bytes(),
                );
                d.extend_from_slice(&c.kind.to_le_bytes());
                d.extend_from_slice(&(name.len() as u16 - 1).to_le_bytes());
                d.extend_from_slice(name);
            }
            i += n;
        }
        let listing_size = (self.dirs.bytes.len() - listing_begin) as u32 + 3;
        let at = self.inodes.pos();
        self.by_number[number as usize] = at;
        let start_block = dir_starts.get(listing_at.0).copied().unwrap_or(0) as u32;
        let nlink = 2 + children.iter().filter(|(_, c)| c.kind == 1).count() as u32;
        let use_index = self.opts.dir_index && !index.is_empty();
        let extended = use_index || listing_size > 0xffff;
        let b = &mut self.inodes.bytes;
        b.extend_from_slice(&(if extended { 8u16 } else { 1 }).to_le_bytes());
        b.extend_from_slice(&0o755u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&1_700_000_000u32.to_le_bytes());
        b.extend_from_slice(&number.to_le_bytes());
        if extended {
            let entries: &[(u32, usize, Vec<u8>)] = if use_index { &index } else { &[] };
            b.extend_from_slice(&nlink.to_le_bytes());
            b.extend_from_slice(&listing_size.to_le_bytes());
            b.extend_from_slice(&start_block.to_le_bytes());
            b.extend_from_slice(&parent.to_le_bytes());
            b.extend_from_slice(&(entries.len() as u16).to_le_bytes());
            b.extend_from_slice(&(listing_at.1 as u16).to_le_bytes());
            b.extend_from_slice(&NO_INDEX.to_le_bytes());
            for (offset, block, name) in entries {
                let block_start = dir_starts.get(*block).copied().unwrap_or(0) as u32;
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&block_start.to_le_bytes());
                b.extend_from_slice(&(name.len() as u32 - 1).to_le_bytes());
                b.extend_from_slice(name);
            }
        } else {
            b.extend_from_slice(&start_block.to_le_bytes());
            b.extend_from_slice(&nlink.to_le_bytes());
            b.extend_from_slice(&(listing_size as u16).to_le_bytes());
            b.extend_from_slice(&(listing_at.1 as u16).to_le_bytes());
            b.extend_from_slice(&parent.to_le_bytes());
        }
        Written {
            number,
            at,
            kind: 1,
        }
    }
}
