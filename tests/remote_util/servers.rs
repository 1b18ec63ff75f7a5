//! Real servers for the remote-image tests, each started on 127.0.0.1 at an ephemeral port
//! with its own scratch directory and stopped (killed and reaped) when dropped:
//! nginx (with and without Range, or as a caching reverse proxy), Debian's docker-registry
//! (open, with a Bearer token service, or with htpasswd Basic auth) and an S3 server (moto,
//! with SigV4 checked). `scripts/test.sh` installs them.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::proxy::{FaultProxy, Logged, Reply};
use super::{free_port, program, scratch};

/// A child process of the test, killed and reaped on drop.
struct Daemon {
    child: Child,
    name: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Wait until `addr` accepts connections; panics with the server's log if it exits or
    /// takes longer than 30 s.
    fn wait_listening(&mut self, addr: SocketAddr, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening on {addr}:\n{}",
                    self.name,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {addr} within 30 s:\n{}",
                self.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// nginx, as a static file server or a caching reverse proxy.
pub struct Nginx {
    _daemon: Daemon,
    dir: tempfile::TempDir,
    pub port: u16,
}

/// What an nginx instance serves.
enum NginxRole<'a> {
    Files {
        root: &'a Path,
        ranges: bool,
        tls: Option<&'a TestCa>,
    },
    CachingProxy {
        origin: &'a str,
    },
}

/// A certificate authority made for a test, and a server certificate it signed for
/// 127.0.0.1 (what a site's own CA and its servers are).
pub struct TestCa {
    _dir: tempfile::TempDir,
    /// The CA certificate (PEM): what a client must trust.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    pub fn new() -> TestCa {
        let openssl = program("openssl", "openssl");
        let dir = scratch("ca");
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new(&openssl)
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=sifuse test CA",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat());
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        TestCa {
            ca: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
            _dir: dir,
        }
    }
}

impl Nginx {
    /// Serve the files under `root` with Range support (single ranges, as S3 and registries).
    pub fn serve(root: &Path) -> Nginx {
        Self::start(NginxRole::Files {
            root,
            ranges: true,
            tls: None,
        })
    }

    /// Serve `root` over HTTPS (with Range), with a certificate `ca` signed.
    pub fn serve_tls(root: &Path, ca: &TestCa) -> Nginx {
        Self::start(NginxRole::Files {
            root,
            ranges: true,
            tls: Some(ca),
        })
    }

    /// Serve `root` ignoring Range (`max_ranges 0`): every GET answers 200 with the whole file.
    pub fn serve_without_ranges(root: &Path) -> Nginx {
        Self::start(NginxRole::Files {
            root,
            ranges: false,
            tls: None,
        })
    }

    /// A caching reverse proxy in front of `origin` (`http://host:port`), as a site puts in
    /// front of its store: it fetches aligned 1 MiB slices from the origin, keeps them on
    /// disk and serves every later request for them itself, whoever asks.
    pub fn caching_proxy(origin: &str) -> Nginx {
        Self::start(NginxRole::CachingProxy { origin })
    }

    fn start(role: NginxRole<'_>) -> Nginx {
        let nginx = program("nginx", "nginx-light");
        let dir = scratch("nginx");
        let d = dir.path();
        for sub in [
            "tmp/body",
            "tmp/proxy",
            "tmp/fastcgi",
            "tmp/uwsgi",
            "tmp/scgi",
            "cache",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let port = free_port();
        let mut listen = format!("127.0.0.1:{port}");
        let server = match role {
            NginxRole::Files { root, ranges, tls } => {
                let tls = match tls {
                    Some(ca) => {
                        listen.push_str(" ssl");
                        format!(
                            "ssl_certificate {};\nssl_certificate_key {};",
                            ca.server_cert.display(),
                            ca.server_key.display()
                        )
                    }
                    None => String::new(),
                };
                format!(
                    "root {root};\n{}\n{tls}\nlocation / {{ }}",
                    if ranges { "" } else { "max_ranges 0;" },
                    root = root.display()
                )
            }
            NginxRole::CachingProxy { origin } => format!(
                r#"location / {{
                    slice 1m;
                    proxy_cache sifuse;
                    proxy_cache_key $uri$is_args$args$slice_range;
                    proxy_cache_valid 200 206 1h;
                    proxy_cache_lock on;
                    proxy_set_header Range $slice_range;
                    proxy_set_header If-Match "";
                    proxy_set_header If-Unmodified-Since "";
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_pass {origin};
                }}"#
            ),
        };
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format sifuse '$request_method $request_uri $status "$http_range" $upstream_cache_status $connection';
    access_log {d}/access.log sifuse;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=sifuse:10m max_size=4g inactive=1h use_temp_path=off;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen {listen};
        {server}
    }}
}}
"#,
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let log = d.join("error.log");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log")).unwrap())
            .spawn()
            .expect("start nginx");
        let mut daemon = Daemon {
            child,
            name: "nginx",
        };
        daemon.wait_listening(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &d.join("stderr.log"),
        );
        Nginx {
            _daemon: daemon,
            dir,
            port,
        }
    }

    /// `http://127.0.0.1:PORT` followed by `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The requests nginx has finished, one line each: `METHOD URI STATUS "RANGE" CACHE`.
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

