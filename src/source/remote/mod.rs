//! Remote images: one object read by byte range from an HTTP(S) server, an S3 bucket or an
//! OCI registry, behind a node-local disk cache of fixed, aligned chunks.
//!
//! The pieces, bottom to top:
//! - [`ObjectStore`]: one remote object at one version, read by range. There is one
//!   implementation per protocol (HTTP, S3, OCI registry). Each bounds every wait and
//!   retries transient failures itself, so a caller hears either the bytes or an error
//!   within a bounded time.
//! - the chunk cache: aligned chunks of objects on local disk, keyed by the object's
//!   version, shared by every sifuse process on the node.
//! - the remote source: a [`ReadAt`](super::ReadAt) over an object, through the chunk cache.
//!   Everything above the source layer reads it as it reads a local file.
//!
//! An object is always read at the version first seen: a store that finds another version
//! answers [`RemoteError::Changed`], and nothing of two versions is ever mixed.
//!
//! [`open_store`] makes the store a URL names: [`http::HttpStore`] for `http(s)://`,
//! [`s3::S3Store`] for `s3://BUCKET/KEY`, [`oci::OciStore`] for `oras://…`.

pub mod chunks;
mod client;
pub mod credentials;
pub mod http;
pub mod oci;
pub mod retry;
pub mod s3;
pub mod sigv4;
pub mod source;
pub mod url;

pub use chunks::{default_cache_dir, parse_size, CacheError, CacheSettings, ChunkCache};
pub use source::{RemoteConfig, RemoteSource};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use credentials::Environment;
pub use retry::RetryPolicy;
pub use url::{is_remote, RemoteUrl};

/// How the stores talk to servers: what the CLI's options set.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Longest wait to resolve a host and connect (TLS included).
    pub connect_timeout: Duration,
    /// Longest silence from a server: until the answer's headers, and between any two
    /// reads of its body. A stalled transfer ends after this.
    pub idle_timeout: Duration,
    /// Longest one request may take, from connecting to the last byte.
    pub request_timeout: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// `--registry-auth FILE`: the docker-style config holding registry credentials,
    /// instead of `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub registry_auth: Option<PathBuf>,
    /// `--no-https`: talk to registries (and token services) over plain HTTP.
    pub allow_http: bool,
    pub user_agent: String,
    /// Longest wait for a `docker-credential-*` helper.
    pub credential_helper_timeout: Duration,
    /// Connections kept open to one host, for parallel reads.
    pub max_connections: usize,
    /// The CA certificates (PEM) TLS trusts. `None`: `SSL_CERT_FILE`, else the system's
    /// bundle, else Mozilla's roots.
    pub ca_file: Option<PathBuf>,
    /// Where credentials and S3 settings come from.
    pub env: Environment,
}

impl StoreConfig {
    /// The defaults, with credentials and S3 settings taken from `env`.
    pub fn new(env: Environment) -> Self {
        StoreConfig {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            retry: RetryPolicy::default(),
            registry_auth: None,
            allow_http: false,
            user_agent: concat!("sifuse/", env!("CARGO_PKG_VERSION")).into(),
            credential_helper_timeout: Duration::from_secs(10),
            max_connections: 8,
            ca_file: None,
            env,
        }
    }

    /// The defaults, with the process's environment.
    pub fn from_process_env() -> Self {
        StoreConfig::new(Environment::from_process())
    }

    /// What `--registry-auth FILE` and `--no-https` ask for, over the defaults with the
    /// process's environment; `None` when they ask for nothing (the defaults are then used).
    pub fn from_options(registry_auth: Option<&std::path::Path>, allow_http: bool) -> Option<Self> {
        if registry_auth.is_none() && !allow_http {
            return None;
        }
        let mut config = StoreConfig::from_process_env();
        config.registry_auth = registry_auth.map(PathBuf::from);
        config.allow_http = allow_http;
        Some(config)
    }
}

/// The store of the object `url` names. Nothing is sent yet (credential helpers aside);
/// [`ObjectStore::version`] makes the first request.
pub fn open_store(url: &str, config: &StoreConfig) -> Result<Arc<dyn ObjectStore>, RemoteError> {
    Ok(match RemoteUrl::parse(url)? {
        RemoteUrl::Http(u) => Arc::new(http::HttpStore::new(u, config)?),
        RemoteUrl::S3(l) => Arc::new(s3::S3Store::new(l, config)?),
        RemoteUrl::Oras(l) => Arc::new(oci::OciStore::new(l, config)?),
    })
}

/// One version of a remote object: its length and a validator that changes whenever its
/// bytes do (an ETag, a `Last-Modified` date, or a content digest such as `sha256:…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectVersion {
    /// Length in bytes.
    pub len: u64,
    /// ETag, Last-Modified or digest, as the store reports it.
    pub validator: String,
}

/// Why a remote read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    /// A failure that may pass (connection refused or reset, a timeout, 5xx, 429, a short
    /// or malformed answer), still failing once the store's retries were spent.
    #[error("{0}")]
    Transient(String),
    /// The object is no longer the version that was opened.
    #[error("the remote object changed: it was version {was}, the store now has {now}")]
    Changed { was: String, now: String },
    /// A failure retrying cannot mend: not found, access denied, a server that ignores
    /// Range, a malformed URL or manifest.
    #[error("{0}")]
    Refused(String),
}

