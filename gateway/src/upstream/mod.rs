//! The connection to the internal NDES: a new TLS connection that trusts only the configured
//! anchors, checks the NDES name, and optionally pins keys of the presented chain; pooled,
//! keep-alive, HTTP/1.1 (what IIS speaks to a proxy).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tower::limit::{ConcurrencyLimit, GlobalConcurrencyLimitLayer};
use tower::retry::{Policy, Retry};
use tower::timeout::error::Elapsed;
use tower::timeout::Timeout;
use tower::util::MapErr;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

use crate::config::{ConfigError, UpstreamConfig};
use crate::tls::{load_certificates, provider};

pub mod cluster;

/// What went wrong on the way to NDES; drives the log line, the status and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    TlsChain,
    TlsName,
    PinMismatch,
    Timeout,
    Protocol,
    /// `upstream.max_in_flight` requests already wait on NDES.
    Busy,
    /// NDES's answer is over `upstream.max_response_bytes`.
    ResponseTooLarge,
    /// The one server that can answer (it holds the RA key) is down or not ready.
    Unavailable,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 9] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::TlsChain,
        UpstreamErrorKind::TlsName,
        UpstreamErrorKind::PinMismatch,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Protocol,
        UpstreamErrorKind::Busy,
        UpstreamErrorKind::ResponseTooLarge,
        UpstreamErrorKind::Unavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::TlsChain => "tls_chain",
            UpstreamErrorKind::TlsName => "tls_name",
            UpstreamErrorKind::PinMismatch => "pin_mismatch",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::Busy => "busy",
            UpstreamErrorKind::ResponseTooLarge => "response_too_large",
            UpstreamErrorKind::Unavailable => "unavailable",
        }
    }
}

#[derive(Debug)]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    pub message: String,
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.message)
    }
}

impl std::error::Error for UpstreamError {}

/// No SPKI pin of the configured list matched the server's certificate.
#[derive(Debug)]
struct PinMismatch;

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server's certificate matches no key in upstream.spki_sha256")
    }
}

impl std::error::Error for PinMismatch {}

/// SHA-256 of a certificate's SubjectPublicKeyInfo, base64: the format of Envoy's
/// `verify_certificate_spki` and of `openssl x509 -pubkey | openssl pkey -pubin -outform der |
/// openssl dgst -sha256 -binary | base64`.
pub fn spki_sha256(cert: &[u8]) -> Option<String> {
    spki_digest(cert).map(|d| base64::engine::general_purpose::STANDARD.encode(d))
}

fn spki_digest(cert: &[u8]) -> Option<[u8; 32]> {
    use der::{Decode, Encode};
    let parsed = x509_cert::Certificate::from_der(cert).ok()?;
    let spki = parsed
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .ok()?;
    Some(Sha256::digest(spki).into())
}

/// Chain and name checks by webpki against the configured anchors only, then the pins.
#[derive(Debug)]
struct PinnedVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
    /// The last certificate NDES presented that passed every check, for its expiry gauge and
    /// `doctor`.
    seen: SeenLeaf,
}

/// The certificate NDES presented last that passed chain, name and pin checks.
pub type SeenLeaf = Arc<std::sync::Mutex<Option<CertificateDer<'static>>>>;

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        // The server's own certificate only, as Envoy does: the other certificates a server sends
        // need not be the ones webpki built its path from, so a pin matched there could be a
        // public certificate appended to an impostor's chain.
        if !self.pins.is_empty() && !spki_digest(end_entity).is_some_and(|d| self.pins.contains(&d))
        {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch)),
            )));
        }
        // Recorded only once chain, name and pin passed: a certificate that failed carries a
        // subject of anyone's choosing, and must never reach the expiry gauge.
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(end_entity.clone().into_owned());
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Who NDES is and how far to trust it, resolved from `[upstream]` once at start.
#[derive(Clone)]
pub struct UpstreamTarget {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The upstream SCEP path the public path is mapped onto (`/pkiclient.exe` is appended to it
    /// when the client used that form).
    pub base_path: String,
    pub server_name: ServerName<'static>,
    pub host_header: HeaderValue,
    pub tls: Option<Arc<ClientConfig>>,
    pub pins: usize,
    pub seen_leaf: SeenLeaf,
}

impl fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTarget")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field("base_path", &self.base_path)
            .field("server_name", &self.server_name)
            .field("pins", &self.pins)
            .finish()
    }
}

