//! One request's straight line: resolve the client, rate-limit, filter, read the body within its
//! limit, forward what the allowlist lets through to NDES, read NDES's answer whole, send it on
//! with the gateway's own framing, count it and write the access line (also when the client goes
//! away mid-request).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};

use crate::config::ConfigError;
use crate::metrics::{Metrics, REASON_RATE_LIMITED};
use crate::pipeline::client_addr::TrustedProxies;
use crate::pipeline::filter::{
    request_target_len, RejectReason, Rejection, RequestLimits, ScepOperation, ScepPath, WireFacts,
    PKICLIENT_SUFFIX,
};
use crate::pipeline::ratelimit::{retry_after_secs, RateLimits};
use crate::scep::{
    decode_get_message, fail_info_name, message_type_name, parse_get_message, parse_pki_message,
    pki_message_recipient, pki_status_name, PkiMessage, Recipient,
};
use crate::upstream::cluster::{Cluster, Kind, Route, Server};
use crate::upstream::{Answer, UpstreamErrorKind};

pub type GatewayBody = UnsyncBoxBody<Bytes, hyper::Error>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_POWERED_BY: HeaderName = HeaderName::from_static("x-powered-by");
static X_ASPNET_VERSION: HeaderName = HeaderName::from_static("x-aspnet-version");
static X_ASPNETMVC_VERSION: HeaderName = HeaderName::from_static("x-aspnetmvc-version");

/// The request headers that reach NDES: an allowlist, not a denylist, so a header nobody thought
/// of never reaches IIS. Fixed: `Content-Type`, `User-Agent`, `Accept`; the gateway's own `Host`,
/// `Content-Length`, `X-Forwarded-For` and `X-Forwarded-Proto`; plus `upstream.forward_headers`.
#[derive(Debug, Clone, Default)]
pub struct ForwardHeaders {
    extra: Vec<HeaderName>,
}

impl ForwardHeaders {
    /// What the client sends that goes on as it is.
    const FIXED: [HeaderName; 3] = [header::CONTENT_TYPE, header::USER_AGENT, header::ACCEPT];

    pub fn parse(names: &[String]) -> Result<ForwardHeaders, ConfigError> {
        let mut extra = Vec::with_capacity(names.len());
        for name in names {
            let parsed = crate::config::forward_header_name(name)?;
            if !Self::FIXED.contains(&parsed) && !extra.contains(&parsed) {
                extra.push(parsed);
            }
        }
        Ok(ForwardHeaders { extra })
    }

    fn allows(&self, name: &HeaderName) -> bool {
        Self::FIXED.contains(name) || (!self.extra.is_empty() && self.extra.contains(name))
    }

    /// Every name that can reach NDES, for `check`.
    pub fn effective(&self) -> Vec<String> {
        let mut names: Vec<String> = [
            "host",
            "content-type",
            "content-length",
            "user-agent",
            "accept",
            "x-forwarded-for",
            "x-forwarded-proto",
        ]
        .iter()
        .map(|n| (*n).to_owned())
        .collect();
        names.extend(self.extra.iter().map(|n| n.as_str().to_owned()));
        names
    }
}

/// The per-gateway request pipeline.
pub struct Proxy {
    pub limits: RequestLimits,
    pub body_timeout: Duration,
    pub cluster: Arc<Cluster>,
    pub metrics: Arc<Metrics>,
    pub rate_limits: Arc<RateLimits>,
    pub trusted_proxies: TrustedProxies,
    /// Refuse a PKIOperation whose message does not parse (`scep.strict`).
    pub scep_strict: bool,
    pub forward: ForwardHeaders,
    /// Rate-limited requests not logged yet: a flood must not flood the log too, so at most one
    /// line a second says how many were refused since the last one.
    rate_limited_unlogged: AtomicU64,
    rate_limit_log: governor::DefaultDirectRateLimiter,
}

