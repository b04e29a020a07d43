//! The public listener: accept under a connection cap, TLS handshake under a timeout, then HTTP/2
//! or HTTP/1.1 by ALPN with every hyper limit set explicitly, and an idle timeout.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::edge::h1scan::HeadScan;
use crate::metrics::{Metrics, REASON_HEADER_TIMEOUT, REASON_MALFORMED};
use crate::pipeline::client_addr::{read_proxy_header, Prefixed};
use crate::pipeline::filter::{request_target_len, RejectReason, WireFacts};
use crate::pipeline::proxy::{GatewayBody, Proxy};
use crate::pipeline::ratelimit::client_key;

/// Past `limits.request_timeout` the gateway answers 408 or 504 itself; this long more lets that
/// answer out before a connection whose answer is still going is cut.
const ANSWER_GRACE: Duration = Duration::from_secs(5);
/// How long an idle connection told to close may take to go before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Room in hyper's HTTP/1.1 read buffer beyond the request-target and header limits: the method,
/// the version, line ends. A head larger than the buffer gets hyper's own 431.
const HEAD_SLACK_BYTES: usize = 8 * 1024;
/// HTTP/2 counts 32 bytes of overhead per header field (RFC 9113 §6.5.2) on top of the same limits.
const H2_HEADER_LIST_SLACK_BYTES: usize = 8 * 1024;
/// An HTTP/2 peer is sent a PING after this long without a frame (or `listen.send_timeout`, if
/// shorter), and closed if it does not answer within the same time: a dead peer is let go without
/// waiting for the idle timeout.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// hyper's own ceiling on HTTP/1.1 header fields, which the default limit matches.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

pub struct ListenerSettings {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub proxy_protocol: bool,
    /// How long requests in flight may take to finish once the gateway is stopping.
    pub drain_timeout: Duration,
    /// A client that takes no response bytes for this long loses its stream or its connection.
    pub send_timeout: Duration,
    /// One request, head to last byte.
    pub request_timeout: Duration,
    per_client: Option<PerClientSlots>,
    http1: http1::Builder,
    http2: Option<http2::Builder<StreamExecutor>>,
}

impl ListenerSettings {
    pub fn from_config(c: &Config) -> ListenerSettings {
        let l = &c.limits;
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // hyper enforces this only with a timer set.
            .header_read_timeout(l.header_timeout)
            .keep_alive(true)
            .half_close(false)
            .max_buf_size(l.max_uri_bytes + l.max_header_bytes + HEAD_SLACK_BYTES)
            .writev(true);
        if l.max_header_count != HYPER_DEFAULT_MAX_HEADERS {
            // One more than the limit, so the field one past it reaches the filter and its
            // answer names the limit. Left at hyper's default otherwise, which keeps the parser's
            // header array on the stack.
            http1.max_headers(l.max_header_count + 1);
        }
        let window = u32::try_from(l.max_body_bytes.max(65_535)).unwrap_or(u32::MAX);
        // A peer that cannot answer a PING within the time it has to take answer bytes is gone.
        let h2_keep_alive = H2_KEEP_ALIVE.min(c.listen.send_timeout);
        let http2 = c.listen.http2.then(|| {
            let mut b = http2::Builder::new(StreamExecutor);
            b.timer(TokioTimer::new())
                // hyper's default of 16 KiB would refuse a 65534-byte :path.
                .max_header_list_size(
                    (l.max_uri_bytes + l.max_header_bytes + H2_HEADER_LIST_SLACK_BYTES) as u32,
                )
                .max_concurrent_streams(c.listen.max_concurrent_streams)
                // Flow-control windows sized to the body limit rather than hyper's 1 MiB, so a
                // client cannot park megabytes in a connection.
                .initial_stream_window_size(window)
                .initial_connection_window_size(window.saturating_mul(4))
                .keep_alive_interval(Some(h2_keep_alive))
                .keep_alive_timeout(h2_keep_alive)
                .max_pending_accept_reset_streams(Some(20))
                .max_local_error_reset_streams(Some(1024));
            b
        });
        ListenerSettings {
            handshake_timeout: c.listen.handshake_timeout,
            idle_timeout: c.listen.idle_timeout,
            max_connections: c.listen.max_connections,
            proxy_protocol: c.listen.proxy_protocol,
            drain_timeout: c.listen.drain_timeout,
            send_timeout: c.listen.send_timeout,
            request_timeout: c.limits.request_timeout,
            per_client: (c.listen.max_connections_per_client > 0).then(|| PerClientSlots {
                max: c.listen.max_connections_per_client,
                open: Mutex::new(HashMap::new()),
            }),
            http1,
            http2,
        }
    }
}