impl UpstreamTarget {
    pub fn from_config(c: &UpstreamConfig) -> Result<UpstreamTarget, ConfigError> {
        let bad = |why: String| ConfigError(format!("upstream.url: {why}"));
        let uri: Uri = c
            .url
            .parse()
            .map_err(|e| bad(format!("{:?} is not a URL: {e}", c.url)))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| bad("needs https://".to_owned()))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| bad("needs a host".to_owned()))?;
        if uri.query().is_some() {
            return Err(bad("has a query string; give the SCEP path only".to_owned()));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let base_path = match uri.path() {
            "" | "/" => {
                return Err(bad(
                    "has no path; NDES is at /certsrv/mscep/mscep.dll".to_owned()
                ))
            }
            p => p.trim_end_matches('/').to_owned(),
        };
        let name = c.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone()).map_err(|_| {
            ConfigError(format!(
                "upstream.server_name: {name:?} is not a DNS name or an IP address"
            ))
        })?;
        let host_text = c.host_header.clone().unwrap_or(name);
        let host_header = HeaderValue::from_str(&host_text).map_err(|_| {
            ConfigError(format!(
                "upstream.host_header: {host_text:?} is not a valid Host"
            ))
        })?;
        let seen_leaf = SeenLeaf::default();
        let tls = if scheme == Scheme::HTTPS {
            Some(client_config(c, seen_leaf.clone())?)
        } else if scheme == Scheme::HTTP {
            // Plain HTTP only to a server on the same host: the sidecar case, where the hop never
            // leaves the machine. Anything else would carry enrolments in clear across the LAN.
            let loopback = host
                .parse::<IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(false);
            if !loopback {
                return Err(bad(format!(
                    "http:// is allowed only to a loopback address (127.0.0.1, ::1), not {host:?}; use https://"
                )));
            }
            if c.ca.is_some() || !c.spki_sha256.is_empty() {
                return Err(ConfigError(
                    "upstream.ca and upstream.spki_sha256 need an https:// upstream.url".to_owned(),
                ));
            }
            None
        } else {
            return Err(bad(format!(
                "scheme {scheme} is not supported; use https://"
            )));
        };
        Ok(UpstreamTarget {
            scheme,
            authority,
            base_path,
            server_name,
            host_header,
            tls,
            pins: c.spki_sha256.len(),
            seen_leaf,
        })
    }

    /// The upstream request URI: the configured path, the client's suffix, the query unchanged.
    /// `None` when the result would not fit the URI type (an upstream path longer than the
    /// public one with a request already at the limit).
    pub fn uri_for(&self, suffix: &str, query: Option<&str>) -> Option<Uri> {
        let mut pq = String::with_capacity(
            self.base_path.len() + suffix.len() + 1 + query.map_or(0, str::len),
        );
        pq.push_str(&self.base_path);
        pq.push_str(suffix);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        // Origin form: the request line carries the path, the Host header the name.
        Some(Uri::from(
            PathAndQuery::from_maybe_shared(Bytes::from(pq)).ok()?,
        ))
    }

    /// The same, sharing the client's bytes when its path is already the upstream's (the usual
    /// case for a real NDES, where both are /certsrv/mscep/mscep.dll): a 64 KB request-target
    /// then goes upstream without a copy.
    pub fn uri_reusing(&self, client: &Uri, suffix: &str) -> Option<Uri> {
        let path = client.path();
        let same = path.len() == self.base_path.len() + suffix.len()
            && path.starts_with(self.base_path.as_str())
            && path.ends_with(suffix);
        match client.path_and_query() {
            Some(pq) if same => Some(Uri::from(pq.clone())),
            _ => self.uri_for(suffix, client.query()),
        }
    }
}

