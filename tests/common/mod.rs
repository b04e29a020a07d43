//! Test helpers: a dev PKI, an upstream that records what reaches it, a gateway in front of it,
//! and a raw TLS client that sends exact bytes and reads the exact status line back.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ndes_gateway::config::Config;
use ndes_gateway::dev::devpki::{self, DevCa, DevPki};
use ndes_gateway::Gateway;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Every network wait in the tests is bounded by this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub const SCEP: &str = "/certsrv/mscep/mscep.dll";

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

type Responder = Arc<dyn Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync>;

/// An upstream on loopback (TLS with the given certificate, or plain HTTP) that records every
/// request and answers with `respond`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests that reached the upstream, counted as they arrive (before any delay).
    pub arrived: Arc<std::sync::atomic::AtomicUsize>,
    /// The gateway's own requests (readiness probe, certificate watch), kept apart from what
    /// clients sent.
    pub probes: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn caps_response(_: &Seen) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(
            b"POSTPKIOperation\nSHA-256\nAES\n",
        )))
        .unwrap()
}

impl Upstream {
    pub async fn tls(cert_pem: &str, key_pem: &str) -> Upstream {
        Self::start(
            Some((cert_pem.to_owned(), key_pem.to_owned())),
            Arc::new(caps_response),
        )
        .await
    }