/// Accepts until `stop`, then waits for open connections to finish: each is told to close (after
/// the response in flight for HTTP/1.1, by GOAWAY for HTTP/2) and given `drain_timeout`; those
/// still running past it are dropped and counted.
pub async fn run(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    settings: Arc<ListenerSettings>,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let connections = TaskTracker::new();
    // The connections still running, to drop at the drain deadline those that did not end by
    // themselves (a handshake still within its own timeout, a task stuck on a peer). Touched
    // once when a connection opens and once when it ends, never per request.
    let open: Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>> = Arc::default();
    let mut next_key: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: wait a little
                // rather than spin, and keep serving the connections already open.
                tracing::warn!(target: "ndes_gateway::edge::listener", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            proxy
                .metrics
                .connections_refused_total
                .with_label_values(&["max_connections"])
                .inc();
            tracing::warn!(
                target: "ndes_gateway::edge::listener",
                client = %peer.ip(),
                limit = settings.max_connections,
                "connection refused: listen.max_connections reached"
            );
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        let proxy = proxy.clone();
        let stop = stop.clone();
        let key = next_key;
        next_key = next_key.wrapping_add(1);
        let registry = open.clone();
        // Held across the spawn: the task's own removal waits until its entry is in.
        let mut entries = open.lock().unwrap_or_else(|e| e.into_inner());
        let task = connections.spawn(async move {
            serve_connection(tcp, peer, acceptor, settings, proxy, stop).await;
            drop(slot);
            registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
        entries.insert(key, task.abort_handle());
    }
    drop(listener);
    connections.close();
    // The connections' own deadlines are the drain timeout; a little more here lets them log.
    let drained = tokio::time::timeout(
        settings.drain_timeout + Duration::from_secs(1),
        connections.wait(),
    )
    .await;
    if drained.is_err() {
        let left: Vec<tokio::task::AbortHandle> = open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, task)| task)
            .collect();
        tracing::warn!(
            target: "ndes_gateway::edge::listener",
            connections = left.len(),
            "drain deadline (listen.drain_timeout): dropping the connections still open"
        );
        for task in &left {
            task.abort();
        }
        proxy
            .metrics
            .connections_aborted_total
            .inc_by(left.len() as u64);
        let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    settings: Arc<ListenerSettings>,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let metrics = proxy.metrics.clone();
    metrics.connections_total.inc();
    metrics.connections_active.inc();
    let _active = ActiveConnection(metrics.clone());
    let mut tcp = tcp;
    let (client, prefix) = if settings.proxy_protocol {
        // The load balancer writes the header at once; the handshake timeout covers it too.
        // Boxed, as is the TLS handshake: what a handshake holds is freed once it is over,
        // rather than kept in every connection's task for its whole life.
        let header = Box::pin(tokio::time::timeout(
            settings.handshake_timeout,
            read_proxy_header(&mut tcp, peer),
        ))
        .await;
        match header {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                refuse_proxy_header(&metrics, peer, &e.0);
                return;
            }
            Err(_) => {
                refuse_proxy_header(
                    &metrics,
                    peer,
                    "no PROXY header within listen.handshake_timeout",
                );
                return;
            }
        }
    } else {
        (peer, Vec::new())
    };
    // Counted per real client: behind a load balancer that is the PROXY header's source; a
    // trusted proxy speaks for many clients and is not capped.
    let _client_slot = match &settings.per_client {
        Some(slots) if !proxy.trusted_proxies.contains(client.ip()) => {
            match slots.take(client_key(client.ip())) {
                Some(slot) => Some(slot),
                None => {
                    metrics
                        .connections_refused_total
                        .with_label_values(&["max_connections_per_client"])
                        .inc();
                    tracing::info!(target: "ndes_gateway::edge::listener", client = %client.ip(), limit = slots.max, "connection refused: listen.max_connections_per_client reached");
                    return;
                }
            }
        }
        _ => None,
    };
    let stream = Prefixed::new(prefix, tcp);
    let handshake = tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream));
    let tls = match Box::pin(handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.tls_handshake_failures_total.inc();
            tracing::info!(target: "ndes_gateway::tls", client = %client.ip(), error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics.tls_handshake_failures_total.inc();
            tracing::info!(target: "ndes_gateway::tls", client = %client.ip(), "TLS handshake timed out (listen.handshake_timeout)");
            return;
        }
    };
    if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ACME_TLS_ALPN) {
        // The ACME CA validating tls-alpn-01: the handshake itself was the answer (RFC 8737),
        // and no HTTP follows on this protocol.
        return;
    }
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let h2 = is_h2 && settings.http2.is_some();
    let activity = Arc::new(Activity::new(!h2));
    let in_service = activity.clone();
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        let guard = InFlight::new(in_service.clone());
        // What only the bytes showed: an HTTP/1.1 head's `#` or Content-Length beside chunked.
        let wire = match &in_service.scan {
            Some(scan) => {
                let key =
                    req.method().as_str().len() + 1 + request_target_len(req.uri(), req.version());
                let found = lock(scan).take(key);
                WireFacts {
                    fragment: found.fragment,
                    length_and_chunked: found.length_and_chunked,
                }
            }
            None => WireFacts::default(),
        };
        async move {
            // hyper calls the service on the connection's task and runs its future on the
            // stream's, where the stream's clock is.
            let stream = STREAM.try_with(Arc::clone).ok();
            let response = proxy.handle(req, client, wire).await;
            if let Some(stream) = &stream {
                stream.progress();
                stream.responded.store(true, Ordering::Release);
            }
            // Counted in flight until hyper has written the whole body, not just the head.
            Ok::<_, Infallible>(response.map(|inner| TrackedBody {
                inner,
                _in_flight: guard,
                stream,
                rest: Bytes::new(),
            }))
        }
    });
    let ctx = ConnCtx {
        activity: &activity,
        settings: &settings,
        metrics: &metrics,
        client,
    };
    let mut io = ActivityIo::new(tls, activity.clone());
    match (&settings.http2, h2) {
        (Some(h2), true) => {
            let mut conn = Box::pin(h2.serve_connection(TokioIo::new(io), service));
            // The streams' executor finds the connection here, to bound each stream's sending.
            let shared = Arc::new(ConnShared {
                activity: activity.clone(),
                metrics: metrics.clone(),
                send_timeout: settings.send_timeout,
                answer_deadline: settings.request_timeout + ANSWER_GRACE,
                client: client.ip(),
            });
            CONN.scope(
                shared,
                ctx.drive(conn.as_mut(), |c| c.graceful_shutdown(), false, &stop),
            )
            .await;
        }
        _ => {
            let mut service = service;
            loop {
                // Boxed, so that a parked connection gives back hyper's state as well as its
                // buffers.
                let mut conn = Box::new(settings.http1.serve_connection(TokioIo::new(io), service));
                let parked = ctx
                    .drive(Pin::new(&mut *conn), |c| c.graceful_shutdown(), true, &stop)
                    .await;
                if !parked {
                    return;
                }
                // Taken apart in a block of its own: the box, and hyper's read buffer behind
                // `read_buf`, are freed here rather than when the loop comes round.
                (io, service) = {
                    let conn = conn;
                    let parts = conn.into_parts();
                    let mut io = parts.io.into_inner();
                    // A copy: the leftover is a view into hyper's 8 KiB read buffer.
                    io.prefix = Bytes::copy_from_slice(&parts.read_buf);
                    (io, parts.service)
                };
                activity.parking.store(false, Ordering::Relaxed);
                if io.prefix.is_empty() {
                    let resumed = {
                        let _parked = Parked::new(&metrics.connections_parked);
                        ctx.wait_parked(&mut io, &stop).await
                    };
                    if !resumed {
                        return;
                    }
                }
            }
        }
    }
}

