//! The addresses of remote images: `http(s)://…`, `s3://BUCKET/KEY` and
//! `oras://REGISTRY/REPOSITORY:TAG` or `…@sha256:DIGEST`, and the plain HTTP URLs the stores
//! send requests to (with the joining of redirect targets).

use std::fmt;

use super::RemoteError;

/// Whether `s` names a remote image rather than a local path: it starts with one of the
/// schemes sifuse reads (`http://`, `https://`, `s3://`, `oras://`).
pub fn is_remote(s: &str) -> bool {
    ["http://", "https://", "s3://", "oras://"]
        .iter()
        .any(|scheme| starts_with_ignore_case(s, scheme))
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// A remote image's address, parsed.
#[derive(Clone, PartialEq, Eq)]
pub enum RemoteUrl {
    /// An object served over HTTP(S), read with Range requests.
    Http(HttpUrl),
    /// An object in an S3 bucket.
    S3(S3Location),
    /// A SIF pushed to an OCI registry as ORAS does.
    Oras(OciLocation),
}

/// `s3://BUCKET/KEY`. The key is taken literally (it is not percent-decoded), as the AWS
/// command line does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub key: String,
}

/// `oras://REGISTRY/REPOSITORY[:TAG|@DIGEST]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciLocation {
    /// Host, with `:port` when one was given.
    pub registry: String,
    /// Repository name, such as `library/alpine`.
    pub repository: String,
    pub reference: OciReference,
}

/// Which manifest of a repository: a tag (which may move) or a digest (which never does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OciReference {
    Tag(String),
    Digest(String),
}

impl OciReference {
    /// As it appears in the `/v2/<name>/manifests/<reference>` path.
    pub fn as_str(&self) -> &str {
        match self {
            OciReference::Tag(t) | OciReference::Digest(t) => t,
        }
    }
}

impl RemoteUrl {
    /// Parse a remote image's address; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Self, RemoteError> {
        let refuse = |why: &str| RemoteError::Refused(format!("{}: {why}", redact_url(s)));
        if starts_with_ignore_case(s, "http://") || starts_with_ignore_case(s, "https://") {
            return HttpUrl::parse(s)
                .map(RemoteUrl::Http)
                .map_err(|e| refuse(&e));
        }
        if starts_with_ignore_case(s, "s3://") {
            return parse_s3(&s["s3://".len()..])
                .map(RemoteUrl::S3)
                .map_err(|e| refuse(&e));
        }
        if starts_with_ignore_case(s, "oras://") {
            return parse_oras(&s["oras://".len()..])
                .map(RemoteUrl::Oras)
                .map_err(|e| refuse(&e));
        }
        Err(refuse(
            "not a remote image address (sifuse reads http://, https://, s3:// and oras://)",
        ))
    }
}

impl fmt::Display for RemoteUrl {
    /// The address without credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteUrl::Http(u) => write!(f, "{u}"),
            RemoteUrl::S3(l) => write!(f, "s3://{}/{}", l.bucket, l.key),
            RemoteUrl::Oras(l) => write!(f, "{l}"),
        }
    }
}

impl fmt::Debug for RemoteUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteUrl({self})")
    }
}

impl fmt::Display for OciLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = match self.reference {
            OciReference::Tag(_) => ':',
            OciReference::Digest(_) => '@',
        };
        write!(
            f,
            "oras://{}/{}{sep}{}",
            self.registry,
            self.repository,
            self.reference.as_str()
        )
    }
}

fn parse_s3(rest: &str) -> Result<S3Location, String> {
    let (bucket, key) = rest
        .split_once('/')
        .ok_or("an S3 address is s3://BUCKET/KEY")?;
    if bucket.is_empty() || key.is_empty() {
        return Err("an S3 address is s3://BUCKET/KEY".into());
    }
    // S3's rules are stricter (lowercase, 3 to 63 characters); other S3 servers are more
    // lenient, so check only what keeps the bucket a single, plain path segment and host label.
    if bucket.len() > 255
        || !bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(format!("{bucket:?} is not a bucket name"));
    }
    if key.len() > 1024 || key.chars().any(char::is_control) {
        return Err("the object key has control characters or is over 1024 bytes".into());
    }
    Ok(S3Location {
        bucket: bucket.into(),
        key: key.into(),
    })
}

