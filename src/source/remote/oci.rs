//! A SIF in an OCI registry, pushed as ORAS (`singularity push` / `apptainer push
//! oras://…`) does: the manifest's layer of media type `application/vnd.sylabs.sif.layer.v1.sif`
//! is the whole SIF, read by range from `/v2/<name>/blobs/<digest>`.
//!
//! The version is the blob's digest: blobs are content-addressed, so the bytes of a version
//! never change and a tag that moves gives a new version at the next [`ObjectStore::version`].
//! Authentication follows the distribution spec: a 401 carries a `WWW-Authenticate`
//! challenge; `Bearer` sends us to a token service (with Basic credentials from the docker
//! config, if any), `Basic` takes the credentials directly. A token that expires (a 401
//! mid-session) is fetched again. Blob GETs may redirect to storage on another host, which
//! never receives the registry's `Authorization`.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::client::{Answer, Credential, HttpClient};
use super::credentials::{DockerCredentialSource, RegistryCredentials};
use super::http::{check_bounds, check_not_changed, RedirectMemo};
use super::retry::{self, Failure, RetryPolicy, SystemClock};
use super::sigv4::hex;
use super::url::{percent_encode, validate_digest, HttpUrl, OciLocation, OciReference};
use super::{ObjectStore, ObjectVersion, RemoteError, StoreConfig};

/// The media type of the SIF layer of an ORAS-pushed SIF.
pub const SIF_LAYER_MEDIA_TYPE: &str = "application/vnd.sylabs.sif.layer.v1.sif";
/// SingularityCE's OCI-SIF images carry bare SquashFS layers of this type instead.
const SQUASHFS_LAYER_MEDIA_TYPE: &str = "application/vnd.sylabs.image.layer.v1.squashfs";

/// Manifests are small; the distribution spec lets registries refuse more than 4 MiB.
const MANIFEST_LIMIT: u64 = 4 << 20;
const TOKEN_ANSWER_LIMIT: u64 = 1 << 20;

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// One SIF in a registry.
#[derive(Debug)]
pub struct OciStore {
    client: HttpClient,
    location: OciLocation,
    /// `scheme://registry` of the API.
    base: HttpUrl,
    /// The repository as the API names it (Docker Hub's official images get `library/`).
    repository: String,
    auth: RegistryAuth,
    retry: RetryPolicy,
    blob_redirect: RedirectMemo,
}

impl OciStore {
    pub fn new(location: OciLocation, config: &StoreConfig) -> Result<Self, RemoteError> {
        let (host, repository) = match location.registry.as_str() {
            "docker.io" | "index.docker.io" => (
                "registry-1.docker.io".to_string(),
                if location.repository.contains('/') {
                    location.repository.clone()
                } else {
                    format!("library/{}", location.repository)
                },
            ),
            other => (other.to_string(), location.repository.clone()),
        };
        let scheme = if config.allow_http { "http" } else { "https" };
        let base = HttpUrl::parse(&format!("{scheme}://{host}/"))
            .map_err(|e| RemoteError::Refused(format!("{location}: {e}")))?;
        let auth = RegistryAuth {
            source: DockerCredentialSource {
                explicit_file: config.registry_auth.clone(),
                env: config.env.clone(),
                helper_timeout: config.credential_helper_timeout,
            },
            registry: location.registry.clone(),
            default_scope: format!("repository:{repository}:pull"),
            allow_http: config.allow_http,
            credentials: OnceLock::new(),
            state: Mutex::new(AuthState::Anonymous),
        };
        Ok(OciStore {
            client: HttpClient::new(config)?,
            location,
            base,
            repository,
            auth,
            retry: config.retry.clone(),
            blob_redirect: RedirectMemo::default(),
        })
    }