fn client_config(c: &UpstreamConfig, seen: SeenLeaf) -> Result<Arc<ClientConfig>, ConfigError> {
    let ca = c.ca.as_ref().ok_or_else(|| {
        ConfigError("upstream.ca: required for https://: the PEM file of the CA that issued the NDES certificate (the system roots are never used)".to_owned())
    })?;
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(ca, "upstream.ca")? {
        roots.add(cert).map_err(|e| {
            ConfigError(format!(
                "upstream.ca: {}: not a usable trust anchor: {e}",
                ca.display()
            ))
        })?;
    }
    let mut pins = Vec::with_capacity(c.spki_sha256.len());
    for pin in &c.spki_sha256 {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(pin.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                ConfigError(format!(
                    "upstream.spki_sha256: {pin:?} is not a base64 SHA-256 (44 characters, as Envoy's verify_certificate_spki)"
                ))
            })?;
        pins.push(bytes);
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| ConfigError(format!("upstream.ca: {e}")))?;
    let verifier = Arc::new(PinnedVerifier { webpki, pins, seen });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigError(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // IIS speaks HTTP/2 too, but HTTP/1.1 is what every NDES handles, and the pool reuses it well.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A connection to NDES: TLS, or plain TCP to a loopback sidecar.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A future the services below return: theirs are async blocks, which have no name to give.
type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Dials NDES for the pool: TCP with a timeout, then TLS with the configured name as SNI. A
/// service of `()`: there is one NDES, so a call needs no target, and each is a new connection.
#[derive(Clone)]
struct UpstreamConnector {
    tls: Option<TlsConnector>,
    server_name: ServerName<'static>,
    authority: Authority,
    connect_timeout: Duration,
}

impl UpstreamConnector {
    async fn connect(&self) -> Result<UpstreamStream, UpstreamError> {
        let connect_err = |message: String| UpstreamError {
            kind: UpstreamErrorKind::Connect,
            message,
        };
        let host = self
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let https = self.tls.is_some();
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if https { 443 } else { 80 });
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let timed_out = || UpstreamError {
            kind: UpstreamErrorKind::Timeout,
            message: format!(
                "connecting to {host}:{port} took longer than upstream.connect_timeout"
            ),
        };
        let addrs: Vec<SocketAddr> =
            tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| connect_err(format!("resolving {host}: {e}")))?
                .collect();
        let mut last = connect_err(format!("{host} resolved to no address"));
        let mut tcp = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last = connect_err(format!("{addr}: {e}")),
                Err(_) => return Err(timed_out()),
            }
        }
        let tcp = tcp.ok_or(last)?;
        // Small writes (a request head) must not wait for Nagle's timer.
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        match tokio::time::timeout_at(deadline, tls.connect(self.server_name.clone(), tcp)).await {
            Err(_) => Err(timed_out()),
            Ok(Ok(s)) => Ok(UpstreamStream::Tls(Box::new(s))),
            Ok(Err(e)) => Err(classify_tls_error(&e)),
        }
    }
}

impl Service<()> for UpstreamConnector {
    type Response = UpstreamStream;
    type Error = UpstreamError;
    type Future = Boxed<UpstreamStream, UpstreamError>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move { connector.connect().await })
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

/// One pooled connection: its sender, and how its connection task ended once it has.
struct Conn {
    sender: Sender,
    /// True when the connection ended on bytes NDES sent past the end of an answer: the answer's
    /// framing did not say where it ended.
    ended: tokio::sync::oneshot::Receiver<bool>,
}

/// Keep-alive HTTP/1.1 connections to NDES, idle ones on a stack: the most recently used is taken
/// first, so a few warm connections carry the load and the rest age out. One NDES, one pool: no
/// key to hash per request. A connection goes back on the stack only after an answer read whole
/// and framed one way; any doubt closes it.
struct Pool {
    connector: UpstreamConnector,
    idle: Mutex<Vec<(Conn, Instant)>>,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Pool {
    fn new(connector: UpstreamConnector, c: &UpstreamConfig) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            connector,
            idle: Mutex::new(Vec::new()),
            idle_timeout: c.pool_idle_timeout,
            max_idle: c.pool_max_idle,
        });
        // Closes connections idle past the timeout even when no request comes to notice them;
        // ends with the pool (a reload replaces it).
        let weak: Weak<Pool> = Arc::downgrade(&pool);
        let every = (c.pool_idle_timeout / 2).max(Duration::from_millis(100));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(pool) = weak.upgrade() else { return };
                    pool.lock()
                        .retain(|(_, since)| since.elapsed() < pool.idle_timeout);
                }
            });
        }
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Conn, Instant)>> {
        // A poisoned lock only means a panic elsewhere mid-push; the stack is still whole.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection ready for a request (true: reused), or a new one.
    async fn checkout(&self) -> Result<(Conn, bool), UpstreamError> {
        loop {
            let popped = self.lock().pop();
            let Some((mut conn, since)) = popped else {
                break;
            };
            if conn.sender.is_closed() || since.elapsed() >= self.idle_timeout {
                continue;
            }
            if conn.sender.is_ready() || conn.sender.ready().await.is_ok() {
                return Ok((conn, true));
            }
        }
        Ok((self.connect().await?, false))
    }

    /// A new connection, never one from the stack.
    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let stream = self.connector.clone().oneshot(()).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError {
                kind: UpstreamErrorKind::Protocol,
                message: format!("starting HTTP/1.1: {e}"),
            })?;
        let (tell, ended) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let overrun = match connection.await {
                Ok(()) => false,
                Err(e) => {
                    tracing::debug!(target: "ndes_gateway::upstream", error = %e, "connection to NDES ended");
                    // hyper ends an idle client connection that receives bytes with this error;
                    // an answer longer than its framing said is the only way to get there.
                    e.to_string().contains("unexpected message")
                }
            };
            let _ = tell.send(overrun);
        });
        Ok(Conn { sender, ended })
    }

    fn put(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push((conn, Instant::now()));
        }
    }
}