/// How long an HTTP/1.1 connection sits between requests before hyper's per-connection state and
/// its two 8 KiB buffers are given back. Well past the gap between the requests of one enrolment
/// or of a load test, so a busy connection is never parked; long before a device that keeps its
/// connection open comes back, so an idle one costs little more than its TLS state.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// What a connection's driving loop needs from around it.
struct ConnCtx<'a> {
    activity: &'a Activity,
    settings: &'a ListenerSettings,
    metrics: &'a Metrics,
    client: SocketAddr,
}

impl ConnCtx<'_> {
    /// Runs one hyper connection to its end: closed by the client, by the idle timeout, or by
    /// the drain. With `can_park`, a connection idle for [`PARK_AFTER`] is ended early, its
    /// stream kept open: true then, and the caller takes the stream back.
    async fn drive<C>(
        &self,
        mut conn: Pin<&mut C>,
        graceful: fn(Pin<&mut C>),
        can_park: bool,
        stop: &CancellationToken,
    ) -> bool
    where
        C: std::future::Future<Output = hyper::Result<()>>,
    {
        let (activity, settings) = (self.activity, self.settings);
        let park_after = can_park.then_some(PARK_AFTER);
        // When a connection told to close is dropped, whatever it still has in flight.
        let mut closing_deadline: Option<Instant> = None;
        // Made once: a new one each turn of the loop would register with the token each time.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            let mut wake = match closing_deadline {
                Some(deadline) => deadline,
                None => activity.next_check(settings.idle_timeout, park_after),
            };
            if let Some(blocked) = activity.write_blocked_since() {
                wake = wake.min(blocked + settings.send_timeout);
            }
            tokio::select! {
                _ = activity.kick.notified() => {
                    if activity.stalled.load(Ordering::Acquire) && closing_deadline.is_none() {
                        // A stream was reset for want of progress: the rest of the connection
                        // gets a GOAWAY rather than another send_timeout each.
                        graceful(conn.as_mut());
                        closing_deadline = Some(Instant::now() + IDLE_CLOSE_GRACE);
                    }
                }
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        log_connection_error(&e, self.client, self.metrics, activity);
                        return false;
                    }
                    return activity.parking.load(Ordering::Relaxed);
                }
                _ = &mut stopped, if closing_deadline.is_none() => {
                    // HTTP/1.1: close after the response in flight; HTTP/2: GOAWAY, streams finish.
                    graceful(conn.as_mut());
                    closing_deadline = Some(Instant::now() + settings.drain_timeout);
                }
                _ = tokio::time::sleep_until(wake) => {
                    if activity
                        .write_blocked_since()
                        .is_some_and(|since| since.elapsed() >= settings.send_timeout)
                    {
                        // Nothing can be written to it, a close_notify included: dropped.
                        self.metrics.reject(RejectReason::SendTimeout.label());
                        tracing::info!(target: "ndes_gateway::edge::listener", client = %self.client.ip(), "connection closed: the client took no response bytes within listen.send_timeout");
                        return false;
                    }
                    if can_park
                        && (activity.in_flight.load(Ordering::Relaxed) > 0
                            || activity.unflushed.load(Ordering::Relaxed))
                        && activity.request_started().elapsed()
                            >= settings.request_timeout + ANSWER_GRACE
                    {
                        // The answer is still going out (hyper may hold it all, its body done) to
                        // a client that takes it a little at a time: the request's own deadline
                        // ends it.
                        self.metrics.reject(RejectReason::RequestTimeout.label());
                        tracing::info!(target: "ndes_gateway::edge::listener", client = %self.client.ip(), "connection closed: the answer was not taken within limits.request_timeout");
                        return false;
                    }
                    if closing_deadline.is_some() {
                        tracing::debug!(target: "ndes_gateway::edge::listener", client = %self.client.ip(), "connection dropped after the close grace period");
                        return false;
                    }
                    if activity.is_idle(settings.idle_timeout) {
                        tracing::debug!(target: "ndes_gateway::edge::listener", client = %self.client.ip(), "idle connection closed (listen.idle_timeout)");
                        graceful(conn.as_mut());
                        closing_deadline = Some(Instant::now() + IDLE_CLOSE_GRACE);
                    } else if can_park && activity.can_park(PARK_AFTER) {
                        // hyper, idle between requests, next reads an end of stream and
                        // finishes; the stream itself stays open (see ActivityIo).
                        activity.parking.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Waits, holding no HTTP state, for the parked connection's next bytes: true when they have
    /// come (they are in `io.prefix`), false when the connection is to end.
    async fn wait_parked<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut ActivityIo<T>,
        stop: &CancellationToken,
    ) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // One TLS record is decrypted whole whatever is asked for; the rest stays in rustls.
        let mut first = [0u8; 64];
        let deadline = self.activity.last() + self.settings.idle_timeout;
        let why = tokio::select! {
            read = io.read(&mut first) => match read {
                Ok(n) if n > 0 => {
                    io.prefix = Bytes::copy_from_slice(&first[..n]);
                    return true;
                }
                // The client closed, or the stream failed: nothing is owed to it.
                _ => return false,
            },
            _ = stop.cancelled() => "connection closed for the drain",
            _ = tokio::time::sleep_until(deadline) => "idle connection closed (listen.idle_timeout)",
        };
        tracing::debug!(target: "ndes_gateway::edge::listener", client = %self.client.ip(), "{why}");
        // close_notify, then the TCP close; a client that does not read it is not waited for.
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        false
    }
}