/// What became of a request, for the access line and the metrics.
#[derive(Default)]
struct Outcome {
    /// The request was handed to a connection to NDES: if the client goes away after that, NDES
    /// may have it whole.
    sent_upstream: bool,
    operation: Option<&'static str>,
    upstream_status: Option<u16>,
    rejected: Option<&'static str>,
    upstream_error: Option<UpstreamErrorKind>,
    upstream_seconds: Option<f64>,
    /// The NDES server that answered, or was meant to.
    server: Option<Arc<Server>>,
    /// Answered from the cache.
    cached: bool,
    /// What the PKIOperation carried and what NDES answered, when they could be read.
    scep: Option<ScepExchange>,
}

#[derive(Default)]
struct ScepExchange {
    request: Option<PkiMessage>,
    response: Option<PkiMessage>,
}

/// The method as a metric label: the usual ones by name, anything else lumped together so a
/// client cannot create series at will.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        limits: RequestLimits,
        body_timeout: Duration,
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        rate_limits: Arc<RateLimits>,
        trusted_proxies: TrustedProxies,
        scep_strict: bool,
        forward: ForwardHeaders,
    ) -> Proxy {
        Proxy {
            limits,
            body_timeout,
            cluster,
            metrics,
            rate_limits,
            trusted_proxies,
            scep_strict,
            forward,
            rate_limited_unlogged: AtomicU64::new(0),
            rate_limit_log: governor::RateLimiter::direct(governor::Quota::per_second(
                std::num::NonZeroU32::MIN,
            )),
        }
    }

    /// `peer` is the connection's client: the TCP peer, or the source of its PROXY header;
    /// `wire` what the edge saw of the request's bytes.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        wire: WireFacts,
    ) -> Response<GatewayBody> {
        let method = req.method().clone();
        let version = req.version();
        let target_bytes = request_target_len(req.uri(), version);
        let client = self.trusted_proxies.client_ip(peer.ip(), req.headers());
        // Written when the future is dropped unfinished too: the client reset the stream or
        // closed the connection.
        let mut record = Record {
            proxy: self,
            started: Instant::now(),
            method,
            version,
            target_bytes,
            client,
            outcome: Outcome::default(),
            finished: false,
        };
        // No deadline of its own here: `check` makes limits.request_timeout at least the body,
        // queue, connect and response timeouts together, which bound every wait below.
        let response = match self.rate_limits.check(client) {
            Ok(()) => self.forward(req, client, wire, &mut record.outcome).await,
            Err((scope, wait)) => self.rate_limited(client, scope.key(), wait, &mut record.outcome),
        };
        record.finished = true;
        // A client that went away mid-body never sees the answer it is given.
        let status = if record.outcome.rejected == Some(RejectReason::ClientCancelled.label()) {
            CLIENT_CLOSED_REQUEST
        } else {
            response.status().as_u16()
        };
        self.account(&record, status);
        response
    }

    /// Counts the request and writes its access line; `status` 499 is a request whose client
    /// went away before its answer (nginx's code for it).
    fn account(&self, record: &Record<'_>, status: u16) {
        let Record {
            started,
            ref method,
            version,
            target_bytes,
            client,
            ref outcome,
            ..
        } = *record;
        let seconds = started.elapsed().as_secs_f64();
        let operation = outcome.operation.unwrap_or("none");
        let m = &self.metrics;
        let status_code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        m.requests_total
            .with_label_values(&[operation, method_label(method), status_code.as_str()])
            .inc();
        m.request_duration_seconds
            .with_label_values(&[operation])
            .observe(seconds);
        m.request_target_bytes.observe(target_bytes as f64);
        if let Some(reason) = outcome.rejected {
            m.reject(reason);
        }
        let scep = outcome.scep.as_ref();
        let request = scep.and_then(|e| e.request.as_ref());
        let cert_rep = scep.and_then(|e| e.response.as_ref());
        let message_type = request
            .and_then(|m| m.message_type)
            .map_or("-", message_type_name);
        let pki_status = cert_rep
            .and_then(|m| m.pki_status)
            .map_or("-", pki_status_name);
        let fail_info = cert_rep
            .and_then(|m| m.fail_info)
            .map_or("-", fail_info_name);
        if scep.is_some() {
            let or_none = |label: &'static str| if label == "-" { "none" } else { label };
            m.scep_messages_total
                .with_label_values(&[
                    if request.is_some() {
                        message_type
                    } else {
                        "unparsed"
                    },
                    or_none(pki_status),
                    or_none(fail_info),
                ])
                .inc();
        }
        // Rate-limited requests have their own, throttled, log line.
        if outcome.rejected != Some(REASON_RATE_LIMITED) {
            tracing::info!(
                target: "ndes_gateway::access",
                client = %client,
                method = %method,
                version = ?version,
                operation,
                target_bytes,
                status,
                upstream_status = outcome.upstream_status.unwrap_or(0),
                ndes_received = match (outcome.upstream_status, outcome.sent_upstream) {
                    (Some(_), _) => "yes",
                    (None, true) => "maybe",
                    (None, false) => "no",
                },
                duration_ms = seconds * 1000.0,
                rejected = outcome.rejected.unwrap_or("-"),
                upstream_error = outcome.upstream_error.map_or("-", UpstreamErrorKind::label),
                server = outcome.server.as_ref().map_or("-", |s| s.label.as_str()),
                cache = if outcome.cached { "hit" } else { "-" },
                transaction_id = request.and_then(|m| m.transaction_id.as_deref()).unwrap_or("-"),
                message_type,
                pki_status,
                fail_info,
                "request"
            );
        }
    }

    fn rate_limited(
        &self,
        client: IpAddr,
        key: &'static str,
        wait: Duration,
        outcome: &mut Outcome,
    ) -> Response<GatewayBody> {
        outcome.rejected = Some(REASON_RATE_LIMITED);
        let unlogged = self.rate_limited_unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        if self.rate_limit_log.check().is_ok() {
            self.rate_limited_unlogged
                .fetch_sub(unlogged, Ordering::Relaxed);
            tracing::warn!(
                target: "ndes_gateway::pipeline::filter",
                client = %client,
                limit = key,
                refused_since_last_line = unlogged,
                "requests refused: rate limit"
            );
        }
        let retry = retry_after_secs(wait);
        let mut resp = text_response(
            StatusCode::TOO_MANY_REQUESTS,
            format!("429 Too Many Requests: over the rate limit ({key}); retry in {retry} s\n"),
            None,
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry));
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        client: IpAddr,
        wire: WireFacts,
        outcome: &mut Outcome,
    ) -> Response<GatewayBody> {
        let (parts, body) = req.into_parts();
        let scep = match self.limits.check_wire(
            &parts.method,
            &parts.uri,
            parts.version,
            &parts.headers,
            wire,
        ) {
            Ok(scep) => scep,
            Err(rejection) => return reject(rejection, client, outcome),
        };
        outcome.operation = Some(scep.operation.map_or("bare", |op| op.as_str()));

        let body = if parts.method == Method::POST {
            match self.read_body(body).await {
                Ok(bytes) => bytes,
                Err(rejection) => return reject(rejection, client, outcome),
            }
        } else if !body.is_end_stream() {
            // An HTTP/2 GET may end its stream with an empty DATA frame, which is fine; one that
            // carries data is not SCEP and is refused before anything is held while NDES answers.
            let empty =
                tokio::time::timeout(self.body_timeout, Limited::new(body, 0).collect()).await;
            let refused = match empty {
                Ok(Ok(_)) => None,
                Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Some((
                    RejectReason::BodyNotAllowed,
                    "a GET request carries no body in SCEP",
                )),
                // The client reset the stream or went away: nothing to forward, nobody to tell.
                Ok(Err(_)) => Some((
                    RejectReason::ClientCancelled,
                    "the client cancelled the request",
                )),
                Err(_) => Some((
                    RejectReason::BodyTimeout,
                    "the request stream did not end within limits.body_timeout",
                )),
            };
            if let Some((reason, detail)) = refused {
                let rejection = Rejection {
                    status: StatusCode::BAD_REQUEST,
                    reason,
                    detail: detail.to_owned(),
                    allow: None,
                };
                return reject(rejection, client, outcome);
            }
            Bytes::new()
        } else {
            Bytes::new()
        };

        let mut route = Route::Balanced;
        if scep.operation == Some(ScepOperation::PkiOperation) {
            let parsed = if parts.method == Method::POST {
                parse_pki_message(&body)
            } else {
                parse_get_message(parts.uri.query().unwrap_or(""))
            };
            let request = match parsed {
                Ok(msg) => Some(msg),
                Err(e) => {
                    self.metrics
                        .scep_parse_errors_total
                        .with_label_values(&["request"])
                        .inc();
                    tracing::info!(target: "ndes_gateway::scep", client = %client, error = %e, "PKIOperation message not readable");
                    if self.scep_strict {
                        let rejection = Rejection {
                            status: StatusCode::BAD_REQUEST,
                            reason: RejectReason::ScepUnparsable,
                            detail: format!("the PKIOperation message is not a SCEP pkiMessage: {e} (scep.strict)"),
                            allow: None,
                        };
                        return reject(rejection, client, outcome);
                    }
                    None
                }
            };
            outcome.scep = Some(ScepExchange {
                request,
                response: None,
            });
            // Read once the request is known to go on: a refused one is never routed.
            if self.cluster.is_many() {
                route = self
                    .cluster
                    .route(recipient(&parts.method, &parts.uri, &body).as_ref());
            }
        }

        // GetCACaps and GetCACert may go twice if a reused connection closes under them, or to
        // a second server; a PKIOperation never does once written.
        let get = parts.method == Method::GET && body.is_empty();
        let kind = Kind {
            operation: outcome.operation.unwrap_or("bare"),
            idempotent: get && scep.operation != Some(ScepOperation::PkiOperation),
            pkioperation: scep.operation == Some(ScepOperation::PkiOperation),
            cacheable: get
                && matches!(
                    scep.operation,
                    Some(ScepOperation::GetCaCaps | ScepOperation::GetCaCert)
                ),
        };
        let suffix = match scep.path {
            ScepPath::Dll => "",
            ScepPath::PkiClientExe => PKICLIENT_SUFFIX,
        };
        if self.cluster.fits(&parts.uri, suffix).is_err() {
            let rejection = Rejection {
                status: StatusCode::URI_TOO_LONG,
                reason: RejectReason::UriTooLong,
                detail:
                    "the request-target is too long once mapped onto the upstream path (upstream.url)"
                        .to_owned(),
                allow: None,
            };
            return reject(rejection, client, outcome);
        }
        let body_copy = body.clone();
        let upstream_req =
            self.upstream_request(&parts.method, parts.uri, parts.headers, body, client);
        let upstream_started = Instant::now();
        outcome.sent_upstream = true;
        let sent = self
            .cluster
            .send(upstream_req, &body_copy, suffix, kind, route)
            .await;
        outcome.upstream_seconds = Some(upstream_started.elapsed().as_secs_f64());
        match sent {
            Ok(delivered) => {
                // A cached answer is the gateway's own: NDES saw nothing of this request.
                outcome.upstream_status = (!delivered.cached).then_some(delivered.answer.status);
                outcome.server = Some(delivered.server);
                outcome.cached = delivered.cached;
                outcome.sent_upstream = !delivered.cached;
                self.answer(delivered.answer, outcome, client)
            }
            Err(undelivered) => {
                let e = undelivered.error;
                outcome.upstream_error = Some(e.kind);
                outcome.server = undelivered.server;
                tracing::warn!(
                    target: "ndes_gateway::upstream",
                    client = %client,
                    kind = e.kind.label(),
                    server = outcome.server.as_ref().map_or("-", |s| s.label.as_str()),
                    error = %e.message,
                    "request not answered by NDES"
                );
                // The client learns that NDES could not be reached, not why: internal names and
                // certificate details stay in the log.
                let unavailable;
                let (status, text) = match e.kind {
                    UpstreamErrorKind::Timeout => {
                        (StatusCode::GATEWAY_TIMEOUT, "NDES did not answer in time")
                    }
                    UpstreamErrorKind::Busy => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many requests are waiting on NDES; try again shortly",
                    ),
                    UpstreamErrorKind::Unavailable => {
                        unavailable = format!(
                            "the NDES server that holds the key this request is encrypted to (server {}) is not ready; try again shortly",
                            outcome.server.as_ref().map_or(0, |s| s.ordinal)
                        );
                        (StatusCode::SERVICE_UNAVAILABLE, unavailable.as_str())
                    }
                    UpstreamErrorKind::ResponseTooLarge => (
                        StatusCode::BAD_GATEWAY,
                        "the answer from NDES is over upstream.max_response_bytes",
                    ),
                    _ => (
                        StatusCode::BAD_GATEWAY,
                        "the gateway could not get an answer from NDES",
                    ),
                };
                let mut resp = text_response(
                    status,
                    format!(
                        "{} {}: {text}\n",
                        status.as_str(),
                        status.canonical_reason().unwrap_or("")
                    ),
                    None,
                );
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    let wait = undelivered
                        .retry_after
                        .unwrap_or_else(|| self.cluster.retry_after());
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(wait));
                }
                resp
            }
        }
    }

    /// NDES's whole answer as the client gets it: status and body as they came, NDES's headers
    /// less the hop-by-hop set and those that fingerprint the internal host, and the gateway's own
    /// Content-Length (never chunked, no trailers). A CertRep is read for its pkiStatus and
    /// failInfo on the way.
    fn answer(
        &self,
        answer: Answer,
        outcome: &mut Outcome,
        client: IpAddr,
    ) -> Response<GatewayBody> {
        let Answer {
            status,
            mut headers,
            body,
        } = answer;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        strip_headers(&mut headers, |name| {
            name == header::SERVER
                || name == X_POWERED_BY
                || name == X_ASPNET_VERSION
                || name == X_ASPNETMVC_VERSION
        });
        if let Some(exchange) = outcome.scep.as_mut() {
            if status == StatusCode::OK {
                match parse_pki_message(&body) {
                    Ok(msg) => exchange.response = Some(msg),
                    Err(e) => {
                        self.metrics
                            .scep_parse_errors_total
                            .with_label_values(&["response"])
                            .inc();
                        tracing::info!(target: "ndes_gateway::scep", client = %client, error = %e, "CertRep from NDES not readable");
                    }
                }
            }
        }
        // NDES's own length, if any, is replaced: the body is whole and counted here.
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            headers.remove(CONTENT_LENGTH);
        } else {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let mut resp = Response::new(
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }

    /// Reads a PKIOperation body whole, within the limit and the body timeout: NDES needs it with a
    /// Content-Length (IIS does not take chunked uploads by default), and a slow sender must not
    /// hold a connection to NDES open.
    async fn read_body(&self, body: Incoming) -> Result<Bytes, Rejection> {
        let limit = self.limits.max_body_bytes;
        match tokio::time::timeout(self.body_timeout, Limited::new(body, limit).collect()).await {
            Err(_) => Err(Rejection {
                status: StatusCode::REQUEST_TIMEOUT,
                reason: RejectReason::BodyTimeout,
                detail: "the request body did not arrive within limits.body_timeout".to_owned(),
                allow: None,
            }),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Rejection {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                reason: RejectReason::BodyTooLarge,
                detail: format!(
                    "the body is over the limit of {limit} bytes (limits.max_body_bytes)"
                ),
                allow: None,
            }),
            Ok(Err(e)) if is_cancelled(&*e) => Err(Rejection {
                status: StatusCode::BAD_REQUEST,
                reason: RejectReason::ClientCancelled,
                detail: "the client cancelled the request before its body was in".to_owned(),
                allow: None,
            }),
            Ok(Err(e)) => Err(Rejection {
                status: StatusCode::BAD_REQUEST,
                reason: RejectReason::BadRequest,
                detail: format!("the request body could not be read: {e}"),
                allow: None,
            }),
        }
    }

    /// The request as it goes to NDES, less what depends on the server: the client's path and
    /// query stay in the URI and Host is left out, both set for the server it goes to.
    fn upstream_request(
        &self,
        method: &Method,
        uri: http::Uri,
        headers: HeaderMap,
        body: Bytes,
        client: IpAddr,
    ) -> Request<Full<Bytes>> {
        let post = method == Method::POST;
        // Names the client's Connection header makes hop-by-hop (RFC 9110 §7.6.1), allowed
        // ones included; HTTP/2 carries no Connection header.
        let connection_named: Vec<HeaderName> = if headers.contains_key(header::CONNECTION) {
            connection_named(&headers)
        } else {
            Vec::new()
        };
        // The client's map, less what is not on the list: most requests carry nothing else, and
        // then nothing is allocated. Host and the forwarding headers are replaced just below.
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| {
                let keep = self.forward.allows(name)
                    && (connection_named.is_empty() || !connection_named.contains(name));
                !keep
                    && *name != HOST
                    && *name != X_FORWARDED_FOR
                    && *name != X_FORWARDED_PROTO
                    && (*name != CONTENT_LENGTH || !post)
            })
            .cloned()
            .collect();
        let mut out = headers;
        for name in doomed {
            out.remove(name);
        }
        if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
            out.insert(X_FORWARDED_FOR.clone(), v);
        }
        out.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
        if post {
            out.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = out;
        req
    }
}

