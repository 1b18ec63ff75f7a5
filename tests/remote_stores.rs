//! The remote object stores against real servers started here on 127.0.0.1 (nginx, Debian's
//! docker-registry, an S3 server with SigV4 checked) and through the fault-injecting proxy:
//! every fault ends in the right bytes after a retry or in a clean error within its
//! timeout, never in wrong bytes and never in a hang.

mod remote_util;

use std::sync::Arc;
use std::time::{Duration, Instant};

use remote_util::proxy::{FaultProxy, Match};
use remote_util::servers::{
    digest_of, Nginx, Registry, RegistryAuth, S3Server, TestCa, HTPASSWD_PASSWORD, HTPASSWD_USER,
};
use remote_util::{pattern, scratch, test_config, within};
use sifuse::source::remote::{
    open_store, Environment, ObjectStore, ObjectVersion, RemoteError, StoreConfig,
};

use remote_util::proxy::Fault;

/// The longest any single test operation may take before the test fails as hung: the
/// test config's retry budget (8 s) plus one request's timeout (10 s), and slack.
const BOUND: Duration = Duration::from_secs(30);

fn open(url: &str, config: &StoreConfig) -> Arc<dyn ObjectStore> {
    open_store(url, config).unwrap_or_else(|e| panic!("open {url}: {e}"))
}

