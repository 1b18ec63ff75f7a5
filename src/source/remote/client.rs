//! The HTTP client every store sends through: one keep-alive agent with every timeout set,
//! redirects followed by hand (so credentials never reach another host), and the checks
//! that make a Range answer safe to serve: 206, the exact `Content-Range`, and a body of
//! exactly the length asked for.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ureq::config::Config;
use ureq::http::{self, Response, Uri};
use ureq::tls::{RootCerts, TlsConfig};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};
use ureq::Body;

use super::retry::{parse_retry_after, Failure};
use super::url::{wire_url, HttpUrl};
use super::{RemoteError, StoreConfig};

/// Most redirects one request follows.
const MAX_REDIRECTS: usize = 5;

/// The blocking HTTP client.
#[derive(Debug, Clone)]
pub(crate) struct HttpClient {
    agent: ureq::Agent,
    allow_http: bool,
    /// The addresses the agent's resolver keeps, forgotten when a request fails.
    addresses: KeptAddresses,
}

/// A response whose body has not been read yet.
pub(crate) struct Answer {
    pub status: u16,
    pub response: Response<Body>,
    /// The URL that answered (after redirects).
    pub url: HttpUrl,
}

impl Answer {
    /// A header as text, if present and ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.response, name)
    }

    /// The failure a status other than the expected ones means: 408, 429 and 5xx may pass
    /// (with the server's Retry-After), anything else is final. `what` names the request.
    pub fn status_failure(mut self, what: &str) -> Failure {
        let retry_after = self
            .header("retry-after")
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let detail = self.error_detail();
        let why = format!(
            "{what}: the server answered {}{detail}",
            status_text(self.status)
        );
        match self.status {
            408 | 425 | 429 | 500..=599 => Failure::Retry { why, retry_after },
            _ => Failure::refused(why),
        }
    }

    /// A short, one-line extract of an error body (S3's `<Code>` and `<Message>`, a
    /// registry's JSON errors, or text), or nothing.
    pub fn error_detail(&mut self) -> String {
        let body = self.small_body(8 * 1024).unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        if let Some(code) = xml_element(&text, "Code") {
            return match xml_element(&text, "Message") {
                Some(m) => format!(" ({code}: {m})"),
                None => format!(" ({code})"),
            };
        }
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(first) = json
                .get("errors")
                .and_then(|e| e.as_array())
                .and_then(|a| a.first())
            {
                let code = first.get("code").and_then(|c| c.as_str()).unwrap_or("");
                let message = first.get("message").and_then(|m| m.as_str()).unwrap_or("");
                return format!(" ({code}: {message})");
            }
        }
        String::new()
    }

    /// The whole body, when it is at most `limit` bytes; a longer one is an error, never read
    /// beyond the limit.
    pub fn small_body(&mut self, limit: u64) -> Result<Vec<u8>, Failure> {
        let mut out = Vec::new();
        let mut reader = self.response.body_mut().as_reader().take(limit + 1);
        reader
            .read_to_end(&mut out)
            .map_err(|e| Failure::retry(format!("reading the answer of {}: {e}", self.url)))?;
        if out.len() as u64 > limit {
            return Err(Failure::refused(format!(
                "{} answered more than {limit} bytes where a small document was expected",
                self.url
            )));
        }
        Ok(out)
    }

    /// Check that this is the answer to `bytes=offset-(offset+buf.len()-1)` of an object of
    /// `total` bytes, and read its body into `buf`. Anything else is a retryable failure:
    /// a 200 (whose body is then not read), a wrong `Content-Range` or `Content-Length`, a
    /// body shorter or longer than asked for.
    pub fn read_partial(mut self, offset: u64, buf: &mut [u8], total: u64) -> Result<(), Failure> {
        let url = self.url.clone();
        if buf.is_empty() {
            return Err(Failure::refused(format!("{url}: a read of no bytes")));
        }
        if self.status == 200 {
            return Err(Failure::retry(format!(
                "{url} answered 200 (the whole object) to a Range request"
            )));
        }
        if self.status != 206 {
            return Err(self.status_failure(&format!("GET {url}")));
        }
        let want_end = offset + buf.len() as u64 - 1;
        let range = self.header("content-range").unwrap_or("(none)");
        match parse_content_range(range) {
            Some(ContentRange {
                start,
                end,
                total: t,
            }) if start == offset && end == want_end && t.is_none_or(|t| t == total) => {}
            _ => {
                return Err(Failure::retry(format!(
                    "{url} answered Content-Range {range:?} to a request for bytes {offset}-{want_end}/{total}"
                )))
            }
        }
        if let Some(len) = self.header("content-length") {
            if len.trim().parse::<u64>().ok() != Some(buf.len() as u64) {
                return Err(Failure::retry(format!(
                    "{url} announced Content-Length {len} for a range of {} bytes",
                    buf.len()
                )));
            }
        }
        let mut reader = self.response.body_mut().as_reader();
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(Failure::retry(format!(
                        "{url} ended the body after {filled} of {} bytes",
                        buf.len()
                    )))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Failure::retry(format!(
                        "reading bytes {offset}-{want_end} from {url} after {filled} bytes: {e}"
                    )))
                }
            }
        }
        let mut extra = [0u8; 1];
        match reader.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(Failure::retry(format!(
                "{url} sent more than the {} bytes asked for",
                buf.len()
            ))),
            Err(e) => Err(Failure::retry(format!(
                "reading the end of bytes {offset}-{want_end} from {url}: {e}"
            ))),
        }
    }
}

