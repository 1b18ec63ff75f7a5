//! An object on an HTTP(S) server, read with Range GETs.
//!
//! The version is the ETag, else `Last-Modified`, from a first one-byte range request (which
//! also proves the server honours Range: one that answers 200 with the whole object is
//! refused without reading it). Reads carry `If-Match` (or `If-Unmodified-Since`) so a
//! changed object answers 412, and the answer's own validator is compared too, for servers
//! that ignore conditions.

use std::sync::Mutex;

use super::client::{unsatisfied_range_length, Answer, Credential, HttpClient};
use super::retry::{self, Failure, RetryPolicy, SystemClock};
use super::url::HttpUrl;
use super::{ObjectStore, ObjectVersion, RemoteError, StoreConfig};

/// Prefix of a validator that is a `Last-Modified` date rather than an ETag (ETags always
/// start with `"` or `W/"`).
const LAST_MODIFIED: &str = "last-modified ";

/// An object at an `http://` or `https://` URL.
pub struct HttpStore {
    client: HttpClient,
    url: HttpUrl,
    /// `Basic …` from the URL's `user:password@`, sent to the URL's origin only.
    authorization: Option<String>,
    retry: RetryPolicy,
    redirect: RedirectMemo,
}

impl std::fmt::Debug for HttpStore {
    /// The URL without credentials, and whether there are some.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStore")
            .field("url", &self.url)
            .field("credentials", &self.authorization.is_some())
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl HttpStore {
    pub fn new(url: HttpUrl, config: &StoreConfig) -> Result<Self, RemoteError> {
        let authorization = url.userinfo.as_ref().map(|(user, password)| {
            super::credentials::RegistryCredentials {
                username: user.clone(),
                password: password.clone(),
            }
            .basic_authorization()
        });
        Ok(HttpStore {
            client: HttpClient::new(config)?,
            url,
            authorization,
            retry: config.retry.clone(),
            redirect: RedirectMemo::default(),
        })
    }

    fn get(&self, headers: &[(String, String)]) -> Result<Answer, Failure> {
        let credential = self.authorization.as_deref().map(|a| Credential {
            origin: &self.url,
            authorization: a,
        });
        self.redirect
            .get(&self.client, &self.url, headers, credential.as_ref())
    }
}

impl ObjectStore for HttpStore {
    fn describe(&self) -> String {
        self.url.to_string()
    }

    /// The URL with its query (where presigned URLs keep their signature) as a digest.
    fn identity(&self) -> String {
        use sha2::{Digest, Sha256};
        let url = super::url::wire_url(&self.url);
        format!(
            "{} {}",
            self.url,
            super::sigv4::hex(&Sha256::digest(url.as_bytes()))
        )
    }

    fn version(&self) -> Result<ObjectVersion, RemoteError> {
        let what = format!("GET {}", self.url);
        retry::run(&self.retry, &SystemClock, &what, || {
            let answer = self.get(&[("range".into(), "bytes=0-0".into())])?;
            if !matches!(answer.status, 200 | 206 | 416) {
                return Err(answer.status_failure(&what));
            }
            let len = probe_length(&answer, &self.url)?;
            let validator = validator_of(&answer).ok_or_else(|| {
                Failure::refused(format!(
                    "{} sends neither ETag nor Last-Modified, so sifuse cannot tell when the \
                     object changes; serve it with one of them",
                    self.url
                ))
            })?;
            answer.read_partial(0, &mut [0u8; 1], len)?;
            Ok(ObjectVersion { len, validator })
        })
    }

