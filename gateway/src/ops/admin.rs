//! The admin listener: /metrics, /healthz, /readyz over plain HTTP on its own address (loopback
//! by default, the management network in production). Nothing else is served there, and the public
//! listener never serves these paths.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::upstream::cluster::Cluster;

/// Whether the gateway should get traffic: its certificates are loaded (it would not run
/// otherwise) and NDES answered the last GetCACaps probe with 200.
#[derive(Default)]
pub struct Readiness {
    upstream_ok: AtomicBool,
    why_not: Mutex<String>,
    /// An expired RA certificate (with `scep.expired_ra = "fail"`).
    ra_problem: Mutex<Option<String>>,
    /// The gateway is stopping: load balancers must send no more.
    draining: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.upstream_ok.load(Ordering::Relaxed)
            && self.ra_problem().is_none()
            && !self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn upstream_ok(&self) -> bool {
        self.upstream_ok.load(Ordering::Relaxed)
    }

    fn ra_problem(&self) -> Option<String> {
        self.ra_problem.lock().ok().and_then(|p| p.clone())
    }

    pub fn set_ra_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.ra_problem.lock() {
            *p = problem;
        }
    }

    fn set(&self, ok: bool, why: String) {
        if let Ok(mut w) = self.why_not.lock() {
            *w = why;
        }
        self.upstream_ok.store(ok, Ordering::Relaxed);
    }

    fn why_not(&self) -> String {
        if self.draining.load(Ordering::Relaxed) {
            return "stopping: finishing the requests in flight".to_owned();
        }
        if let Some(p) = self.ra_problem() {
            return p;
        }
        self.why_not.lock().map(|w| w.clone()).unwrap_or_default()
    }
}

/// Asks every NDES server for GetCACaps every `interval` until `stop`, and records the answers:
/// each server's for the balancer, and the gateway's readiness, which holds while one is up.
pub async fn probe_loop(
    cluster: Arc<Cluster>,
    readiness: Arc<Readiness>,
    interval: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    readiness.set(false, "NDES not probed yet".to_owned());
    let many = cluster.is_many();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut probes = tokio::task::JoinSet::new();
        for server in &cluster.servers {
            let server = server.clone();
            probes.spawn(async move {
                let (ok, why) = match tokio::time::timeout(timeout, server.upstream.probe()).await {
                    Err(_) => (
                        false,
                        "GetCACaps probe timed out (admin.probe_timeout)".to_owned(),
                    ),
                    Ok(Ok(200)) => (true, String::new()),
                    Ok(Ok(status)) => (false, format!("NDES answered GetCACaps with {status}")),
                    Ok(Err(e)) => (false, format!("NDES failed the probe: {e}")),
                };
                if server.set_probe(ok, why.clone()) {
                    if ok {
                        tracing::info!(target: "ndes_gateway::ops::admin", server = %server.label, "NDES server ready: it answers GetCACaps");
                    } else {
                        tracing::warn!(target: "ndes_gateway::ops::admin", server = %server.label, reason = %why, "NDES server not ready");
                    }
                }
            });
        }
        while probes.join_next().await.is_some() {}
        let (ok, down) = cluster.readiness();
        let why = if !many {
            cluster.servers[0].why_down()
        } else if ok {
            format!("NDES servers down: {}", down.join("; "))
        } else {
            format!("no NDES server is ready: {}", down.join("; "))
        };
        if ok != readiness.upstream_ok() {
            if ok {
                tracing::info!(target: "ndes_gateway::ops::admin", "ready: NDES answers GetCACaps");
            } else {
                tracing::warn!(target: "ndes_gateway::ops::admin", reason = %why, "not ready");
            }
        }
        readiness.set(ok, if down.is_empty() { String::new() } else { why });
    }
}

/// Serves the admin endpoints until `stop`; then its open connections (a scraper's keep-alive)
/// are closed too, so a stopped gateway answers nothing more.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let response = answer(&req, &metrics, &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
}

fn answer(
    req: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/readyz" if readiness.is_ready() => {
            // Ready while one NDES server is: the others that are down are named.
            let down = readiness.why_not();
            if down.is_empty() {
                text(StatusCode::OK, "ready\n".to_owned())
            } else {
                text(StatusCode::OK, format!("ready; {down}\n"))
            }
        }
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", readiness.why_not()),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "only /metrics, /healthz and /readyz\n".to_owned(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Binds the admin address, saying which key to change when it is taken.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::config::ConfigError> {
    TcpListener::bind(addr).await.map_err(|e| {
        crate::config::ConfigError(format!("admin.addr: cannot listen on {addr}: {e}"))
    })
}