fn parse_oras(rest: &str) -> Result<OciLocation, String> {
    const FORM: &str = "an ORAS address is oras://REGISTRY/REPOSITORY:TAG or oras://REGISTRY/REPOSITORY@sha256:DIGEST";
    let (registry, path) = rest.split_once('/').ok_or(FORM)?;
    if registry.is_empty() || path.is_empty() {
        return Err(FORM.into());
    }
    validate_host_port(registry)?;
    let (name, reference) = match path.split_once('@') {
        Some((name_and_tag, digest)) => {
            validate_digest(digest)?;
            // `repo:tag@digest`: the digest decides, as with docker.
            let name = match name_and_tag.rsplit_once(':') {
                Some((n, tag)) if !tag.contains('/') => n,
                _ => name_and_tag,
            };
            (name, OciReference::Digest(digest.into()))
        }
        None => match path.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => {
                validate_tag(tag)?;
                (name, OciReference::Tag(tag.into()))
            }
            _ => (path, OciReference::Tag("latest".into())),
        },
    };
    validate_repository(name)?;
    Ok(OciLocation {
        registry: registry.to_ascii_lowercase(),
        repository: name.into(),
        reference,
    })
}

/// The distribution spec's repository name: path components of lowercase letters and
/// digits, joined by `.`, `_`, `__`, `-`, separated by `/`.
fn validate_repository(name: &str) -> Result<(), String> {
    let bad = || {
        format!("{name:?} is not a repository name (lowercase letters, digits, '.', '_', '-', '/')")
    };
    if name.is_empty() || name.len() > 255 {
        return Err(bad());
    }
    for component in name.split('/') {
        let bytes = component.as_bytes();
        let ok = !bytes.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b));
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b));
    if ok {
        Ok(())
    } else {
        Err(format!("{tag:?} is not a tag"))
    }
}

/// `sha256:` and 64 lowercase hex digits, or `sha512:` and 128: the digests registries
/// address blobs and manifests by.
pub fn validate_digest(digest: &str) -> Result<(), String> {
    let ok = match digest.split_once(':') {
        Some(("sha256", hex)) => hex.len() == 64 && is_lower_hex(hex),
        Some(("sha512", hex)) => hex.len() == 128 && is_lower_hex(hex),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{digest:?} is not a digest (sha256: and 64 lowercase hex digits)"
        ))
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn validate_host_port(authority: &str) -> Result<(), String> {
    let bad = || format!("{authority:?} is not a host or host:port");
    let (host, port) = split_host_port(authority).ok_or_else(bad)?;
    if let Some(port) = port {
        port.parse::<u16>().map_err(|_| bad())?;
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
    };
    if host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `host[:port]` → (host, port); IPv6 hosts keep their brackets.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        match rest {
            "" => Some((host, None)),
            _ => Some((host, Some(rest.strip_prefix(':')?))),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => Some((h, Some(p))),
            None => Some((authority, None)),
        }
    }
}

/// An `http://` or `https://` URL as requests need it: scheme, host, port, and the path and
/// query exactly as they will be sent. Credentials in the URL (`user:password@`) are kept
/// apart and never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub https: bool,
    /// Lowercase host name or IP address (IPv6 in brackets).
    pub host: String,
    pub port: u16,
    /// Starts with `/`; percent-encoded.
    pub path: String,
    /// After the `?`, if any; percent-encoded.
    pub query: Option<String>,
    /// `user:password@` from the URL, percent-decoded, sent as Basic credentials.
    pub userinfo: Option<(String, String)>,
}

