//! From what the command line names to an open archive: a local file (a bare SquashFS
//! image, an image at a byte offset, or the chosen partition of a SIF) or a remote object
//! named by a URL, read through the chunk cache. Everything after this reads any of them
//! as a [`ReadAt`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::archive::superblock::{Superblock, SUPERBLOCK_LEN};
use crate::archive::Archive;
use crate::error::{Error, Result};
use crate::sif::{self, Descriptor, SifImage};
use crate::source::remote::{
    self as remote, CacheSettings, ObjectStore, RemoteConfig, RemoteSource, StoreConfig,
};
use crate::source::{file_size, open_image_file, FileWindow, ReadAt, Window};

/// Which image to use, and where it is.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// A path (a SIF or SquashFS file, `/proc/self/fd/N`) or a URL (see [`remote_url`]).
    pub path: PathBuf,
    /// Byte offset of a SquashFS image inside the file (squashfuse's `-o offset=N`).
    pub offset: Option<u64>,
    /// SIF partition by id or name.
    pub partition: Option<String>,
    /// For a URL: the chunk cache.
    pub cache: CacheSettings,
    /// For a URL: how to talk to the store (timeouts, credentials); `None`: the defaults,
    /// with credentials from the environment.
    pub store: Option<StoreConfig>,
}

impl ImageSpec {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ImageSpec {
            path: path.into(),
            ..Default::default()
        }
    }

    /// The URL, when the image is remote.
    pub fn url(&self) -> Option<&str> {
        remote_url(&self.path)
    }
}

/// `path` as a URL, if it names a remote image (`http://`, `https://`, `s3://`,
/// `oras://`). A local file whose name looks like that is reached as `./NAME`.
pub fn remote_url(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| remote::is_remote(s))
}