/// Who a PKIOperation is encrypted to, when its message says: the key to its NDES server.
fn recipient(method: &Method, uri: &http::Uri, body: &Bytes) -> Option<Recipient> {
    if method == Method::POST {
        pki_message_recipient(body).ok()
    } else {
        let der = decode_get_message(uri.query().unwrap_or("")).ok()?;
        pki_message_recipient(&der).ok()
    }
}

/// A request on its way, written to the log and the metrics once: when answered, or when its
/// future is dropped unfinished because the client reset the stream or closed the connection.
struct Record<'a> {
    proxy: &'a Proxy,
    started: Instant,
    method: Method,
    version: Version,
    target_bytes: usize,
    client: IpAddr,
    outcome: Outcome,
    finished: bool,
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.outcome.rejected = Some(RejectReason::ClientCancelled.label());
        self.proxy.account(self, CLIENT_CLOSED_REQUEST);
    }
}

/// nginx's status for a request whose client went away before the answer; never sent.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// A body that ended because the client went away: the connection closed mid-body (HTTP/1.1) or
/// the stream was reset (HTTP/2).
fn is_cancelled(e: &(dyn std::error::Error + 'static)) -> bool {
    let Some(he) = e.downcast_ref::<hyper::Error>() else {
        return false;
    };
    if he.is_incomplete_message() || he.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(he);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.is_reset() || h2e.is_io() || h2e.is_go_away();
        }
        if s.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        source = s.source();
    }
    false
}