    pub async fn start(tls: Option<(String, String)>, respond: Responder) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let probes2 = probes.clone();
        let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let arrived2 = arrived.clone();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let connections2 = connections.clone();
        let acceptor = tls.map(|(cert, key)| tls_acceptor(&cert, &key));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                connections2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = seen2.clone();
                let probes = probes2.clone();
                let arrived = arrived2.clone();
                let respond = respond.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        let probes = probes.clone();
                        let arrived = arrived.clone();
                        let respond = respond.clone();
                        async move {
                            arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            // `delay_ms=N` in the query: an NDES that takes its time (Intune's
                            // challenge check, a slow CA).
                            let delay = parts_delay(req.uri().query().unwrap_or(""));
                            tokio::time::sleep(delay).await;
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let s = Seen {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                            };
                            let resp = respond(&s);
                            if s.target.contains("message=ndes-gateway") {
                                probes.lock().unwrap().push(s);
                            } else {
                                seen.lock().unwrap().push(s);
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let mut b = hyper::server::conn::http1::Builder::new();
                    b.max_buf_size(256 * 1024);
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                let _ = b.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = b.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            seen,
            arrived,
            probes,
            connections,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }
}

/// A TLS server side with the given certificate chain and key, PEM.
pub fn tls_acceptor(cert_pem: &str, key_pem: &str) -> TlsAcceptor {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(ndes_gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

fn parts_delay(query: &str) -> std::time::Duration {
    let ms = query
        .split('&')
        .find_map(|p| p.strip_prefix("delay_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    std::time::Duration::from_millis(ms)
}

/// A dev PKI in a temporary folder, plus the PEM of the NDES certificate and key.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
    pub ca: DevCa,
    pub ndes_cert: String,
    pub ndes_key: String,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (pki, ca) = devpki::generate_with_ca(dir.path()).unwrap();
        Pki {
            ca,
            ndes_cert: std::fs::read_to_string(&pki.ndes_cert).unwrap(),
            ndes_key: std::fs::read_to_string(&pki.ndes_key).unwrap(),
            pki,
            dir,
        }
    }

    pub fn root(&self) -> &Path {
        &self.pki.root
    }

    /// A server certificate for the NDES name from a CA the gateway does not trust.
    pub fn foreign_ndes_cert() -> (String, String) {
        DevCa::new("Some Other CA")
            .unwrap()
            .issue_server(&[devpki::NDES_NAME, "127.0.0.1"])
            .unwrap()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// The gateway's config: listener with the dev gateway certificate, upstream at `upstream` over
/// https with the dev root, plus `extra` TOML lines appended to the named sections.
pub fn gateway_config(
    pki: &Pki,
    upstream: SocketAddr,
    upstream_extra: &str,
    limits_extra: &str,
) -> Config {
    let text = format!(
        r#"
[listen]
addr = "127.0.0.1:0"
cert = {cert:?}
key = {key:?}
[upstream]
url = "https://{upstream}{SCEP}"
ca = {ca:?}
server_name = "{ndes}"
{cache}
{upstream_extra}
[limits]
{limits_extra}
[admin]
# Off here: its readiness probe would add requests to what the recording upstream counts.
enabled = false
"#,
        cert = pki.pki.gateway_cert.display().to_string(),
        key = pki.pki.gateway_key.display().to_string(),
        ca = pki.root().display().to_string(),
        ndes = devpki::NDES_NAME,
        // The recording upstream counts what reaches it: the cache would answer in its place.
        cache = if upstream_extra.contains("cache_ttl") {
            ""
        } else {
            "cache_ttl = \"0s\""
        },
    );
    Config::parse(&text).unwrap()
}

/// A gateway in front of a recording TLS upstream with the dev NDES certificate.
pub struct Setup {
    pub pki: Pki,
    pub upstream: Upstream,
    pub gateway: Gateway,
}

impl Setup {
    pub async fn new() -> Setup {
        Self::with("", "").await
    }

    pub async fn with(upstream_extra: &str, limits_extra: &str) -> Setup {
        let pki = Pki::new();
        let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
        let gateway = Gateway::start(&gateway_config(
            &pki,
            upstream.addr,
            upstream_extra,
            limits_extra,
        ))
        .await
        .unwrap();
        Setup {
            pki,
            upstream,
            gateway,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway.local_addr()
    }

    pub async fn raw(&self, request: &[u8]) -> RawResponse {
        raw_request(self.addr(), self.pki.root(), request).await
    }

    /// A GET over HTTP/1.1 with Connection: close.
    pub async fn get(&self, target: &str) -> RawResponse {
        self.raw(
            format!(
                "GET {target} HTTP/1.1\r\nHost: scep.example.test\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
    }
}

/// A TLS client trusting only `root`, with the given ALPN protocols.
pub fn tls_connector(root: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(root).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(ndes_gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

pub async fn tls_connect(
    addr: SocketAddr,
    root: &Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls_connector(root, &[b"http/1.1"])
        .connect(ServerName::try_from("scep.example.test").unwrap(), tcp)
        .await
        .unwrap()
}

/// A response as bytes: the status line exactly as sent, headers, body.
#[derive(Debug)]
pub struct RawResponse {
    pub status_line: String,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends the bytes as they are over a new TLS connection and reads until the server closes it
/// (the requests ask for Connection: close) or a whole response with Content-Length has arrived.
pub async fn raw_request(addr: SocketAddr, root: &Path, request: &[u8]) -> RawResponse {
    let mut tls = tls_connect(addr, root).await;
    tls.write_all(request).await.unwrap();
    tls.flush().await.unwrap();
    read_response(&mut tls).await
}

pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> RawResponse {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(r) = parse_complete(&buf) {
                return Some(r);
            }
        }
        None
    };
    match tokio::time::timeout(IO_TIMEOUT, read).await {
        Ok(Some(r)) => r,
        _ => parse_head(&buf).unwrap_or_else(|| RawResponse {
            status_line: String::new(),
            head: String::from_utf8_lossy(&buf).into_owned(),
            body: Vec::new(),
        }),
    }
}

/// What arrived before the connection closed: a head, and the body so far (a HEAD response has a
/// Content-Length and no body).
fn parse_head(buf: &[u8]) -> Option<RawResponse> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    Some(RawResponse {
        status_line: head.lines().next().unwrap_or("").to_owned(),
        head,
        body: buf[end + 4..].to_vec(),
    })
}

fn parse_complete(buf: &[u8]) -> Option<RawResponse> {
    let r = parse_head(buf)?;
    let len: usize = r.header("content-length")?.parse().ok()?;
    (r.body.len() >= len).then(|| RawResponse {
        body: r.body[..len].to_vec(),
        ..r
    })
}

/// An HTTP/2 client over TLS with ALPN h2, trusting `root`.
pub async fn h2_client(
    addr: SocketAddr,
    root: &Path,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connector(root, &[b"h2"])
        .connect(ServerName::try_from("scep.example.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .max_header_list_size(256 * 1024)
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A query of `total` bytes whose request-target (SCEP path + '?' + query) is exactly `target`
/// bytes, with raw '+' and '/' inside as iOS and macOS send them.
pub fn pki_target(path: &str, target: usize) -> String {
    let head = format!("{path}?operation=PKIOperation&message=");
    assert!(target > head.len());
    let pattern = b"MIAGCSqGSIb3+tl4tH9E/97TB";
    let fill: String = (0..target - head.len())
        .map(|i| pattern[i % pattern.len()] as char)
        .collect();
    format!("{head}{fill}")
}

/// How a read of a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// A whole response with a Content-Length arrived (the connection may still be open).
    Complete,
    /// The server closed the connection: EOF, or a read error such as a reset or a TLS end
    /// without close_notify.
    Closed,
    /// Nothing ended it: the wait ran out.
    TimedOut,
}

/// A response read by [`read_response_ending`], with how and when the read ended.
#[derive(Debug)]
pub struct EndedResponse {
    pub response: RawResponse,
    pub end: ReadEnd,
    pub elapsed: Duration,
}

/// Reads a response as [`read_response`] does, waiting at most `wait`, and also says whether the
/// read ended with a whole response, with the server closing the connection, or by the timeout
/// (which an empty status line alone cannot tell apart).
pub async fn read_response_ending<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    wait: Duration,
) -> EndedResponse {
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return (None, ReadEnd::Closed),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(r) = parse_complete(&buf) {
                return (Some(r), ReadEnd::Complete);
            }
        }
    };
    let (complete, end) = match tokio::time::timeout(wait, read).await {
        Ok(result) => result,
        Err(_) => (None, ReadEnd::TimedOut),
    };
    let response = complete.unwrap_or_else(|| {
        parse_head(&buf).unwrap_or_else(|| RawResponse {
            status_line: String::new(),
            head: String::from_utf8_lossy(&buf).into_owned(),
            body: Vec::new(),
        })
    });
    EndedResponse {
        response,
        end,
        elapsed: started.elapsed(),
    }
}

/// [`raw_request`], reporting how the read of the answer ended (see [`read_response_ending`]).
/// A write the server cuts short (it refused and closed early) is not an error here.
pub async fn raw_request_ending(
    addr: SocketAddr,
    root: &Path,
    request: &[u8],
    wait: Duration,
) -> EndedResponse {
    let mut tls = tls_connect(addr, root).await;
    let _ = tls.write_all(request).await;
    let _ = tls.flush().await;
    read_response_ending(&mut tls, wait).await
}

/// An NDES that ends each keep-alive connection right after its answer without saying so (no
/// `Connection: close`), as IIS does when its `connectionTimeout` or an application pool recycle
/// closes a connection: TLS with the NDES certificate in front of a plain-HTTP `backend`, one
/// request per connection, the public SCEP path mapped onto `backend_path`. The close comes
/// `linger` after the answer: at once, or late enough to meet the gateway's next request on its
/// way.
pub struct ClosingNdes {
    pub addr: SocketAddr,
    /// TLS connections accepted.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ClosingNdes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClosingNdes {
    pub async fn start(
        pki: &Pki,
        backend: SocketAddr,
        backend_path: &str,
        linger: Duration,
    ) -> ClosingNdes {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls_acceptor(&pki.ndes_cert, &pki.ndes_key);
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let backend_path = backend_path.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let backend_path = backend_path.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let exchange = async {
                        let request = read_one_request(&mut tls).await?;
                        let request = with_connection_close(&request, &backend_path);
                        let mut b = TcpStream::connect(backend).await.ok()?;
                        b.write_all(&request).await.ok()?;
                        let mut answer = Vec::new();
                        b.read_to_end(&mut answer).await.ok()?;
                        let answer = without_connection_close(&answer);
                        if linger.is_zero() {
                            // The answer and the close_notify in one write, as a server that
                            // closes with its answer sends them: the close never trails behind
                            // on a busy machine.
                            use std::io::Write;
                            let session = tls.get_mut().1;
                            session.writer().write_all(&answer).ok()?;
                            session.send_close_notify();
                        } else {
                            tls.write_all(&answer).await.ok()?;
                        }
                        tls.flush().await.ok()
                    };
                    if tokio::time::timeout(IO_TIMEOUT, exchange).await.is_err() {
                        return;
                    }
                    if !linger.is_zero() {
                        tokio::time::sleep(linger).await;
                    }
                    let _ = tls.shutdown().await;
                });
            }
        });
        ClosingNdes {
            addr,
            connections,
            task,
        }
    }
}

/// One HTTP/1.1 request, head and Content-Length body, as the gateway sends it.
async fn read_one_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 256 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf)
}