    /// A GET to the registry, answering its authentication challenges: a fresh token (or
    /// Basic credentials) after a 401, at most twice, then the 401 is final.
    fn registry_get(&self, url: &HttpUrl, headers: &[(String, String)]) -> Result<Answer, Failure> {
        for round in 0..3 {
            let authorization = self.auth.authorization(&self.client)?;
            let credential = authorization.as_deref().map(|a| Credential {
                origin: &self.base,
                authorization: a,
            });
            let answer = self
                .client
                .get_following(url, headers, credential.as_ref())?;
            if answer.status != 401 || !answer.url.same_origin(&self.base) {
                return Ok(answer);
            }
            let challenge = answer.header("www-authenticate").unwrap_or("").to_string();
            if round == 2 {
                break;
            }
            self.auth
                .answer_challenge(&self.client, &challenge, authorization.as_deref())?;
        }
        Err(Failure::Stop(self.auth.refusal()))
    }

    fn manifest_url(&self) -> HttpUrl {
        self.base.with_path(&format!(
            "/v2/{}/manifests/{}",
            self.repository,
            self.location.reference.as_str()
        ))
    }
}

impl ObjectStore for OciStore {
    fn describe(&self) -> String {
        self.location.to_string()
    }

    /// The repository (its versions are blob digests, whatever tag led to them).
    fn identity(&self) -> String {
        format!("oras://{}/{}", self.base.authority(), self.repository)
    }

    fn version(&self) -> Result<ObjectVersion, RemoteError> {
        let url = self.manifest_url();
        let what = format!("GET the manifest of {}", self.describe());
        let headers = [("accept".to_string(), MANIFEST_ACCEPT.to_string())];
        retry::run(&self.retry, &SystemClock, &what, || {
            let mut answer = self.registry_get(&url, &headers)?;
            match answer.status {
                200 => {}
                404 => {
                    let detail = answer.error_detail();
                    return Err(Failure::refused(format!(
                        "{}: no such image in the registry{detail}",
                        self.describe()
                    )));
                }
                _ => return Err(answer.status_failure(&what)),
            }
            let body = answer.small_body(MANIFEST_LIMIT)?;
            if let OciReference::Digest(digest) = &self.location.reference {
                let got = format!("sha256:{}", hex(&Sha256::digest(&body)));
                if digest.starts_with("sha256:") && got != *digest {
                    return Err(Failure::retry(format!(
                        "{what}: the manifest's digest is {got}, not {digest}"
                    )));
                }
            }
            let (digest, len) = sif_layer(&body)
                .map_err(|e| Failure::refused(format!("{}: {e}", self.describe())))?;
            Ok(ObjectVersion {
                len,
                validator: digest,
            })
        })
    }