fn reject(rejection: Rejection, client: IpAddr, outcome: &mut Outcome) -> Response<GatewayBody> {
    outcome.rejected = Some(rejection.reason.label());
    tracing::info!(
        target: "ndes_gateway::pipeline::filter",
        client = %client,
        status = rejection.status.as_u16(),
        reason = rejection.reason.label(),
        detail = %rejection.detail,
        "request refused at the edge"
    );
    text_response(rejection.status, rejection.body(), rejection.allow)
}

/// The gateway's own answers: short, text/plain, never cached.
pub fn text_response(
    status: StatusCode,
    body: String,
    allow: Option<&'static str>,
) -> Response<GatewayBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The reason may quote what the client sent; it is never to be read as anything but text.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Some(allow) = allow {
        h.insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    resp
}

/// Removes the headers that belong to one hop (RFC 9110 §7.6.1), including any the Connection
/// header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_headers(headers, |_| false);
}

/// The hop-by-hop headers (RFC 9110 §7.6.1) and those `also` picks, removed after one pass over
/// the names: most messages carry none, and a removal by name hashes it.
fn strip_headers(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    let named = connection_named(headers);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) || named.contains(name) || also(name))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// The names a Connection header lists: hop-by-hop for this message. `close` and `keep-alive`,
/// nearly all it ever says, name no other header and are passed over without building a name.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| {
            !name.eq_ignore_ascii_case("close") && !name.eq_ignore_ascii_case("keep-alive")
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect()
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ]
    .contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            "content-type",
            HeaderValue::from_static("application/x-pki-message"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }
}