fn classify_tls_error(e: &io::Error) -> UpstreamError {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let kind = match rustls_error {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other)))
            if other.0.downcast_ref::<PinMismatch>().is_some() =>
        {
            UpstreamErrorKind::PinMismatch
        }
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => UpstreamErrorKind::TlsName,
        Some(rustls::Error::InvalidCertificate(_)) => UpstreamErrorKind::TlsChain,
        Some(_) => UpstreamErrorKind::Protocol,
        None => UpstreamErrorKind::Connect,
    };
    UpstreamError {
        kind,
        message: format!("TLS handshake: {e}"),
    }
}

/// A whole answer from NDES.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: http::header::HeaderName) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// The pool and its settings; one per gateway.
pub struct Upstream {
    pub target: UpstreamTarget,
    /// Replaced whole when the trust settings are reloaded, so no pooled connection made under
    /// the old CA or pins is used again; requests already sent finish on the old one.
    pool: PoolCell,
    stacks: Stacks,
    config: UpstreamConfig,
    /// Requests to NDES at once, each held from the wait for a connection to the last byte of
    /// the answer: bounds the connections opened to NDES and the answers held meanwhile, whatever
    /// the number of clients and HTTP/2 streams and however slowly they read.
    in_flight: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
    /// The gateway's own requests (readiness probe, certificate watch) have slots of their own:
    /// a replica whose `max_in_flight` PKIOperations all wait on Intune still answers its probe,
    /// and so stays ready.
    own_checks: Arc<tokio::sync::Semaphore>,
    queue_timeout: Duration,
    /// Counts requests sent again on a new connection, by reason.
    retried: Option<prometheus::IntCounterVec>,
}

/// The gateway's own requests to NDES at once, apart from `max_in_flight`: the probe and the
/// certificate watch, one each.
const OWN_CHECK_SLOTS: usize = 2;

fn protocol(message: String) -> UpstreamError {
    UpstreamError {
        kind: UpstreamErrorKind::Protocol,
        message,
    }
}

/// An answer framed one way only: at most one Content-Length, no Transfer-Encoding beside it,
/// and no coding but chunked. Anything else could be read two ways, by the gateway and by
/// whatever sits between NDES and it.
fn check_answer_framing(headers: &http::HeaderMap) -> Result<(), UpstreamError> {
    let lengths = headers.get_all(http::header::CONTENT_LENGTH).iter().count();
    let codings: Vec<&HeaderValue> = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .collect();
    if lengths > 1 {
        return Err(protocol(
            "the answer has more than one Content-Length".to_owned(),
        ));
    }
    if codings.is_empty() {
        return Ok(());
    }
    if lengths == 1 {
        return Err(protocol(
            "the answer has both Content-Length and Transfer-Encoding".to_owned(),
        ));
    }
    let chunked_only = codings.len() == 1
        && codings[0]
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
    if !chunked_only {
        return Err(protocol(format!(
            "the answer's Transfer-Encoding is not chunked alone: {:?}",
            codings
        )));
    }
    Ok(())
}

/// A whole exchange with NDES: sent once more on a new connection when the attempt hands the
/// request back (see `Resend`), its error the gateway's.
type Exchange = MapErr<Retry<Resend, Attempt>, fn(Failed) -> UpstreamError>;

/// The exchange within the response timeout, behind a limit of requests at once. Cloned per
/// request: a clone shares the semaphore and holds a slot of its own once ready.
type Limited = ConcurrencyLimit<Timeout<Exchange>>;

/// The pool in force, read by each exchange as it starts.
type PoolCell = Arc<std::sync::RwLock<Arc<Pool>>>;