/// A response body that keeps its request in flight until hyper has written it all or dropped it:
/// a connection streaming an answer is neither idle nor to be parked.
struct TrackedBody {
    inner: GatewayBody,
    _in_flight: InFlight,
    /// The HTTP/2 stream's clock: each frame taken is progress.
    stream: Option<Arc<StreamState>>,
    /// What is left of a data frame handed out a slice at a time.
    rest: Bytes,
}

/// A large answer goes to hyper a slice at a time, so that its body, and with it the request,
/// stays in flight until the client has nearly all of it. HTTP/2: hyper hands a whole data frame
/// to h2 once the stream's window has room for one byte, and h2 holds what the window does not
/// take; each further slice is asked for only when the client has taken the previous one, so a
/// client that keeps its window nearly shut parks at most one slice beyond the watch of
/// `listen.send_timeout`. HTTP/1.1: hyper asks for more only as its write queue drains, and the
/// request's deadline applies while the answer goes out.
const SLICE_BYTES: usize = 16 * 1024;

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(stream) = &self.stream {
            stream.progress();
        }
        if !self.rest.is_empty() {
            let n = self.rest.len().min(SLICE_BYTES);
            return Poll::Ready(Some(Ok(Frame::data(self.rest.split_to(n)))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) if data.len() > SLICE_BYTES => {
                    self.rest = data.split_off(SLICE_BYTES);
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// Errors that end a connection. hyper answers malformed heads itself (400, 414 past the URI
/// type's 65534-byte ceiling, 431 past the read buffer) and reports them here.
fn refuse_proxy_header(metrics: &Metrics, peer: SocketAddr, why: &str) {
    metrics
        .connections_refused_total
        .with_label_values(&["proxy_protocol"])
        .inc();
    tracing::info!(target: "ndes_gateway::edge::listener", peer = %peer.ip(), reason = why, "connection refused: listen.proxy_protocol requires a valid PROXY header");
}

/// Open connections per client address.
struct PerClientSlots {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerClientSlots {
    fn take(&self, ip: IpAddr) -> Option<ClientSlot<'_>> {
        // A poisoned lock only means a panic elsewhere mid-update; the counts are still usable.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot { slots: self, ip })
    }
}

/// One client connection's place in the per-client count, given back on drop.
struct ClientSlot<'a> {
    slots: &'a PerClientSlots,
    ip: IpAddr,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Forgotten at once: the map holds only addresses with connections open.
                open.remove(&self.ip);
            }
        }
    }
}

