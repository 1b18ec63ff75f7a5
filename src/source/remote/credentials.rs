//! Where credentials and settings come from: the environment (as a snapshot, so tests and
//! the CLI pass their own), the docker config and its credential helpers for registries,
//! and the AWS variables and shared files for S3. Nothing here prints a secret: the types
//! holding one hide it from `Debug`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

use super::sigv4::AwsCredentials;
use super::RemoteError;

/// The environment variables the stores read, captured once.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// The variables taken from the process by [`Environment::from_process`].
    pub const NAMES: &'static [&'static str] = &[
        "HOME",
        "PATH",
        "DOCKER_CONFIG",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
        "SSL_CERT_FILE",
    ];

    /// The process's values of [`Environment::NAMES`].
    pub fn from_process() -> Self {
        let mut env = Environment::default();
        for name in Self::NAMES {
            if let Ok(v) = std::env::var(name) {
                env.vars.insert((*name).into(), v);
            }
        }
        env
    }

    /// No variables at all.
    pub fn empty() -> Self {
        Environment::default()
    }

    /// This environment with `name` set to `value`.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// A variable's value; an empty value counts as unset.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn home(&self) -> Option<PathBuf> {
        self.get("HOME").map(PathBuf::from)
    }
}

impl std::fmt::Debug for Environment {
    /// Names only: values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl RegistryCredentials {
    /// The `Authorization: Basic …` value.
    pub fn basic_authorization(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Where registry credentials are looked up.
#[derive(Debug, Clone)]
pub struct DockerCredentialSource {
    /// `--registry-auth FILE`: this file only, which must exist.
    pub explicit_file: Option<PathBuf>,
    pub env: Environment,
    /// Longest wait for a `docker-credential-*` helper.
    pub helper_timeout: Duration,
}

impl DockerCredentialSource {
    /// The docker config file to read, and whether it must exist.
    fn config_file(&self) -> Option<(PathBuf, bool)> {
        if let Some(f) = &self.explicit_file {
            return Some((f.clone(), true));
        }
        if let Some(dir) = self.env.get("DOCKER_CONFIG") {
            return Some((Path::new(dir).join("config.json"), false));
        }
        self.env
            .home()
            .map(|h| (h.join(".docker").join("config.json"), false))
    }

    /// The credentials for `registry` (`host` or `host:port`), or `None` to go anonymous.
    pub fn lookup(&self, registry: &str) -> Result<Option<RegistryCredentials>, RemoteError> {
        let Some((path, required)) = self.config_file() else {
            return Ok(None);
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(RemoteError::Refused(format!(
                    "cannot read the registry credentials in {}: {e}",
                    path.display()
                )))
            }
        };
        let config = DockerConfig::parse(&text).map_err(|e| {
            RemoteError::Refused(format!(
                "{} is not a docker config file: {e}",
                path.display()
            ))
        })?;
        config.credentials_for(registry, |helper, server| {
            run_credential_helper(&self.env, helper, server, self.helper_timeout)
        })
    }
}

/// The parts of a docker `config.json` that hold credentials.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DockerConfig {
    /// Keys as written (`host`, `https://host/v1/`…), values as `auths` holds them.
    pub auths: Vec<(String, AuthEntry)>,
    pub creds_store: Option<String>,
    pub cred_helpers: Vec<(String, String)>,
}

/// One `auths` entry.
#[derive(Default, PartialEq, Eq)]
pub struct AuthEntry {
    pub credentials: Option<RegistryCredentials>,
    /// An OAuth refresh token (`identitytoken`), which sifuse does not use.
    pub has_identity_token: bool,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEntry")
            .field("credentials", &self.credentials)
            .field("has_identity_token", &self.has_identity_token)
            .finish()
    }
}

