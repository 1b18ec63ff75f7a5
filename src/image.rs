//! From a path on the command line to an open archive: a bare SquashFS file, an image at a
//! byte offset, or the chosen partition of a SIF.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::archive::Archive;
use crate::error::{Error, Result};
use crate::sif::{self, Descriptor, SifImage};
use crate::source::{open_image_file, FileWindow, ReadAt};

/// Which image inside a file to use.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    pub path: PathBuf,
    /// Byte offset of a SquashFS image inside the file (squashfuse's `-o offset=N`).
    pub offset: Option<u64>,
    /// SIF partition by id or name.
    pub partition: Option<String>,
}

impl ImageSpec {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ImageSpec {
            path: path.into(),
            ..Default::default()
        }
    }
}

/// Where the served SquashFS bytes were found.
#[derive(Debug, Clone)]
pub struct Located {
    pub file: Arc<File>,
    pub file_len: u64,
    pub sif: Option<SifImage>,
    pub partition: Option<Descriptor>,
    pub start: u64,
    pub len: u64,
}

fn open_err(path: &Path, e: std::io::Error) -> Error {
    Error::Open {
        path: path.display().to_string(),
        source: e,
    }
}

/// Open the file and find the SquashFS window, without opening the SquashFS itself.
pub fn locate(spec: &ImageSpec) -> Result<Located> {
    let file = Arc::new(open_image_file(&spec.path).map_err(|e| open_err(&spec.path, e))?);
    let file_len = file.metadata().map_err(|e| open_err(&spec.path, e))?.len();
    let whole = FileWindow::new(file.clone(), 0, file_len).map_err(|e| open_err(&spec.path, e))?;
    if let Some(offset) = spec.offset {
        if offset >= file_len {
            return Err(Error::NotAnImage(format!(
                "offset {offset} is beyond the end of the {file_len}-byte file"
            )));
        }
        return Ok(Located {
            file,
            file_len,
            sif: None,
            partition: None,
            start: offset,
            len: file_len - offset,
        });
    }
    let mut head = vec![0u8; file_len.min(64) as usize];
    whole
        .read_exact_at(&mut head, 0)
        .map_err(|e| open_err(&spec.path, e))?;
    if sif::has_sif_magic(&head) {
        let image = SifImage::parse(&whole)?;
        let part = image.select_partition(spec.partition.as_deref())?.clone();
        let (start, len) = (part.offset as u64, part.size as u64);
        return Ok(Located {
            file,
            file_len,
            sif: Some(image),
            partition: Some(part),
            start,
            len,
        });
    }
    if spec.partition.is_some() {
        return Err(Error::NotAnImage(
            "--partition needs a SIF image, and this file is not one".into(),
        ));
    }
    if head.len() >= 4 && &head[0..4] == b"hsqs" {
        return Ok(Located {
            file,
            file_len,
            sif: None,
            partition: None,
            start: 0,
            len: file_len,
        });
    }
    Err(Error::NotAnImage(format!(
        "{} has neither SIF_MAGIC at byte 32 nor the SquashFS magic 'hsqs' at byte 0{}",
        spec.path.display(),
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
    let located = locate(spec)?;
    let window = FileWindow::new(located.file.clone(), located.start, located.len)
        .map_err(|e| open_err(&spec.path, e))?;
    let archive = Archive::open(Arc::new(window), cache_bytes)?;
    Ok(OpenImage { archive, located })
}