/// How a registry authenticates.
pub enum RegistryAuth {
    /// No authentication.
    Open,
    /// `auth: silly`: a 401 with a real Bearer challenge naming our token service, which
    /// hands out tokens (requiring these Basic credentials, if given); the registry then
    /// takes any token.
    Bearer {
        credentials: Option<(String, String)>,
        /// `expires_in` of the tokens.
        token_lifetime: u64,
    },
    /// `auth: htpasswd` with [`HTPASSWD_USER`] and [`HTPASSWD_PASSWORD`].
    Basic,
}

/// The user of the htpasswd file.
pub const HTPASSWD_USER: &str = "sifuse-reader";
pub const HTPASSWD_PASSWORD: &str = "correct horse";
/// `htpasswd -nbB -C 4 sifuse-reader 'correct horse'` (bcrypt, as the registry requires).
const HTPASSWD_LINE: &str =
    "sifuse-reader:$2y$04$kJizw8fyfYLoQL38mxmWvOGe2lA5fJcaU5CLGR7e/ny2NiUKw48vC";

/// Debian's docker-registry (the distribution registry).
pub struct Registry {
    _daemon: Daemon,
    _dir: tempfile::TempDir,
    pub port: u16,
    /// The token service of [`RegistryAuth::Bearer`].
    pub token_service: Option<FaultProxy>,
    push_authorization: Option<String>,
    client: ureq::Agent,
}