impl DockerConfig {
    /// Parse `config.json`; entries this reader cannot use are kept empty, not errors.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let json: serde_json::Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        let mut config = DockerConfig::default();
        if let Some(auths) = json.get("auths").and_then(|a| a.as_object()) {
            for (key, entry) in auths {
                config.auths.push((key.clone(), parse_auth_entry(entry)?));
            }
        }
        config.creds_store = json
            .get("credsStore")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .map(String::from);
        if let Some(helpers) = json.get("credHelpers").and_then(|h| h.as_object()) {
            for (key, name) in helpers {
                if let Some(name) = name.as_str() {
                    config.cred_helpers.push((key.clone(), name.into()));
                }
            }
        }
        Ok(config)
    }

    /// The credentials for `registry`: its `credHelpers` entry, else `credsStore`, else its
    /// `auths` entry. `run_helper(name, server)` asks a `docker-credential-<name>` helper.
    pub fn credentials_for(
        &self,
        registry: &str,
        mut run_helper: impl FnMut(&str, &str) -> Result<Option<RegistryCredentials>, RemoteError>,
    ) -> Result<Option<RegistryCredentials>, RemoteError> {
        let wanted = registry_key(registry);
        if let Some((key, helper)) = self
            .cred_helpers
            .iter()
            .find(|(k, _)| registry_key(k) == wanted)
        {
            return run_helper(helper, key);
        }
        let entry = self.auths.iter().find(|(k, _)| registry_key(k) == wanted);
        if let Some(store) = &self.creds_store {
            let server = entry.map_or(registry, |(k, _)| k.as_str());
            if let Some(c) = run_helper(store, server)? {
                return Ok(Some(c));
            }
        }
        match entry {
            Some((key, e)) => {
                if e.credentials.is_none() && e.has_identity_token {
                    tracing::warn!(
                        "the docker config holds only an identity token for {key}, which sifuse \
                         cannot use; reading anonymously"
                    );
                }
                Ok(e.credentials.clone())
            }
            None => Ok(None),
        }
    }
}

fn parse_auth_entry(entry: &serde_json::Value) -> Result<AuthEntry, String> {
    let field = |name: &str| {
        entry
            .get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    };
    let credentials = if let Some(auth) = field("auth") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| "an \"auth\" entry is not base64".to_string())?;
        let raw = String::from_utf8(raw).map_err(|_| "an \"auth\" entry is not UTF-8")?;
        let (user, password) = raw
            .split_once(':')
            .ok_or("an \"auth\" entry is not user:password")?;
        Some(RegistryCredentials {
            username: user.into(),
            password: password.into(),
        })
    } else {
        match (field("username"), field("password")) {
            (Some(u), Some(p)) => Some(RegistryCredentials {
                username: u.into(),
                password: p.into(),
            }),
            _ => None,
        }
    };
    Ok(AuthEntry {
        credentials,
        has_identity_token: field("identitytoken").is_some(),
    })
}

/// A registry as config keys name it: no scheme, no path, lowercase; Docker Hub's many
/// names made one.
fn registry_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

/// Most bytes a credential helper may print.
const HELPER_OUTPUT_LIMIT: u64 = 64 * 1024;

/// Ask `docker-credential-<helper> get` for `server`'s credentials, waiting at most
/// `timeout`. `None` when the helper has none for it.
pub fn run_credential_helper(
    env: &Environment,
    helper: &str,
    server: &str,
    timeout: Duration,
) -> Result<Option<RegistryCredentials>, RemoteError> {
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || helper.starts_with('.')
    {
        return Err(RemoteError::Refused(format!(
            "the docker config names the credential helper {helper:?}, which is not a helper name"
        )));
    }
    let program = format!("docker-credential-{helper}");
    let path = find_in_path(env, &program).ok_or_else(|| {
        RemoteError::Refused(format!(
            "the docker config asks for the credential helper {program}, which is not on PATH"
        ))
    })?;
    let mut child = Command::new(&path)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| RemoteError::Refused(format!("cannot run {program}: {e}")))?;
    // The helper reads the server from stdin and answers on stdout. Both pipes are served
    // by threads, so neither a helper that does not read nor one that leaves its output
    // open (a daemon it started) can hold us past the deadline.
    let mut stdin = child.stdin.take();
    let input = format!("{server}\n");
    std::thread::spawn(move || {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(input.as_bytes());
        }
    });
    let stdout = child.stdout.take();
    let (sender, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout {
            let _ = s.take(HELPER_OUTPUT_LIMIT).read_to_end(&mut out);
        }
        let _ = sender.send(out);
    });
    let deadline = Instant::now() + timeout;
    let late = || {
        RemoteError::Refused(format!(
            "the credential helper {program} did not answer within {} s",
            timeout.as_secs_f64()
        ))
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => {
                // Our own child, by its handle: nothing else is signalled.
                let _ = child.kill();
                let _ = child.wait();
                return Err(late());
            }
        }
    };
    let out = output
        .recv_timeout(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(500)),
        )
        .map_err(|_| late())?;
    let text = String::from_utf8_lossy(&out);
    if !status.success() {
        if text.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(RemoteError::Refused(format!(
            "the credential helper {program} failed ({status}): {}",
            text.lines().next().unwrap_or("").trim()
        )));
    }
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|_| {
        RemoteError::Refused(format!("the credential helper {program} printed no JSON"))
    })?;
    let username = json.get("Username").and_then(|v| v.as_str()).unwrap_or("");
    let secret = json.get("Secret").and_then(|v| v.as_str()).unwrap_or("");
    if secret.is_empty() || username == "<token>" {
        // `<token>` marks an identity token, which sifuse does not use.
        return Ok(None);
    }
    Ok(Some(RegistryCredentials {
        username: username.into(),
        password: secret.into(),
    }))
}