/// Keeps `connections_parked` right however the wait ends.
struct Parked<'a>(&'a prometheus::IntGauge);

impl<'a> Parked<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Parked<'a> {
        gauge.inc();
        Parked(gauge)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Keeps `connections_active` right however the connection's task ends.
struct ActiveConnection(Arc<Metrics>);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.connections_active.dec();
    }
}

fn log_connection_error(
    e: &(dyn std::error::Error + 'static),
    peer: SocketAddr,
    metrics: &Metrics,
    activity: &Activity,
) {
    let Some(he) = e.downcast_ref::<hyper::Error>() else {
        tracing::debug!(target: "ndes_gateway::edge::listener", client = %peer.ip(), error = %e, "connection error");
        return;
    };
    // A request the parser refused is a request all the same: it gets its access line and its
    // count, with the reason the gateway's answer gave.
    let refused = |status: u16, reason: &'static str, detail: &dyn std::fmt::Display| {
        metrics.reject(reason);
        let code = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_REQUEST);
        metrics
            .requests_total
            .with_label_values(&["none", "other", code.as_str()])
            .inc();
        tracing::info!(
            target: "ndes_gateway::access",
            client = %peer.ip(),
            method = "-",
            operation = "none",
            status,
            rejected = reason,
            detail = %detail,
            "request refused by the HTTP parser"
        );
    };
    if he.is_parse_too_large() {
        let answered = *lock(&activity.refusal);
        match answered {
            Some(r) => refused(r.status, r.reason, he),
            None => refused(431, RejectReason::HeadersTooLarge.label(), he),
        }
    } else if he.is_parse() {
        refused(400, REASON_MALFORMED, he);
    } else if he.is_timeout() && !activity.partial_head.load(Ordering::Relaxed) {
        // hyper re-arms the header timeout between keep-alive requests: this is an idle
        // HTTP/1.1 connection closed, not a slow client.
        tracing::debug!(target: "ndes_gateway::edge::listener", client = %peer.ip(), "idle keep-alive connection closed (limits.header_timeout)");
    } else if he.is_timeout() {
        metrics.reject(REASON_HEADER_TIMEOUT);
        tracing::info!(target: "ndes_gateway::pipeline::filter", client = %peer.ip(), "request head not received within limits.header_timeout");
    } else {
        tracing::debug!(target: "ndes_gateway::edge::listener", client = %peer.ip(), error = %he, "connection error");
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// When the connection last started or finished a request, and how many it has in flight: what
/// the idle timeout looks at. Bytes alone do not count, or a peer sending an HTTP/2 PING now and
/// then, or dripping a header block, would hold a connection slot forever. Atomics, because hyper
/// polls the IO and the service from different places.
struct Activity {
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Bytes arrived since the last request head was complete: a header timeout then cut a
    /// request short, rather than closing a keep-alive connection that sat idle.
    partial_head: AtomicBool,
    /// Set to end an idle HTTP/1.1 connection's hyper state while keeping its stream.
    parking: AtomicBool,
    /// Bytes handed to the stream since it last flushed: not a moment to park.
    unflushed: AtomicBool,
    /// When the latest request started (ms after the epoch).
    request_started_ms: AtomicU64,
    /// HTTP/1.1: what the parser hides of each head (see [`HeadScan`]).
    scan: Option<Mutex<HeadScan>>,
    /// Since when (ms after the epoch, plus one; 0: not) the client has taken no bytes written to it.
    write_blocked_ms: AtomicU64,
    /// A stream was reset for want of progress.
    stalled: AtomicBool,
    /// Wakes the connection's loop when a write blocks or a stream stalls.
    kick: tokio::sync::Notify,
    /// What the gateway answered in place of hyper's own refusal, for its access line.
    refusal: Mutex<Option<Refusal>>,
}

/// A request the HTTP parser refused, as answered.
#[derive(Clone, Copy)]
struct Refusal {
    status: u16,
    reason: &'static str,
}

fn now_ms() -> u64 {
    Instant::now()
        .saturating_duration_since(epoch())
        .as_millis() as u64
}

impl Activity {
    fn new(scan: bool) -> Activity {
        let a = Activity {
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            partial_head: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            unflushed: AtomicBool::new(false),
            request_started_ms: AtomicU64::new(0),
            scan: scan.then(|| Mutex::new(HeadScan::default())),
            write_blocked_ms: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            kick: tokio::sync::Notify::new(),
            refusal: Mutex::new(None),
        };
        a.touch();
        a
    }

    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        epoch() + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn is_idle(&self, timeout: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && self.last().elapsed() >= timeout
    }

    fn request_started(&self) -> Instant {
        epoch() + Duration::from_millis(self.request_started_ms.load(Ordering::Relaxed))
    }

    fn write_blocked_since(&self) -> Option<Instant> {
        match self.write_blocked_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(epoch() + Duration::from_millis(ms - 1)),
        }
    }

    fn write_blocked(&self, blocked: bool) {
        if !blocked {
            self.write_blocked_ms.store(0, Ordering::Relaxed);
        } else if self.write_blocked_ms.load(Ordering::Relaxed) == 0 {
            self.write_blocked_ms.store(now_ms() + 1, Ordering::Relaxed);
            // The loop may be asleep until the idle timeout: it is to look at the send deadline.
            self.kick.notify_one();
        }
    }

    /// Idle for `after`, between requests, with nothing half-read and nothing left to send.
    fn can_park(&self, after: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && !self.partial_head.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
            && !self.parking.load(Ordering::Relaxed)
            && self.last().elapsed() >= after
    }

    /// When to look again: at the idle timeout, or sooner to park. A connection kept from
    /// parking (a request in flight, a head half-read, an answer not yet flushed) is looked at
    /// again a park interval later.
    fn next_check(&self, timeout: Duration, park_after: Option<Duration>) -> Instant {
        let now = Instant::now();
        let park_at = match park_after {
            Some(park) if !self.parking.load(Ordering::Relaxed) => {
                let due = self.last() + park;
                Some(if due > now { due } else { now + park })
            }
            _ => None,
        };
        let idle_at = if self.in_flight.load(Ordering::Relaxed) > 0 {
            now + timeout
        } else {
            self.last() + timeout
        };
        let at = match park_at {
            Some(p) if p < idle_at => p,
            _ => idle_at,
        };
        at.max(now + Duration::from_millis(10))
    }
}