/// The services, one per kind of request; each attempt reads the pool in force.
struct Stacks {
    /// GetCACaps and GetCACert, which may go twice.
    idempotent: Limited,
    /// PKIOperation, and anything else not idempotent: never written twice.
    once: Limited,
    /// The gateway's own GETs, in slots of their own.
    own_checks: Limited,
}

impl Stacks {
    fn new(
        pool: &PoolCell,
        c: &UpstreamConfig,
        retried: Option<&prometheus::IntCounterVec>,
        in_flight: &Arc<tokio::sync::Semaphore>,
        own_checks: &Arc<tokio::sync::Semaphore>,
    ) -> Stacks {
        let stack = |slots: &Arc<tokio::sync::Semaphore>, idempotent: bool| {
            ServiceBuilder::new()
                .layer(GlobalConcurrencyLimitLayer::with_semaphore(slots.clone()))
                .timeout(c.response_timeout)
                .map_err((|f: Failed| f.error) as fn(Failed) -> UpstreamError)
                .retry(Resend {
                    retried: retried.cloned(),
                })
                .service(Attempt {
                    pool: pool.clone(),
                    max_response_bytes: c.max_response_bytes,
                    idempotent,
                })
        };
        Stacks {
            idempotent: stack(in_flight, true),
            once: stack(in_flight, false),
            own_checks: stack(own_checks, true),
        }
    }
}

impl Upstream {
    pub fn new(target: UpstreamTarget, c: &UpstreamConfig) -> Upstream {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(c.max_in_flight));
        let own_checks = Arc::new(tokio::sync::Semaphore::new(OWN_CHECK_SLOTS));
        let pool = PoolCell::new(std::sync::RwLock::new(Self::pool(&target, c)));
        let stacks = Stacks::new(&pool, c, None, &in_flight, &own_checks);
        Upstream {
            target,
            pool,
            stacks,
            config: c.clone(),
            in_flight,
            max_in_flight: c.max_in_flight,
            own_checks,
            queue_timeout: c.queue_timeout,
            retried: None,
        }
    }

    /// Counts the requests sent again on a new connection in `counter`, by reason.
    pub fn counting_retries(mut self, counter: prometheus::IntCounterVec) -> Upstream {
        self.retried = Some(counter);
        self.stacks = Stacks::new(
            &self.pool,
            &self.config,
            self.retried.as_ref(),
            &self.in_flight,
            &self.own_checks,
        );
        self
    }

    fn pool(target: &UpstreamTarget, c: &UpstreamConfig) -> Arc<Pool> {
        let connector = UpstreamConnector {
            tls: target.tls.clone().map(TlsConnector::from),
            server_name: target.server_name.clone(),
            authority: target.authority.clone(),
            connect_timeout: c.connect_timeout,
        };
        Pool::new(connector, c)
    }

    /// Takes `ca` and `spki_sha256` from `c` (a config read again; the URL and name stay): a CA
    /// file that does not load, or a pin that does not decode, is refused and the trust in force
    /// kept. Pooled connections made under the old trust are never used again.
    pub fn reload_trust(&self, c: &UpstreamConfig) -> Result<(), ConfigError> {
        let Some(_) = &self.target.tls else {
            return Ok(());
        };
        let config = UpstreamConfig {
            ca: c.ca.clone(),
            spki_sha256: c.spki_sha256.clone(),
            ..self.config.clone()
        };
        let tls = client_config(&config, self.target.seen_leaf.clone())?;
        let target = UpstreamTarget {
            tls: Some(tls),
            ..self.target.clone()
        };
        let pool = Self::pool(&target, &config);
        // A poisoned lock only means a panic elsewhere while swapping; the value is whole.
        *self.pool.write().unwrap_or_else(|e| e.into_inner()) = pool;
        // The certificate recorded under the old trust may be one the new trust refuses.
        if let Ok(mut seen) = self.target.seen_leaf.lock() {
            *seen = None;
        }
        Ok(())
    }

    /// GetCACaps, as the readiness probe asks it: the status NDES answered with.
    pub async fn probe(&self) -> Result<u16, UpstreamError> {
        let resp = self
            .get("", Some("operation=GetCACaps&message=ndes-gateway-probe"))
            .await?;
        Ok(resp.status)
    }

    /// A GET of the upstream SCEP path with `suffix` and `query`, as the gateway's own checks
    /// (readiness, certificate watch, doctor) ask it.
    pub async fn get(&self, suffix: &str, query: Option<&str>) -> Result<Answer, UpstreamError> {
        let uri = self
            .target
            .uri_for(suffix, query)
            .ok_or_else(|| protocol("the URL does not fit".to_owned()))?;
        let mut req = http::Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert(http::header::HOST, self.target.host_header.clone());
        self.exchange(self.stacks.own_checks.clone(), req, || {
            "the gateway's own checks of NDES are still waiting on it".to_owned()
        })
        .await
    }

    /// The same, refused past `limit` bytes of body.
    pub async fn get_all(
        &self,
        suffix: &str,
        query: Option<&str>,
        limit: usize,
    ) -> Result<Answer, UpstreamError> {
        let answer = self.get(suffix, query).await?;
        if answer.body.len() > limit {
            return Err(UpstreamError {
                kind: UpstreamErrorKind::ResponseTooLarge,
                message: format!("the answer is over {limit} bytes"),
            });
        }
        Ok(answer)
    }

    /// Sends one request and reads the whole answer, within the response timeout and
    /// `upstream.max_response_bytes`. The in-flight slot and the connection are held until the
    /// last byte is in, then the connection goes back to the pool: a client that reads slowly
    /// holds only the answer, never NDES. `idempotent`: the request may be sent again if a
    /// reused connection closes before answering it (GetCACaps, GetCACert; never PKIOperation).
    pub async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
        idempotent: bool,
    ) -> Result<Answer, UpstreamError> {
        let exchange = if idempotent {
            self.stacks.idempotent.clone()
        } else {
            self.stacks.once.clone()
        };
        self.exchange(exchange, req, || {
            format!(
                "{} requests already wait on NDES (upstream.max_in_flight)",
                self.max_in_flight
            )
        })
        .await
    }

    /// `req` through `exchange` once it has a slot. The limit's own wait has no end, so the
    /// queue's is bounded here: past `upstream.queue_timeout` the request is refused as busy
    /// (`busy` says why), never sent.
    async fn exchange(
        &self,
        mut exchange: Limited,
        req: http::Request<Full<Bytes>>,
        busy: impl FnOnce() -> String,
    ) -> Result<Answer, UpstreamError> {
        match tokio::time::timeout(self.queue_timeout, exchange.ready()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(self.unboxed(e)),
            Err(_) => {
                return Err(UpstreamError {
                    kind: UpstreamErrorKind::Busy,
                    message: busy(),
                })
            }
        }
        exchange.call(req).await.map_err(|e| self.unboxed(e))
    }

    /// The timeout layer's error as the gateway's: the exchange's own, or the timeout's.
    fn unboxed(&self, e: BoxError) -> UpstreamError {
        match e.downcast::<UpstreamError>() {
            Ok(e) => *e,
            Err(e) if e.is::<Elapsed>() => UpstreamError {
                kind: UpstreamErrorKind::Timeout,
                message: format!(
                    "no whole answer within upstream.response_timeout ({})",
                    humantime::format_duration(self.config.response_timeout)
                ),
            },
            Err(e) => protocol(error_chain(&*e)),
        }
    }
}

