//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1, scripted per request, and (with a closure
//! in place of the upstream) a tiny origin server, such as a registry's token service.
//!
//! Every request is logged (method, target, headers, the fault applied, the status sent).
//! Faults come from rules matched in order, each for a number of requests, else from the
//! default (pass, or say a delay on every request). Connections to the client are kept
//! alive across requests, as a real server's are; each request opens its own connection
//! upstream (`Connection: close`), so the end of an upstream answer is its EOF.
//!
//! Everything waits with a bound: reads poll a stop flag every 50 ms, upstream reads time out
//! after 10 s, a stalled body is held at most 120 s, and dropping the proxy stops and joins
//! every thread.

use std::collections::VecDeque;
use std::io::{self, Cursor, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the proxy does to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward it and relay the answer unchanged.
    Pass,
    /// Wait, then forward it.
    Delay(Duration),
    /// Read the request, then reset the connection (RST) without answering.
    ResetBeforeHeaders,
    /// Forward it, send the answer's headers, then reset the connection.
    ResetAfterHeaders,
    /// Forward it, send the headers and this many bytes of the body, then close.
    TruncateBody(usize),
    /// Forward it, send the headers and this many bytes of the body, then send nothing more
    /// while holding the connection open (until the client closes it or 120 s pass).
    StallBody(usize),
    /// Forward it; turn a 206 into a 200 without Content-Range, body unchanged.
    OkInsteadOfPartial,
    /// Forward it; move both ends of the Content-Range by this many bytes, body unchanged
    /// (a label that lies).
    ShiftContentRange(i64),
    /// Forward it with both ends of its Range moved by this many bytes: the answer is
    /// another range, labelled truthfully (a cache that served the wrong piece).
    ShiftRange(i64),
    /// Forward it without its Authorization header (what an expired token amounts to: the
    /// origin answers 401 with its challenge).
    StripAuthorization,
    /// Answer this instead of forwarding.
    Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

impl Fault {
    /// An answer with this status and a short text body.
    pub fn status(status: u16) -> Fault {
        Fault::Answer {
            status,
            headers: vec![],
            body: format!("injected {status}\n").into_bytes(),
        }
    }

    /// A 429 or 503 asking the client to come back after `retry_after` (seconds or a date).
    pub fn retry_after(status: u16, retry_after: &str) -> Fault {
        Fault::Answer {
            status,
            headers: vec![("Retry-After".into(), retry_after.into())],
            body: format!("injected {status}\n").into_bytes(),
        }
    }

    /// A 307 to `location`.
    pub fn redirect(location: &str) -> Fault {
        Fault::Answer {
            status: 307,
            headers: vec![("Location".into(), location.into())],
            body: vec![],
        }
    }

    /// A 416 saying the object is `len` bytes long.
    pub fn unsatisfiable(len: u64) -> Fault {
        Fault::Answer {
            status: 416,
            headers: vec![("Content-Range".into(), format!("bytes */{len}"))],
            body: vec![],
        }
    }
}

/// Which requests a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    Any,
    /// The request target (path and query) contains this.
    PathContains(String),
    /// Requests with a Range header.
    Ranged,
}

impl Match {
    fn matches(&self, head: &RequestHead) -> bool {
        match self {
            Match::Any => true,
            Match::PathContains(s) => head.target.contains(s.as_str()),
            Match::Ranged => head.header("range").is_some(),
        }
    }
}

/// A request as the proxy received it.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The answer of a closure-backed origin.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }
}

/// One request seen by the proxy.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub fault: Fault,
    /// The status sent to the client; `None` if none was.
    pub status: Option<u16>,
    /// Body bytes delivered to the client.
    pub sent: u64,
    /// Whether the proxy is done with the request (the fields above are final).
    pub finished: bool,
}

impl Logged {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Responder = dyn Fn(&RequestHead) -> Reply + Send + Sync;

enum Backend {
    Forward(SocketAddr),
    Respond(Box<Responder>),
}

struct Rule {
    matcher: Match,
    fault: Fault,
    remaining: usize,
}

struct Shared {
    stop: AtomicBool,
    backend: Backend,
    rules: Mutex<VecDeque<Rule>>,
    default: Mutex<Fault>,
    log: Mutex<Vec<Logged>>,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

/// The proxy (or origin). Stops, with all its threads, when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
const STALL_LIMIT: Duration = Duration::from_secs(120);
const HEAD_LIMIT: usize = 64 * 1024;

impl FaultProxy {
    /// A proxy in front of `upstream` (`host:port` on this machine).
    pub fn forward_to(upstream: SocketAddr) -> FaultProxy {
        Self::start(Backend::Forward(upstream))
    }

