//! `sifuse fetch URL` and `sifuse cache info|prune`: the node-local chunk cache of remote
//! images, from the command line.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};

use sifuse::image::{self, ImageSpec};
use sifuse::source::remote::chunks::HEADER_LEN;
use sifuse::source::remote::{parse_size, CacheSettings, RemoteConfig, RemoteSource};
use sifuse::source::ReadAt;
use sifuse::{Error, Result};

use super::{CacheArgs, StoreArgs};

/// `sifuse fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The image's URL (https://..., http://..., s3://BUCKET/KEY, oras://REGISTRY/REPO:TAG)
    pub url: String,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Never show a progress bar
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// `sifuse cache`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Show what the cache holds, image by image
    Info {
        /// Cache directory [default: $SIFUSE_CACHE_DIR, else $XDG_CACHE_HOME/sifuse, else
        /// ~/.cache/sifuse]
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Remove the least recently used chunks until the cache holds at most SIZE (safe
    /// while images are mounted: they fetch what they miss again)
    Prune {
        /// Cache directory [default: $SIFUSE_CACHE_DIR, else $XDG_CACHE_HOME/sifuse, else
        /// ~/.cache/sifuse]
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// What the cache may keep (K, M, G, T: powers of 1024; 0 empties it) [default: 10G]
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max: Option<u64>,
    },
}

fn cache_error(e: impl std::fmt::Display) -> Error {
    Error::Io(io::Error::other(e.to_string()))
}

/// Run `sifuse cache ...`.
pub fn run(cmd: &CacheCommand) -> Result<()> {
    match cmd {
        CacheCommand::Info { cache_dir } => info(&CacheSettings {
            dir: cache_dir.clone(),
            ..Default::default()
        }),
        CacheCommand::Prune { cache_dir, max } => {
            let settings = CacheSettings {
                dir: cache_dir.clone(),
                ..Default::default()
            };
            let cache = settings.open().map_err(cache_error)?;
            let report = cache
                .evict_to(max.unwrap_or(settings.max_bytes))
                .map_err(cache_error)?;
            println!(
                "{}: removed {} chunks ({} left of {}), {} unfinished fetches, {} images",
                cache.path().display(),
                report.removed_chunks,
                human(report.bytes_after),
                human(report.bytes_before),
                report.removed_parts,
                report.removed_objects
            );
            Ok(())
        }
    }
}

fn info(settings: &CacheSettings) -> Result<()> {
    let cache = settings.open().map_err(cache_error)?;
    let usage = cache.usage().map_err(cache_error)?;
    let total: u64 = usage.iter().map(|u| u.bytes).sum();
    let mut out = String::new();
    out += &format!("cache:  {}\n", cache.path().display());
    out += &format!(
        "holds:  {} in {} images (default budget {}; see --cache-max)\n",
        human(total),
        usage.len(),
        human(settings.max_bytes)
    );
    for u in &usage {
        match &u.meta {
            Some(m) => {
                let full = m.len + m.chunk_count() * HEADER_LEN as u64;
                out += &format!(
                    "\n{}\n  version {}, {}; cached {} ({:.0}%, {} chunks)\n",
                    m.address,
                    m.validator,
                    human(m.len),
                    human(u.bytes),
                    if full == 0 {
                        100.0
                    } else {
                        u.bytes as f64 * 100.0 / full as f64
                    },
                    u.chunks
                );
            }
            None => {
                out += &format!(
                    "\n(unknown image {})\n  cached {} ({} chunks)\n",
                    u.key,
                    human(u.bytes),
                    u.chunks
                )
            }
        }
    }
    io::stdout()
        .lock()
        .write_all(out.as_bytes())
        .map_err(Error::Io)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Run `sifuse fetch`.
pub fn fetch(args: &FetchArgs) -> Result<()> {
    let settings = args.cache.settings();
    if !settings.disk {
        return Err(cache_error(
            "--no-disk-cache leaves nothing to fill: sifuse fetch fills the disk cache",
        ));
    }
    let spec = ImageSpec {
        path: PathBuf::from(&args.url),
        cache: settings.clone(),
        store: args.store.config(),
        ..Default::default()
    };
    if spec.url().is_none() {
        return Err(cache_error(format!(
            "{}: not a URL (https://, http://, s3:// or oras://); local images need no fetching",
            args.url
        )));
    }
    // The cache must be usable: filling it is the point.
    let cache = settings.open().map_err(cache_error)?;
    let store = image::open_store(&spec)?;
    let config = RemoteConfig::default();
    let source = RemoteSource::open(store, Some(cache.clone()), config.clone())
        .map_err(|e| cache_error(format!("{}: {e}", args.url)))?;
    let len = source.len();
    if len > settings.max_bytes {
        return Err(cache_error(format!(
            "{} ({}) does not fit in the cache budget ({}): raise --cache-max",
            source.address(),
            human(len),
            human(settings.max_bytes)
        )));
    }
    let bar = (!args.quiet && io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Arc::new(bar)
    });
    let progress = |done: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    let result = source.fetch_all(config.max_in_flight, &progress);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    result.map_err(|e| cache_error(format!("{}: {e}", source.address())))?;
    let c = source.counters();
    eprintln!(
        "{}: {} cached in {}; fetched {} in {} requests",
        source.address(),
        human(len),
        cache.path().display(),
        human(c.bytes_fetched.load(std::sync::atomic::Ordering::Relaxed)),
        c.requests.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }
}