impl HttpUrl {
    /// Parse an absolute `http://` or `https://` URL. Characters a URL may not hold (spaces,
    /// non-ASCII) in the path or query are percent-encoded; a fragment is dropped.
    pub fn parse(s: &str) -> Result<HttpUrl, String> {
        let (https, rest) = if starts_with_ignore_case(s, "https://") {
            (true, &s["https://".len()..])
        } else if starts_with_ignore_case(s, "http://") {
            (false, &s["http://".len()..])
        } else {
            return Err("not an http:// or https:// URL".into());
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path_query) = rest.split_at(end);
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((ui, hp)) => {
                let (user, pass) = ui.split_once(':').unwrap_or((ui, ""));
                (Some((percent_decode(user)?, percent_decode(pass)?)), hp)
            }
            None => (None, authority),
        };
        validate_host_port(hostport)?;
        let (host, port) = split_host_port(hostport).ok_or("no host")?;
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
            None if https => 443,
            None => 80,
        };
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p, Some(encode_uri_chars(q))),
            None => (path_query, None),
        };
        let path = if path.is_empty() {
            "/".to_string()
        } else {
            encode_uri_chars(path)
        };
        Ok(HttpUrl {
            https,
            host: host.to_ascii_lowercase(),
            port,
            path,
            query,
            userinfo,
        })
    }

    /// `host` or `host:port`, the port left out when it is the scheme's default: what the
    /// `Host` header carries.
    pub fn authority(&self) -> String {
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Path and query, as sent in the request line.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }

    /// Same scheme, host and port: where credentials meant for one may go to the other.
    pub fn same_origin(&self, other: &HttpUrl) -> bool {
        self.https == other.https && self.host == other.host && self.port == other.port
    }

    /// The URL a `Location` header points to, relative to this one. Credentials in the
    /// location are dropped: a redirect must not pick who we are.
    pub fn join(&self, location: &str) -> Result<HttpUrl, String> {
        let location = location.trim();
        let mut joined = if starts_with_ignore_case(location, "http://")
            || starts_with_ignore_case(location, "https://")
        {
            HttpUrl::parse(location)?
        } else if let Some(rest) = location.strip_prefix("//") {
            let scheme = if self.https { "https://" } else { "http://" };
            HttpUrl::parse(&format!("{scheme}{rest}"))?
        } else if location.contains("://") {
            return Err(format!("redirect to a non-HTTP address {location:?}"));
        } else {
            let base = if location.starts_with('/') || location.starts_with('?') {
                if location.starts_with('?') {
                    self.path.clone()
                } else {
                    String::new()
                }
            } else {
                // A relative path: replace the last segment of ours.
                match self.path.rfind('/') {
                    Some(i) => self.path[..=i].to_string(),
                    None => "/".into(),
                }
            };
            let scheme = if self.https { "https" } else { "http" };
            HttpUrl::parse(&format!("{scheme}://{}{base}{location}", self.authority()))?
        };
        joined.userinfo = None;
        Ok(joined)
    }

    /// This URL with `path` (already encoded) and no query.
    pub fn with_path(&self, path: &str) -> HttpUrl {
        HttpUrl {
            path: path.into(),
            query: None,
            ..self.clone()
        }
    }
}

impl fmt::Display for HttpUrl {
    /// The URL without credentials. The query is shown as `?…`, since presigned URLs carry
    /// their signature there.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path)?;
        if self.query.is_some() {
            write!(f, "?…")?;
        }
        Ok(())
    }
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HttpUrl({self})")
    }
}

/// The full URL to put on the wire (without userinfo).
pub(crate) fn wire_url(u: &HttpUrl) -> String {
    let scheme = if u.https { "https" } else { "http" };
    format!("{scheme}://{}{}", u.authority(), u.path_and_query())
}

/// `s` with any `user:password@` removed, for messages about an address that did not parse.
pub fn redact_url(s: &str) -> String {
    match s.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
                None => s.to_string(),
            }
        }
        None => s.to_string(),
    }
}