/// Counts a request in flight until its response is written (or the request is dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.partial_head.store(false, Ordering::Relaxed);
        activity.touch();
        activity
            .request_started_ms
            .store(activity.last_ms.load(Ordering::Relaxed), Ordering::Relaxed);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if let Some(stream) = &self.stream {
            stream.done.store(true, Ordering::Release);
        }
    }
}

/// A poisoned lock only means a panic elsewhere mid-update; what it guards is still whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

tokio::task_local! {
    /// The HTTP/2 connection a stream belongs to, for the executor that starts the stream.
    static CONN: Arc<ConnShared>;
    /// The stream being served, for the service and its response body.
    static STREAM: Arc<StreamState>;
}

/// What an HTTP/2 connection's streams share with it.
struct ConnShared {
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    send_timeout: Duration,
    /// From a stream's start to the last byte of its answer.
    answer_deadline: Duration,
    client: IpAddr,
}

/// One HTTP/2 stream's sending: whether its answer is out of the service, and when the client
/// last took part of it.
struct StreamState {
    responded: AtomicBool,
    done: AtomicBool,
    started_ms: u64,
    progress_ms: AtomicU64,
}

impl StreamState {
    fn progress(&self) {
        self.progress_ms.store(now_ms(), Ordering::Release);
    }

