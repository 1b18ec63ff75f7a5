//! The command line: clap definitions (also used to generate the man page and shell
//! completions) and the commands that run on the archive layer directly.

mod cache;
mod commands;
pub mod compat;
mod container;
mod docs;
mod mount;
mod version;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use sifuse::mount::Ending;

pub use commands::dispatch;

/// How a command ended, for `main` to turn into the exit status.
#[derive(Debug)]
pub enum Exit {
    /// The command did what it was asked.
    Done,
    /// A server ended (`sifuse mount`, squashfuse's command line), and why.
    Served(Ending),
    /// Exit with this status: COMMAND's for `sifuse run`, or squashfuse's after its usage.
    Status(i32),
    /// The command failed: one line for stderr, after the program's name, and the status.
    Failed { message: String, status: i32 },
}

impl Exit {
    /// A failure with status 1.
    pub fn failed(error: impl std::fmt::Display) -> Exit {
        Exit::Failed {
            message: error.to_string(),
            status: 1,
        }
    }
}

/// Mount SquashFS and SIF container images read-only over FUSE, exactly as the kernel's
/// squashfs driver shows them; inspect, list and extract them without mounting.
#[derive(Debug, Parser)]
#[command(
    name = "sifuse",
    version,
    long_version = version::long_version(),
    about,
    long_about = None,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Which image inside the file to use.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// The image: a SIF file, a SquashFS file, /proc/self/fd/N, or a URL
    /// (https://..., http://..., s3://BUCKET/KEY, oras://REGISTRY/REPO:TAG)
    pub image: PathBuf,
    /// Byte offset of a SquashFS image inside IMAGE
    #[arg(long, value_name = "N", conflicts_with = "partition")]
    pub offset: Option<u64>,
    /// SIF partition to use, by descriptor id or name (default: the primary system partition)
    #[arg(long, value_name = "ID|NAME")]
    pub partition: Option<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

impl ImageArgs {
    pub fn spec(&self) -> sifuse::image::ImageSpec {
        sifuse::image::ImageSpec {
            path: self.image.clone(),
            offset: self.offset,
            partition: self.partition.clone(),
            cache: self.cache.settings(),
            store: self.store.config(),
        }
    }
}

/// How to reach a remote image's store.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Registry credentials for oras:// images, in a docker-style config.json [default:
    /// $DOCKER_CONFIG/config.json, else ~/.docker/config.json]
    #[arg(long, value_name = "FILE")]
    pub registry_auth: Option<PathBuf>,
    /// Talk to an oras:// registry (and its token service) over plain HTTP
    #[arg(long)]
    pub no_https: bool,
}

impl StoreArgs {
    /// The store settings, when they differ from the defaults.
    pub fn config(&self) -> Option<sifuse::source::remote::StoreConfig> {
        sifuse::source::remote::StoreConfig::from_options(
            self.registry_auth.as_deref(),
            self.no_https,
        )
    }
}

/// The node-local cache of remote images' chunks.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Chunk cache of remote images [default: $SIFUSE_CACHE_DIR, else
    /// $XDG_CACHE_HOME/sifuse, else ~/.cache/sifuse]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most the chunk cache may hold on disk, least recently used chunks going first
    /// (K, M, G, T: powers of 1024) [default: 10G]
    #[arg(long, value_name = "SIZE", value_parser = sifuse::source::remote::parse_size)]
    pub cache_max: Option<u64>,
    /// Keep a remote image's chunks in memory only (16 MiB), never on disk
    #[arg(long)]
    pub no_disk_cache: bool,
}

impl CacheArgs {
    pub fn settings(&self) -> sifuse::source::remote::CacheSettings {
        let mut s = sifuse::source::remote::CacheSettings {
            dir: self.cache_dir.clone(),
            disk: !self.no_disk_cache,
            ..Default::default()
        };
        if let Some(max) = self.cache_max {
            s.max_bytes = max;
        }
        s
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the SIF header and descriptors, and the SquashFS superblock
    Inspect {
        #[command(flatten)]
        image: ImageArgs,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List a directory inside the image
    Ls {
        #[command(flatten)]
        image: ImageArgs,
        /// Path inside the image
        #[arg(default_value = "/")]
        path: String,
        /// Long listing: mode, links, owner, group, size, mtime, inode
        #[arg(short = 'l', long)]
        long: bool,
        /// List subdirectories recursively
        #[arg(short = 'R', long)]
        recursive: bool,
    },
    /// Show the attributes of a path inside the image
    Stat {
        #[command(flatten)]
        image: ImageArgs,
        /// Path inside the image
        path: String,
    },
    /// Write a file from the image to standard output
    Cat {
        #[command(flatten)]
        image: ImageArgs,
        /// Path inside the image
        path: String,
    },
    /// Extract the image (or PATH inside it) to DEST, as unsquashfs -d does
    Extract {
        #[command(flatten)]
        image: ImageArgs,
        /// Destination directory: must not exist, or be empty
        dest: PathBuf,
        /// Path inside the image to extract
        #[arg(default_value = "/")]
        path: String,
        /// Never show a progress bar
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Mount the image read-only over FUSE, as the kernel's squashfs driver would show it
    Mount(mount::MountArgs),
    /// Put a whole remote image in the node-local chunk cache (pre-staging), so mounts
    /// fetch nothing from the store but one revalidation
    Fetch(cache::FetchArgs),
    /// The node-local chunk cache of remote images
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Unmount a sifuse mount (umount2 as root, fusermount3 otherwise)
    Umount(mount::UmountArgs),
    /// Run a command with the image as its read-only root, in new namespaces
    Run(container::RunArgs),
    /// Make squashfuse_ll and squashfuse in DIR: links to this binary, which then takes
    /// squashfuse's command line, so launchers that look for those names use sifuse
    #[command(after_long_help = compat::COMPAT_HELP)]
    InstallCompat {
        /// Directory for the links (for example /usr/local/libexec/sifuse)
        dir: PathBuf,
        /// Replace files of those names that are not links to sifuse
        #[arg(long)]
        force: bool,
    },
    /// Print a shell completion script
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
}