/// How the image `path` names is shown to others (mountinfo's source, messages): a
/// URL without credentials or presigned query, or the file's absolute path.
pub fn shown_name(path: &Path) -> String {
    match remote_url(path) {
        Some(url) => remote::RemoteUrl::parse(url)
            .map(|u| u.to_string())
            .unwrap_or_else(|_| remote::url::redact_url(url)),
        None => std::path::absolute(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string(),
    }
}

/// Where the served SquashFS bytes were found.
#[derive(Clone)]
pub struct Located {
    /// The whole file or object.
    pub source: Arc<dyn ReadAt>,
    /// The remote object behind `source`, for a URL.
    pub remote: Option<Arc<RemoteSource>>,
    /// The file's path or the object's address (without credentials), for messages and
    /// mountinfo.
    pub name: String,
    pub file_len: u64,
    pub sif: Option<SifImage>,
    pub partition: Option<Descriptor>,
    pub start: u64,
    pub len: u64,
}

impl std::fmt::Debug for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Located")
            .field("name", &self.name)
            .field("remote", &self.remote)
            .field("file_len", &self.file_len)
            .field("partition", &self.partition.as_ref().map(|d| d.id))
            .field("start", &self.start)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

fn open_err(name: &str, e: std::io::Error) -> Error {
    Error::Open {
        path: name.to_string(),
        source: e,
    }
}

/// The whole file or object `spec` names, and its name.
pub struct Whole {
    pub source: Arc<dyn ReadAt>,
    pub remote: Option<Arc<RemoteSource>>,
    pub name: String,
}

/// Open the file, or the remote object through the chunk cache (one request: its
/// version), without looking inside.
pub fn open_whole(spec: &ImageSpec) -> Result<Whole> {
    if spec.url().is_some() {
        let store = open_store(spec)?;
        return open_whole_object(store, &spec.cache);
    }
    let name = spec.path.display().to_string();
    let file = Arc::new(open_image_file(&spec.path).map_err(|e| open_err(&name, e))?);
    let file_len = file_size(&file).map_err(|e| open_err(&name, e))?;
    let whole = FileWindow::new(file, 0, file_len).map_err(|e| open_err(&name, e))?;
    Ok(Whole {
        source: Arc::new(whole),
        remote: None,
        name,
    })
}

/// The store of the remote object `spec` names (nothing is sent yet).
pub fn open_store(spec: &ImageSpec) -> Result<Arc<dyn ObjectStore>> {
    let url = spec.url().unwrap_or_default();
    let config = match &spec.store {
        Some(c) => c.clone(),
        None => StoreConfig::from_process_env(),
    };
    remote::open_store(url, &config).map_err(|e| open_err(&remote::url::redact_url(url), e.into()))
}

/// A remote object as a whole image source: its version asked once, its chunks read
/// through the cache `cache` describes.
pub fn open_whole_object(store: Arc<dyn ObjectStore>, cache: &CacheSettings) -> Result<Whole> {
    let name = store.describe();
    let source = RemoteSource::open(store, cache.open_for_reading(), RemoteConfig::default())
        .map_err(|e| open_err(&name, e.into()))?;
    let remote = Arc::new(source);
    Ok(Whole {
        source: remote.clone(),
        remote: Some(remote),
        name,
    })
}

/// Find the SquashFS window in the file or object `spec` names, without opening the
/// SquashFS itself.
pub fn locate(spec: &ImageSpec) -> Result<Located> {
    locate_in(open_whole(spec)?, spec)
}

/// Find the SquashFS window in `whole`: the SIF partition `spec` asks for, the image at its
/// offset, or a bare image.
pub fn locate_in(whole: Whole, spec: &ImageSpec) -> Result<Located> {
    let Whole {
        source,
        remote,
        name,
    } = whole;
    let file_len = source.len();
    let located = |sif, partition, start, len| Located {
        source: source.clone(),
        remote: remote.clone(),
        name: name.clone(),
        file_len,
        sif,
        partition,
        start,
        len,
    };
    if let Some(offset) = spec.offset {
        if offset >= file_len {
            return Err(Error::NotAnImage(format!(
                "offset {offset} is beyond the end of the {file_len}-byte file"
            )));
        }
        return Ok(located(None, None, offset, file_len - offset));
    }
    let mut head = vec![0u8; file_len.min(64) as usize];
    source
        .read_exact_at(&mut head, 0)
        .map_err(|e| open_err(&name, e))?;
    if sif::has_sif_magic(&head) {
        let image = SifImage::parse(&*source)?;
        let part = image.select_partition(spec.partition.as_deref())?.clone();
        let (start, len) = (part.offset as u64, part.size as u64);
        return Ok(located(Some(image), Some(part), start, len));
    }
    if spec.partition.is_some() {
        return Err(Error::NotAnImage(
            "--partition needs a SIF image, and this file is not one".into(),
        ));
    }
    if head.len() >= 4 && &head[0..4] == b"hsqs" {
        return Ok(located(None, None, 0, file_len));
    }
    Err(Error::NotAnImage(format!(
        "{name} has neither SIF_MAGIC at byte 32 nor the SquashFS magic 'hsqs' at byte 0{}",
        if file_len < 96 {
            " (the file is too short)"
        } else {
            "; for an image inside another file pass --offset"
        }
    )))
}

/// An opened image: the archive plus where it came from.
#[derive(Debug)]
pub struct OpenImage {
    pub archive: Archive,
    pub located: Located,
}

/// Open the image `spec` names, with a block cache of `cache_bytes`.
pub fn open(spec: &ImageSpec, cache_bytes: u64) -> Result<OpenImage> {
    open_located(locate(spec)?, cache_bytes)
}

/// Open the SquashFS image at `located`. For a remote image the metadata tables, which sit
/// together at the end of a SquashFS image (from the inode table on), are fetched first,
/// in one request when they are small, otherwise in the background in large requests once
/// serving begins (the root is then read on its own).
pub fn open_located(located: Located, cache_bytes: u64) -> Result<OpenImage> {
    let window = Arc::new(
        Window::new(located.source.clone(), located.start, located.len)
            .map_err(|e| open_err(&located.name, e))?,
    );
    if let Some(remote) = &located.remote {
        fetch_metadata_tail(remote, &*window, located.start);
    }
    let archive = Archive::open(window, cache_bytes)?;
    Ok(OpenImage { archive, located })
}

fn fetch_metadata_tail(remote: &RemoteSource, window: &dyn ReadAt, start: u64) {
    let mut raw = [0u8; SUPERBLOCK_LEN];
    if window.len() < SUPERBLOCK_LEN as u64 || window.read_exact_at(&mut raw, 0).is_err() {
        return; // Archive::open reports it.
    }
    let Ok(sb) = Superblock::parse(&raw, window.len()) else {
        return;
    };
    let tail = start + sb.inode_table..start + sb.bytes_used;
    if tail.end - tail.start <= remote.config().max_request_bytes {
        // Failures here are the archive's to report, when it reads the same bytes.
        let _ = remote.warm(tail);
    } else {
        remote.prefetch(tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        for url in [
            "https://example.org/a.sif",
            "http://127.0.0.1:8080/x",
            "s3://bucket/key.sif",
            "oras://registry/repo:tag",
            "HTTPS://example.org/a",
        ] {
            assert_eq!(remote_url(Path::new(url)), Some(url));
        }
        for path in [
            "/images/a.sif",
            "a.sif",
            "./https://example.org/a.sif",
            "ftp://example.org/a.sif",
            "/proc/self/fd/3",
        ] {
            assert_eq!(remote_url(Path::new(path)), None, "{path}");
        }
    }
}