fn find_in_path(env: &Environment, program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = env.get("PATH").unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// S3 settings from the environment and the AWS shared files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// `None`: unsigned (anonymous) requests.
    pub credentials: Option<AwsCredentials>,
    pub region: String,
    /// `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
}

impl AwsSettings {
    pub fn from_env(env: &Environment) -> Result<Self, RemoteError> {
        let profile = env.get("AWS_PROFILE");
        let profile_name = profile.unwrap_or("default");
        let credentials = match (
            env.get("AWS_ACCESS_KEY_ID"),
            env.get("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(id), Some(secret)) => Some(AwsCredentials {
                access_key_id: id.into(),
                secret_access_key: secret.into(),
                session_token: env.get("AWS_SESSION_TOKEN").map(String::from),
            }),
            (Some(_), None) | (None, Some(_)) => {
                return Err(RemoteError::Refused(
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together".into(),
                ))
            }
            (None, None) => {
                let file = env
                    .get("AWS_SHARED_CREDENTIALS_FILE")
                    .map(PathBuf::from)
                    .or_else(|| env.home().map(|h| h.join(".aws").join("credentials")));
                match file.as_deref().map(read_ini).transpose()? {
                    Some(Some(ini)) => match ini.get(profile_name) {
                        Some(section) => Some(credentials_from_section(section, profile_name)?),
                        None if profile.is_some() => {
                            return Err(RemoteError::Refused(format!(
                                "AWS_PROFILE is {profile_name:?}, which the AWS credentials file has no section for"
                            )))
                        }
                        None => None,
                    },
                    _ => None,
                }
            }
        };
        let region = match env.get("AWS_REGION").or(env.get("AWS_DEFAULT_REGION")) {
            Some(r) => r.to_string(),
            None => {
                let file = env
                    .get("AWS_CONFIG_FILE")
                    .map(PathBuf::from)
                    .or_else(|| env.home().map(|h| h.join(".aws").join("config")));
                let section = if profile_name == "default" {
                    "default".to_string()
                } else {
                    format!("profile {profile_name}")
                };
                file.as_deref()
                    .map(read_ini)
                    .transpose()?
                    .flatten()
                    .and_then(|ini| ini.get(&section)?.get("region").cloned())
                    .unwrap_or_else(|| "us-east-1".into())
            }
        };
        if !region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(RemoteError::Refused(format!(
                "{region:?} is not an AWS region"
            )));
        }
        let endpoint = env
            .get("AWS_ENDPOINT_URL_S3")
            .or(env.get("AWS_ENDPOINT_URL"))
            .map(String::from);
        Ok(AwsSettings {
            credentials,
            region,
            endpoint,
        })
    }
}

fn credentials_from_section(
    section: &BTreeMap<String, String>,
    profile: &str,
) -> Result<AwsCredentials, RemoteError> {
    match (
        section.get("aws_access_key_id"),
        section.get("aws_secret_access_key"),
    ) {
        (Some(id), Some(secret)) => Ok(AwsCredentials {
            access_key_id: id.clone(),
            secret_access_key: secret.clone(),
            session_token: section.get("aws_session_token").cloned(),
        }),
        _ => Err(RemoteError::Refused(format!(
            "the AWS credentials file's profile {profile:?} has no aws_access_key_id and \
             aws_secret_access_key (sifuse reads static keys only)"
        ))),
    }
}

type Ini = BTreeMap<String, BTreeMap<String, String>>;