impl Registry {
    pub fn start(auth: RegistryAuth) -> Registry {
        let registry = program("docker-registry", "docker-registry");
        let dir = scratch("registry");
        let d = dir.path();
        let port = free_port();
        let mut token_service = None;
        let mut push_authorization = None;
        let auth_conf = match auth {
            RegistryAuth::Open => String::new(),
            RegistryAuth::Bearer {
                credentials,
                token_lifetime,
            } => {
                let issued = Arc::new(AtomicU64::new(0));
                let expected = credentials.map(|(u, p)| basic(&u, &p));
                let service = FaultProxy::respond_with(move |req| {
                    if let Some(want) = &expected {
                        if req.header("authorization") != Some(want.as_str()) {
                            return Reply::json(
                                401,
                                &serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}),
                            );
                        }
                    }
                    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                    Reply::json(
                        200,
                        &serde_json::json!({"token": format!("token-{n}"), "expires_in": token_lifetime}),
                    )
                });
                let conf = format!(
                    "auth:\n  silly:\n    realm: {}/token\n    service: sifuse-test-registry\n",
                    service.url()
                );
                token_service = Some(service);
                push_authorization = Some("Bearer pusher".to_string());
                conf
            }
            RegistryAuth::Basic => {
                std::fs::write(d.join("htpasswd"), format!("{HTPASSWD_LINE}\n")).unwrap();
                push_authorization = Some(basic(HTPASSWD_USER, HTPASSWD_PASSWORD));
                format!(
                    "auth:\n  htpasswd:\n    realm: sifuse-test-registry\n    path: {}\n",
                    d.join("htpasswd").display()
                )
            }
        };
        let conf = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: sifuse-test-only\n{auth_conf}",
            d.join("data").display()
        );
        std::fs::write(d.join("config.yml"), conf).unwrap();
        let log = d.join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(registry)
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start docker-registry");
        let mut daemon = Daemon {
            child,
            name: "docker-registry",
        };
        daemon.wait_listening(SocketAddr::from(([127, 0, 0, 1], port)), &log);
        Registry {
            _daemon: daemon,
            _dir: dir,
            port,
            token_service,
            push_authorization,
            client: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .new_agent(),
        }
    }

    /// `127.0.0.1:PORT`, as an `oras://` address names it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Requests the token service has answered.
    pub fn token_requests(&self) -> Vec<Logged> {
        self.token_service
            .as_ref()
            .map(|t| t.requests())
            .unwrap_or_default()
    }

    /// Push `sif` as `singularity push` / `oras push` do: the SIF as one layer of type
    /// `application/vnd.sylabs.sif.layer.v1.sif`, an (empty JSON) config of type
    /// `application/vnd.sylabs.sif.config.v1+json`, and an OCI image manifest tagged `tag`.
    /// Returns the layer's digest.
    pub fn push_sif(&self, repository: &str, tag: &str, sif: &[u8]) -> String {
        let layer = self.push_blob(repository, sif);
        self.push_manifest(
            repository,
            tag,
            &[(
                "application/vnd.sylabs.sif.layer.v1.sif",
                layer.clone(),
                sif.len(),
            )],
        );
        layer
    }

    /// Push an OCI manifest with these (media type, digest, size) layers, already pushed,
    /// under `tag`; returns the manifest's digest.
    pub fn push_manifest(
        &self,
        repository: &str,
        tag: &str,
        layers: &[(&str, String, usize)],
    ) -> String {
        let config = b"{}";
        let config_digest = self.push_blob(repository, config);
        let layers: Vec<_> = layers
            .iter()
            .map(|(media_type, digest, size)| {
                serde_json::json!({
                    "mediaType": media_type,
                    "digest": digest,
                    "size": size,
                    "annotations": {"org.opencontainers.image.title": "image.sif"}
                })
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.sylabs.sif.config.v1+json",
                "digest": config_digest,
                "size": config.len()
            },
            "layers": layers
        })
        .to_string();
        let url = format!("http://{}/v2/{repository}/manifests/{tag}", self.host());
        let mut req = self
            .client
            .put(&url)
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json");
        if let Some(a) = &self.push_authorization {
            req = req.header("Authorization", a);
        }
        let resp = req.send(manifest.as_bytes()).expect("PUT the manifest");
        assert_eq!(resp.status(), 201, "PUT {url}");
        digest_of(manifest.as_bytes())
    }

    /// Upload a blob (POST an upload, PUT it whole); returns its digest.
    pub fn push_blob(&self, repository: &str, bytes: &[u8]) -> String {
        let digest = digest_of(bytes);
        let base = format!("http://{}", self.host());
        let mut req = self
            .client
            .post(&format!("{base}/v2/{repository}/blobs/uploads/"));
        if let Some(a) = &self.push_authorization {
            req = req.header("Authorization", a);
        }
        let resp = req.send_empty().expect("POST an upload");
        assert_eq!(resp.status(), 202, "POST an upload to {repository}");
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let location = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut req = self
            .client
            .put(&format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream");
        if let Some(a) = &self.push_authorization {
            req = req.header("Authorization", a);
        }
        let resp = req.send(bytes).expect("PUT the blob");
        assert_eq!(resp.status(), 201, "PUT the blob {digest}");
        digest
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// `Basic base64(user:password)`.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// An S3 server (moto) with SigV4 checked, and an IAM user allowed to use it.
pub struct S3Server {
    _daemon: Daemon,
    dir: tempfile::TempDir,
    stdin: Mutex<ChildStdin>,
    answers: Mutex<Receiver<String>>,
    pub port: u16,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Temporary credentials of an assumed role: (key id, secret, session token).
    pub session: (String, String, String),
    counter: AtomicU64,
}

impl S3Server {
    pub fn start() -> S3Server {
        // scripts/test.sh names the python that has moto when python3 does not.
        let python = std::env::var_os("SIFUSE_TEST_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| program("python3", "python3"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/remote_util/s3_server.py");
        let dir = scratch("s3");
        let log = dir.path().join("s3.log");
        let mut child = Command::new(python)
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the S3 server (python3 tests/remote_util/s3_server.py)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let daemon = Daemon {
            child,
            name: "the S3 server",
        };
        let (send, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let first = answers
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the S3 server did not start within 60 s (is moto installed? scripts/test.sh \
                 installs it):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let info: serde_json::Value = serde_json::from_str(&first).unwrap();
        let s = |k: &str| info[k].as_str().unwrap().to_string();
        S3Server {
            port: info["port"].as_u64().unwrap() as u16,
            access_key_id: s("access_key_id"),
            secret_access_key: s("secret_access_key"),
            session: (
                s("session_access_key_id"),
                s("session_secret_access_key"),
                s("session_token"),
            ),
            _daemon: daemon,
            dir,
            stdin: Mutex::new(stdin),
            answers: Mutex::new(answers),
            counter: AtomicU64::new(0),
        }
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Store `bytes` as `s3://bucket/key` (making the bucket); returns the ETag.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) -> String {
        assert!(!key.contains(char::is_whitespace), "keep test keys simple");
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.path().join(format!("object-{n}"));
        std::fs::write(&path, bytes).unwrap();
        let answer = self.command(&format!("put {bucket} {key} {}", path.display()));
        answer
            .strip_prefix("ok ")
            .unwrap_or_else(|| panic!("put s3://{bucket}/{key}: {answer}"))
            .to_string()
    }

    fn command(&self, line: &str) -> String {
        let answers = self.answers.lock().unwrap();
        writeln!(self.stdin.lock().unwrap(), "{line}").unwrap();
        answers
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the S3 server did not answer {line:?} within 30 s"))
    }
}

/// The path of a file under the scratch directory, for tests that serve files.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}