pub(crate) fn header<'a, B>(response: &'a Response<B>, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A status code with its reason phrase, e.g. `404 Not Found`.
pub(crate) fn status_text(status: u16) -> String {
    match http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

/// The text of the first `<name>` element, on one line, if short enough for a message.
fn xml_element(text: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{name}>"))? + start;
    let inner = text[start..end]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    (!inner.is_empty() && inner.len() <= 300).then_some(inner)
}

/// `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContentRange {
    pub start: u64,
    pub end: u64,
    pub total: Option<u64>,
}

pub(crate) fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if end < start || total.is_some_and(|t| end >= t) {
        return None;
    }
    Some(ContentRange { start, end, total })
}

/// The object length a `416` answer reports (`Content-Range: bytes */LENGTH`).
pub(crate) fn unsatisfied_range_length(value: &str) -> Option<u64> {
    value.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

/// Who may see a credential: the origin it was given for.
pub(crate) struct Credential<'a> {
    pub origin: &'a HttpUrl,
    /// The `Authorization` header value.
    pub authorization: &'a str,
}

/// CA bundles of the common distributions, tried in order when no bundle is named: a site's
/// own CAs are installed there, and sites often serve images from servers they sign.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The roots TLS trusts: `ca_file`, else `SSL_CERT_FILE`, else the system bundle, else
/// Mozilla's roots (built in). A named bundle that cannot be read is an error; an unreadable
/// system bundle is passed over.
fn root_certs(config: &StoreConfig) -> Result<RootCerts, RemoteError> {
    let named = config
        .ca_file
        .clone()
        .or_else(|| config.env.get("SSL_CERT_FILE").map(PathBuf::from));
    if let Some(path) = named {
        return read_bundle(&path)
            .map_err(|e| RemoteError::Refused(format!("the CA bundle {}: {e}", path.display())));
    }
    for path in SYSTEM_CA_BUNDLES {
        if let Ok(roots) = read_bundle(Path::new(path)) {
            return Ok(roots);
        }
    }
    Ok(RootCerts::WebPki)
}

fn read_bundle(path: &Path) -> Result<RootCerts, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(RootCerts::from(certs))
}

/// How long a host's resolved addresses are used before it is looked up again.
const ADDRESSES_KEPT_FOR: Duration = Duration::from_secs(60);
/// Most hosts whose addresses are kept (a store and the hosts it redirects to).
const HOSTS_KEPT: usize = 64;

/// A resolver that looks a host up once a minute rather than before every request.
///
/// ureq resolves the host before every request, even one sent on a pooled connection, and
/// to bound the look-up by the request's timeout it does so on a new thread: a thread
/// started per range request (hundreds a second in a sequential read). The look-up itself
/// is still the default one, bounded by the same timeout, when a host is new or its
/// addresses are older than [`ADDRESSES_KEPT_FOR`], and after any request failed to
/// reach its server (the host may have moved: each retry looks it up again).
/// Clones share what they keep: the agent resolves with one, its client forgets with
/// another.
#[derive(Debug, Clone)]
struct KeptAddresses {
    kept: Arc<Mutex<HashMap<String, (Instant, ResolvedSocketAddrs)>>>,
    keep_for: Duration,
}