/// An INI file as the AWS files are written; `None` when it does not exist.
fn read_ini(path: &Path) -> Result<Option<Ini>, RemoteError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(parse_ini(&text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RemoteError::Refused(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

fn parse_ini(text: &str) -> Ini {
    let mut ini = Ini::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            ini.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((k, v))) = (&current, line.split_once('=')) {
            ini.entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    ini
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn creds(u: &str, p: &str) -> Option<RegistryCredentials> {
        Some(RegistryCredentials {
            username: u.into(),
            password: p.into(),
        })
    }

    fn no_helper(_: &str, _: &str) -> Result<Option<RegistryCredentials>, RemoteError> {
        panic!("no helper should run")
    }

    #[test]
    fn auths_entries_match_by_host_whatever_their_spelling() {
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "ghcr.io": {{"auth": "{}"}},
                "http://127.0.0.1:5000": {{"username": "u", "password": "p"}},
                "quay.io": {{"identitytoken": "xyz"}}
            }}}}"#,
            b64("hub:pw:with:colons"),
            b64("gh:tok")
        );
        let c = DockerConfig::parse(text.as_bytes()).unwrap();
        assert_eq!(
            c.credentials_for("registry-1.docker.io", no_helper)
                .unwrap(),
            creds("hub", "pw:with:colons")
        );
        assert_eq!(
            c.credentials_for("GHCR.io", no_helper).unwrap(),
            creds("gh", "tok")
        );
        assert_eq!(
            c.credentials_for("127.0.0.1:5000", no_helper).unwrap(),
            creds("u", "p")
        );
        assert_eq!(
            c.credentials_for("127.0.0.1:5001", no_helper).unwrap(),
            None
        );
        assert_eq!(c.credentials_for("quay.io", no_helper).unwrap(), None);
    }

    #[test]
    fn helpers_come_before_auths_and_a_store_falls_back_to_them() {
        let text = format!(
            r#"{{"auths": {{"a.io": {{"auth": "{}"}}, "b.io": {{"auth": "{}"}} }},
                "credsStore": "desktop",
                "credHelpers": {{"c.io": "gcloud"}} }}"#,
            b64("a:1"),
            b64("b:2")
        );
        let c = DockerConfig::parse(text.as_bytes()).unwrap();
        let mut asked = Vec::new();
        let mut helper = |name: &str, server: &str| {
            asked.push(format!("{name} {server}"));
            Ok(match server {
                "a.io" => creds("from-store", "x"),
                "c.io" => creds("from-gcloud", "y"),
                _ => None,
            })
        };
        assert_eq!(
            c.credentials_for("a.io", &mut helper).unwrap(),
            creds("from-store", "x")
        );
        assert_eq!(
            c.credentials_for("b.io", &mut helper).unwrap(),
            creds("b", "2")
        );
        assert_eq!(
            c.credentials_for("c.io", &mut helper).unwrap(),
            creds("from-gcloud", "y")
        );
        assert_eq!(c.credentials_for("d.io", &mut helper).unwrap(), None);
        assert_eq!(
            asked,
            [
                "desktop a.io",
                "desktop b.io",
                "gcloud c.io",
                "desktop d.io"
            ]
        );
    }

    #[test]
    fn malformed_configs_are_errors_not_guesses() {
        assert!(DockerConfig::parse(b"{not json").is_err());
        assert!(DockerConfig::parse(br#"{"auths": {"h": {"auth": "%%%"}}}"#).is_err());
        let no_colon = format!(r#"{{"auths": {{"h": {{"auth": "{}"}}}}}}"#, b64("nocolon"));
        assert!(DockerConfig::parse(no_colon.as_bytes()).is_err());
        assert_eq!(DockerConfig::parse(b"{}").unwrap(), DockerConfig::default());
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = RegistryCredentials {
            username: "me".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(
            c.basic_authorization(),
            format!("Basic {}", b64("me:hunter2"))
        );
        let env = Environment::empty().with("AWS_SECRET_ACCESS_KEY", "s3cr3t");
        assert!(!format!("{env:?}").contains("s3cr3t"));
    }

    fn script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn credential_helpers_are_run_with_a_bounded_wait() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "docker-credential-good",
            r#"read server; [ "$1" = get ] && printf '{"ServerURL":"%s","Username":"u-%s","Secret":"s"}' "$server" "$server""#,
        );
        script(
            dir.path(),
            "docker-credential-none",
            "echo 'credentials not found in native keychain'; exit 1",
        );
        script(
            dir.path(),
            "docker-credential-broken",
            "echo 'boom'; exit 3",
        );
        script(dir.path(), "docker-credential-slow", "exec sleep 30");
        let env = Environment::empty().with("PATH", dir.path().to_str().unwrap());
        let t = Duration::from_secs(5);
        assert_eq!(
            run_credential_helper(&env, "good", "r.io", t).unwrap(),
            creds("u-r.io", "s")
        );
        assert_eq!(
            run_credential_helper(&env, "none", "r.io", t).unwrap(),
            None
        );
        let e = run_credential_helper(&env, "broken", "r.io", t).unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        let started = Instant::now();
        let e =
            run_credential_helper(&env, "slow", "r.io", Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("did not answer within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let e = run_credential_helper(&env, "missing", "r.io", t).unwrap_err();
        assert!(e.to_string().contains("not on PATH"), "{e}");
        assert!(run_credential_helper(&env, "../evil", "r.io", t).is_err());
    }

    #[test]
    fn the_docker_config_is_found_as_docker_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(home.join(".docker")).unwrap();
        let write = |path: &Path, user: &str| {
            std::fs::write(
                path,
                format!(
                    r#"{{"auths": {{"r.io": {{"auth": "{}"}}}}}}"#,
                    b64(&format!("{user}:p"))
                ),
            )
            .unwrap()
        };
        write(&home.join(".docker/config.json"), "home");
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        write(&other.join("config.json"), "docker-config");
        let explicit = dir.path().join("apptainer.json");
        write(&explicit, "explicit");

        let source = |explicit_file: Option<PathBuf>, env: Environment| DockerCredentialSource {
            explicit_file,
            env,
            helper_timeout: Duration::from_secs(1),
        };
        let env = Environment::empty().with("HOME", home.to_str().unwrap());
        let user = |s: DockerCredentialSource| s.lookup("r.io").unwrap().map(|c| c.username);
        assert_eq!(user(source(None, env.clone())).as_deref(), Some("home"));
        let with_dc = env.clone().with("DOCKER_CONFIG", other.to_str().unwrap());
        assert_eq!(
            user(source(None, with_dc.clone())).as_deref(),
            Some("docker-config")
        );
        assert_eq!(
            user(source(Some(explicit), with_dc)).as_deref(),
            Some("explicit")
        );
        // A missing default file means anonymous; a missing --registry-auth file is an error.
        let empty_home = Environment::empty().with("HOME", dir.path().to_str().unwrap());
        assert_eq!(
            source(None, empty_home.clone()).lookup("r.io").unwrap(),
            None
        );
        assert!(source(Some(dir.path().join("nope.json")), empty_home)
            .lookup("r.io")
            .is_err());
    }

    #[test]
    fn aws_settings_come_from_variables_then_shared_files() {
        let dir = tempfile::tempdir().unwrap();
        let aws = dir.path().join(".aws");
        std::fs::create_dir_all(&aws).unwrap();
        std::fs::write(
            aws.join("credentials"),
            "# comment\n[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = sd\n\n\
             [ci]\naws_access_key_id=AKIDCI\naws_secret_access_key=sc\naws_session_token=tok\n\
             [broken]\naws_access_key_id=x\n",
        )
        .unwrap();
        std::fs::write(
            aws.join("config"),
            "[default]\nregion = eu-west-1\n[profile ci]\nregion = ap-south-1\n",
        )
        .unwrap();
        let home = Environment::empty().with("HOME", dir.path().to_str().unwrap());

        let s = AwsSettings::from_env(&home).unwrap();
        assert_eq!(s.credentials.unwrap().access_key_id, "AKIDDEFAULT");
        assert_eq!(s.region, "eu-west-1");
        assert_eq!(s.endpoint, None);

        let s = AwsSettings::from_env(&home.clone().with("AWS_PROFILE", "ci")).unwrap();
        let c = s.credentials.unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.session_token.as_deref()),
            ("AKIDCI", Some("tok"))
        );
        assert_eq!(s.region, "ap-south-1");

        let s = AwsSettings::from_env(
            &home
                .clone()
                .with("AWS_ACCESS_KEY_ID", "AKIDENV")
                .with("AWS_SECRET_ACCESS_KEY", "se")
                .with("AWS_REGION", "us-west-2")
                .with("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
                .with("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001"),
        )
        .unwrap();
        assert_eq!(s.credentials.unwrap().access_key_id, "AKIDENV");
        assert_eq!(s.region, "us-west-2");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9001"));

        assert!(AwsSettings::from_env(&home.clone().with("AWS_PROFILE", "nope")).is_err());
        assert!(AwsSettings::from_env(&home.clone().with("AWS_PROFILE", "broken")).is_err());
        assert!(AwsSettings::from_env(&home.clone().with("AWS_ACCESS_KEY_ID", "x")).is_err());

        let nothing = AwsSettings::from_env(&Environment::empty()).unwrap();
        assert_eq!(nothing.credentials, None);
        assert_eq!(nothing.region, "us-east-1");
    }
}