/// The request with its SCEP path mapped onto `path` and `Connection: close` added, so the
/// backend's answer ends with its connection.
fn with_connection_close(request: &[u8], path: &str) -> Vec<u8> {
    let line_end = request
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(request.len());
    let line = String::from_utf8_lossy(&request[..line_end]).replacen(SCEP, path, 1);
    let mut out = line.into_bytes();
    out.extend_from_slice(b"\r\nConnection: close");
    out.extend_from_slice(&request[line_end..]);
    out
}

fn without_connection_close(answer: &[u8]) -> Vec<u8> {
    let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return answer.to_vec();
    };
    let head = String::from_utf8_lossy(&answer[..head_end]);
    let kept: Vec<&str> = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    let mut out = kept.join("\r\n").into_bytes();
    out.extend_from_slice(&answer[head_end..]);
    out
}

/// The sum of every series in `scrape` named as `series` is and carrying at least its labels:
/// `name{kind="busy"}` counts `name{kind="busy",server="..."}` for every server. NaN when none.
pub fn series_sum(scrape: &str, series: &str) -> f64 {
    let (name, wanted) = match series.split_once('{') {
        Some((name, labels)) => (name, labels.trim_end_matches('}')),
        None => (series, ""),
    };
    let wanted: Vec<&str> = wanted.split(',').filter(|l| !l.is_empty()).collect();
    let mut found = None;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (line_name, labels) = match key.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (key, ""),
        };
        let labels: Vec<&str> = labels.split(',').collect();
        if line_name == name && wanted.iter().all(|w| labels.contains(w)) {
            if let Ok(v) = value.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found.unwrap_or(f64::NAN)
}