impl Default for KeptAddresses {
    fn default() -> Self {
        KeptAddresses {
            kept: Arc::default(),
            keep_for: ADDRESSES_KEPT_FOR,
        }
    }
}

impl KeptAddresses {
    /// Look every host up again from now on.
    fn forget_all(&self) {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Resolver for KeptAddresses {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let key = match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) => format!("{scheme}://{authority}"),
            _ => return DefaultResolver::default().resolve(uri, config, timeout),
        };
        let now = Instant::now();
        if let Some((at, addresses)) = self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if now.duration_since(*at) < self.keep_for {
                return Ok(addresses.clone());
            }
        }
        let addresses = DefaultResolver::default().resolve(uri, config, timeout)?;
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= HOSTS_KEPT {
            kept.retain(|_, (at, _)| now.duration_since(*at) < self.keep_for);
            if kept.len() >= HOSTS_KEPT {
                kept.clear();
            }
        }
        kept.insert(key, (now, addresses.clone()));
        Ok(addresses)
    }
}

impl HttpClient {
    pub fn new(config: &StoreConfig) -> Result<Self, RemoteError> {
        let tls = TlsConfig::builder().root_certs(root_certs(config)?).build();
        let agent_config = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(config.user_agent.as_str())
            // Bytes must come as stored: no content coding on a Range answer.
            .accept_encoding("identity")
            .timeout_connect(Some(config.connect_timeout))
            .timeout_recv_response(Some(config.idle_timeout))
            .timeout_per_read(Some(config.idle_timeout))
            .timeout_per_write(Some(config.idle_timeout))
            .timeout_per_call(Some(config.request_timeout))
            .max_idle_connections(config.max_connections.max(1) * 2)
            .max_idle_connections_per_host(config.max_connections.max(1))
            .build();
        let addresses = KeptAddresses::default();
        let agent =
            ureq::Agent::with_parts(agent_config, DefaultConnector::new(), addresses.clone());
        Ok(HttpClient {
            addresses,
            agent,
            allow_http: config.allow_http,
        })
    }

    /// One request, no redirects followed.
    pub fn send(
        &self,
        method: &str,
        url: &HttpUrl,
        headers: &[(String, String)],
    ) -> Result<Answer, Failure> {
        let mut builder = http::Request::builder().method(method).uri(wire_url(url));
        for (k, v) in headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let request = builder
            .body(())
            .map_err(|e| Failure::refused(format!("cannot make a request to {url}: {e}")))?;
        let response = self.agent.run(request).map_err(|e| {
            self.addresses.forget_all();
            transport_failure(&format!("{method} {url}"), e)
        })?;
        Ok(Answer {
            status: response.status().as_u16(),
            response,
            url: url.clone(),
        })
    }

    /// A GET that follows redirects. `credential` goes only to URLs of its own origin; a
    /// redirect from HTTPS to plain HTTP is refused unless plain HTTP is allowed.
    pub fn get_following(
        &self,
        url: &HttpUrl,
        headers: &[(String, String)],
        credential: Option<&Credential<'_>>,
    ) -> Result<Answer, Failure> {
        let mut url = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut all = headers.to_vec();
            if let Some(c) = credential.filter(|c| c.origin.same_origin(&url)) {
                all.push(("authorization".into(), c.authorization.into()));
            }
            let answer = self.send("GET", &url, &all)?;
            if !matches!(answer.status, 301 | 302 | 303 | 307 | 308) {
                return Ok(answer);
            }
            let location = answer.header("location").ok_or_else(|| {
                Failure::retry(format!(
                    "{url} answered {} without a Location",
                    answer.status
                ))
            })?;
            let next = url
                .join(location)
                .map_err(|e| Failure::refused(format!("{url} redirected badly: {e}")))?;
            if url.https && !next.https && !self.allow_http {
                return Err(Failure::refused(format!(
                    "{url} redirected to plain HTTP ({next}); use --no-https to allow it"
                )));
            }
            url = next;
        }
        Err(Failure::refused(format!(
            "more than {MAX_REDIRECTS} redirects from {url}"
        )))
    }
}