    /// When the stream is to be reset, once its answer waits, and for which reason: the client
    /// took nothing more for `send_timeout`, or the answer is not out by the request's deadline.
    fn deadline(&self, conn: &ConnShared) -> Option<(Instant, RejectReason)> {
        if !self.responded.load(Ordering::Acquire) || self.done.load(Ordering::Acquire) {
            return None;
        }
        let progress = Duration::from_millis(self.progress_ms.load(Ordering::Acquire));
        let stalled = epoch() + progress + conn.send_timeout;
        let overdue = epoch() + Duration::from_millis(self.started_ms) + conn.answer_deadline;
        Some(if overdue < stalled {
            (overdue, RejectReason::RequestTimeout)
        } else {
            (stalled, RejectReason::SendTimeout)
        })
    }
}

/// Starts hyper's HTTP/2 streams, each under a watch: a stream whose answer the client takes no
/// bytes of for `listen.send_timeout` (a zero flow-control window, say) is dropped, which resets
/// it (RST_STREAM), and its connection is told to go away.
#[derive(Clone, Copy, Debug)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        match CONN.try_with(Arc::clone) {
            Ok(conn) => {
                let now = now_ms();
                let state = Arc::new(StreamState {
                    responded: AtomicBool::new(false),
                    done: AtomicBool::new(false),
                    started_ms: now,
                    progress_ms: AtomicU64::new(now),
                });
                tokio::spawn(Watched {
                    fut: Box::pin(STREAM.scope(state.clone(), fut)),
                    state,
                    conn,
                    sleep: None,
                });
            }
            Err(_) => {
                tokio::spawn(fut);
            }
        }
    }
}