    fn read_range(
        &self,
        version: &ObjectVersion,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RemoteError> {
        validate_digest(&version.validator)
            .map_err(|e| RemoteError::Refused(format!("{}: {e}", self.describe())))?;
        let digest = &version.validator;
        let Some(end) = check_bounds(version, offset, buf.len(), &self.describe())? else {
            return Ok(());
        };
        let url = self
            .base
            .with_path(&format!("/v2/{}/blobs/{digest}", self.repository));
        let headers = [("range".to_string(), format!("bytes={offset}-{end}"))];
        let what = format!("GET {} blob {digest} bytes {offset}-{end}", self.describe());
        retry::run(&self.retry, &SystemClock, &what, || {
            let mut answer = self.blob_redirect.get_with(&url, |target| {
                if *target == url {
                    self.registry_get(target, &headers)
                } else {
                    // A remembered storage location: no registry credentials unless it is
                    // the registry itself.
                    let authorization = self.auth.current();
                    let credential = authorization.as_deref().map(|a| Credential {
                        origin: &self.base,
                        authorization: a,
                    });
                    self.client
                        .get_following(target, &headers, credential.as_ref())
                }
            })?;
            if answer.status == 404 {
                let detail = answer.error_detail();
                return Err(Failure::refused(format!(
                    "{}: the blob {digest} is no longer in the registry (the image was deleted \
                     or garbage-collected){detail}",
                    self.describe()
                )));
            }
            if let Some(d) = answer.header("docker-content-digest") {
                if matches!(answer.status, 200 | 206) && d.trim() != digest {
                    return Err(Failure::retry(format!(
                        "{what}: the registry answered for blob {d}"
                    )));
                }
            }
            check_not_changed_length(&answer, version)?;
            answer.read_partial(offset, buf, version.len)
        })
    }
}

/// A blob never changes, so its answers carry no validator to compare; only a 416 for
/// another length means the blob is not the one we read.
fn check_not_changed_length(answer: &Answer, version: &ObjectVersion) -> Result<(), Failure> {
    if answer.status == 416 {
        check_not_changed(answer, version)
    } else {
        Ok(())
    }
}

/// The digest and size of the SIF layer of an ORAS manifest.
pub fn sif_layer(manifest: &[u8]) -> Result<(String, u64), String> {
    let json: serde_json::Value = serde_json::from_slice(manifest)
        .map_err(|e| format!("the registry's manifest is not JSON: {e}"))?;
    let media_type = json.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
    if json.get("manifests").is_some()
        || media_type.contains("index")
        || media_type.contains("list")
    {
        return Err(
            "this is an image index (several manifests), not a SIF pushed with ORAS".into(),
        );
    }
    let layers = json
        .get("layers")
        .and_then(|l| l.as_array())
        .ok_or("the manifest has no layers")?;
    let mut found = Vec::new();
    let mut types = Vec::new();
    for layer in layers {
        let t = layer
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or("");
        if t == SIF_LAYER_MEDIA_TYPE {
            found.push(layer);
        } else if !types.contains(&t) {
            types.push(t);
        }
    }
    let layer = match found.as_slice() {
        [one] => *one,
        [] => {
            let hint = if types.contains(&SQUASHFS_LAYER_MEDIA_TYPE) {
                " (it is an OCI-SIF image; sifuse mounts SIF files pushed with ORAS)"
            } else {
                ""
            };
            return Err(format!(
                "the manifest has no layer of type {SIF_LAYER_MEDIA_TYPE}, only {}{hint}",
                if types.is_empty() {
                    "none".to_string()
                } else {
                    types.join(", ")
                }
            ));
        }
        _ => {
            return Err(format!(
                "the manifest has {} layers of type {SIF_LAYER_MEDIA_TYPE}; sifuse cannot tell \
                 which to mount",
                found.len()
            ))
        }
    };
    let digest = layer
        .get("digest")
        .and_then(|d| d.as_str())
        .ok_or("the SIF layer has no digest")?;
    validate_digest(digest)?;
    let size = layer
        .get("size")
        .and_then(|s| s.as_u64())
        .filter(|&s| s > 0)
        .ok_or("the SIF layer has no size")?;
    Ok((digest.to_string(), size))
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercase: `bearer`, `basic`…
    pub scheme: String,
    /// Parameter names lowercase, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The challenges of a `WWW-Authenticate` header (RFC 9110 §11.6.1): `Scheme` followed by
/// comma-separated `name=value` or `name="quoted \"value\""` parameters; several challenges
/// may share one header.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let b = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    while i < b.len() {
        skip(b, &mut i, |c| c == b' ' || c == b'\t' || c == b',');
        let scheme = token(b, &mut i);
        if scheme.is_empty() {
            // Not a token: step over it.
            i += 1;
            continue;
        }
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        loop {
            skip(b, &mut i, |c| c == b' ' || c == b'\t' || c == b',');
            let name_start = i;
            let name = token(b, &mut i);
            if name.is_empty() {
                break;
            }
            skip(b, &mut i, |c| c == b' ' || c == b'\t');
            if b.get(i) != Some(&b'=') {
                // Not a parameter: the next challenge's scheme.
                i = name_start;
                break;
            }
            i += 1;
            skip(b, &mut i, |c| c == b' ' || c == b'\t');
            let value = if b.get(i) == Some(&b'"') {
                quoted(b, &mut i)
            } else {
                let start = i;
                while i < b.len() && !matches!(b[i], b',' | b' ' | b'\t') {
                    i += 1;
                }
                String::from_utf8_lossy(&b[start..i]).into_owned()
            };
            challenge.params.push((name.to_ascii_lowercase(), value));
        }
        out.push(challenge);
    }
    out
}