/// What a failure to get any answer means.
fn transport_failure(what: &str, e: ureq::Error) -> Failure {
    use ureq::Error as E;
    let tls = |e: &ureq::Error, certificate: bool| {
        let hint = if certificate {
            "if a site CA signs the server's certificate, name its PEM bundle in SSL_CERT_FILE"
        } else {
            "a server that speaks plain HTTP needs an http:// URL, or --no-https for a registry"
        };
        Failure::refused(format!("{what}: TLS failed: {e} ({hint})"))
    };
    let bad_certificate = |e: &rustls::Error| matches!(e, rustls::Error::InvalidCertificate(_));
    match e {
        E::Rustls(ref r) => tls(&e, bad_certificate(r)),
        E::Tls(_) | E::Pem(_) | E::TlsRequired => tls(&e, false),
        E::BadUri(_) | E::Http(_) | E::RequireHttpsOnly(_) | E::InvalidProxyUrl => {
            Failure::refused(format!("{what}: {e}"))
        }
        // A TLS failure reaches us as I/O when rustls reports it through the stream.
        E::Io(ref io)
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>()) =>
        {
            let certificate = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(bad_certificate);
            tls(&e, certificate)
        }
        E::HostNotFound => Failure::retry(format!("{what}: host not found")),
        other => Failure::retry(format!("{what}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses_are_looked_up_once_a_minute_and_after_a_failure() {
        let uri: Uri = "http://localhost:8080/image.sif".parse().unwrap();
        let config = Config::default();
        let timeout = || NextTimeout {
            after: Duration::from_secs(5).into(),
            reason: ureq::Timeout::Resolve,
            per_read: None,
            per_write: None,
        };
        let mut planted = KeptAddresses::default().empty();
        planted.push("192.0.2.7:8080".parse().unwrap());
        let plant = |resolver: &KeptAddresses| {
            resolver.kept.lock().unwrap().insert(
                "http://localhost:8080".into(),
                (Instant::now(), planted.clone()),
            );
        };
        let looked_up = |addresses: &ResolvedSocketAddrs| {
            !addresses.is_empty()
                && addresses
                    .iter()
                    .all(|a| a.ip().is_loopback() && a.port() == 8080)
        };
        // Addresses kept less than a minute are used as they are: no look-up.
        let resolver = KeptAddresses::default();
        plant(&resolver);
        let got = resolver.resolve(&uri, &config, timeout()).unwrap();
        assert_eq!(&got[..], &planted[..]);
        // After a failed request the host is looked up again, and the answer kept.
        resolver.forget_all();
        let fresh = resolver.resolve(&uri, &config, timeout()).unwrap();
        assert!(looked_up(&fresh), "{fresh:?}");
        let kept = resolver.kept.lock().unwrap()["http://localhost:8080"]
            .1
            .clone();
        assert_eq!(&kept[..], &fresh[..]);
        // Once kept for as long as they may be, the host is looked up again.
        let expiring = KeptAddresses {
            keep_for: Duration::ZERO,
            ..KeptAddresses::default()
        };
        plant(&expiring);
        let fresh = expiring.resolve(&uri, &config, timeout()).unwrap();
        assert!(looked_up(&fresh), "{fresh:?}");
    }

    #[test]
    fn content_ranges_parse_strictly() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some(ContentRange {
                start: 0,
                end: 9,
                total: Some(100)
            })
        );
        assert_eq!(
            parse_content_range("bytes 5-5/*"),
            Some(ContentRange {
                start: 5,
                end: 5,
                total: None
            })
        );
        for bad in [
            "bytes 9-0/100",
            "bytes 0-100/100",
            "bytes */100",
            "items 0-9/100",
            "bytes 0-9",
            "bytes -1-9/100",
            "bytes 0-9/abc",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
        assert_eq!(unsatisfied_range_length("bytes */1234"), Some(1234));
        assert_eq!(unsatisfied_range_length("bytes 0-1/2"), None);
    }

    #[test]
    fn error_bodies_give_one_line_details() {
        let s3 = "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>";
        assert_eq!(xml_element(s3, "Code").as_deref(), Some("NoSuchKey"));
        assert_eq!(
            xml_element(s3, "Message").as_deref(),
            Some("The specified key does not exist.")
        );
        assert_eq!(
            xml_element("<Message>\n a\n  b </Message>", "Message").as_deref(),
            Some("a b")
        );
        assert_eq!(xml_element("<Code></Code>", "Code"), None);
        assert_eq!(
            xml_element(&format!("<Code>{}</Code>", "x".repeat(301)), "Code"),
            None
        );
        assert_eq!(status_text(404), "404 Not Found");
        assert_eq!(status_text(599), "599");
    }
}
