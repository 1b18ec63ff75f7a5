//! A small SIF writer: enough to wrap SquashFS images for tests, fixtures and the demo
//! image. It writes what the Go reference (`siftool new` + `add`) writes: a 128-byte
//! header, a fixed-size descriptor table, and 4096-aligned objects.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;

use super::{
    arch_code, DataType, PartitionInfo, DESCRIPTOR_LEN, GROUP_MASK, HEADER_LEN, MAGIC, VERSION,
};

const ALIGN: u64 = 4096;

/// Where an object's bytes come from.
#[derive(Debug, Clone)]
pub enum ObjectData {
    Bytes(Vec<u8>),
    File(PathBuf),
}

/// One object to store.
#[derive(Debug, Clone)]
pub struct WriterObject {
    pub data_type: DataType,
    pub name: String,
    pub data: ObjectData,
    pub partition: Option<PartitionInfo>,
    /// Group id (without the 0xf0000000 mark); 0 for none.
    pub group: u32,
    /// Linked object or group id as stored.
    pub link: u32,
}

impl WriterObject {
    /// A partition object holding the bytes of a file.
    pub fn partition(name: &str, path: PathBuf, info: PartitionInfo) -> Self {
        WriterObject {
            data_type: DataType::Partition,
            name: name.into(),
            data: ObjectData::File(path),
            partition: Some(info),
            group: 1,
            link: 0,
        }
    }

    /// A non-partition object holding bytes.
    pub fn bytes(data_type: DataType, name: &str, data: Vec<u8>) -> Self {
        WriterObject {
            data_type,
            name: name.into(),
            data: ObjectData::Bytes(data),
            partition: None,
            group: 1,
            link: 0,
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(match &self.data {
            ObjectData::Bytes(b) => b.len() as u64,
            ObjectData::File(p) => std::fs::metadata(p)?.len(),
        })
    }
}

/// Builds a SIF file.
#[derive(Debug, Clone)]
pub struct SifWriter {
    pub objects: Vec<WriterObject>,
    /// Go architecture name for the header ("amd64").
    pub arch: String,
    /// Descriptor slots; at least the number of objects (the Go tools default to 48).
    pub descriptor_slots: usize,
    /// Fixed times make output reproducible.
    pub time: i64,
    pub uuid: [u8; 16],
}

impl Default for SifWriter {
    fn default() -> Self {
        SifWriter {
            objects: Vec::new(),
            arch: super::host_arch().into(),
            descriptor_slots: 48,
            time: 1_700_000_000,
            uuid: *b"sifuse-test-uuid",
        }
    }
}

impl SifWriter {
    /// Write the SIF to `path`.
    pub fn write_file(&self, path: &std::path::Path) -> io::Result<()> {
        let mut f = File::create(path)?;
        self.write(&mut f)?;
        f.sync_all()
    }

    /// Write the SIF to `out`.
    pub fn write<W: Write + Seek>(&self, out: &mut W) -> io::Result<()> {
        let slots = self.descriptor_slots.max(self.objects.len());
        let table_len = slots as u64 * DESCRIPTOR_LEN;
        let data_start = align(HEADER_LEN + table_len);
        let mut offsets = Vec::new();
        let mut pos = data_start;
        for o in &self.objects {
            offsets.push(pos);
            pos = align(pos + o.len()?);
        }
        let data_end = offsets
            .last()
            .zip(self.objects.last())
            .map(|(off, o)| o.len().map(|l| off + l))
            .transpose()?
            .unwrap_or(data_start);

        let mut h = vec![0u8; HEADER_LEN as usize];
        let launch = b"#!/usr/bin/env run-singularity\n";
        h[..launch.len()].copy_from_slice(launch);
        h[32..42].copy_from_slice(MAGIC);
        h[42..45].copy_from_slice(VERSION);
        h[45..48].copy_from_slice(&arch_code(&self.arch).unwrap_or(*b"00\0"));
        h[48..64].copy_from_slice(&self.uuid);
        put_i64(&mut h, 64, self.time);
        put_i64(&mut h, 72, self.time);
        put_i64(&mut h, 80, (slots - self.objects.len()) as i64);
        put_i64(&mut h, 88, slots as i64);
        put_i64(&mut h, 96, HEADER_LEN as i64);
        put_i64(&mut h, 104, table_len as i64);
        put_i64(&mut h, 112, data_start as i64);
        put_i64(&mut h, 120, (data_end - data_start) as i64);
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&h)?;

        for (i, o) in self.objects.iter().enumerate() {
            let mut d = vec![0u8; DESCRIPTOR_LEN as usize];
            let len = o.len()?;
            put_i32(&mut d, 0, o.data_type.to_raw());
            d[4] = 1;
            put_u32(&mut d, 5, i as u32 + 1);
            put_u32(
                &mut d,
                9,
                if o.group == 0 {
                    0
                } else {
                    o.group | GROUP_MASK
                },
            );
            put_u32(&mut d, 13, o.link);
            put_i64(&mut d, 17, offsets[i] as i64);
            put_i64(&mut d, 25, len as i64);
            let padded = if i + 1 < offsets.len() {
                offsets[i + 1]
            } else {
                offsets[i] + len
            };
            put_i64(&mut d, 33, (padded - offsets[i]) as i64);
            put_i64(&mut d, 41, self.time);
            put_i64(&mut d, 49, self.time);
            let name = o.name.as_bytes();
            let n = name.len().min(127);
            d[73..73 + n].copy_from_slice(&name[..n]);
            if let Some(p) = o.partition {
                put_i32(&mut d, 201, p.fs_type.to_raw());
                put_i32(&mut d, 205, p.part_type.to_raw());
                d[209..212].copy_from_slice(&p.arch);
            }
            out.write_all(&d)?;
        }
        // Unused slots stay zero.
        let unused = (slots - self.objects.len()) as u64 * DESCRIPTOR_LEN;
        out.write_all(&vec![0u8; unused as usize])?;

        for (i, o) in self.objects.iter().enumerate() {
            out.seek(SeekFrom::Start(offsets[i]))?;
            match &o.data {
                ObjectData::Bytes(b) => out.write_all(b)?,
                ObjectData::File(p) => {
                    io::copy(&mut File::open(p)?, out)?;
                }
            }
        }
        Ok(())
    }
}

fn align(v: u64) -> u64 {
    v.div_ceil(ALIGN) * ALIGN
}
fn put_i32(b: &mut [u8], at: usize, v: i32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_i64(b: &mut [u8], at: usize, v: i64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
