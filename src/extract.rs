//! `sifuse extract`: write a tree from the image to disk, as `unsquashfs -d` does: every
//! file type, modes including set-id bits, owners (as root), mtimes, xattrs, hard links,
//! and sparse files kept sparse.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, IsTerminal};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::archive::{Archive, FileKind, Inode};
use crate::error::{Error, Result};
use crate::walk::{walk, Event};

/// How to extract.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Show a progress bar (the CLI sets this when stderr is a terminal).
    pub progress: bool,
    /// Set owners. Only root can; defaults to "am I root".
    pub owners: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            progress: io::stderr().is_terminal(),
            owners: nix::unistd::geteuid().is_root(),
        }
    }
}

/// What an extraction wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExtractStats {
    pub directories: u64,
    pub files: u64,
    pub hard_links: u64,
    pub symlinks: u64,
    pub specials: u64,
    pub bytes: u64,
    /// Attributes that could not be set without privileges (non-root only).
    pub skipped_xattrs: u64,
}

fn io_at(path: &Path, what: &str, e: impl Into<io::Error>) -> Error {
    let e: io::Error = e.into();
    Error::Io(io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    ))
}

/// Extract the tree at `source` (a path inside the image) to `dest`, which must not exist
/// or be an empty directory; `dest` takes the attributes of `source`.
pub fn extract(
    archive: &Archive,
    source: &[u8],
    dest: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractStats> {
    let start = archive.resolve(source)?;
    match fs::read_dir(dest) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(io_at(
                    dest,
                    "refusing to extract into non-empty directory",
                    io::Error::from(io::ErrorKind::AlreadyExists),
                ));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(dest, "cannot use destination", e)),
    }
    let mut x = Extractor {
        archive,
        opts,
        stats: ExtractStats::default(),
        links: HashMap::new(),
        bar: None,
    };
    if opts.progress {
        let bar = indicatif::ProgressBar::new(archive.superblock().inode_count as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} entries {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        x.bar = Some(bar);
    }
    let root_is_dir = start.as_dir().is_some();
    let dest_buf = dest.to_path_buf();
    let target = |rel: &[u8]| -> PathBuf {
        if rel.is_empty() {
            dest_buf.clone()
        } else {
            dest_buf.join(OsStr::from_bytes(rel))
        }
    };
    if !root_is_dir {
        // A single file: DEST is a directory holding it.
        fs::create_dir_all(dest).map_err(|e| io_at(dest, "cannot create", e))?;
    }
    let start_rel: Vec<u8> = if root_is_dir {
        Vec::new()
    } else {
        source
            .rsplit(|&c| c == b'/')
            .next()
            .unwrap_or(b"file")
            .to_vec()
    };
    walk(archive, &start, &start_rel, &mut |ev| {
        match ev {
            Event::EnterDir { path, inode } => {
                let p = target(path);
                match fs::create_dir(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_empty() => {}
                    Err(e) => return Err(io_at(&p, "cannot create directory", e)),
                }
                // Writable while we fill it; the real mode is set on the way out.
                fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
                    .map_err(|e| io_at(&p, "cannot chmod", e))?;
                x.stats.directories += 1;
                x.tick(inode);
                Ok(())
            }
            Event::LeaveDir { path, inode } => {
                let p = target(path);
                x.finish(&p, inode)
            }
            Event::Entry { path, inode } => {
                let p = target(path);
                x.entry(&p, inode)
            }
        }
    })?;
    if let Some(bar) = &x.bar {
        bar.finish_and_clear();
    }
    Ok(x.stats)
}

struct Extractor<'a> {
    archive: &'a Archive,
    opts: &'a ExtractOptions,
    stats: ExtractStats,
    /// Inode number → first path written, for hard links.
    links: HashMap<u32, PathBuf>,
    bar: Option<indicatif::ProgressBar>,
}

