//! Per-compressor decompression. Contexts that are costly to set up (zlib, zstd) are kept
//! per thread and reused; every decompression is bounded by the size the caller expects,
//! so a hostile block cannot make output grow past one data or metadata block.

use std::cell::RefCell;

use serde::Serialize;

/// Compressor ids of SquashFS 4.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compressor {
    Gzip,
    Lzma,
    Lzo,
    Xz,
    Lz4,
    Zstd,
}

impl Compressor {
    /// The compressor with SquashFS id `id`.
    pub fn from_id(id: u16) -> Option<Self> {
        Some(match id {
            1 => Compressor::Gzip,
            2 => Compressor::Lzma,
            3 => Compressor::Lzo,
            4 => Compressor::Xz,
            5 => Compressor::Lz4,
            6 => Compressor::Zstd,
            _ => return None,
        })
    }

    /// The name mksquashfs uses (`-comp NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Compressor::Gzip => "gzip",
            Compressor::Lzma => "lzma",
            Compressor::Lzo => "lzo",
            Compressor::Xz => "xz",
            Compressor::Lz4 => "lz4",
            Compressor::Zstd => "zstd",
        }
    }

    /// Decompress `input` into `out` (cleared first). `max_out` bounds the output; producing
    /// more is an error. Returns the error text on failure.
    pub fn decompress(self, input: &[u8], out: &mut Vec<u8>, max_out: usize) -> Result<(), String> {
        out.clear();
        match self {
            Compressor::Gzip => gzip(input, out, max_out),
            Compressor::Zstd => zstd_block(input, out, max_out),
            Compressor::Xz => lzma_family(input, out, max_out, false),
            Compressor::Lzma => lzma_family(input, out, max_out, true),
            Compressor::Lz4 => {
                out.resize(max_out, 0);
                let n = lz4_flex::block::decompress_into(input, out).map_err(|e| e.to_string())?;
                out.truncate(n);
                Ok(())
            }
            Compressor::Lzo => {
                // lzokay-native has no output bound of its own; LZO's worst-case expansion
                // from one (at most 1 MiB) block is bounded, and the result is checked here.
                let v = lzokay_native::decompress_all(input, Some(max_out))
                    .map_err(|e| format!("{e:?}"))?;
                if v.len() > max_out {
                    return Err(format!(
                        "output of {} bytes exceeds the block size {max_out}",
                        v.len()
                    ));
                }
                *out = v;
                Ok(())
            }
        }
    }
}

thread_local! {
    static ZLIB: RefCell<flate2::Decompress> = RefCell::new(flate2::Decompress::new(true));
    static ZSTD: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn gzip(input: &[u8], out: &mut Vec<u8>, max_out: usize) -> Result<(), String> {
    ZLIB.with(|cell| {
        let mut z = cell.borrow_mut();
        z.reset(true);
        out.resize(max_out, 0);
        let status = z
            .decompress(input, out, flate2::FlushDecompress::Finish)
            .map_err(|e| e.to_string())?;
        let produced = z.total_out() as usize;
        out.truncate(produced);
        match status {
            flate2::Status::StreamEnd => Ok(()),
            _ if produced >= max_out => Err(format!("output exceeds the block size {max_out}")),
            _ => Err("truncated zlib stream".into()),
        }
    })
}

fn zstd_block(input: &[u8], out: &mut Vec<u8>, max_out: usize) -> Result<(), String> {
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let d = slot.as_mut().expect("initialised above");
        out.resize(max_out, 0);
        let n = d
            .decompress_to_buffer(input, out.as_mut_slice())
            .map_err(|e| e.to_string())?;
        out.truncate(n);
        Ok(())
    })
}

/// Memory limit for an xz/lzma decoder: the largest dictionary mksquashfs uses is the
/// block size (1 MiB); allow generous headroom, but not gigabytes from a hostile header.
const LZMA_MEMLIMIT: u64 = 64 << 20;

fn lzma_family(
    input: &[u8],
    out: &mut Vec<u8>,
    max_out: usize,
    legacy: bool,
) -> Result<(), String> {
    use liblzma::stream::{Action, Status, Stream};
    let mut s = if legacy {
        Stream::new_lzma_decoder(LZMA_MEMLIMIT)
    } else {
        Stream::new_stream_decoder(LZMA_MEMLIMIT, 0)
    }
    .map_err(|e| e.to_string())?;
    out.resize(max_out, 0);
    let mut consumed = 0usize;
    let mut produced = 0usize;
    loop {
        let (in_before, out_before) = (s.total_in(), s.total_out());
        let status = s
            .process(&input[consumed..], &mut out[produced..], Action::Finish)
            .map_err(|e| e.to_string())?;
        consumed += (s.total_in() - in_before) as usize;
        produced += (s.total_out() - out_before) as usize;
        match status {
            Status::StreamEnd => break,
            _ if produced >= max_out => {
                out.truncate(produced);
                return Err(format!("output exceeds the block size {max_out}"));
            }
            _ if s.total_in() == in_before && s.total_out() == out_before => {
                return Err("truncated stream".into());
            }
            _ => {}
        }
    }
    out.truncate(produced);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> Vec<u8> {
        (0..20_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn gzip_roundtrip_and_bound() {
        let data = sample();
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let c = e.finish().unwrap();
        let mut out = Vec::new();
        Compressor::Gzip
            .decompress(&c, &mut out, data.len())
            .unwrap();
        assert_eq!(out, data);
        // Twice on the same thread: the context is reused.
        Compressor::Gzip
            .decompress(&c, &mut out, data.len())
            .unwrap();
        assert_eq!(out, data);
        assert!(Compressor::Gzip
            .decompress(&c, &mut out, data.len() - 1)
            .is_err());
        assert!(Compressor::Gzip
            .decompress(&c[..c.len() / 2], &mut out, data.len())
            .is_err());
    }

    #[test]
    fn zstd_roundtrip_and_bound() {
        let data = sample();
        let c = zstd::bulk::compress(&data, 3).unwrap();
        let mut out = Vec::new();
        Compressor::Zstd
            .decompress(&c, &mut out, data.len())
            .unwrap();
        assert_eq!(out, data);
        assert!(Compressor::Zstd.decompress(&c, &mut out, 100).is_err());
    }

    #[test]
    fn xz_roundtrip_and_bound() {
        let data = sample();
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(&data).unwrap();
        let c = e.finish().unwrap();
        let mut out = Vec::new();
        Compressor::Xz.decompress(&c, &mut out, data.len()).unwrap();
        assert_eq!(out, data);
        assert!(Compressor::Xz.decompress(&c, &mut out, 1000).is_err());
        assert!(Compressor::Xz
            .decompress(b"garbage", &mut out, 1000)
            .is_err());
    }

    #[test]
    fn lz4_roundtrip_and_bound() {
        let data = sample();
        let c = lz4_flex::block::compress(&data);
        let mut out = Vec::new();
        Compressor::Lz4
            .decompress(&c, &mut out, data.len())
            .unwrap();
        assert_eq!(out, data);
        assert!(Compressor::Lz4.decompress(&c, &mut out, 10).is_err());
    }

    #[test]
    fn lzo_rejects_garbage() {
        let mut out = Vec::new();
        assert!(Compressor::Lzo
            .decompress(&[0xff, 0x00, 0x01], &mut out, 4096)
            .is_err());
    }

    #[test]
    fn ids() {
        for id in 1..=6 {
            assert!(Compressor::from_id(id).is_some());
        }
        assert!(Compressor::from_id(0).is_none());
        assert!(Compressor::from_id(7).is_none());
    }
}