    /// A server answering every request with `respond`.
    pub fn respond_with(
        respond: impl Fn(&RequestHead) -> Reply + Send + Sync + 'static,
    ) -> FaultProxy {
        Self::start(Backend::Respond(Box::new(respond)))
    }

    fn start(backend: Backend) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            backend,
            rules: Mutex::new(VecDeque::new()),
            default: Mutex::new(Fault::Pass),
            log: Mutex::new(Vec::new()),
            connections: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let s2 = s.clone();
                let handle = std::thread::spawn(move || serve_connection(&s2, stream));
                let mut conns = s.connections.lock().unwrap();
                conns.retain(|h| !h.is_finished());
                conns.push(handle);
            }
        });
        FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Apply `fault` to the next `times` requests that `matcher` matches (after the rules
    /// already queued have been used up for them).
    pub fn inject(&self, matcher: Match, fault: Fault, times: usize) {
        self.shared.rules.lock().unwrap().push_back(Rule {
            matcher,
            fault,
            remaining: times,
        });
    }

    /// Apply `fault` to the next request, whatever it is.
    pub fn next(&self, fault: Fault) {
        self.inject(Match::Any, fault, 1);
    }

    /// What requests no rule matches get.
    pub fn set_default(&self, fault: Fault) {
        *self.shared.default.lock().unwrap() = fault;
    }

    /// Forget the rules not used yet.
    pub fn clear_rules(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.shared.log.lock().unwrap().clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let conns: Vec<_> = self.shared.connections.lock().unwrap().drain(..).collect();
        for c in conns {
            let _ = c.join();
        }
    }
}

impl Shared {
    fn pick(&self, head: &RequestHead) -> Fault {
        let mut rules = self.rules.lock().unwrap();
        if let Some(i) = rules
            .iter()
            .position(|r| r.remaining > 0 && r.matcher.matches(head))
        {
            let fault = rules[i].fault.clone();
            rules[i].remaining -= 1;
            if rules[i].remaining == 0 {
                rules.remove(i);
            }
            return fault;
        }
        self.default.lock().unwrap().clone()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Bytes read from a client connection, kept across requests.
struct ClientConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

enum After {
    KeepAlive,
    Close,
    Reset,
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(POLL));
    let _ = stream.set_nodelay(true);
    let mut conn = ClientConn {
        stream,
        buf: Vec::new(),
    };
    loop {
        let head = match read_request(shared, &mut conn) {
            Some(h) => h,
            None => return,
        };
        let fault = shared.pick(&head);
        let index = {
            let mut log = shared.log.lock().unwrap();
            log.push(Logged {
                method: head.method.clone(),
                target: head.target.clone(),
                headers: head.headers.clone(),
                fault: fault.clone(),
                status: None,
                sent: 0,
                finished: false,
            });
            log.len() - 1
        };
        let mut sent = 0u64;
        let (after, status) = handle(shared, &mut conn.stream, &head, &fault, &mut sent);
        if let Some(entry) = shared.log.lock().unwrap().get_mut(index) {
            entry.status = status;
            entry.sent = sent;
            entry.finished = true;
        }
        match after {
            After::KeepAlive => continue,
            After::Close => {
                let _ = conn.stream.shutdown(Shutdown::Both);
                return;
            }
            After::Reset => {
                reset(&conn.stream);
                return;
            }
        }
    }
}

/// Close with an RST rather than a FIN.
fn reset(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a live `linger` of the size
    // passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    // Dropping the last handle closes it; the caller's handle is dropped when it returns.
}

/// Read one request (head and Content-Length body); `None` when the client closed, the
/// request is malformed, or the proxy stops.
fn read_request(shared: &Shared, conn: &mut ClientConn) -> Option<RequestHead> {
    let head_end = loop {
        if let Some(i) = find(&conn.buf, b"\r\n\r\n") {
            break i;
        }
        if conn.buf.len() > HEAD_LIMIT || shared.stopped() {
            return None;
        }
        let mut chunk = [0u8; 8192];
        match conn.stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => continue,
            Err(_) => return None,
        }
    };
    let head = String::from_utf8_lossy(&conn.buf[..head_end]).into_owned();
    conn.buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let headers = parse_headers(lines);
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let deadline = Instant::now() + UPSTREAM_TIMEOUT;
    while conn.buf.len() < len {
        if shared.stopped() || Instant::now() > deadline {
            return None;
        }
        let mut chunk = [0u8; 65536];
        match conn.stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => continue,
            Err(_) => return None,
        }
    }
    let body = conn.buf.drain(..len).collect();
    Some(RequestHead {
        method,
        target,
        headers,
        body,
    })
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// An answer from upstream: status, headers, and a reader of the rest (the body).
struct Upstream {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
    body: Box<dyn Read + Send>,
}