/// One try at an exchange with NDES: a connection (from the pool, or a new one for a request
/// sent again), the request, the whole answer read, and the connection back to the pool.
///
/// IIS closes keep-alive connections on its own (its `connectionTimeout`, a restart), and a
/// pooled connection may close in the very instant a request is handed to it. Such a request is
/// handed back in the error, to be sent once more on a new connection, when none of it was
/// written (whatever its operation), or when it is idempotent and the connection closed before
/// any byte of an answer. A PKIOperation that was written is never sent twice: a resent PKCSReq
/// can burn a one-time challenge or hit "DN already exists".
#[derive(Clone)]
struct Attempt {
    pool: PoolCell,
    max_response_bytes: usize,
    /// A copy is kept while the request is on a reused connection, to send if it closes unanswered.
    idempotent: bool,
}

/// An attempt that failed, and the request to send again when the failure allows it, with the
/// reason (a label of `upstream_retries_total`).
struct Failed {
    error: UpstreamError,
    again: Option<(http::Request<Full<Bytes>>, &'static str)>,
}

impl From<UpstreamError> for Failed {
    fn from(error: UpstreamError) -> Failed {
        Failed { error, again: None }
    }
}

/// Marks a request handed back to be sent again: it goes on a new connection of the pool its
/// first attempt used (a reload meanwhile changes nothing for it), and never a third time.
#[derive(Clone)]
struct SentAgain(Arc<Pool>);

impl Service<http::Request<Full<Bytes>>> for Attempt {
    type Response = Answer;
    type Error = Failed;
    type Future = Boxed<Answer, Failed>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Full<Bytes>>) -> Self::Future {
        Box::pin(self.clone().run(req))
    }
}