/// Percent-encode what may not appear in a request target as it is: controls, space,
/// non-ASCII and `"<>\^`{|}`. Everything else, `%` included, is left as given.
fn encode_uri_chars(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encode everything but the unreserved characters (`A-Za-z0-9-._~`), and `/` when
/// `keep_slash`: the encoding SigV4 and registry query strings expect.
pub(crate) fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a bad %-escape in the URL's credentials")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL's credentials are not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oras(s: &str) -> OciLocation {
        match RemoteUrl::parse(s).unwrap() {
            RemoteUrl::Oras(l) => l,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    #[test]
    fn remote_addresses_are_told_from_paths() {
        for s in ["http://h/x", "HTTPS://h/x", "s3://b/k", "oras://r/n:t"] {
            assert!(is_remote(s), "{s}");
        }
        for s in [
            "/tmp/x.sif",
            "x.sif",
            "file:///x",
            "ftp://h/x",
            "http:/x",
            "",
        ] {
            assert!(!is_remote(s), "{s}");
        }
    }

    #[test]
    fn http_urls_keep_path_and_query_and_hide_credentials() {
        let u = HttpUrl::parse("https://alice:p%40ss@Example.COM:8443/a/b.sif?x=1#frag").unwrap();
        assert!(u.https);
        assert_eq!(u.host, "example.com");
        assert_eq!(u.port, 8443);
        assert_eq!(u.path, "/a/b.sif");
        assert_eq!(u.query.as_deref(), Some("x=1"));
        assert_eq!(u.userinfo, Some(("alice".into(), "p@ss".into())));
        assert_eq!(u.to_string(), "https://example.com:8443/a/b.sif?…");
        assert_eq!(wire_url(&u), "https://example.com:8443/a/b.sif?x=1");

        let u = HttpUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!(
            (u.port, u.path.as_str(), u.authority()),
            (80, "/", "127.0.0.1".into())
        );
        let u = HttpUrl::parse("http://[::1]:8080/x y").unwrap();
        assert_eq!(u.authority(), "[::1]:8080");
        assert_eq!(u.path, "/x%20y");

        for bad in [
            "http://",
            "http://h:99999/",
            "http://h o/",
            "http://[::1/",
            "https://:80/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redirect_targets_join_like_a_browser_and_drop_credentials() {
        let base = HttpUrl::parse("https://u:p@reg.io/v2/lib/blobs/sha256:1?a=b").unwrap();
        let abs = base.join("https://cdn.example/x?sig=1").unwrap();
        assert_eq!(wire_url(&abs), "https://cdn.example/x?sig=1");
        assert!(!abs.same_origin(&base));
        assert_eq!(abs.userinfo, None);
        assert_eq!(
            wire_url(&base.join("/other").unwrap()),
            "https://reg.io/other"
        );
        assert_eq!(
            wire_url(&base.join("next?x").unwrap()),
            "https://reg.io/v2/lib/blobs/next?x"
        );
        assert_eq!(
            wire_url(&base.join("//mirror:81/p").unwrap()),
            "https://mirror:81/p"
        );
        assert!(base.join("/other").unwrap().same_origin(&base));
        assert_eq!(base.join("/other").unwrap().userinfo, None);
        assert!(base.join("ftp://x/y").is_err());
    }

    #[test]
    fn s3_addresses_split_bucket_and_literal_key() {
        assert_eq!(
            RemoteUrl::parse("s3://my-bucket/dir/image v1.sif").unwrap(),
            RemoteUrl::S3(S3Location {
                bucket: "my-bucket".into(),
                key: "dir/image v1.sif".into()
            })
        );
        for bad in ["s3://bucket", "s3://bucket/", "s3:///key", "s3://b@d/k"] {
            assert!(
                matches!(RemoteUrl::parse(bad), Err(RemoteError::Refused(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn oras_addresses_take_tags_digests_and_ports() {
        let l = oras("oras://ghcr.io/org/tools/python:3.12-slim");
        assert_eq!(l.registry, "ghcr.io");
        assert_eq!(l.repository, "org/tools/python");
        assert_eq!(l.reference, OciReference::Tag("3.12-slim".into()));

        let l = oras("oras://localhost:5000/lib/alpine");
        assert_eq!(l.registry, "localhost:5000");
        assert_eq!(l.repository, "lib/alpine");
        assert_eq!(l.reference, OciReference::Tag("latest".into()));

        let digest = format!("sha256:{}", "ab".repeat(32));
        let l = oras(&format!("oras://127.0.0.1:5000/lib/alpine:1.0@{digest}"));
        assert_eq!(l.repository, "lib/alpine");
        assert_eq!(l.reference, OciReference::Digest(digest.clone()));
        assert_eq!(
            l.to_string(),
            format!("oras://127.0.0.1:5000/lib/alpine@{digest}")
        );

        for bad in [
            "oras://ghcr.io",
            "oras://ghcr.io/",
            "oras://ghcr.io/Upper/case:1",
            "oras://ghcr.io/a//b:1",
            "oras://ghcr.io/a:-bad",
            "oras://ghcr.io/a@sha256:1234",
            "oras://host:port/a:1",
        ] {
            assert!(
                matches!(RemoteUrl::parse(bad), Err(RemoteError::Refused(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn messages_never_show_url_credentials() {
        let e = RemoteUrl::parse("https://bob:hunter2@h:99999/x").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(redact_url("https://bob:pw@h/x@y"), "https://h/x@y");
        assert_eq!(redact_url("/local/path"), "/local/path");
    }

    #[test]
    fn percent_encoding_follows_sigv4() {
        assert_eq!(percent_encode("a b/c~d+e=", true), "a%20b/c~d%2Be%3D");
        assert_eq!(percent_encode("a/b", false), "a%2Fb");
        assert_eq!(percent_encode("é", false), "%C3%A9");
    }
}