fn handle(
    shared: &Shared,
    client: &mut TcpStream,
    head: &RequestHead,
    fault: &Fault,
    sent: &mut u64,
) -> (After, Option<u16>) {
    match fault {
        Fault::ResetBeforeHeaders => return (After::Reset, None),
        Fault::Answer {
            status,
            headers,
            body,
        } => {
            let ok = write_head(
                client,
                *status,
                &reason(*status),
                headers,
                Some(body.len()),
                false,
            )
            .and_then(|_| client.write_all(body))
            .is_ok();
            *sent = body.len() as u64;
            return (
                if ok { After::KeepAlive } else { After::Close },
                Some(*status),
            );
        }
        Fault::Delay(d) => {
            let until = Instant::now() + *d;
            while Instant::now() < until && !shared.stopped() {
                std::thread::sleep(POLL.min(until - Instant::now()));
            }
        }
        _ => {}
    }
    let shifted;
    let head = match fault {
        Fault::ShiftRange(by) => {
            let mut h = head.clone();
            for (k, v) in h.headers.iter_mut() {
                if k.eq_ignore_ascii_case("range") {
                    *v = shift_range_request(v, *by);
                }
            }
            shifted = h;
            &shifted
        }
        _ => head,
    };
    let mut upstream = match fetch(shared, head, matches!(fault, Fault::StripAuthorization)) {
        Ok(u) => u,
        Err(e) => {
            let body = format!("proxy: upstream failed: {e}\n").into_bytes();
            let _ = write_head(client, 502, "Bad Gateway", &[], Some(body.len()), false)
                .and_then(|_| client.write_all(&body));
            return (After::Close, Some(502));
        }
    };
    match fault {
        Fault::OkInsteadOfPartial if upstream.status == 206 => {
            upstream.status = 200;
            upstream.reason = "OK".into();
            upstream
                .headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case("content-range"));
        }
        Fault::ShiftContentRange(by) => {
            for (k, v) in upstream.headers.iter_mut() {
                if k.eq_ignore_ascii_case("content-range") {
                    *v = shift_range(v, *by);
                }
            }
        }
        _ => {}
    }
    let no_body = head.method == "HEAD" || matches!(upstream.status, 204 | 304);
    let length = upstream
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let chunked = upstream.headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    // Without a length or chunking the body ends at our close.
    let close_delimited = !no_body && length.is_none() && !chunked;
    let cut_short = matches!(
        fault,
        Fault::TruncateBody(_) | Fault::StallBody(_) | Fault::ResetAfterHeaders
    );
    let status = upstream.status;
    if write_head(
        client,
        status,
        &upstream.reason,
        &upstream.headers,
        None,
        close_delimited || cut_short,
    )
    .is_err()
    {
        return (After::Close, Some(status));
    }
    if no_body {
        return (After::KeepAlive, Some(status));
    }
    let limit = match fault {
        Fault::ResetAfterHeaders => return (After::Reset, Some(status)),
        Fault::TruncateBody(n) | Fault::StallBody(n) => Some(*n),
        _ => None,
    };
    if relay(&mut upstream.body, client, limit, sent).is_err() {
        return (After::Close, Some(status));
    }
    match fault {
        Fault::TruncateBody(_) => (After::Close, Some(status)),
        Fault::StallBody(_) => {
            let _ = client.flush();
            let until = Instant::now() + STALL_LIMIT;
            let mut probe = [0u8; 1];
            while Instant::now() < until && !shared.stopped() {
                // A read of 0 is the client giving up; a timeout, its still waiting.
                match client.read(&mut probe) {
                    Ok(0) => break,
                    Err(e) if is_timeout(&e) => continue,
                    _ => break,
                }
            }
            (After::Close, Some(status))
        }
        _ if close_delimited => (After::Close, Some(status)),
        _ => (After::KeepAlive, Some(status)),
    }
}