impl Attempt {
    async fn run(self, req: http::Request<Full<Bytes>>) -> Result<Answer, Failed> {
        let again_on = req.extensions().get::<SentAgain>().map(|a| a.0.clone());
        let sent_again = again_on.is_some();
        let (pool, (mut conn, reused)) = match again_on {
            // A request sent again does not trust the pool's idle connections a second time.
            Some(pool) => {
                let conn = pool.connect().await?;
                (pool, (conn, false))
            }
            None => {
                let pool = self.pool.read().unwrap_or_else(|e| e.into_inner()).clone();
                let checked_out = pool.checkout().await?;
                (pool, checked_out)
            }
        };
        // Only a reused connection can have closed under the request.
        let copy = (self.idempotent && reused).then(|| copy_request(&req));
        let resp = match conn.sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => {
                let again = match e.take_message() {
                    Some(unsent) if !sent_again => Some((unsent, RETRY_UNSENT)),
                    Some(_) => None,
                    None if closed_before_answer(e.error()) => copy.map(|c| (c, RETRY_NO_ANSWER)),
                    None => None,
                }
                .map(|(mut again, reason)| {
                    again.extensions_mut().insert(SentAgain(pool.clone()));
                    (again, reason)
                });
                return Err(Failed {
                    error: protocol(error_chain(e.error())),
                    again,
                });
            }
        };
        let (parts, body) = resp.into_parts();
        // A connection whose answer was framed two ways is dropped here, never reused.
        check_answer_framing(&parts.headers)?;
        let body = read_whole(body, self.max_response_bytes).await?;
        if parts.version == http::Version::HTTP_11 {
            // Bytes past the end its framing gave end the connection with an error before it
            // asks for the next request: ready again means the answer ended where it said.
            // Bytes that come later still close it before reuse, or reach the next request
            // as an answer hyper refuses (a 502 there).
            let ready = conn.sender.is_ready()
                || matches!(
                    tokio::time::timeout(OVERRUN_CHECK, conn.sender.ready()).await,
                    Ok(Ok(()))
                );
            if ready {
                pool.put(conn);
            } else if let Ok(Ok(true)) = tokio::time::timeout(OVERRUN_CHECK, &mut conn.ended).await
            {
                return Err(protocol(
                    "the answer is longer than its Content-Length or last chunk said".to_owned(),
                )
                .into());
            }
        }
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// Sends a request once more, on a new connection, when its attempt handed it back. Nothing is
/// copied for it here: tower's retry asks for a copy of every request before it is sent, but
/// the request to send again is the one hyper returned unsent, or the idempotent copy the
/// attempt keeps only while on a reused connection. The "copy" given is an empty request that
/// holds the place until the error fills it.
#[derive(Clone)]
struct Resend {
    retried: Option<prometheus::IntCounterVec>,
}

impl Policy<http::Request<Full<Bytes>>, Answer, Failed> for Resend {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        req: &mut http::Request<Full<Bytes>>,
        result: &mut Result<Answer, Failed>,
    ) -> Option<Self::Future> {
        let failed = result.as_mut().err()?;
        let (again, reason) = failed.again.take()?;
        tracing::debug!(
            target: "ndes_gateway::upstream",
            reason,
            error = %failed.error.message,
            "connection to NDES closed under the request: sending it on a new one"
        );
        if let Some(counter) = &self.retried {
            counter.with_label_values(&[reason]).inc();
        }
        *req = again;
        Some(std::future::ready(()))
    }

    fn clone_request(
        &mut self,
        req: &http::Request<Full<Bytes>>,
    ) -> Option<http::Request<Full<Bytes>>> {
        req.extensions()
            .get::<SentAgain>()
            .is_none()
            .then(|| http::Request::new(Full::new(Bytes::new())))
    }
}

/// Retry reasons, the label of `upstream_retries_total`.
pub const RETRY_UNSENT: &str = "unsent";
pub const RETRY_NO_ANSWER: &str = "no_answer";

/// The same request again: what an idempotent request needs to be sent a second time.
fn copy_request(req: &http::Request<Full<Bytes>>) -> http::Request<Full<Bytes>> {
    let mut copy = http::Request::new(Full::new(Bytes::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The connection ended, by a close or a reset, before any byte of the answer.
fn closed_before_answer(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            );
        }
        source = s.source();
    }
    false
}