    fn read_range(
        &self,
        version: &ObjectVersion,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RemoteError> {
        let Some(end) = check_bounds(version, offset, buf.len(), &self.describe())? else {
            return Ok(());
        };
        let mut headers = vec![("range".to_string(), format!("bytes={offset}-{end}"))];
        match condition_of(&version.validator) {
            Condition::IfMatch(etag) => headers.push(("if-match".into(), etag.into())),
            Condition::IfUnmodifiedSince(date) => {
                headers.push(("if-unmodified-since".into(), date.into()))
            }
            Condition::None => {}
        }
        let what = format!("GET {} bytes {offset}-{end}", self.url);
        retry::run(&self.retry, &SystemClock, &what, || {
            let answer = self.get(&headers)?;
            check_not_changed(&answer, version)?;
            answer.read_partial(offset, buf, version.len)
        })
    }
}

/// The object's length from the answer to `Range: bytes=0-0`. A server that answers 200
/// ignores Range: refused, and its body is never read.
pub(crate) fn probe_length(answer: &Answer, url: &HttpUrl) -> Result<u64, Failure> {
    match answer.status {
        206 => {
            let range = answer.header("content-range").unwrap_or_default();
            match super::client::parse_content_range(range) {
                Some(r) if r.start == 0 && r.end == 0 => r.total.ok_or_else(|| {
                    Failure::refused(format!(
                        "{url} does not say how long the object is (Content-Range {range:?})"
                    ))
                }),
                _ => Err(Failure::retry(format!(
                    "{url} answered Content-Range {range:?} to a request for byte 0"
                ))),
            }
        }
        200 => Err(Failure::refused(format!(
            "{url} ignores HTTP Range requests (it answered 200 with the whole object); \
             sifuse reads images in pieces and needs a server that supports Range"
        ))),
        416 => match answer
            .header("content-range")
            .and_then(unsatisfied_range_length)
        {
            Some(0) => Err(Failure::refused(format!("{url} is an empty object"))),
            _ => Err(Failure::retry(format!(
                "{url} answered 416 to a request for byte 0"
            ))),
        },
        other => Err(Failure::retry(format!(
            "{url} answered {other} to a request for byte 0"
        ))),
    }
}

/// Whether `offset..offset+len` lies in the object: the offset of its last byte, or `None`
/// for an empty range (nothing to fetch).
pub(crate) fn check_bounds(
    version: &ObjectVersion,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Option<u64>, RemoteError> {
    offset
        .checked_add(len as u64)
        .filter(|&end| end <= version.len)
        .map(|end| (len > 0).then(|| end - 1))
        .ok_or_else(|| {
            RemoteError::Refused(format!(
                "{what}: a read of {len} bytes at {offset} lies outside the {}-byte object",
                version.len
            ))
        })
}

/// The version an answer describes: its ETag, else its Last-Modified.
pub(crate) fn validator_of(answer: &Answer) -> Option<String> {
    if let Some(etag) = answer
        .header("etag")
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        return Some(etag.to_string());
    }
    answer
        .header("last-modified")
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| format!("{LAST_MODIFIED}{d}"))
}

enum Condition<'a> {
    IfMatch(&'a str),
    IfUnmodifiedSince(&'a str),
    None,
}

/// The request condition that makes a server refuse another version. Weak ETags cannot be
/// used with If-Match (the comparison is strong), so they are only compared on answers.
fn condition_of(validator: &str) -> Condition<'_> {
    if let Some(date) = validator.strip_prefix(LAST_MODIFIED) {
        Condition::IfUnmodifiedSince(date)
    } else if validator.starts_with('"') {
        Condition::IfMatch(validator)
    } else {
        Condition::None
    }
}

/// `Changed` when the answer is 412 (the condition failed), a 416 for a length other than
/// the version's, or carries another validator than the version's.
pub(crate) fn check_not_changed(answer: &Answer, version: &ObjectVersion) -> Result<(), Failure> {
    let changed = |now: String| {
        Failure::Stop(RemoteError::Changed {
            was: version.validator.clone(),
            now,
        })
    };
    match answer.status {
        412 => {
            return Err(changed(
                validator_of(answer).unwrap_or_else(|| "another version".into()),
            ))
        }
        416 => {
            return match answer
                .header("content-range")
                .and_then(unsatisfied_range_length)
            {
                Some(len) if len != version.len => Err(changed(format!("{len} bytes long"))),
                _ => Err(Failure::retry(format!(
                    "{} answered 416 to a range inside the object",
                    answer.url
                ))),
            };
        }
        200 | 206 => {}
        _ => return Ok(()),
    }
    if let Some(date) = version.validator.strip_prefix(LAST_MODIFIED) {
        match answer.header("last-modified").map(str::trim) {
            Some(d) if d != date => return Err(changed(format!("{LAST_MODIFIED}{d}"))),
            _ => {}
        }
    } else if let Some(etag) = answer.header("etag").map(str::trim) {
        if !etag.is_empty() && etag != version.validator {
            return Err(changed(etag.to_string()));
        }
    }
    Ok(())
}

/// Where the object was last found after a redirect (say, a presigned URL of blob storage),
/// so later reads go there directly. When that location stops answering (401, 403, 404,
/// 410: the signature expired), the origin is asked again.
#[derive(Debug, Default)]
pub(crate) struct RedirectMemo {
    last: Mutex<Option<(String, HttpUrl)>>,
}

impl RedirectMemo {
    /// GET `origin` (or where it last redirected to), following redirects.
    pub fn get(
        &self,
        client: &HttpClient,
        origin: &HttpUrl,
        headers: &[(String, String)],
        credential: Option<&Credential<'_>>,
    ) -> Result<Answer, Failure> {
        self.get_with(origin, |url| client.get_following(url, headers, credential))
    }

    /// Like [`RedirectMemo::get`] with the request to the origin made by `fetch` (which may,
    /// say, authenticate first).
    pub fn get_with(
        &self,
        origin: &HttpUrl,
        mut fetch: impl FnMut(&HttpUrl) -> Result<Answer, Failure>,
    ) -> Result<Answer, Failure> {
        let key = super::url::wire_url(origin);
        let remembered = self
            .lock()
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, u)| u.clone());
        if let Some(location) = remembered {
            let answer = match fetch(&location) {
                Ok(a) => a,
                Err(e) => {
                    // Storage unreachable: the next attempt asks the origin, which may know
                    // another place.
                    *self.lock() = None;
                    return Err(e);
                }
            };
            if !matches!(answer.status, 401 | 403 | 404 | 410) {
                return Ok(answer);
            }
            tracing::debug!(
                "{location} answered {}; asking {origin} again",
                answer.status
            );
            *self.lock() = None;
        }
        let answer = fetch(origin)?;
        if matches!(answer.status, 200 | 206) && answer.url != *origin {
            *self.lock() = Some((key, answer.url.clone()));
        }
        Ok(answer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(String, HttpUrl)>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}