/// Read `len` bytes at `offset` on another thread, failing the test if it hangs.
fn read(
    store: &Arc<dyn ObjectStore>,
    version: &ObjectVersion,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, RemoteError> {
    let (store, version) = (store.clone(), version.clone());
    within(BOUND, move || {
        let mut buf = vec![0u8; len];
        store.read_range(&version, offset, &mut buf).map(|_| buf)
    })
}

fn version(store: &Arc<dyn ObjectStore>) -> Result<ObjectVersion, RemoteError> {
    let store = store.clone();
    within(BOUND, move || store.version())
}

/// The ranges every store is checked on: the start, an unaligned middle, the last byte,
/// a single byte, and a range across a 1 MiB boundary.
fn check_ranges(store: &Arc<dyn ObjectStore>, version: &ObjectVersion, data: &[u8]) {
    let len = data.len() as u64;
    for (offset, size) in [
        (0u64, 4096usize),
        (12_345, 100_000),
        (len - 1, 1),
        (777, 1),
        ((1 << 20) - 10, 20),
    ] {
        let got = read(store, version, offset, size).unwrap();
        assert!(
            got == data[offset as usize..offset as usize + size],
            "bytes {offset}+{size} differ"
        );
    }
    // Outside the object: refused without a request.
    assert!(matches!(
        read(store, version, len - 1, 2),
        Err(RemoteError::Refused(_))
    ));
}

/// A file served by nginx, and the nginx.
fn nginx_with(data: &[u8]) -> (tempfile::TempDir, Nginx) {
    let root = scratch("www");
    std::fs::write(root.path().join("image.sif"), data).unwrap();
    let nginx = Nginx::serve(root.path());
    (root, nginx)
}

#[test]
fn http_reads_exact_ranges_at_the_etag_version() {
    let data = pattern(3 << 20, 1);
    let (_root, nginx) = nginx_with(&data);
    let store = open(&nginx.url("/image.sif"), &test_config());
    assert_eq!(store.describe(), nginx.url("/image.sif"));
    // Objects told apart only by their query have one description but two identities.
    let a = open(&nginx.url("/image.sif?x=1"), &test_config());
    let b = open(&nginx.url("/image.sif?x=2"), &test_config());
    assert_eq!(a.describe(), b.describe());
    assert!(!a.describe().contains("x=1"));
    assert_ne!(a.identity(), b.identity());
    assert!(!a.identity().contains("x=1"));
    let v = version(&store).unwrap();
    assert_eq!(v.len, data.len() as u64);
    assert!(v.validator.starts_with('"'), "an ETag: {}", v.validator);
    check_ranges(&store, &v, &data);
    // One keep-alive connection carried every request.
    let log_length = settled_log_length(&nginx);
    let log = nginx.access_log();
    assert_eq!(log_length, 6, "{log:?}");
    let connections: std::collections::BTreeSet<_> =
        log.iter().filter_map(|l| l.rsplit(' ').next()).collect();
    assert_eq!(connections.len(), 1, "{log:?}");
}

#[test]
fn https_trusts_the_named_ca_bundle_and_refuses_unknown_certificates_at_once() {
    let data = pattern(256 << 10, 7);
    let root = scratch("www");
    std::fs::write(root.path().join("image.sif"), &data).unwrap();
    let ca = TestCa::new();
    let nginx = Nginx::serve_tls(root.path(), &ca);
    let url = format!("https://127.0.0.1:{}/image.sif", nginx.port);

    let mut config = test_config();
    config.ca_file = Some(ca.ca.clone());
    let store = open(&url, &config);
    let v = version(&store).unwrap();
    assert_eq!(read(&store, &v, 1, 1000).unwrap(), data[1..1001]);

    // The same bundle named by SSL_CERT_FILE.
    let mut config = test_config();
    config.env = Environment::empty().with("SSL_CERT_FILE", ca.ca.to_str().unwrap());
    let store = open(&url, &config);
    assert_eq!(version(&store).unwrap(), v);

    // Trusting only the usual roots: refused, not retried, and the message says what to do.
    let started = Instant::now();
    let store = open(&url, &test_config());
    match version(&store) {
        Err(RemoteError::Refused(m)) => {
            assert!(m.contains("TLS") && m.contains("SSL_CERT_FILE"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "retried a bad certificate"
    );

    // A bundle that is not one is an error when the store is opened.
    let mut config = test_config();
    config.ca_file = Some(root.path().join("image.sif"));
    assert!(matches!(
        open_store(&url, &config),
        Err(RemoteError::Refused(m)) if m.contains("no PEM certificate")
    ));
}

#[test]
fn a_server_that_ignores_range_is_refused_without_being_read_whole() {
    let data = pattern(64 << 20, 2);
    let root = scratch("www");
    std::fs::write(root.path().join("image.sif"), &data).unwrap();
    let nginx = Nginx::serve_without_ranges(root.path());
    let proxy = FaultProxy::forward_to(nginx.addr());
    let store = open(&format!("{}/image.sif", proxy.url()), &test_config());
    let started = Instant::now();
    let err = version(&store).unwrap_err();
    match &err {
        RemoteError::Refused(m) => {
            assert!(m.contains("ignores HTTP Range"), "{m}");
            assert!(!m.contains('\n'), "one line: {m}");
        }
        other => panic!("{other:?}"),
    }
    // One request, abandoned: the proxy could not deliver the 64 MiB body to anyone.
    let deadline = started + BOUND;
    let log = loop {
        let log = proxy.requests();
        if log.iter().all(|r| r.finished) || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].status, Some(200));
    assert!(
        log[0].sent < data.len() as u64 / 2,
        "the client read {} of {} bytes of a body it refused",
        log[0].sent,
        data.len()
    );
}

#[test]
fn a_changed_object_answers_changed_and_never_bytes_of_the_new_one() {
    let data = pattern(1 << 20, 3);
    let (root, nginx) = nginx_with(&data);
    let proxy = FaultProxy::forward_to(nginx.addr());
    let store = open(&format!("{}/image.sif", proxy.url()), &test_config());
    let v1 = version(&store).unwrap();
    assert_eq!(read(&store, &v1, 100, 100).unwrap(), data[100..200]);
    // Reads are conditional on the version, so the server itself refuses another one.
    let log = proxy.requests();
    assert_eq!(log[1].header("if-match"), Some(v1.validator.as_str()));

    // Same length, other bytes, another mtime: another ETag.
    let new = pattern(1 << 20, 4);
    let path = root.path().join("image.sif");
    let tmp = root.path().join("image.sif.new");
    std::fs::write(&tmp, &new).unwrap();
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(f);
    std::fs::rename(&tmp, &path).unwrap();

    match read(&store, &v1, 100, 100) {
        Err(RemoteError::Changed { was, now }) => {
            assert_eq!(was, v1.validator);
            assert_ne!(now, v1.validator);
        }
        other => panic!("{other:?}"),
    }
    let v2 = version(&store).unwrap();
    assert_ne!(v2, v1);
    assert_eq!(read(&store, &v2, 100, 100).unwrap(), new[100..200]);
}

#[test]
fn url_credentials_go_to_their_origin_only_and_are_never_shown() {
    let data = pattern(256 << 10, 5);
    let (_root, nginx) = nginx_with(&data);
    let storage = FaultProxy::forward_to(nginx.addr());
    // The "origin" redirects every request to storage on another port (another origin).
    let origin = FaultProxy::forward_to(nginx.addr());
    origin.set_default(Fault::redirect(&format!(
        "{}/image.sif?signature=1",
        storage.url()
    )));
    let url = format!("http://alice:s3cr%65t@{}/image.sif", origin.host());
    let store = open(&url, &test_config());
    assert!(!store.describe().contains("s3cret") && !store.describe().contains("alice"));
    let v = version(&store).unwrap();
    assert_eq!(read(&store, &v, 10, 1000).unwrap(), data[10..1010]);
    let basic = remote_util::servers::basic("alice", "s3cret");
    let shown = format!("{store:?} {}", store.identity());
    assert!(
        !shown.contains("s3cret") && !shown.contains(&basic[6..]),
        "{shown}"
    );

    assert!(origin
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some(basic.as_str())));
    let to_storage = storage.requests();
    assert!(!to_storage.is_empty());
    assert!(
        to_storage
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "credentials leaked to another origin: {to_storage:?}"
    );
}

#[test]
fn a_remembered_redirect_that_expires_goes_back_to_the_origin() {
    let data = pattern(256 << 10, 6);
    let (_root, nginx) = nginx_with(&data);
    let storage = FaultProxy::forward_to(nginx.addr());
    let origin = FaultProxy::forward_to(nginx.addr());
    origin.set_default(Fault::redirect(&format!(
        "{}/image.sif?sig=1",
        storage.url()
    )));
    let store = open(&format!("{}/image.sif", origin.url()), &test_config());
    let v = version(&store).unwrap();
    assert_eq!(read(&store, &v, 0, 100).unwrap(), data[..100]);
    let asked_origin = origin.requests().len();
    // Later reads go straight to storage.
    assert_eq!(read(&store, &v, 100, 100).unwrap(), data[100..200]);
    assert_eq!(origin.requests().len(), asked_origin);
    // The presigned URL expires: storage answers 403 once; the origin is asked again.
    storage.next(Fault::status(403));
    assert_eq!(read(&store, &v, 200, 100).unwrap(), data[200..300]);
    assert_eq!(origin.requests().len(), asked_origin + 1);
    // That storage goes away; the origin now sends readers elsewhere.
    drop(storage);
    let elsewhere = FaultProxy::forward_to(nginx.addr());
    origin.set_default(Fault::redirect(&format!(
        "{}/image.sif?sig=2",
        elsewhere.url()
    )));
    assert_eq!(read(&store, &v, 300, 100).unwrap(), data[300..400]);
    assert_eq!(origin.requests().len(), asked_origin + 2);
    assert_eq!(elsewhere.requests().len(), 1);
}

/// A store behind a fault proxy in front of nginx, its version taken before any fault.
struct Faulty {
    data: Vec<u8>,
    proxy: FaultProxy,
    store: Arc<dyn ObjectStore>,
    version: ObjectVersion,
    _nginx: Nginx,
    _root: tempfile::TempDir,
}

fn faulty(seed: u32) -> Faulty {
    let data = pattern(2 << 20, seed);
    let (root, nginx) = nginx_with(&data);
    let proxy = FaultProxy::forward_to(nginx.addr());
    let store = open(&format!("{}/image.sif", proxy.url()), &test_config());
    let version = version(&store).unwrap();
    Faulty {
        data,
        proxy,
        store,
        version,
        _nginx: nginx,
        _root: root,
    }
}

impl Faulty {
    /// A 1 MiB read at an unaligned offset.
    fn read(&self) -> Result<Vec<u8>, RemoteError> {
        read(&self.store, &self.version, 4321, 1 << 20)
    }

    fn expected(&self) -> &[u8] {
        &self.data[4321..4321 + (1 << 20)]
    }

    /// `fault` on the next `times` requests, then a read: the right bytes, after retries.
    fn recovers_from(&self, fault: Fault, times: usize) {
        self.proxy.inject(Match::Any, fault.clone(), times);
        let got = self
            .read()
            .unwrap_or_else(|e| panic!("after {fault:?} x{times}: {e}"));
        assert!(got == self.expected(), "wrong bytes after {fault:?}");
        let log = self.proxy.requests();
        let faulted = log.iter().filter(|r| r.fault == fault).count();
        assert_eq!(faulted, times, "{fault:?} applied {faulted} times: {log:?}");
    }

    /// `fault` on every request: a transient error naming it, never bytes.
    fn gives_up_on(&self, fault: Fault, mention: &str) {
        self.proxy.set_default(fault.clone());
        match self.read() {
            Err(RemoteError::Transient(m)) => {
                assert!(m.contains(mention), "{fault:?}: {m}");
                assert!(m.contains("gave up after"), "{m}");
                assert!(!m.contains('\n'), "one line: {m}");
            }
            other => panic!("{fault:?}: {:?}", other.map(|b| b.len())),
        }
    }
}

#[test]
fn latency_is_only_latency() {
    let f = faulty(10);
    f.recovers_from(Fault::Delay(Duration::from_millis(300)), 1);
}

#[test]
fn resets_before_and_after_the_headers_are_retried() {
    let f = faulty(11);
    f.recovers_from(Fault::ResetBeforeHeaders, 2);
    f.recovers_from(Fault::ResetAfterHeaders, 1);
    f.gives_up_on(Fault::ResetBeforeHeaders, "GET");
}

#[test]
fn a_truncated_body_is_retried_and_never_served() {
    let f = faulty(12);
    f.recovers_from(Fault::TruncateBody(1000), 1);
    f.recovers_from(Fault::TruncateBody(0), 1);
    f.gives_up_on(Fault::TruncateBody(5000), "GET");
}

#[test]
fn a_stalled_body_times_out_and_is_retried() {
    let f = faulty(13);
    let started = Instant::now();
    f.recovers_from(Fault::StallBody(64 << 10), 1);
    // The idle timeout (2 s) ended the stall, not the proxy's own 120 s limit.
    assert!(started.elapsed() < BOUND);
}

#[test]
fn a_200_instead_of_206_is_retried_and_never_served() {
    let f = faulty(14);
    f.recovers_from(Fault::OkInsteadOfPartial, 2);
    f.gives_up_on(Fault::OkInsteadOfPartial, "answered 200");
}

#[test]
fn a_wrong_content_range_is_retried_and_never_served() {
    let f = faulty(15);
    f.recovers_from(Fault::ShiftContentRange(1), 1);
    f.recovers_from(Fault::ShiftContentRange(-1), 1);
    f.recovers_from(Fault::ShiftRange(4), 1);
    f.recovers_from(Fault::ShiftRange(-4321), 1);
    f.gives_up_on(Fault::ShiftRange(4096), "Content-Range");
}

#[test]
fn a_416_is_retried_unless_it_reports_another_length() {
    let f = faulty(16);
    f.recovers_from(Fault::unsatisfiable(f.version.len), 1);
    f.proxy.next(Fault::unsatisfiable(f.version.len - 1));
    match f.read() {
        Err(RemoteError::Changed { was, .. }) => assert_eq!(was, f.version.validator),
        other => panic!("{:?}", other.map(|b| b.len())),
    }
}

#[test]
fn retry_after_is_honoured_for_429_and_503() {
    let f = faulty(17);
    let started = Instant::now();
    f.recovers_from(Fault::retry_after(429, "1"), 1);
    f.recovers_from(Fault::retry_after(503, "1"), 1);
    // Two answers asked for a second's wait each, and got it.
    assert!(started.elapsed() >= Duration::from_millis(1900));
}

#[test]
fn a_store_that_stays_down_gives_a_transient_error_in_bounded_time() {
    let f = faulty(18);
    f.gives_up_on(Fault::status(503), "503 Service Unavailable");
}

#[test]
fn a_store_that_comes_back_serves_again() {
    let f = faulty(19);
    f.proxy.set_default(Fault::status(503));
    assert!(matches!(f.read(), Err(RemoteError::Transient(_))));
    f.proxy.set_default(Fault::Pass);
    assert!(f.read().unwrap() == f.expected());
}

#[test]
fn final_answers_are_not_retried() {
    let f = faulty(20);
    f.proxy.set_default(Fault::status(404));
    match f.read() {
        Err(RemoteError::Refused(m)) => assert!(m.contains("404"), "{m}"),
        other => panic!("{:?}", other.map(|b| b.len())),
    }
    assert_eq!(f.proxy.requests().len(), 2, "the version probe and one GET");
}

#[test]
fn an_unreachable_server_gives_a_transient_error_in_bounded_time() {
    let port = remote_util::free_port();
    let store = open(
        &format!("http://127.0.0.1:{port}/image.sif"),
        &test_config(),
    );
    match version(&store) {
        Err(RemoteError::Transient(m)) => assert!(m.contains("gave up after"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_caching_proxy_serves_a_second_node_without_asking_the_origin() {
    let data = pattern(5 << 20, 21);
    let (_root, origin) = nginx_with(&data);
    let cache = Nginx::caching_proxy(&origin.url(""));
    let url = cache.url("/image.sif");
    let ranges = [
        (0u64, 64usize << 10),
        (3 << 20, 1 << 20),
        ((5 << 20) - 100, 100),
    ];

    let first_node = open(&url, &test_config());
    let v = version(&first_node).unwrap();
    assert_eq!(v.len, data.len() as u64);
    for (offset, len) in ranges {
        let got = read(&first_node, &v, offset, len).unwrap();
        assert!(got == data[offset as usize..offset as usize + len]);
    }
    let origin_requests = settled_log_length(&origin);
    assert!(origin_requests > 0);

    // Another node, cold: its own store, the same image.
    let second_node = open(&url, &test_config());
    let v2 = version(&second_node).unwrap();
    assert_eq!(v2, v);
    for (offset, len) in ranges {
        let got = read(&second_node, &v2, offset, len).unwrap();
        assert!(got == data[offset as usize..offset as usize + len]);
    }
    assert_eq!(
        settled_log_length(&origin),
        origin_requests,
        "the second node reached the origin: {:?}",
        origin.access_log()
    );
}

/// The length of nginx's access log once it has not changed for 300 ms (nginx writes a
/// line when it has sent an answer, which may be a moment after our read returned).
fn settled_log_length(nginx: &Nginx) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = nginx.access_log().len();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = nginx.access_log().len();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

// ---- OCI registries (oras://) ----

fn oras(registry: &Registry, reference: &str) -> String {
    format!("oras://{}/{reference}", registry.host())
}

#[test]
fn oras_reads_a_pushed_sif_by_tag_and_by_digest() {
    let registry = Registry::start(RegistryAuth::Open);
    let data = pattern(3 << 20, 30);
    let layer = registry.push_sif("lab/tools", "1.0", &data);
    let store = open(&oras(&registry, "lab/tools:1.0"), &test_config());
    assert_eq!(
        store.describe(),
        format!("oras://{}/lab/tools:1.0", registry.host())
    );
    let v = version(&store).unwrap();
    assert_eq!(v.validator, layer);
    assert_eq!(v.len, data.len() as u64);
    check_ranges(&store, &v, &data);

    // The same image by manifest digest.
    let manifest = registry.push_manifest(
        "lab/tools",
        "pinned",
        &[(
            "application/vnd.sylabs.sif.layer.v1.sif",
            layer.clone(),
            data.len(),
        )],
    );
    let pinned = open(
        &oras(&registry, &format!("lab/tools@{manifest}")),
        &test_config(),
    );
    assert_eq!(version(&pinned).unwrap(), v);

    // The tag moves: a new version; the old one still reads its own bytes.
    let new = pattern(1 << 20, 31);
    let new_layer = registry.push_sif("lab/tools", "1.0", &new);
    let v2 = version(&store).unwrap();
    assert_eq!(v2.validator, new_layer);
    assert_eq!(read(&store, &v2, 5, 10).unwrap(), new[5..15]);
    assert_eq!(read(&store, &v, 5, 10).unwrap(), data[5..15]);
}

#[test]
fn oras_refuses_what_is_not_a_sif_clearly() {
    let registry = Registry::start(RegistryAuth::Open);
    let missing = open(&oras(&registry, "lab/none:1"), &test_config());
    match version(&missing) {
        Err(RemoteError::Refused(m)) => assert!(m.contains("no such image"), "{m}"),
        other => panic!("{other:?}"),
    }
    let tar = registry.push_blob("lab/docker", b"not a sif");
    registry.push_manifest(
        "lab/docker",
        "1",
        &[("application/vnd.oci.image.layer.v1.tar+gzip", tar, 9)],
    );
    let docker = open(&oras(&registry, "lab/docker:1"), &test_config());
    match version(&docker) {
        Err(RemoteError::Refused(m)) => {
            assert!(
                m.contains("application/vnd.oci.image.layer.v1.tar+gzip"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A digest that does not name the manifest served is never trusted.
    let wrong = digest_of(b"another manifest");
    let pinned = open(
        &oras(&registry, &format!("lab/docker@{wrong}")),
        &test_config(),
    );
    assert!(version(&pinned).is_err());
}

#[test]
fn plain_http_registries_need_no_https() {
    let registry = Registry::start(RegistryAuth::Open);
    registry.push_sif("lab/a", "1", &pattern(4096, 32));
    let mut config = test_config();
    config.allow_http = false;
    let store = open(&oras(&registry, "lab/a:1"), &config);
    match version(&store) {
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("--no-https"), "{m}");
        }
        Ok(v) => panic!("read over plain HTTP without --no-https: {v:?}"),
    }
}

/// A docker config file with `auth` for `host`.
fn docker_config(
    dir: &std::path::Path,
    host: &str,
    user: &str,
    password: &str,
) -> std::path::PathBuf {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    path
}

#[test]
fn bearer_tokens_are_fetched_with_credentials_and_refreshed_on_a_401() {
    let registry = Registry::start(RegistryAuth::Bearer {
        credentials: Some(("robot".into(), "t0ken-pw".into())),
        token_lifetime: 300,
    });
    let data = pattern(1 << 20, 33);
    registry.push_sif("lab/secure", "v1", &data);
    let front = FaultProxy::forward_to(registry.addr());
    let dir = scratch("auth");
    let mut config = test_config();
    config.registry_auth = Some(docker_config(
        dir.path(),
        &front.host(),
        "robot",
        "t0ken-pw",
    ));
    let store = open(&format!("oras://{}/lab/secure:v1", front.host()), &config);
    let v = version(&store).unwrap();
    assert_eq!(read(&store, &v, 1000, 5000).unwrap(), data[1000..6000]);

    let tokens = registry.token_requests();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    let shown = format!("{store:?}");
    assert!(
        !shown.contains("token-1") && !shown.contains("t0ken-pw"),
        "{shown}"
    );
    assert_eq!(
        tokens[0].header("authorization"),
        Some(remote_util::servers::basic("robot", "t0ken-pw").as_str())
    );
    assert!(
        tokens[0]
            .target
            .contains("scope=repository%3Alab%2Fsecure%3Apull"),
        "{}",
        tokens[0].target
    );
    assert!(tokens[0].target.contains("service=sifuse-test-registry"));

    // The token "expires": the registry answers the next read with 401 and its challenge.
    front.inject(
        Match::PathContains("/blobs/".into()),
        Fault::StripAuthorization,
        1,
    );
    assert_eq!(read(&store, &v, 7000, 100).unwrap(), data[7000..7100]);
    assert_eq!(registry.token_requests().len(), 2);
    // Every registry request but the first (anonymous) and the stripped one carried a token.
    let log = front.requests();
    let with_token = log
        .iter()
        .filter(|r| {
            r.header("authorization")
                .is_some_and(|a| a.starts_with("Bearer "))
        })
        .count();
    assert_eq!(with_token, log.len() - 1, "{log:?}");
}

#[test]
fn short_lived_tokens_are_renewed_before_they_expire() {
    let registry = Registry::start(RegistryAuth::Bearer {
        credentials: None,
        token_lifetime: 4,
    });
    let data = pattern(64 << 10, 34);
    registry.push_sif("lab/pub", "1", &data);
    let store = open(&oras(&registry, "lab/pub:1"), &test_config());
    let v = version(&store).unwrap();
    assert_eq!(registry.token_requests().len(), 1);
    // Half the 4 s life has passed: the next request brings a new token first, anonymously.
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(read(&store, &v, 0, 10).unwrap(), data[..10]);
    let tokens = registry.token_requests();
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|t| t.header("authorization").is_none()));
}

#[test]
fn a_registry_that_needs_a_login_says_so() {
    let registry = Registry::start(RegistryAuth::Bearer {
        credentials: Some(("robot".into(), "pw".into())),
        token_lifetime: 300,
    });
    registry.push_sif("lab/secure", "v1", &pattern(4096, 35));
    let store = open(&oras(&registry, "lab/secure:v1"), &test_config());
    match version(&store) {
        Err(RemoteError::Refused(m)) => {
            assert!(
                m.contains("requires credentials") && m.contains("--registry-auth"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    let dir = scratch("auth");
    let mut config = test_config();
    config.registry_auth = Some(docker_config(
        dir.path(),
        &registry.host(),
        "robot",
        "wrong",
    ));
    let store = open(&oras(&registry, "lab/secure:v1"), &config);
    match version(&store) {
        Err(RemoteError::Refused(m)) => {
            assert!(m.contains("refused the credentials"), "{m}");
            assert!(!m.contains("wrong"), "a secret in a message: {m}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn basic_auth_registries_take_credentials_from_the_docker_config() {
    let registry = Registry::start(RegistryAuth::Basic);
    let data = pattern(128 << 10, 36);
    registry.push_sif("lab/basic", "1", &data);
    let dir = scratch("docker");
    docker_config(
        dir.path(),
        &registry.host(),
        HTPASSWD_USER,
        HTPASSWD_PASSWORD,
    );
    let mut config = test_config();
    config.env = Environment::empty().with("DOCKER_CONFIG", dir.path().to_str().unwrap());
    let store = open(&oras(&registry, "lab/basic:1"), &config);
    let v = version(&store).unwrap();
    assert_eq!(read(&store, &v, 99, 1000).unwrap(), data[99..1099]);

    docker_config(dir.path(), &registry.host(), HTPASSWD_USER, "not it");
    let store = open(&oras(&registry, "lab/basic:1"), &config);
    match version(&store) {
        Err(RemoteError::Refused(m)) => assert!(m.contains("refused the credentials"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn credential_helpers_answer_for_their_registry() {
    use std::os::unix::fs::PermissionsExt;
    let registry = Registry::start(RegistryAuth::Basic);
    let data = pattern(64 << 10, 37);
    registry.push_sif("lab/helper", "1", &data);
    let dir = scratch("helper");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-sifusetest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n[ \"$server\" = \"{}\" ] || {{ echo 'credentials not found'; exit 1; }}\n\
             printf '{{\"Username\":\"{HTPASSWD_USER}\",\"Secret\":\"{HTPASSWD_PASSWORD}\"}}'\n",
            registry.host()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        format!(
            r#"{{"credHelpers": {{"{}": "sifusetest"}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let mut config = test_config();
    config.env = Environment::empty()
        .with("DOCKER_CONFIG", dir.path().to_str().unwrap())
        .with("PATH", bin.to_str().unwrap());
    let store = open(&oras(&registry, "lab/helper:1"), &config);
    let v = version(&store).unwrap();
    assert_eq!(read(&store, &v, 0, 100).unwrap(), data[..100]);
}

#[test]
fn blob_redirects_reach_storage_without_the_registry_token_and_recover_from_expiry() {
    let registry = Registry::start(RegistryAuth::Bearer {
        credentials: None,
        token_lifetime: 300,
    });
    let data = pattern(1 << 20, 38);
    let layer = registry.push_sif("lab/redirected", "1", &data);
    // "Storage": nginx serving the blob, behind a proxy that logs and can expire URLs.
    let root = scratch("storage");
    std::fs::write(root.path().join("blob"), &data).unwrap();
    let nginx = Nginx::serve(root.path());
    let storage = FaultProxy::forward_to(nginx.addr());
    let front = FaultProxy::forward_to(registry.addr());
    front.inject(
        Match::PathContains(format!("/blobs/{layer}")),
        Fault::redirect(&format!("{}/blob?X-Signature=abc", storage.url())),
        usize::MAX,
    );
    let store = open(
        &format!("oras://{}/lab/redirected:1", front.host()),
        &test_config(),
    );
    let v = version(&store).unwrap();
    assert_eq!(read(&store, &v, 10, 100).unwrap(), data[10..110]);
    assert_eq!(read(&store, &v, 5000, 100).unwrap(), data[5000..5100]);
    let blob_asks = |front: &FaultProxy| {
        front
            .requests()
            .iter()
            .filter(|r| r.target.contains("/blobs/"))
            .count()
    };
    assert_eq!(blob_asks(&front), 1, "the redirect was remembered");
    storage.next(Fault::status(403));
    assert_eq!(read(&store, &v, 9000, 100).unwrap(), data[9000..9100]);
    assert_eq!(
        blob_asks(&front),
        2,
        "an expired location sends us back to the registry"
    );
    let to_storage = storage.requests();
    assert_eq!(to_storage.len(), 4);
    assert!(
        to_storage
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "the registry's token reached storage: {to_storage:?}"
    );
    assert!(front
        .requests()
        .iter()
        .filter(|r| r.target.contains("/blobs/"))
        .all(|r| r.header("authorization").is_some()));
}

#[test]
fn registry_faults_recover_or_fail_cleanly() {
    let registry = Registry::start(RegistryAuth::Open);
    let data = pattern(2 << 20, 39);
    registry.push_sif("lab/flaky", "1", &data);
    let front = FaultProxy::forward_to(registry.addr());
    let store = open(
        &format!("oras://{}/lab/flaky:1", front.host()),
        &test_config(),
    );
    front.next(Fault::retry_after(429, "0"));
    let v = version(&store).unwrap();
    for fault in [
        Fault::ResetAfterHeaders,
        Fault::TruncateBody(100),
        Fault::OkInsteadOfPartial,
        Fault::ShiftContentRange(2),
        Fault::ShiftRange(8),
        Fault::status(502),
    ] {
        front.next(fault.clone());
        let got = read(&store, &v, 333, 1 << 20).unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert!(got == data[333..333 + (1 << 20)], "{fault:?}");
    }
    front.set_default(Fault::OkInsteadOfPartial);
    assert!(matches!(
        read(&store, &v, 0, 10),
        Err(RemoteError::Transient(_))
    ));
}

// ---- S3 ----

/// The test config with a longer idle timeout: moto (Python) can be slow to answer on a
/// loaded machine, and no test here stalls it on purpose.
fn s3_config() -> StoreConfig {
    let mut config = test_config();
    config.idle_timeout = Duration::from_secs(5);
    config
}

fn s3_env(s3: &S3Server) -> Environment {
    Environment::empty()
        .with("AWS_ENDPOINT_URL", s3.endpoint())
        .with("AWS_ACCESS_KEY_ID", s3.access_key_id.clone())
        .with("AWS_SECRET_ACCESS_KEY", s3.secret_access_key.clone())
}

#[test]
fn s3_reads_signed_ranges_and_detects_a_changed_object() {
    let s3 = S3Server::start();
    let data = pattern(3 << 20, 40);
    let etag = s3.put("images", "lab/tools-v1_final~x.sif", &data);
    let mut config = s3_config();
    config.env = s3_env(&s3);
    let store = open("s3://images/lab/tools-v1_final~x.sif", &config);
    assert_eq!(store.describe(), "s3://images/lab/tools-v1_final~x.sif");
    let v = version(&store).unwrap();
    assert_eq!(
        (v.len, v.validator.as_str()),
        (data.len() as u64, etag.as_str())
    );
    check_ranges(&store, &v, &data);

    // Temporary credentials (a session token) sign as well.
    let (id, secret, token) = s3.session.clone();
    config.env = Environment::empty()
        .with("AWS_ENDPOINT_URL", s3.endpoint())
        .with("AWS_ACCESS_KEY_ID", id)
        .with("AWS_SECRET_ACCESS_KEY", secret)
        .with("AWS_SESSION_TOKEN", token);
    let session_store = open("s3://images/lab/tools-v1_final~x.sif", &config);
    assert_eq!(read(&session_store, &v, 10, 10).unwrap(), data[10..20]);

    let new = pattern(3 << 20, 41);
    s3.put("images", "lab/tools-v1_final~x.sif", &new);
    match read(&store, &v, 0, 100) {
        Err(RemoteError::Changed { was, .. }) => assert_eq!(was, etag),
        other => panic!("{other:?}"),
    }
    let v2 = version(&store).unwrap();
    assert_eq!(read(&store, &v2, 0, 100).unwrap(), new[..100]);
}

#[test]
fn s3_refusals_say_what_to_fix_and_retries_are_signed_afresh() {
    let s3 = S3Server::start();
    let data = pattern(1 << 20, 42);
    s3.put("images", "a.sif", &data);

    let mut config = s3_config();
    config.env = s3_env(&s3).with("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    match version(&open("s3://images/a.sif", &config)) {
        Err(RemoteError::Refused(m)) => {
            assert!(
                m.contains("SignatureDoesNotMatch") && m.contains("AWS_SECRET_ACCESS_KEY"),
                "{m}"
            );
            assert!(!m.contains("not-the-secret"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    config.env = s3_env(&s3);
    match version(&open("s3://images/missing.sif", &config)) {
        Err(RemoteError::Refused(m)) => assert!(m.contains("NoSuchKey"), "{m}"),
        other => panic!("{other:?}"),
    }
    config.env = Environment::empty().with("AWS_ENDPOINT_URL", s3.endpoint());
    match version(&open("s3://images/a.sif", &config)) {
        Err(RemoteError::Refused(m)) => assert!(m.contains("anonymous"), "{m}"),
        other => panic!("{other:?}"),
    }

    // Through a faulty proxy: every retry carries a fresh, valid signature.
    let front = FaultProxy::forward_to(s3.addr());
    config.env = s3_env(&s3).with("AWS_ENDPOINT_URL", front.url());
    let store = open("s3://images/a.sif", &config);
    front.next(Fault::ResetBeforeHeaders);
    let v = version(&store).unwrap();
    front.next(Fault::retry_after(503, "0"));
    front.next(Fault::TruncateBody(10));
    assert!(read(&store, &v, 100, 500_000).unwrap() == data[100..500_100]);
    let log = front.requests();
    assert_eq!(log.len(), 5, "{log:?}");
    assert!(log.iter().all(|r| r
        .header("authorization")
        .is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256 "))));
}

#[test]
fn addresses_that_are_not_remote_images_are_refused() {
    for bad in [
        "ftp://h/x",
        "s3://bucket",
        "oras://reg",
        "http://h:99999/x",
        "/local/file",
    ] {
        match open_store(bad, &test_config()) {
            Err(RemoteError::Refused(m)) => assert!(!m.is_empty()),
            other => panic!("{bad}: {other:?}"),
        }
    }
}