impl From<RemoteError> for std::io::Error {
    fn from(e: RemoteError) -> Self {
        let kind = match e {
            RemoteError::Transient(_) => std::io::ErrorKind::TimedOut,
            RemoteError::Changed { .. } | RemoteError::Refused(_) => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// One remote object, read by byte range.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// The object's address for messages, without credentials.
    fn describe(&self) -> String;

    /// A name that differs whenever the address does, for keying caches: two objects never
    /// share one, although [`describe`](ObjectStore::describe) may hide what tells them
    /// apart (an HTTP query, which can hold a signature). Never shown to users; holds no
    /// credentials. By default, the description.
    fn identity(&self) -> String {
        self.describe()
    }

    /// The object's current version (one request).
    fn version(&self) -> Result<ObjectVersion, RemoteError>;

    /// Fill `buf` with the bytes at `offset` of the object at `version`. Answers
    /// [`RemoteError::Changed`] when the store holds another version, and never returns
    /// bytes it did not verify to be exactly the range asked for.
    fn read_range(
        &self,
        version: &ObjectVersion,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RemoteError>;
}

/// An object held in memory: the store of unit tests, which counts the requests it answers
/// and can be made to fail or to change.
#[derive(Debug)]
pub struct MemoryObject {
    state: Mutex<MemoryState>,
    requests: AtomicU64,
    bytes_served: AtomicU64,
}

#[derive(Debug)]
struct MemoryState {
    bytes: Vec<u8>,
    version: u64,
    /// Requests still to fail, and with what.
    failures: Vec<RemoteError>,
}

impl MemoryObject {
    /// An object holding `bytes`, at version 1.
    pub fn new(bytes: Vec<u8>) -> Self {
        MemoryObject {
            state: Mutex::new(MemoryState {
                bytes,
                version: 1,
                failures: Vec::new(),
            }),
            requests: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
        }
    }

    /// Replace the bytes: the object gets a new version.
    pub fn replace(&self, bytes: Vec<u8>) {
        let mut s = self.lock();
        s.bytes = bytes;
        s.version += 1;
    }

    /// Make the next requests (version or range) fail with `errors`, in order.
    pub fn fail_next(&self, errors: impl IntoIterator<Item = RemoteError>) {
        let mut s = self.lock();
        let mut errors: Vec<_> = errors.into_iter().collect();
        errors.reverse();
        errors.append(&mut s.failures);
        s.failures = errors;
    }

    /// Requests answered or failed so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Bytes of ranges served so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(&self) -> Result<std::sync::MutexGuard<'_, MemoryState>, RemoteError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        match s.failures.pop() {
            Some(e) => Err(e),
            None => Ok(s),
        }
    }
}

fn memory_version(s: &MemoryState) -> ObjectVersion {
    ObjectVersion {
        len: s.bytes.len() as u64,
        validator: format!("\"v{}\"", s.version),
    }
}

impl ObjectStore for MemoryObject {
    fn describe(&self) -> String {
        "memory object".into()
    }

    fn version(&self) -> Result<ObjectVersion, RemoteError> {
        let s = self.begin()?;
        Ok(memory_version(&s))
    }

    fn read_range(
        &self,
        version: &ObjectVersion,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RemoteError> {
        let s = self.begin()?;
        let now = memory_version(&s);
        if &now != version {
            return Err(RemoteError::Changed {
                was: version.validator.clone(),
                now: now.validator,
            });
        }
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .filter(|r| r.end <= s.bytes.len())
            .ok_or_else(|| {
                RemoteError::Refused(format!(
                    "range of {} bytes at {offset} lies outside the {}-byte object",
                    buf.len(),
                    s.bytes.len()
                ))
            })?;
        buf.copy_from_slice(&s.bytes[range]);
        self.bytes_served
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_object_serves_ranges_of_its_version_only() {
        let o = MemoryObject::new((0..=255u8).collect());
        let v = o.version().unwrap();
        assert_eq!(v.len, 256);
        let mut buf = [0u8; 4];
        o.read_range(&v, 10, &mut buf).unwrap();
        assert_eq!(buf, [10, 11, 12, 13]);
        assert!(matches!(
            o.read_range(&v, 254, &mut buf),
            Err(RemoteError::Refused(_))
        ));
        o.replace(vec![1; 256]);
        assert!(matches!(
            o.read_range(&v, 0, &mut buf),
            Err(RemoteError::Changed { .. })
        ));
        assert_eq!(o.requests(), 4);
        assert_eq!(o.bytes_served(), 4);
    }

    #[test]
    fn injected_failures_come_in_order() {
        let o = MemoryObject::new(vec![0; 8]);
        o.fail_next([
            RemoteError::Transient("reset".into()),
            RemoteError::Refused("403".into()),
        ]);
        assert_eq!(o.version(), Err(RemoteError::Transient("reset".into())));
        assert_eq!(o.version(), Err(RemoteError::Refused("403".into())));
        assert!(o.version().is_ok());
    }
}
