//! inspect, ls, stat, cat and extract: thin front ends over the archive layer.

use std::io::{self, Write};

use serde_json::json;

use sifuse::archive::superblock::flags;
use sifuse::archive::{Archive, FileKind, Inode};
use sifuse::image::{self, ImageSpec};
use sifuse::sif::{self, SifImage};
use sifuse::source::ReadAt;
use sifuse::walk::{walk, Event};
use sifuse::{Error, Result};

use super::{Cli, Command, Exit, ImageArgs};

/// Cache for one-shot commands: enough for a few data blocks and the metadata they touch.
const TOOL_CACHE_BYTES: u64 = 32 << 20;

/// Carry out a parsed command line.
pub fn dispatch(cli: Cli) -> Exit {
    let done = match cli.command {
        Command::Inspect { image, json } => inspect(&image.spec(), json),
        Command::Ls {
            image,
            path,
            long,
            recursive,
        } => open(&image).and_then(|img| ls(&img.archive, &path, long, recursive)),
        Command::Stat { image, path } => open(&image).and_then(|img| stat(&img.archive, &path)),
        Command::Cat { image, path } => open(&image).and_then(|img| cat(&img.archive, &path)),
        Command::Extract {
            image,
            dest,
            path,
            quiet,
        } => open(&image).and_then(|img| {
            let mut opts = sifuse::extract::ExtractOptions::default();
            if quiet {
                opts.progress = false;
            }
            sifuse::extract::extract(&img.archive, path.as_bytes(), &dest, &opts)?;
            Ok(())
        }),
        Command::Mount(args) => return super::mount::mount(&args),
        Command::Fetch(args) => super::cache::fetch(&args),
        Command::Cache(cmd) => super::cache::run(&cmd),
        Command::Umount(args) => super::mount::umount(&args),
        Command::Run(args) => return super::container::run_container(&args),
        Command::InstallCompat { dir, force } => super::compat::install_compat(&dir, force),
        Command::Completions { shell } => super::docs::completions(shell).map_err(Error::Io),
    };
    match done {
        Ok(()) => Exit::Done,
        // A closed pipe (`| head`) ends output quietly.
        Err(Error::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => Exit::Done,
        Err(e) => Exit::failed(e),
    }
}

/// The image a one-shot command reads.
fn open(image: &ImageArgs) -> Result<image::OpenImage> {
    image::open(&image.spec(), TOOL_CACHE_BYTES)
}

fn out_err(e: io::Error) -> Error {
    Error::Io(e)
}

/// Write to stdout (a closed pipe is an error [`dispatch`] takes as the end of output).
fn emit(stdout: &mut impl Write, s: &str) -> Result<()> {
    stdout.write_all(s.as_bytes()).map_err(out_err)
}

fn inspect(spec: &ImageSpec, as_json: bool) -> Result<()> {
    let whole = image::open_whole(spec)?;
    let remote = whole.remote.clone();
    let len = whole.source.len();
    let mut head = vec![0u8; len.min(64) as usize];
    whole.source.read_exact_at(&mut head, 0)?;
    let sif_image = if spec.offset.is_none() && sif::has_sif_magic(&head) {
        Some(SifImage::parse(&*whole.source)?)
    } else {
        None
    };

    // The SquashFS part is optional: a SIF may hold none, or one we cannot open.
    let squash = match &sif_image {
        Some(s)
            if s.select_partition(spec.partition.as_deref()).is_err()
                && spec.partition.is_none() =>
        {
            Err(s.select_partition(None).expect_err("checked above").into())
        }
        _ => image::locate_in(whole, spec)
            .and_then(|located| image::open_located(located, TOOL_CACHE_BYTES)),
    };
    if sif_image.is_none() {
        // Not a SIF: the SquashFS must open, or there is nothing to show.
        squash
            .as_ref()
            .map_err(|e| Error::NotAnImage(e.to_string()))?;
    }

    let mut stdout = io::stdout().lock();
    if as_json {
        let sif_json = sif_image.as_ref().map(|s| {
            json!({
                "header": s.header,
                "layout_ok": s.check_layout().is_ok(),
                "layout_error": s.check_layout().err().map(|e| e.to_string()),
                "descriptors": s.descriptors.iter().map(|d| {
                    let p = d.partition();
                    json!({
                        "id": d.id, "type": d.data_type.name(), "type_code": d.data_type.to_raw(),
                        "name": d.name, "group": d.group_id, "link": d.linked_id,
                        "offset": d.offset, "size": d.size,
                        "fs_type": p.map(|p| p.fs_type.name()),
                        "partition_type": p.map(|p| p.part_type.name()),
                        "arch": p.map(|p| sif::arch_name(&p.arch)),
                    })
                }).collect::<Vec<_>>(),
            })
        });
        let sq_json = match &squash {
            Ok(img) => json!({
                "offset": img.located.start,
                "partition": img.located.partition.as_ref().map(|d| d.id),
                "superblock": img.archive.superblock(),
                "flag_names": flags::names(img.archive.superblock().flags),
                "compressor_options": img.archive.compressor_options(),
            }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        let remote_json = remote.as_ref().map(|r| {
            json!({
                "address": r.address(),
                "version": r.version().validator,
                "length": r.version().len,
                "disk_cache": r.disk_cache_dir().map(|d| d.display().to_string()),
            })
        });
        let v = json!({ "remote": remote_json, "sif": sif_json, "squashfs": sq_json });
        emit(
            &mut stdout,
            &format!("{}\n", serde_json::to_string_pretty(&v).expect("json")),
        )?;
        return Ok(());
    }
    let mut s = String::new();
    if let Some(r) = &remote {
        s += &format!(
            "Remote image {}
",
            r.address()
        );
        s += &format!(
            "  version:     {}, {} bytes
",
            r.version().validator,
            r.version().len
        );
        match r.disk_cache_dir() {
            Some(d) => s += &format!("  chunk cache: {}\n\n", d.display()),
            None => s += "  chunk cache: memory only\n\n",
        }
    }
    if let Some(img) = &sif_image {
        let h = &img.header;
        s += &format!("SIF image, version {}\n", h.version);
        s += &format!("  arch:        {}\n  uuid:        {}\n", h.arch, h.uuid);
        s += &format!(
            "  created:     {}\n  modified:    {}\n",
            fmt_time(h.created),
            fmt_time(h.modified)
        );
        s += &format!(
            "  descriptors: {} used of {} ({} free)\n",
            img.descriptors.len(),
            h.descriptors_total,
            h.descriptors_free
        );
        s += &format!(
            "  data:        {} bytes at {}\n",
            h.data_size, h.data_offset
        );
        if let Err(e) = img.check_layout() {
            s += &format!("  warning:     {e}\n");
        }
        s += &format!(
            "\n{:<4} {:<14} {:<24} {:>12} {:>12}  {:<10} {:<8} {}\n",
            "ID", "TYPE", "NAME", "OFFSET", "SIZE", "FS", "PART", "ARCH"
        );
        for d in &img.descriptors {
            let (fs, pt, arch) = match d.partition() {
                Some(p) => (
                    p.fs_type.name(),
                    p.part_type.name(),
                    sif::arch_name(&p.arch),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            s += &format!(
                "{:<4} {:<14} {:<24} {:>12} {:>12}  {:<10} {:<8} {}\n",
                d.id,
                d.data_type.name(),
                d.name,
                d.offset,
                d.size,
                fs,
                pt,
                arch
            );
        }
        s += "\n";
    }
    match &squash {
        Ok(img) => {
            let sb = img.archive.superblock();
            match &img.located.partition {
                Some(d) => {
                    s += &format!(
                        "SquashFS 4.0 in partition {} at byte {}\n",
                        d.label(),
                        img.located.start
                    )
                }
                None => s += &format!("SquashFS 4.0 at byte {}\n", img.located.start),
            }
            s += &format!("  compressor:  {}\n", sb.compressor.name());
            if let Some(o) = img.archive.compressor_options() {
                s += &format!(
                    "  options:     {}\n",
                    serde_json::to_string(o).expect("json")
                );
            }
            s += &format!("  block size:  {}\n", sb.block_size);
            s += &format!("  size:        {} bytes\n", sb.bytes_used);
            s += &format!(
                "  inodes:      {}\n  fragments:   {}\n  ids:         {}\n",
                sb.inode_count, sb.fragment_count, sb.id_count
            );
            s += &format!("  created:     {}\n", fmt_time(sb.mod_time as i64));
            s += &format!("  flags:       {}\n", flags::names(sb.flags).join(" "));
        }
        Err(e) => s += &format!("SquashFS: none to show ({e})\n"),
    }
    emit(&mut stdout, &s)
}

fn fmt_time(t: i64) -> String {
    // UTC, ISO 8601, without pulling in a date crate.
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn mode_string(inode: &Inode) -> String {
    let p = inode.permissions as u32;
    let mut s = String::new();
    s.push(inode.kind.letter());
    let bit = |mask: u32, c: char| if p & mask != 0 { c } else { '-' };
    let exec = |x: u32, special: u32, set: char, unset: char| match (p & x != 0, p & special != 0) {
        (true, true) => set,
        (false, true) => unset,
        (true, false) => 'x',
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(exec(0o100, 0o4000, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(exec(0o010, 0o2000, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(exec(0o001, 0o1000, 't', 'T'));
    s
}

fn long_line(inode: &Inode, name: &str) -> String {
    let size = match inode.kind {
        FileKind::BlockDevice | FileKind::CharDevice => {
            let (ma, mi) = inode.device_numbers();
            format!("{ma}, {mi}")
        }
        _ => inode.size().to_string(),
    };
    let mut line = format!(
        "{:>8} {} {:>3} {:>6} {:>6} {:>12} {} {}",
        inode.number,
        mode_string(inode),
        inode.nlink,
        inode.uid,
        inode.gid,
        size,
        fmt_time(inode.mtime as i64),
        name
    );
    if let Some(t) = inode.symlink_target() {
        line += &format!(" -> {}", String::from_utf8_lossy(t));
    }
    line
}

fn ls(archive: &Archive, path: &str, long: bool, recursive: bool) -> Result<()> {
    let start = archive.resolve(path.as_bytes())?;
    let mut stdout = io::BufWriter::new(io::stdout().lock());
    let show = |out: &mut dyn Write, inode: &Inode, name: &str| -> Result<()> {
        let line = if long {
            long_line(inode, name)
        } else {
            name.to_string()
        };
        writeln!(out, "{line}").map_err(out_err)
    };
    if start.as_dir().is_none() {
        show(&mut stdout, &start, path)?;
    } else if !recursive {
        for e in archive.read_dir(&start)? {
            let inode = archive.inode(e.iref)?;
            show(&mut stdout, &inode, &String::from_utf8_lossy(&e.name))?;
        }
    } else {
        let base = path.trim_end_matches('/').as_bytes().to_vec();
        walk(archive, &start, &base, &mut |ev| match ev {
            Event::EnterDir { path, inode } | Event::Entry { path, inode } => {
                let p = if path.is_empty() {
                    "/".to_string()
                } else {
                    String::from_utf8_lossy(path).into_owned()
                };
                show(&mut stdout, inode, &p)
            }
            Event::LeaveDir { .. } => Ok(()),
        })?;
    }
    stdout.flush().map_err(out_err)
}

fn stat(archive: &Archive, path: &str) -> Result<()> {
    let inode = archive.resolve(path.as_bytes())?;
    let mut s = String::new();
    s += &format!("  File: {path}");
    if let Some(t) = inode.symlink_target() {
        s += &format!(" -> {}", String::from_utf8_lossy(t));
    }
    let kind = match inode.kind {
        FileKind::Directory => "directory",
        FileKind::File => "regular file",
        FileKind::Symlink => "symbolic link",
        FileKind::BlockDevice => "block special file",
        FileKind::CharDevice => "character special file",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
    };
    s += &format!(
        "\n  Size: {:<12} Blocks: {:<8} {}\n",
        inode.size(),
        archive.stat_blocks(&inode)?,
        kind
    );
    s += &format!(" Inode: {:<12} Links: {}", inode.number, inode.nlink);
    if matches!(inode.kind, FileKind::BlockDevice | FileKind::CharDevice) {
        let (ma, mi) = inode.device_numbers();
        s += &format!("  Device type: {ma},{mi}");
    }
    s += &format!(
        "\nAccess: ({:04o}/{})  Uid: {}  Gid: {}\n",
        inode.permissions,
        mode_string(&inode),
        inode.uid,
        inode.gid
    );
    s += &format!(
        "Modify: {} ({})\n",
        fmt_time(inode.mtime as i64),
        inode.mtime
    );
    for xa in archive.xattrs(&inode)? {
        s += &format!(
            " Xattr: {}={}\n",
            String::from_utf8_lossy(&xa.name),
            escape(&xa.value)
        );
    }
    emit(&mut io::stdout().lock(), &s)
}

fn escape(v: &[u8]) -> String {
    let mut s = String::from("\"");
    for &b in v {
        match b {
            b'"' => s += "\\\"",
            b'\\' => s += "\\\\",
            0x20..=0x7e => s.push(b as char),
            _ => s += &format!("\\{b:03o}"),
        }
    }
    s.push('"');
    s
}

fn cat(archive: &Archive, path: &str) -> Result<()> {
    let inode = archive.resolve(path.as_bytes())?;
    let file = inode
        .as_file()
        .ok_or_else(|| Error::NotAFile(path.to_string()))?;
    let bs = archive.superblock().block_size;
    let mut stdout = io::stdout().lock();
    let zeros = vec![0u8; bs as usize];
    for index in 0..file.block_count(bs) {
        let block = archive.file_block(file, index)?;
        let bytes = block.bytes().unwrap_or(&zeros[..block.len()]);
        match stdout.write_all(bytes) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            r => r.map_err(out_err)?,
        }
    }
    stdout.flush().map_err(out_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_in_utc() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(4_102_444_800), "2100-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn escapes_binary() {
        assert_eq!(escape(b"a\"b\x01"), "\"a\\\"b\\001\"");
    }
}