/// Percent-encodes every byte that is not unreserved (RFC 3986), as certmonger does.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A PKCSReq that scepclient made for the CA certificate `ca_der` (a GetCACert answer), caught
/// by a stand-in CA that hands out that certificate and records the POST instead of answering it.
/// scepclient runs in `dir`; `root` is the dev root it trusts.
pub async fn pkcsreq_for(dir: &Path, root: &Path, ca_der: Bytes, cn: &str) -> Bytes {
    let recorded: Arc<Mutex<Option<Bytes>>> = Arc::default();
    let rec = recorded.clone();
    let recorder = Upstream::start(
        None,
        Arc::new(move |seen: &Seen| {
            let resp = Response::builder();
            if seen.target.contains("GetCACert") {
                resp.header("content-type", "application/x-x509-ca-cert")
                    .body(Full::new(ca_der.clone()))
            } else if seen.target.contains("GetCACaps") {
                resp.header("content-type", "text/plain")
                    .body(Full::new(Bytes::from_static(
                        b"POSTPKIOperation\nSHA-256\nAES\n",
                    )))
            } else {
                *rec.lock().unwrap() = Some(seen.body.clone());
                resp.status(500)
                    .body(Full::new(Bytes::from_static(b"recorded")))
            }
            .unwrap()
        }),
    )
    .await;
    let url = format!("http://127.0.0.1:{}/scep", recorder.addr.port());
    let _ = ndes_gateway::dev::demo::enrol(&dir.join(cn), &url, root, cn).await;
    let body = recorded.lock().unwrap().clone();
    body.expect("scepclient posted no PKCSReq")
}

/// GET over plain HTTP/1.1 straight to a local server (scepserver, say).
pub async fn direct_get(port: u16, target: &str) -> RawResponse {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    read_response(&mut s).await
}