/// A stream's future and its send deadline.
struct Watched<F> {
    fut: Pin<Box<F>>,
    state: Arc<StreamState>,
    conn: Arc<ConnShared>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F: std::future::Future<Output = ()>> std::future::Future for Watched<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.fut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        loop {
            let Some((deadline, reason)) = self.state.deadline(&self.conn) else {
                return Poll::Pending;
            };
            if deadline <= Instant::now() {
                let conn = &self.conn;
                conn.metrics.reject(reason.label());
                let why = match reason {
                    RejectReason::RequestTimeout => {
                        "the answer was not taken within limits.request_timeout"
                    }
                    _ => "the client took no response bytes within listen.send_timeout",
                };
                tracing::info!(target: "ndes_gateway::edge::listener", client = %conn.client, reason = why, "HTTP/2 stream reset");
                conn.activity.stalled.store(true, Ordering::Release);
                conn.activity.kick.notify_one();
                // Dropping the stream's future resets the stream.
                return Poll::Ready(());
            }
            let sleep = match &mut self.sleep {
                Some(sleep) => {
                    if sleep.deadline() != deadline {
                        sleep.as_mut().reset(deadline);
                    }
                    sleep
                }
                none => none.insert(Box::pin(tokio::time::sleep_until(deadline))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// The client's TLS stream, noting bytes that arrive between requests, and giving hyper's own
/// bodiless answers to oversized heads the gateway's text/plain reason. While parking it reads as
/// an end of stream and its shutdown does nothing: hyper, idle, then ends without closing it.
struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
    /// Bytes read from `inner` that the next hyper connection reads first.
    prefix: Bytes,
    /// A replacement response being written in place of hyper's, and how much of it is out.
    replacement: Option<(&'static [u8], usize)>,
}

impl<T> ActivityIo<T> {
    fn new(inner: T, activity: Arc<Activity>) -> ActivityIo<T> {
        ActivityIo {
            inner,
            activity,
            prefix: Bytes::new(),
            replacement: None,
        }
    }
}

/// The gateway's answer in place of one of hyper's, and what it says.
struct Replacement {
    bytes: &'static [u8],
    refusal: Refusal,
}

/// hyper answers a request-target over the URI type's 65534-byte ceiling (414), a head over its
/// read buffer or with too many fields (431) and a Content-Length it cannot count to (431) by
/// itself, before the filter sees the request, with an empty body. Those automatic answers have
/// one exact shape, which no response relayed from NDES has (relayed responses carry the
/// gateway's Content-Length after NDES's own headers); it is swapped for the gateway's answer
/// naming the limit.
fn replacement_for(head: &[u8], activity: &Activity) -> Option<Replacement> {
    const TAIL: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ";
    const DATE_AND_END: usize = 29 + 4;
    // Every write passes here, bodies included: anything that cannot be one of those short
    // heads is let go before it is scanned.
    if head.len() > 192 || !head.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let status_end = head.windows(2).position(|w| w == b"\r\n")?;
    let (status, rest) = head.split_at(status_end);
    if !rest.starts_with(TAIL)
        || rest.len() != TAIL.len() + DATE_AND_END
        || !rest.ends_with(b"\r\n\r\n")
    {
        return None;
    }
    static URI: OnceLock<Vec<u8>> = OnceLock::new();
    static HEAD: OnceLock<Vec<u8>> = OnceLock::new();
    static LENGTH: OnceLock<Vec<u8>> = OnceLock::new();
    let absurd = || {
        activity
            .scan
            .as_ref()
            .is_some_and(|scan| lock(scan).take_absurd_length())
    };
    let (cell, status, reason, label) = match status {
        b"HTTP/1.1 414 URI Too Long" => (
            &URI,
            "414 URI Too Long",
            "the request-target is over the limit of 65534 bytes (limits.max_uri_bytes)",
            RejectReason::UriTooLong.label(),
        ),
        b"HTTP/1.1 431 Request Header Fields Too Large" if absurd() => (
            &LENGTH,
            "413 Payload Too Large",
            "the Content-Length is over the body limit (limits.max_body_bytes)",
            RejectReason::BodyTooLarge.label(),
        ),
        b"HTTP/1.1 431 Request Header Fields Too Large" => (
            &HEAD,
            "431 Request Header Fields Too Large",
            "the request head is over the limits (limits.max_uri_bytes + limits.max_header_bytes, limits.max_header_count)",
            RejectReason::HeadersTooLarge.label(),
        ),
        _ => return None,
    };
    let bytes = cell.get_or_init(|| {
        let body = format!("{status}: {reason}\n");
        format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    });
    let code = status
        .split(' ')
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or(400);
    Some(Replacement {
        bytes: bytes.as_slice(),
        refusal: Refusal {
            status: code,
            reason: label,
        },
    })
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = buf.remaining().min(self.prefix.len());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        if self.activity.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.partial_head.store(true, Ordering::Relaxed);
            if let Some(scan) = &self.activity.scan {
                lock(scan).feed(&buf.filled()[before..]);
            }
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.activity.unflushed.store(true, Ordering::Relaxed);
        if self.replacement.is_none() {
            if let Some(found) = replacement_for(buf, &self.activity) {
                *lock(&self.activity.refusal) = Some(found.refusal);
                self.replacement = Some((found.bytes, 0));
            }
        }
        if let Some((text, mut sent)) = self.replacement {
            // hyper is told its bytes went out once the replacement has.
            while sent < text.len() {
                match Pin::new(&mut self.inner).poll_write(cx, &text[sent..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        sent += n;
                        self.replacement = Some((text, sent));
                    }
                    other => return other,
                }
            }
            return Poll::Ready(Ok(buf.len()));
        }
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_blocked(poll.is_pending());
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // An automatic answer is a head alone: one non-empty slice.
        let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (non_empty.next(), non_empty.next()) {
            if self.replacement.is_none() {
                if let Some(found) = replacement_for(only, &self.activity) {
                    *lock(&self.activity.refusal) = Some(found.refusal);
                    self.replacement = Some((found.bytes, 0));
                }
            }
            if self.replacement.is_some() {
                return self.poll_write(cx, only);
            }
        }
        self.activity.unflushed.store(true, Ordering::Relaxed);
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_blocked(poll.is_pending());
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = poll {
            self.activity.unflushed.store(false, Ordering::Relaxed);
        }
        self.activity.write_blocked(poll.is_pending());
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacements_are_whole_responses() {
        let activity = Activity::new(true);
        for text in [
            replacement_for(b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: Wed, 25 Nov 2026 13:44:58 GMT\r\n\r\n", &activity),
            replacement_for(b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Wed, 25 Nov 2026 13:44:58 GMT\r\n\r\n", &activity),
        ] {
            let text = text.expect("hyper's automatic answer is recognised").bytes;
            let split = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let head = std::str::from_utf8(&text[..split]).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, text.len() - split - 4, "{head}");
        }
    }

    #[test]
    fn relayed_responses_are_never_replaced() {
        let activity = Activity::new(true);
        assert!(replacement_for(
            b"HTTP/1.1 414 URI Too Long\r\nserver: Microsoft-IIS/10.0\r\ncontent-length: 0\r\n\r\n",
            &activity
        )
        .is_none());
        assert!(replacement_for(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Wed, 25 Nov 2026 13:44:58 GMT\r\n\r\n", &activity).is_none());
    }
}
