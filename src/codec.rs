//! Per-compressor decompression. Contexts that are costly to set up (zlib, zstd) are kept
//! per thread and reused; every decompression is bounded by the size the caller expects,
//! so a hostile block cannot make output grow past one data or metadata block.
//!
//! LZO is decoded here rather than by a crate: lzokay-native grows its output without
//! bound (a 1 MiB block of zero-run lengths asks for ~255 MiB) and indexes and subtracts
//! unchecked on a hostile stream (panics); [`lzo1x`] checks every length and distance.

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
    /// Every compressor this build decodes, by SquashFS id (all six are always built in).
    pub const ALL: [Compressor; 6] = [
        Compressor::Gzip,
        Compressor::Lzma,
        Compressor::Lzo,
        Compressor::Xz,
        Compressor::Lz4,
        Compressor::Zstd,
    ];

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
            Compressor::Lzo => lzo1x(input, out, max_out),
        }
    }
}

/// The input side of the LZO decoder: bytes consumed in order, every read checked.
struct LzoInput<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> LzoInput<'a> {
    fn byte(&mut self) -> Result<usize, String> {
        let b = *self.bytes.get(self.at).ok_or("truncated lzo stream")?;
        self.at += 1;
        Ok(b as usize)
    }
    fn le16(&mut self) -> Result<usize, String> {
        Ok(self.byte()? | self.byte()? << 8)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let s = &self.bytes[self.at..end.ok_or("truncated lzo stream")?];
        self.at += n;
        Ok(s)
    }
    /// A run-length extension: 255 for each zero byte, plus the first non-zero byte.
    fn zero_run(&mut self) -> Result<usize, String> {
        let mut n = 0usize;
        loop {
            match self.byte()? {
                0 => n += 255,
                b => return Ok(n + b),
            }
        }
    }
}