/// `bytes A-B/T` with A and B moved by `by`.
fn shift_range(v: &str, by: i64) -> String {
    let parse = || -> Option<String> {
        let rest = v.trim().strip_prefix("bytes ")?;
        let (range, total) = rest.split_once('/')?;
        let (a, b) = range.split_once('-')?;
        let a: i64 = a.parse().ok()?;
        let b: i64 = b.parse().ok()?;
        Some(format!(
            "bytes {}-{}/{total}",
            (a + by).max(0),
            (b + by).max(0)
        ))
    };
    parse().unwrap_or_else(|| v.to_string())
}

/// `bytes=A-B` with A and B moved by `by`.
fn shift_range_request(v: &str, by: i64) -> String {
    let parse = || -> Option<String> {
        let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
        let a: i64 = a.parse().ok()?;
        let b: i64 = b.parse().ok()?;
        Some(format!("bytes={}-{}", (a + by).max(0), (b + by).max(0)))
    };
    parse().unwrap_or_else(|| v.to_string())
}

fn relay(
    from: &mut dyn Read,
    to: &mut TcpStream,
    limit: Option<usize>,
    sent: &mut u64,
) -> io::Result<()> {
    let mut left = limit.unwrap_or(usize::MAX);
    let mut chunk = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = chunk.len().min(left);
        let n = match from.read(&mut chunk[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&chunk[..n])?;
        *sent += n as u64;
        left -= n;
    }
    to.flush()
}

fn write_head(
    out: &mut TcpStream,
    status: u16,
    reason: &str,
    headers: &[(String, String)],
    content_length: Option<usize>,
    close: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        if content_length.is_some() && k.eq_ignore_ascii_case("content-length") {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(n) = content_length {
        head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn reason(status: u16) -> String {
    match status {
        200 => "OK",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        412 => "Precondition Failed",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
    .into()
}

/// The upstream's answer to `head` (from the closure, or over a new connection).
fn fetch(shared: &Shared, head: &RequestHead, strip_authorization: bool) -> io::Result<Upstream> {
    let addr = match &shared.backend {
        Backend::Respond(respond) => {
            let mut head = head.clone();
            if strip_authorization {
                head.headers
                    .retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
            }
            let reply = respond(&head);
            let mut headers = reply.headers.clone();
            headers.push(("Content-Length".into(), reply.body.len().to_string()));
            return Ok(Upstream {
                status: reply.status,
                reason: reason(reply.status),
                headers,
                body: Box::new(Cursor::new(reply.body)),
            });
        }
        Backend::Forward(addr) => *addr,
    };
    let mut up = TcpStream::connect_timeout(&addr, UPSTREAM_TIMEOUT)?;
    up.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    up.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
    let mut request = format!("{} {} HTTP/1.1\r\n", head.method, head.target);
    for (k, v) in &head.headers {
        let skip = k.eq_ignore_ascii_case("connection")
            || k.eq_ignore_ascii_case("keep-alive")
            || k.eq_ignore_ascii_case("proxy-connection")
            || (strip_authorization && k.eq_ignore_ascii_case("authorization"));
        if !skip {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    request.push_str("Connection: close\r\n\r\n");
    up.write_all(request.as_bytes())?;
    up.write_all(&head.body)?;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > HEAD_LIMIT {
            return Err(io::Error::other("upstream head too long"));
        }
        let mut chunk = [0u8; 8192];
        let n = up.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other("upstream closed before its headers"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = buf[end + 4..].to_vec();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let _version = parts.next();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let reason = parts.next().unwrap_or("").to_string();
    Ok(Upstream {
        status,
        reason,
        headers: parse_headers(lines),
        body: Box::new(Cursor::new(rest).chain(up)),
    })
}