fn skip(b: &[u8], i: &mut usize, what: impl Fn(u8) -> bool) {
    while *i < b.len() && what(b[*i]) {
        *i += 1;
    }
}

fn token(b: &[u8], i: &mut usize) -> String {
    let start = *i;
    while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b[*i])) {
        *i += 1;
    }
    String::from_utf8_lossy(&b[start..*i]).into_owned()
}

fn quoted(b: &[u8], i: &mut usize) -> String {
    let mut out = Vec::new();
    *i += 1;
    while *i < b.len() {
        match b[*i] {
            b'"' => {
                *i += 1;
                break;
            }
            b'\\' if *i + 1 < b.len() => {
                out.push(b[*i + 1]);
                *i += 2;
            }
            c => {
                out.push(c);
                *i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the registry accepts from us now.
#[derive(Clone)]
enum AuthState {
    Anonymous,
    Basic(String),
    Bearer {
        authorization: String,
        /// Fetch a new token after this (the token's lifetime less a margin).
        refresh_at: Option<Instant>,
        challenge: Challenge,
    },
}

impl std::fmt::Debug for AuthState {
    /// Never the token or the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthState::Anonymous => write!(f, "Anonymous"),
            AuthState::Basic(_) => write!(f, "Basic(<hidden>)"),
            AuthState::Bearer {
                refresh_at,
                challenge,
                ..
            } => f
                .debug_struct("Bearer")
                .field("token", &"<hidden>")
                .field("refresh_at", refresh_at)
                .field("realm", &challenge.param("realm"))
                .finish(),
        }
    }
}

/// A registry's authentication: credentials looked up once, at the first challenge, and
/// the token or Basic header in use.
#[derive(Debug)]
struct RegistryAuth {
    source: DockerCredentialSource,
    /// `host[:port]` as the user wrote it, for credential look-up and messages.
    registry: String,
    default_scope: String,
    allow_http: bool,
    credentials: OnceLock<Result<Option<RegistryCredentials>, RemoteError>>,
    state: Mutex<AuthState>,
}

impl RegistryAuth {
    fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn credentials(&self) -> Result<Option<RegistryCredentials>, RemoteError> {
        self.credentials
            .get_or_init(|| self.source.lookup(&self.registry))
            .clone()
    }

    /// The `Authorization` value in use, without refreshing anything.
    fn current(&self) -> Option<String> {
        match &*self.lock() {
            AuthState::Anonymous => None,
            AuthState::Basic(a)
            | AuthState::Bearer {
                authorization: a, ..
            } => Some(a.clone()),
        }
    }

    /// The `Authorization` value to send, after fetching a new token if ours has expired.
    fn authorization(&self, client: &HttpClient) -> Result<Option<String>, Failure> {
        let mut state = self.lock();
        if let AuthState::Bearer {
            refresh_at: Some(at),
            challenge,
            ..
        } = &*state
        {
            if Instant::now() >= *at {
                let challenge = challenge.clone();
                *state = self.bearer(client, &challenge)?;
            }
        }
        Ok(match &*state {
            AuthState::Anonymous => None,
            AuthState::Basic(a)
            | AuthState::Bearer {
                authorization: a, ..
            } => Some(a.clone()),
        })
    }

    /// Answer a 401's challenge. `failed` is the header the 401 answered: when another
    /// thread has already replaced it, there is nothing to do but try again.
    fn answer_challenge(
        &self,
        client: &HttpClient,
        header: &str,
        failed: Option<&str>,
    ) -> Result<(), Failure> {
        let mut state = self.lock();
        let now = match &*state {
            AuthState::Anonymous => None,
            AuthState::Basic(a)
            | AuthState::Bearer {
                authorization: a, ..
            } => Some(a.as_str()),
        };
        if now != failed {
            return Ok(());
        }
        let challenges = parse_challenges(header);
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            *state = self.bearer(client, bearer)?;
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            return match self.credentials()? {
                Some(c) if failed.is_none() => {
                    *state = AuthState::Basic(c.basic_authorization());
                    Ok(())
                }
                _ => Err(Failure::Stop(self.refusal())),
            };
        }
        Err(Failure::refused(format!(
            "{}: the registry answered 401 with no challenge sifuse can answer ({header:?})",
            self.registry
        )))
    }

    /// A new token from the challenge's token service.
    fn bearer(&self, client: &HttpClient, challenge: &Challenge) -> Result<AuthState, Failure> {
        let realm = challenge.param("realm").ok_or_else(|| {
            Failure::refused(format!(
                "{}: the registry's Bearer challenge names no token service (realm)",
                self.registry
            ))
        })?;
        let mut url = HttpUrl::parse(realm).map_err(|e| {
            Failure::refused(format!(
                "{}: the token service {realm:?} is not a URL: {e}",
                self.registry
            ))
        })?;
        if !url.https && !self.allow_http {
            return Err(Failure::refused(format!(
                "{}: the token service {url} is plain HTTP; use --no-https to allow it",
                self.registry
            )));
        }
        let mut query: Vec<String> = url.query.take().into_iter().collect();
        if let Some(service) = challenge.param("service") {
            query.push(format!("service={}", percent_encode(service, false)));
        }
        let scope = challenge.param("scope").unwrap_or(&self.default_scope);
        for s in scope.split(' ').filter(|s| !s.is_empty()) {
            query.push(format!("scope={}", percent_encode(s, false)));
        }
        url.query = (!query.is_empty()).then(|| query.join("&"));
        url.userinfo = None;

        let credentials = self.credentials()?;
        let basic = credentials
            .as_ref()
            .map(RegistryCredentials::basic_authorization);
        let credential = basic.as_deref().map(|a| Credential {
            origin: &url,
            authorization: a,
        });
        let mut answer = client.get_following(&url, &[], credential.as_ref())?;
        match answer.status {
            200 => {}
            401 | 403 => return Err(Failure::Stop(self.refusal())),
            _ => return Err(answer.status_failure(&format!("GET a token from {url}"))),
        }
        let body = answer.small_body(TOKEN_ANSWER_LIMIT)?;
        let json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| Failure::retry(format!("the token service {url} answered no JSON")))?;
        let token = ["token", "access_token"]
            .iter()
            .find_map(|k| {
                json.get(*k)
                    .and_then(|t| t.as_str())
                    .filter(|t| !t.is_empty())
            })
            .ok_or_else(|| Failure::retry(format!("the token service {url} answered no token")))?;
        // The spec's default lifetime is 60 s. Refresh 10 s before the end, or half-way
        // through a shorter life; a 401 still brings a new token if this was not early enough.
        let lifetime = Duration::from_secs(
            json.get("expires_in")
                .and_then(|e| e.as_u64())
                .unwrap_or(60),
        );
        let refresh_at =
            Instant::now().checked_add(lifetime - (lifetime / 2).min(Duration::from_secs(10)));
        Ok(AuthState::Bearer {
            authorization: format!("Bearer {token}"),
            refresh_at,
            challenge: challenge.clone(),
        })
    }

    /// The final error when the registry keeps refusing us.
    fn refusal(&self) -> RemoteError {
        match self.credentials() {
            Err(e) => e,
            Ok(Some(_)) => RemoteError::Refused(format!(
                "{}: the registry refused the credentials from the docker config; log in \
                 again or pass --registry-auth FILE",
                self.registry
            )),
            Ok(None) => RemoteError::Refused(format!(
                "{}: the registry requires credentials and none are configured for it; log \
                 in (docker login, or apptainer/singularity registry login) or pass \
                 --registry-auth FILE",
                self.registry
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_parse_as_the_distribution_spec_writes_them() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/alpine:pull"));
    }

    #[test]
    fn challenges_tolerate_spacing_escapes_tokens_and_several_schemes() {
        let c = parse_challenges(
            r#"Basic realm="x \"q\" y" , BEARER  Realm = "https://t/tok?a=b", error=insufficient_scope,scope="repository:a:pull repository:b:pull""#,
        );
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some(r#"x "q" y"#));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("https://t/tok?a=b"));
        assert_eq!(c[1].param("error"), Some("insufficient_scope"));
        assert_eq!(
            c[1].param("scope"),
            Some("repository:a:pull repository:b:pull")
        );

        let c = parse_challenges("Basic");
        assert_eq!(
            c,
            [Challenge {
                scheme: "basic".into(),
                params: vec![]
            }]
        );
        let c = parse_challenges(r#"Negotiate abc==, Basic realm=r"#);
        assert!(
            c.iter()
                .any(|c| c.scheme == "basic" && c.param("realm") == Some("r")),
            "{c:?}"
        );
        for junk in [
            "",
            ",,, ",
            "=\"",
            "\"unterminated",
            "Bearer realm=\"x",
            "@@@ ;;",
        ] {
            let _ = parse_challenges(junk);
        }
        assert_eq!(
            parse_challenges("Bearer realm=\"x")[0].param("realm"),
            Some("x")
        );
    }

    fn manifest(layers: &str) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
               "config":{{"mediaType":"application/vnd.sylabs.sif.config.v1+json","digest":"sha256:{}","size":2}},
               "layers":[{layers}]}}"#,
            "0".repeat(64)
        )
        .into_bytes()
    }

    fn layer(media_type: &str, digest_char: char, size: u64) -> String {
        format!(
            r#"{{"mediaType":"{media_type}","digest":"sha256:{}","size":{size},"annotations":{{"org.opencontainers.image.title":"x.sif"}}}}"#,
            digest_char.to_string().repeat(64)
        )
    }

    #[test]
    fn the_sif_layer_is_found_and_anything_else_is_refused_clearly() {
        let m = manifest(&layer(SIF_LAYER_MEDIA_TYPE, 'a', 4096));
        assert_eq!(
            sif_layer(&m),
            Ok((format!("sha256:{}", "a".repeat(64)), 4096))
        );

        let oci_sif = manifest(&layer(SQUASHFS_LAYER_MEDIA_TYPE, 'b', 10));
        assert!(sif_layer(&oci_sif).unwrap_err().contains("OCI-SIF"));
        let two = manifest(&format!(
            "{},{}",
            layer(SIF_LAYER_MEDIA_TYPE, 'a', 1),
            layer(SIF_LAYER_MEDIA_TYPE, 'b', 1)
        ));
        assert!(sif_layer(&two).unwrap_err().contains("2 layers"));
        let docker = manifest(&layer(
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            'c',
            5,
        ));
        assert!(sif_layer(&docker)
            .unwrap_err()
            .contains("rootfs.diff.tar.gzip"));
        let bad_digest = manifest(&layer(SIF_LAYER_MEDIA_TYPE, 'G', 1));
        assert!(sif_layer(&bad_digest).is_err());
        let empty = manifest(&layer(SIF_LAYER_MEDIA_TYPE, 'a', 0));
        assert!(sif_layer(&empty).is_err());
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(sif_layer(index).unwrap_err().contains("index"));
        assert!(sif_layer(b"not json").is_err());
    }
}