/// How long a connection whose answer just ended may take to say it is ready for the next
/// request: its task runs at once, so this is only a bound.
const OVERRUN_CHECK: Duration = Duration::from_secs(1);

/// NDES's answer body, whole: data frames only (trailers are NDES's business), at most `limit`
/// bytes, and read to the end its framing gives (a length, the last chunk, or the close).
async fn read_whole(mut body: Incoming, limit: usize) -> Result<Bytes, UpstreamError> {
    use http_body_util::BodyExt;
    use hyper::body::Body;
    let mut first: Option<Bytes> = None;
    // A length known up front is reserved once (never past the limit); chunks grow it.
    let expected = body.size_hint().exact().unwrap_or(0);
    let mut rest = bytes::BytesMut::with_capacity(0);
    let mut reserve = usize::try_from(expected).unwrap_or(limit).min(limit);
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| protocol(format!("reading the answer: {}", error_chain(&e))))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let held = first.as_ref().map_or(0, Bytes::len) + rest.len();
        if held + data.len() > limit {
            return Err(UpstreamError {
                kind: UpstreamErrorKind::ResponseTooLarge,
                message: format!("the answer is over {limit} bytes (upstream.max_response_bytes)"),
            });
        }
        // The usual answer is one frame: kept as it came, without a copy.
        match first.take() {
            None if rest.is_empty() => first = Some(data),
            None => rest.extend_from_slice(&data),
            Some(f) => {
                rest.reserve(std::mem::take(&mut reserve).max(f.len() + data.len()));
                rest.extend_from_slice(&f);
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: &'static [u8]) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::new(Full::new(Bytes::from_static(body)));
        req.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("ndes"));
        req
    }

    fn failed(again: Option<(http::Request<Full<Bytes>>, &'static str)>) -> Failed {
        Failed {
            error: protocol("connection closed".to_owned()),
            again,
        }
    }

    /// A request as an attempt hands it back: marked with the pool it goes again on.
    fn handed_back(body: &'static [u8]) -> http::Request<Full<Bytes>> {
        let c = UpstreamConfig {
            url: "http://127.0.0.1:9/scep".to_owned(),
            ..UpstreamConfig::default()
        };
        let pool = Upstream::pool(&UpstreamTarget::from_config(&c).unwrap(), &c);
        let mut req = request(body);
        req.extensions_mut().insert(SentAgain(pool));
        req
    }

    fn counter() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("retries", "retries"), &["reason"])
            .unwrap()
    }

    #[test]
    fn the_place_kept_for_a_resend_holds_nothing_of_the_request() {
        let mut resend = Resend { retried: None };
        let place = resend.clone_request(&request(b"pkcsreq")).unwrap();
        assert!(place.headers().is_empty());
        assert_eq!(hyper::body::Body::size_hint(place.body()).exact(), Some(0));
    }

    #[test]
    fn a_request_handed_back_is_sent_again_once_and_counted() {
        let retried = counter();
        let mut resend = Resend {
            retried: Some(retried.clone()),
        };
        let mut place = resend.clone_request(&request(b"")).unwrap();
        let mut result = Err(failed(Some((handed_back(b"pkcsreq"), RETRY_UNSENT))));
        assert!(resend.retry(&mut place, &mut result).is_some());
        assert_eq!(place.headers()[http::header::HOST], "ndes");
        assert!(place.extensions().get::<SentAgain>().is_some());
        assert_eq!(retried.with_label_values(&[RETRY_UNSENT]).get(), 1);
        // The request sent again gets no place of its own: no third time.
        assert!(resend.clone_request(&place).is_none());
    }

    #[test]
    fn an_answer_or_an_error_with_nothing_handed_back_ends_the_exchange() {
        let retried = counter();
        let mut resend = Resend {
            retried: Some(retried.clone()),
        };
        let mut place = resend.clone_request(&request(b"")).unwrap();
        let mut answered = Ok(Answer {
            status: 200,
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
        });
        assert!(resend.retry(&mut place, &mut answered).is_none());
        let mut written = Err(failed(None));
        assert!(resend.retry(&mut place, &mut written).is_none());
        assert_eq!(retried.with_label_values(&[RETRY_UNSENT]).get(), 0);
        assert_eq!(retried.with_label_values(&[RETRY_NO_ANSWER]).get(), 0);
    }
}