/// LZO1X decompression as the kernel's lzo1x_decompress_safe (what squashfs uses) does
/// it: the stream must end with the end marker exactly at the end of the input, and every
/// literal run and match must fit in `max_out` and point inside the output so far.
fn lzo1x(input: &[u8], out: &mut Vec<u8>, max_out: usize) -> Result<(), String> {
    fn room(out: &[u8], n: usize, max_out: usize) -> Result<(), String> {
        if n > max_out - out.len() {
            return Err(format!("output exceeds the block size {max_out}"));
        }
        Ok(())
    }
    let mut ip = LzoInput {
        bytes: input,
        at: 0,
    };
    // Literals copied by the previous instruction: 0..=3, or 4 for "4 or more". It selects
    // the meaning of instructions 0..=15.
    let mut state = 0usize;
    if input.first().is_some_and(|&b| b > 17) {
        let n = ip.byte()? - 17;
        room(out, n, max_out)?;
        out.extend_from_slice(ip.take(n)?);
        state = n.min(4);
    }
    loop {
        let t = ip.byte()?;
        let (distance, len, next) = if t >= 64 {
            // M2: 3..=8 bytes from up to 2 KiB back.
            let h = ip.byte()?;
            (1 + ((t >> 2) & 7) + (h << 3), (t >> 5) + 1, t & 3)
        } else if t >= 32 {
            // M3: up to 16 KiB back.
            let len = match t & 31 {
                0 => 31 + ip.zero_run()?,
                l => l,
            } + 2;
            let d = ip.le16()?;
            (1 + (d >> 2), len, d & 3)
        } else if t >= 16 {
            // M4: 16..48 KiB back; distance 0 is the end marker.
            let len = match t & 7 {
                0 => 7 + ip.zero_run()?,
                l => l,
            } + 2;
            let d = ip.le16()?;
            let far = ((t & 8) << 11) + (d >> 2);
            if far == 0 {
                if len != 3 {
                    return Err("corrupt lzo end marker".into());
                }
                if ip.at != input.len() {
                    return Err(format!(
                        "{} bytes after the end of the lzo stream",
                        input.len() - ip.at
                    ));
                }
                return Ok(());
            }
            (far + 0x4000, len, d & 3)
        } else if state == 0 {
            // A literal run of 4 or more bytes.
            let n = match t {
                0 => 15 + ip.zero_run()?,
                l => l,
            } + 3;
            room(out, n, max_out)?;
            out.extend_from_slice(ip.take(n)?);
            state = 4;
            continue;
        } else if state < 4 {
            // M1: 2 bytes from up to 1 KiB back.
            let h = ip.byte()?;
            (1 + (t >> 2) + (h << 2), 2, t & 3)
        } else {
            // M1 after a long literal run: 3 bytes from 2..3 KiB back.
            let h = ip.byte()?;
            (1 + 0x800 + (t >> 2) + (h << 2), 3, t & 3)
        };
        if distance > out.len() {
            return Err(format!(
                "lzo match reaches {distance} bytes back with only {} decoded",
                out.len()
            ));
        }
        room(out, len, max_out)?;
        let from = out.len() - distance;
        if distance >= len {
            out.extend_from_within(from..from + len);
        } else {
            // Overlapping: each byte may be one this copy just wrote.
            for k in from..from + len {
                out.push(out[k]);
            }
        }
        room(out, next, max_out)?;
        out.extend_from_slice(ip.take(next)?);
        state = next;
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
        // Decompress into spare capacity: no zero-filling of a block about to be written.
        out.reserve_exact(max_out);
        let status = z
            .decompress_vec(input, out, flate2::FlushDecompress::Finish)
            .map_err(|e| e.to_string())?;
        let produced = out.len();
        match status {
            _ if produced > max_out => Err(format!("output exceeds the block size {max_out}")),
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

/// Memory limit for an xz/lzma decoder. The dictionary a stream declares is allocated
/// before any data is checked; mksquashfs never uses one larger than the block size (at
/// most 1 MiB), and the kernel refuses larger ones, so 8 MiB leaves ample headroom while a
/// hostile header cannot make every block cost tens of megabytes.
const LZMA_MEMLIMIT: u64 = 8 << 20;

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

    /// ALL (which `sifuse --version` lists) is exactly what from_id decodes, in id order.
    #[test]
    fn all_lists_every_known_id() {
        let known: Vec<Compressor> = (0..=u16::MAX).filter_map(Compressor::from_id).collect();
        assert_eq!(known, Compressor::ALL);
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

    /// A legacy lzma header (no checksum) declaring a 32 MiB dictionary: refused by the
    /// decoder's memory limit instead of allocated.
    #[test]
    fn lzma_dictionary_is_bounded() {
        use liblzma::stream::{LzmaOptions, Stream};
        let data = sample();
        let opts = LzmaOptions::new_preset(1).unwrap();
        let stream = Stream::new_lzma_encoder(&opts).unwrap();
        let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        e.write_all(&data).unwrap();
        let mut c = e.finish().unwrap();
        let mut out = Vec::new();
        Compressor::Lzma
            .decompress(&c, &mut out, data.len())
            .unwrap();
        assert_eq!(out, data);
        c[1..5].copy_from_slice(&(32u32 << 20).to_le_bytes());
        let err = Compressor::Lzma
            .decompress(&c, &mut out, data.len())
            .unwrap_err();
        assert!(err.to_lowercase().contains("memory"), "{err}");
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

    /// lzokay-native's compressor (a dev-dependency) writes standard LZO1X; the decoder
    /// must reproduce the input exactly, and refuse a bound one byte short.
    #[test]
    fn lzo_roundtrip_and_bound() {
        let mut inputs = vec![
            sample(),
            vec![0u8; 100_000],
            b"abc".to_vec(),
            (0..70_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ];
        // Text-like: long matches at every distance class (M1..M4).
        inputs.push(
            (0..30_000u32)
                .flat_map(|i| format!("line {} of {}\n", i % 977, i % 13).into_bytes())
                .collect(),
        );
        let mut out = Vec::new();
        for data in &inputs {
            let c = lzokay_native::compress(data).unwrap();
            Compressor::Lzo
                .decompress(&c, &mut out, data.len())
                .unwrap_or_else(|e| panic!("{} bytes: {e}", data.len()));
            assert!(
                out == *data,
                "{} bytes differ after a round trip",
                data.len()
            );
            if !data.is_empty() {
                assert!(Compressor::Lzo
                    .decompress(&c, &mut out, data.len() - 1)
                    .is_err());
                // Truncated, or with a byte after the end marker.
                assert!(Compressor::Lzo
                    .decompress(&c[..c.len() - 1], &mut out, data.len())
                    .is_err());
                let mut longer = c.clone();
                longer.push(0);
                assert!(Compressor::Lzo
                    .decompress(&longer, &mut out, data.len())
                    .is_err());
            }
        }
    }

    /// Hostile streams: a literal run whose length is a long run of zero bytes (asks for
    /// ~255 bytes per input byte), a match longer than the bound, a match reaching before
    /// the start. Each is refused without producing more than the bound.
    #[test]
    fn lzo_hostile_streams_are_bounded() {
        let mut out = Vec::with_capacity(4096);
        // Instruction 0 in state 0 with 60000 zero bytes: a ~15 MB literal run.
        let mut run = vec![0u8; 60_001];
        run.push(1);
        assert!(Compressor::Lzo.decompress(&run, &mut out, 4096).is_err());
        assert!(out.len() <= 4096);
        // 4 literals, then an M3 copy of 33 + 255 * 1000 bytes at distance 1.
        let mut m3 = vec![21, b'a', b'b', b'c', b'd', 32];
        m3.extend(std::iter::repeat_n(0u8, 1000));
        m3.extend([1, 0, 0, 0x11, 0, 0]);
        assert!(Compressor::Lzo.decompress(&m3, &mut out, 4096).is_err());
        assert!(out.len() <= 4096);
        // With the bound large enough, the same stream decodes to the run it describes.
        let want = 4 + 2 + 31 + 255 * 1000 + 1;
        Compressor::Lzo.decompress(&m3, &mut out, want).unwrap();
        assert_eq!(out.len(), want);
        assert!(out[4..].iter().all(|&b| b == b'd'));
        // Matches reaching before the start: M4 16 KiB back as the first instruction, and
        // M1 5 bytes back after one literal.
        for stream in [
            &[0x11, 0x04, 0x00, 0x11, 0, 0][..],
            &[18, b'a', 0, 1, 0x11, 0, 0],
        ] {
            let e = Compressor::Lzo
                .decompress(stream, &mut out, 4096)
                .unwrap_err();
            assert!(e.contains("reaches"), "{e}");
        }
        // Only the end marker: empty output.
        Compressor::Lzo
            .decompress(&[0x11, 0, 0], &mut out, 4096)
            .unwrap();
        assert!(out.is_empty());
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