impl Extractor<'_> {
    fn tick(&self, _inode: &Inode) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn entry(&mut self, p: &Path, inode: &Inode) -> Result<()> {
        if inode.nlink > 1 {
            if let Some(first) = self.links.get(&inode.number) {
                fs::hard_link(first, p).map_err(|e| io_at(p, "cannot link", e))?;
                self.stats.hard_links += 1;
                return Ok(());
            }
        }
        self.tick(inode);
        match inode.kind {
            FileKind::File => {
                self.write_file(p, inode)?;
                self.stats.files += 1;
            }
            FileKind::Symlink => {
                let target = inode.symlink_target().unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(target), p)
                    .map_err(|e| io_at(p, "cannot create symlink", e))?;
                self.stats.symlinks += 1;
            }
            kind => {
                let flag = match kind {
                    FileKind::BlockDevice => SFlag::S_IFBLK,
                    FileKind::CharDevice => SFlag::S_IFCHR,
                    FileKind::Fifo => SFlag::S_IFIFO,
                    _ => SFlag::S_IFSOCK,
                };
                let (major, minor) = inode.device_numbers();
                let dev = libc::makedev(major, minor);
                mknod(p, flag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| io_at(p, "cannot create", e))?;
                self.stats.specials += 1;
            }
        }
        if inode.nlink > 1 {
            self.links.insert(inode.number, p.to_path_buf());
        }
        self.finish(p, inode)
    }

    fn write_file(&mut self, p: &Path, inode: &Inode) -> Result<()> {
        let info = inode.as_file().expect("regular file");
        // create_new (O_EXCL): never open what is already there. A hostile image could
        // otherwise place a symlink to a host file and then a regular file of the same name
        // and have the extraction write through it.
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(p)
            .map_err(|e| io_at(p, "cannot create", e))?;
        let bs = self.archive.superblock().block_size as u64;
        for index in 0..info.block_count(bs as u32) {
            let block = self.archive.file_block(info, index)?;
            // Sparse blocks are skipped: the hole stays a hole.
            if let Some(bytes) = block.bytes() {
                f.write_all_at(bytes, index * bs)
                    .map_err(|e| io_at(p, "cannot write", e))?;
            }
            self.stats.bytes += block.len() as u64;
        }
        f.set_len(info.file_size)
            .map_err(|e| io_at(p, "cannot size", e))?;
        Ok(())
    }

    /// Xattrs, owner, mode and times, in the order that keeps set-id bits (chown clears
    /// them, so chmod comes after) and mtimes (set last).
    fn finish(&mut self, p: &Path, inode: &Inode) -> Result<()> {
        let is_link = inode.kind == FileKind::Symlink;
        let cpath = CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io_at(p, "bad path", io::Error::from(io::ErrorKind::InvalidInput)))?;
        for xa in self.archive.xattrs(inode)? {
            let name = CString::new(xa.name.clone())
                .map_err(|_| Error::corrupt("xattr name holds a NUL byte"))?;
            // SAFETY: both strings are NUL-terminated and the value pointer/length pair
            // describes a live buffer.
            let rc = unsafe {
                libc::lsetxattr(
                    cpath.as_ptr(),
                    name.as_ptr(),
                    xa.value.as_ptr().cast(),
                    xa.value.len(),
                    0,
                )
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                let unprivileged = !self.opts.owners
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOTSUP)
                    );
                if unprivileged {
                    self.stats.skipped_xattrs += 1;
                } else {
                    return Err(io_at(
                        p,
                        &format!("cannot set xattr {}", String::from_utf8_lossy(&xa.name)),
                        e,
                    ));
                }
            }
        }
        if self.opts.owners {
            std::os::unix::fs::lchown(p, Some(inode.uid), Some(inode.gid))
                .map_err(|e| io_at(p, "cannot chown", e))?;
        }
        if !is_link {
            fs::set_permissions(p, fs::Permissions::from_mode(inode.permissions as u32))
                .map_err(|e| io_at(p, "cannot chmod", e))?;
        }
        let t = TimeSpec::new(inode.mtime as i64, 0);
        utimensat(
            nix::fcntl::AT_FDCWD,
            p,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_at(p, "cannot set times of", e))?;
        Ok(())
    }
}
