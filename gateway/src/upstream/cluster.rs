//! Several NDES servers behind the one public name.
//!
//! Each NDES host enrols RA certificates of its own, and a device encrypts its PKIOperation to
//! the RA certificate that GetCACert gave it: only that host can open it. So a PKIOperation goes
//! to the server whose GetCACert answer holds the certificate its RecipientInfo names, read from
//! the message itself; nothing is shared between requests or between gateway replicas. The rest
//! (GetCACaps, GetCACert, GetNextCACert, the bare path, and a PKIOperation no single server
//! claims) is balanced by load over the servers that are up: two picked at random, the one with
//! fewer requests in flight taken (power of two choices, as tower's `balance::p2c` with its
//! `PendingRequests` load; tower's balancer itself needs `&mut self` to pick, so a shared one
//! would sit behind a `Buffer`, a channel and a task hop on every request).
//!
//! Health is the probe's (GetCACaps every `admin.probe_interval`) and the requests' own: a server
//! that refuses connections or fails the TLS handshake is set aside for a backoff that doubles
//! up to a limit, and taken back when its probe passes. PKIOperations are admitted per server
//! (`max_pkioperations_per_server`, then a bounded queue), so a renewal storm waits at the
//! gateway instead of piling onto IIS, and GetCACaps and GetCACert never wait behind it. Their
//! answers are kept per server for `cache_ttl`, and dropped when the server's RA set changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{copy_request, Answer, Upstream, UpstreamError, UpstreamErrorKind, UpstreamTarget};
use crate::config::{ConfigError, UpstreamConfig};
use crate::metrics::Metrics;
use crate::scep::{ca_and_ra, parse_ca_certs, Recipient, Watched};

/// A server that refused a connection is set aside this long, then twice as long each time, up to
/// `EJECT_MAX`: short enough that a restarted IIS is back in seconds, long enough that a dead
/// one costs a connect timeout only now and then.
const EJECT_FIRST: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(30);

/// What the probe said last.
const PROBE_UNKNOWN: u8 = 0;
const PROBE_UP: u8 = 1;
const PROBE_DOWN: u8 = 2;

/// The CA and RA certificates one server hands out, as a GetCACert answer gave them.
#[derive(Default)]
pub struct RaSet {
    /// The answer they came from: a GetCACert passing through that differs is read again.
    pub body: Bytes,
    /// Every way a RecipientInfo can name one of them.
    pub names: Vec<Recipient>,
    /// For the expiry gauge.
    pub watched: Vec<Watched>,
    /// The set before this one, still routed to until then: a device that fetched GetCACert
    /// just before NDES's RA certificates were renewed (NDES keeps the old key) encrypts to the
    /// old certificate, and a cache may hand it out for `cache_ttl` more.
    pub previous: Option<(Bytes, Vec<Recipient>, Instant)>,
}

/// How long a server's previous RA certificates still route to it, beyond `cache_ttl`: time for
/// a device that read them to send its PKIOperation.
const PREVIOUS_RA_GRACE: Duration = Duration::from_secs(600);

struct Cached {
    answer: Arc<Answer>,
    stored: Instant,
}

/// One NDES server: its connection pool and stacks, its health, its admission and its cache.
pub struct Server {
    /// `host:port` of its URL: the metric label and the log's name for it.
    pub label: String,
    /// 1-based, the name the client is given: internal host names stay in the log.
    pub ordinal: usize,
    pub upstream: Upstream,
    probe: AtomicU8,
    /// Why the last probe failed, for /readyz.
    why_down: Mutex<String>,
    /// Set aside after connection failures, until then; cleared by a passing probe or answer.
    ejected: Mutex<Option<(Instant, Duration)>>,
    /// Whether `ejected` holds anything: read without the lock on every request.
    set_aside: AtomicBool,
    /// An RA certificate of this server has expired (with `scep.expired_ra = "fail"`): NDES
    /// answers every enrolment 500, so nothing is balanced to it.
    ra_expired: AtomicBool,
    /// `scep.expired_ra = "fail"`: an expired RA certificate takes the server out.
    expired_ra_fails: bool,
    /// How long the previous RA set still routes here.
    previous_grace: Duration,
    /// Requests on their way to it now: the load the balancer compares.
    load: AtomicUsize,
    pkioperations: Arc<Semaphore>,
    ra: RwLock<Arc<RaSet>>,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    ready_gauge: IntGauge,
    /// Per operation (as `OPERATIONS`), its duration and its count of 200 answers.
    answered: Vec<Answered>,
}

/// The operation labels whose series each server resolves at start.
const OPERATIONS: [&str; 5] = [
    "GetCACaps",
    "GetCACert",
    "GetNextCACert",
    "PKIOperation",
    "bare",
];

struct Answered {
    duration: Histogram,
    ok: IntCounter,
}

impl Server {
    /// Up to the balancer: not known down by the probe, not set aside, RA certificates valid.
    pub fn usable(&self) -> bool {
        self.probe.load(Ordering::Relaxed) != PROBE_DOWN
            && !self.ra_expired.load(Ordering::Relaxed)
            && !self.is_ejected()
    }

    fn is_ejected(&self) -> bool {
        if !self.set_aside.load(Ordering::Relaxed) {
            return false;
        }
        let ejected = self.ejected.lock().unwrap_or_else(|e| e.into_inner());
        matches!(*ejected, Some((until, _)) if Instant::now() < until)
    }

    /// Up by the probe, for /readyz.
    pub fn probed_up(&self) -> bool {
        self.probe.load(Ordering::Relaxed) == PROBE_UP && !self.ra_expired.load(Ordering::Relaxed)
    }

    pub fn why_down(&self) -> String {
        if self.ra_expired.load(Ordering::Relaxed) {
            return "its RA certificate expired".to_owned();
        }
        self.why_down.lock().map(|w| w.clone()).unwrap_or_default()
    }

    /// Records a probe's result; returns whether the server's state changed.
    pub fn set_probe(&self, up: bool, why: String) -> bool {
        if let Ok(mut w) = self.why_down.lock() {
            *w = why;
        }
        let new = if up { PROBE_UP } else { PROBE_DOWN };
        let old = self.probe.swap(new, Ordering::Relaxed);
        self.ready_gauge.set(i64::from(up));
        if up {
            self.restore();
        }
        old != new
    }

    pub fn set_ra_expired(&self, expired: bool) {
        self.ra_expired.store(expired, Ordering::Relaxed);
    }

    /// A connection to it failed: set it aside, longer each time in a row.
    fn eject(&self, why: &UpstreamError) {
        let mut ejected = self.ejected.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (backoff, was_out) = match *ejected {
            Some((until, last)) => ((last * 2).min(EJECT_MAX), now < until),
            None => (EJECT_FIRST, false),
        };
        *ejected = Some((now + backoff, backoff));
        self.set_aside.store(true, Ordering::Relaxed);
        // Once per setting aside: with every server down, each request's one try would
        // otherwise log again.
        if was_out {
            tracing::debug!(target: "ndes_gateway::upstream", server = %self.label, error = %why, "NDES server still set aside");
        } else {
            tracing::warn!(
                target: "ndes_gateway::upstream",
                server = %self.label,
                for_seconds = backoff.as_secs(),
                error = %why,
                "NDES server set aside: no connection"
            );
        }
    }

    /// It answered: whatever set it aside is over.
    fn restore(&self) {
        if !self.set_aside.load(Ordering::Relaxed) {
            return;
        }
        let mut ejected = self.ejected.lock().unwrap_or_else(|e| e.into_inner());
        self.set_aside.store(false, Ordering::Relaxed);
        if ejected.take().is_some() {
            tracing::info!(target: "ndes_gateway::upstream", server = %self.label, "NDES server answers again");
        }
    }

    pub fn ra_set(&self) -> Arc<RaSet> {
        self.ra.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes a GetCACert answer of this server as its RA set, unless it is the one known. The
    /// cache is emptied when the set changes: its GetCACert answers are the old ones. The set
    /// before stays routed to for a while; an answer equal to it (one that was on its way while
    /// the set changed) does not bring it back.
    pub fn learn_ra_set(&self, body: &Bytes) -> Result<bool, String> {
        let known = self.ra_set();
        let now = Instant::now();
        let fresh_previous = known.previous.as_ref().filter(|(_, _, until)| now < *until);
        if known.body == *body || fresh_previous.is_some_and(|(b, _, _)| b == body) {
            return Ok(false);
        }
        let certs = parse_ca_certs(body).map_err(|e| e.to_string())?;
        let mut watched = ca_and_ra(body)?;
        for w in &mut watched {
            w.server.clone_from(&self.label);
        }
        let expired = watched
            .iter()
            .any(|w| w.role == "ra" && w.not_after <= unix_now());
        let set = RaSet {
            body: body.clone(),
            names: certs.iter().flat_map(Recipient::names_of).collect(),
            watched,
            previous: (!known.body.is_empty()).then(|| {
                (
                    known.body.clone(),
                    known.names.clone(),
                    now + self.previous_grace,
                )
            }),
        };
        *self.ra.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // Renewed RA certificates count at once, not at the next look of the expiry watch.
        self.set_ra_expired(expired && self.expired_ra_fails);
        tracing::info!(target: "ndes_gateway::scep", server = %self.label, certificates = certs.len(), "RA set of the NDES server read");
        Ok(true)
    }

    /// Whether `recipient` names one of this server's RA (or CA) certificates, or one of those
    /// it handed out just before.
    fn holds(&self, recipient: &Recipient) -> bool {
        let set = self.ra_set();
        set.names.iter().any(|n| n == recipient)
            || set.previous.as_ref().is_some_and(|(_, names, until)| {
                Instant::now() < *until && names.iter().any(|n| n == recipient)
            })
    }

    /// No GetCACert answer read yet: PKIOperations cannot be routed to it.
    pub fn knows_no_ra_set(&self) -> bool {
        self.ra_set().body.is_empty()
    }

    fn cached(&self, key: &CacheKey, ttl: Duration) -> Option<Arc<Answer>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|c| c.stored.elapsed() < ttl)
            .map(|c| c.answer.clone())
    }

    /// Keeps `answer` under `key`: an operation on a path, so a handful of entries at most.
    fn keep(&self, key: CacheKey, answer: &Answer) {
        let answer = Arc::new(Answer {
            status: answer.status,
            headers: answer.headers.clone(),
            body: answer.body.clone(),
        });
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(
            key,
            Cached {
                answer,
                stored: Instant::now(),
            },
        );
    }
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the least loaded of the servers that are up.
    Balanced,
    /// To this server only (its index): it holds the RA key the PKIOperation is encrypted to.
    To(usize),
}

/// What a request is, for routing, admission, retries and the cache.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// The operation's metric label.
    pub operation: &'static str,
    /// GetCACaps, GetCACert, GetNextCACert, the bare path: may go twice, and elsewhere.
    pub idempotent: bool,
    /// Admitted through `max_pkioperations_per_server`.
    pub pkioperation: bool,
    /// GetCACaps or GetCACert: its answer may be kept.
    pub cacheable: bool,
}

/// A request answered, and by whom.
pub struct Delivered {
    pub answer: Answer,
    pub server: Arc<Server>,
    /// From the cache: NDES did not see it.
    pub cached: bool,
}

/// A request not answered: why, the server it was last meant for, and when to come back.
pub struct Undelivered {
    pub error: UpstreamError,
    pub server: Option<Arc<Server>>,
    /// Seconds, for a 503's Retry-After.
    pub retry_after: Option<u64>,
}

/// The request-target does not fit once mapped onto a server's path.
pub struct TooLong;

/// Per-server counters, resolved once.
struct ServerMetrics {
    pkioperation_queue_depth: IntGauge,
    shed_full: IntCounter,
    shed_timeout: IntCounter,
    cache_hit: [IntCounter; 2],
    cache_miss: [IntCounter; 2],
}

/// Every NDES server, and what is shared between them.
pub struct Cluster {
    pub servers: Vec<Arc<Server>>,
    queue_timeout: Duration,
    pkioperation_queue: usize,
    /// PKIOperations waiting for a slot, over all servers.
    waiting: AtomicUsize,
    cache_ttl: Duration,
    /// A 503's Retry-After: a probe will have looked again by then.
    retry_after: u64,
    /// What a request may spend on NDES, and what one try may take: another server is asked
    /// only while a whole try still fits.
    budget: Duration,
    one_try: Duration,
    metrics: Arc<Metrics>,
    m: ServerMetrics,
}

impl Cluster {
    /// `expired_ra_fails`: `scep.expired_ra = "fail"`. `budget`: what a request may spend on
    /// NDES (`limits.request_timeout` less `limits.body_timeout`), which bounds asking another
    /// server after a failure.
    pub fn new(
        targets: Vec<UpstreamTarget>,
        c: &UpstreamConfig,
        metrics: Arc<Metrics>,
        probe_interval: Duration,
        expired_ra_fails: bool,
        budget: Duration,
    ) -> Result<Cluster, ConfigError> {
        let servers = c.server_list();
        // GetCACaps and GetCACert never wait behind PKIOperations: these leave them a slot.
        let per_server = c
            .max_pkioperations_per_server
            .min(c.max_in_flight.saturating_sub(1).max(1));
        let servers = servers
            .iter()
            .zip(targets)
            .enumerate()
            .map(|(i, (s, target))| {
                let label = target.authority.to_string();
                let ready_gauge = metrics.upstream_ready.with_label_values(&[&label]);
                let answered = OPERATIONS
                    .iter()
                    .map(|op| Answered {
                        duration: metrics
                            .upstream_duration_seconds
                            .with_label_values(&[op, label.as_str()]),
                        ok: metrics.upstream_requests_total.with_label_values(&[
                            op,
                            label.as_str(),
                            "200",
                        ]),
                    })
                    .collect();
                Arc::new(Server {
                    ordinal: i + 1,
                    upstream: Upstream::new(target, &c.for_server(s))
                        .counting_retries(metrics.upstream_retries_total.clone()),
                    probe: AtomicU8::new(PROBE_UNKNOWN),
                    why_down: Mutex::new("not probed yet".to_owned()),
                    ejected: Mutex::new(None),
                    set_aside: AtomicBool::new(false),
                    ra_expired: AtomicBool::new(false),
                    expired_ra_fails,
                    previous_grace: c.cache_ttl + PREVIOUS_RA_GRACE,
                    load: AtomicUsize::new(0),
                    pkioperations: Arc::new(Semaphore::new(per_server)),
                    ra: RwLock::default(),
                    cache: Mutex::default(),
                    ready_gauge,
                    answered,
                    label,
                })
            })
            .collect();
        let cache = |result: &str| {
            ["GetCACaps", "GetCACert"].map(|operation| {
                metrics
                    .cache_requests_total
                    .with_label_values(&[operation, result])
            })
        };
        let shed = |reason| {
            metrics
                .pkioperations_shed_total
                .with_label_values(&[reason])
        };
        let m = ServerMetrics {
            pkioperation_queue_depth: metrics.pkioperation_queue_depth.clone(),
            shed_full: shed("queue_full"),
            shed_timeout: shed("queue_timeout"),
            cache_hit: cache("hit"),
            cache_miss: cache("miss"),
        };
        for result in ["matched", "unmatched", "unavailable"] {
            metrics.scep_routing_total.with_label_values(&[result]);
        }
        Ok(Cluster {
            servers,
            queue_timeout: c.queue_timeout,
            pkioperation_queue: c.pkioperation_queue,
            waiting: AtomicUsize::new(0),
            cache_ttl: c.cache_ttl,
            retry_after: probe_interval.as_secs().clamp(1, 60),
            budget,
            one_try: c.queue_timeout + c.connect_timeout + c.response_timeout,
            metrics,
            m,
        })
    }

    /// The targets of every server in `c`, checked.
    pub fn targets(c: &UpstreamConfig) -> Result<Vec<UpstreamTarget>, ConfigError> {
        let servers = c.server_list();
        let many = servers.len() > 1;
        let mut labels = Vec::new();
        servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let target = UpstreamTarget::from_config(&c.for_server(s)).map_err(|e| {
                    if many {
                        ConfigError(e.0.replacen("upstream.", &format!("upstream.server[{i}]."), 1))
                    } else {
                        e
                    }
                })?;
                let label = target.authority.to_string();
                if labels.contains(&label) {
                    return Err(ConfigError(format!(
                        "upstream.server[{i}]: {label} is already a server; each host:port once"
                    )));
                }
                labels.push(label);
                Ok(target)
            })
            .collect()
    }

    /// More than one server: routing by recipient means something.
    pub fn is_many(&self) -> bool {
        self.servers.len() > 1
    }

    /// Where a PKIOperation encrypted to `recipient` goes: the one server holding that
    /// certificate; balanced when none does or several do (RA certificates shared by all).
    pub fn route(&self, recipient: Option<&Recipient>) -> Route {
        let holders = recipient.map(|r| {
            let mut held = self.servers.iter().enumerate().filter(|(_, s)| s.holds(r));
            match (held.next(), held.next()) {
                (Some((i, _)), None) => Some(i),
                _ => None,
            }
        });
        match holders.flatten() {
            Some(i) => Route::To(i),
            None => {
                self.routed("unmatched");
                Route::Balanced
            }
        }
    }

    /// Whether `uri` fits every server's path (a request-target at the limit does not fit a
    /// longer upstream path).
    pub fn fits(&self, uri: &Uri, suffix: &str) -> Result<(), TooLong> {
        for s in &self.servers {
            if s.upstream.target.uri_reusing(uri, suffix).is_none() {
                return Err(TooLong);
            }
        }
        Ok(())
    }

    /// Two servers at random among `candidates`, the less loaded taken.
    fn pick(&self, candidates: &[usize]) -> Option<usize> {
        match candidates {
            [] => None,
            [only] => Some(*only),
            _ => {
                let n = candidates.len();
                let r = random();
                let a = (r % n as u64) as usize;
                let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                let (a, b) = (candidates[a], candidates[b]);
                let load = |i: usize| self.servers[i].load.load(Ordering::Relaxed);
                Some(if load(b) < load(a) { b } else { a })
            }
        }
    }

    /// Sends `req` (the client's path and query in its URI; no Host yet; `body` the same bytes
    /// as its body, for a copy) along `route`, and reads the whole answer. A request that
    /// reached no server is sent to another; an idempotent one also once more elsewhere after a
    /// 5xx or a timeout. A routed PKIOperation goes to its server or nowhere.
    pub async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
        body: &Bytes,
        suffix: &'static str,
        kind: Kind,
        route: Route,
    ) -> Result<Delivered, Undelivered> {
        if let Route::To(i) = route {
            let server = &self.servers[i];
            if !server.usable() {
                self.routed("unavailable");
                return Err(self.unavailable(server));
            }
            self.routed("matched");
            return match self.attempt(server, req, suffix, kind).await {
                Ok(d) => Ok(d),
                Err(e) if unsent(&e) && e.kind != UpstreamErrorKind::Busy => {
                    Err(self.unavailable(server))
                }
                Err(error) => Err(self.undelivered(error, server)),
            };
        }
        if let [only] = self.servers.as_slice() {
            // One server: nowhere else to go, nothing to choose.
            return self
                .attempt(only, req, suffix, kind)
                .await
                .map_err(|error| self.undelivered(error, only));
        }
        let started = Instant::now();
        let mut tried: Vec<usize> = Vec::with_capacity(self.servers.len());
        // What the last server said, given if no other is left to ask.
        let mut outcome: Option<Result<Delivered, Undelivered>> = None;
        let mut second_opinion = false;
        let mut req = Some(req);
        loop {
            let mut candidates: Vec<usize> = (0..self.servers.len())
                .filter(|i| !tried.contains(i) && self.servers[*i].usable())
                .collect();
            if candidates.is_empty() && tried.is_empty() {
                // None is known up: one try, at the server set aside the shortest, rather than
                // answer for them all, or try them all on every request while they are down.
                candidates.extend(self.least_set_aside());
            }
            let (Some(i), Some(r)) = (self.pick(&candidates), req.take()) else {
                return outcome.unwrap_or_else(|| Err(self.unavailable(&self.servers[0])));
            };
            tried.push(i);
            let server = &self.servers[i];
            // Another server only while a whole try there still fits in the request's deadline.
            let room = started.elapsed() + self.one_try <= self.budget;
            let this = if candidates.len() > 1 && room {
                let mut copy = copy_request(&r);
                *copy.body_mut() = Full::new(body.clone());
                req = Some(r);
                copy
            } else {
                r
            };
            let result = self.attempt(server, this, suffix, kind).await;
            let again = match &result {
                Ok(d) => kind.idempotent && d.answer.status >= 500 && !second_opinion,
                Err(e) if e.kind == UpstreamErrorKind::Timeout => {
                    kind.idempotent && !second_opinion
                }
                Err(e) => unsent(e),
            };
            if !again || req.is_none() {
                return result.map_err(|error| self.undelivered(error, server));
            }
            match &result {
                Ok(d) => {
                    second_opinion = true;
                    tracing::info!(target: "ndes_gateway::upstream", server = %server.label, status = d.answer.status, operation = kind.operation, "answered with an error: asking another NDES server");
                }
                Err(e) => {
                    second_opinion |= e.kind == UpstreamErrorKind::Timeout;
                    tracing::info!(target: "ndes_gateway::upstream", server = %server.label, error = %e, operation = kind.operation, "not answered: asking another NDES server");
                }
            }
            outcome = Some(result.map_err(|error| self.undelivered(error, server)));
        }
    }

    /// The server whose probe or ejection may end first: not known down by its probe if one
    /// is, then the one set aside until the soonest.
    fn least_set_aside(&self) -> Option<usize> {
        (0..self.servers.len()).min_by_key(|&i| {
            let s = &self.servers[i];
            let until = s
                .ejected
                .lock()
                .map(|e| e.map(|(until, _)| until))
                .ok()
                .flatten();
            (s.probe.load(Ordering::Relaxed) == PROBE_DOWN, until)
        })
    }

    fn routed(&self, result: &str) {
        self.metrics
            .scep_routing_total
            .with_label_values(&[result])
            .inc();
    }

    fn undelivered(&self, error: UpstreamError, server: &Arc<Server>) -> Undelivered {
        Undelivered {
            retry_after: unsent(&error).then_some(self.retry_after),
            error,
            server: Some(server.clone()),
        }
    }

    fn unavailable(&self, server: &Arc<Server>) -> Undelivered {
        self.count_error(UpstreamErrorKind::Unavailable, server);
        Undelivered {
            error: UpstreamError {
                kind: UpstreamErrorKind::Unavailable,
                message: format!(
                    "NDES server {} ({}), which holds the RA key this request is encrypted to, is not ready: {}",
                    server.ordinal,
                    server.label,
                    server.why_down()
                ),
            },
            server: Some(server.clone()),
            retry_after: Some(self.retry_after),
        }
    }

    /// One server, one try (its own stack may send it twice on a new connection).
    async fn attempt(
        &self,
        server: &Arc<Server>,
        mut req: http::Request<Full<Bytes>>,
        suffix: &'static str,
        kind: Kind,
    ) -> Result<Delivered, UpstreamError> {
        let target = &server.upstream.target;
        let cache_key =
            (kind.cacheable && !self.cache_ttl.is_zero()).then_some((suffix, kind.operation));
        if let Some(key) = &cache_key {
            let which = usize::from(kind.operation == "GetCACert");
            if let Some(answer) = server.cached(key, self.cache_ttl) {
                self.m.cache_hit[which].inc();
                return Ok(Delivered {
                    answer: Answer {
                        status: answer.status,
                        headers: answer.headers.clone(),
                        body: answer.body.clone(),
                    },
                    server: server.clone(),
                    cached: true,
                });
            }
            self.m.cache_miss[which].inc();
        }
        let uri = target
            .uri_reusing(req.uri(), suffix)
            .ok_or_else(|| super::protocol("the URL does not fit".to_owned()))?;
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert(http::header::HOST, target.host_header.clone());
        let result = match self.admitted(server, kind).await {
            Ok(_permit) => {
                let _load = Load::on(&server.load);
                let started = Instant::now();
                let result = server.upstream.send(req, kind.idempotent).await;
                if let Ok(answer) = &result {
                    server.restore();
                    self.count_answer(server, kind.operation, answer.status, started);
                }
                result
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.count_error(e.kind, server);
            // With one server there is nowhere else to send it: nothing to set aside.
            if unsent(e) && e.kind != UpstreamErrorKind::Busy && self.is_many() {
                server.eject(e);
            }
        }
        let answer = result?;
        if answer.status == 200 {
            if kind.operation == "GetCACert" {
                if let Err(e) = server.learn_ra_set(&answer.body) {
                    tracing::warn!(target: "ndes_gateway::scep", server = %server.label, error = %e, "GetCACert answer from NDES not readable");
                }
            }
            if let Some(key) = cache_key {
                server.keep(key, &answer);
            }
        }
        Ok(Delivered {
            answer,
            server: server.clone(),
            cached: false,
        })
    }

    fn count_error(&self, kind: UpstreamErrorKind, server: &Server) {
        self.metrics
            .upstream_errors_total
            .with_label_values(&[kind.label(), &server.label])
            .inc();
    }

    /// A PKIOperation's slot on `server`, held until its answer is in; nothing for the others.
    async fn admitted(
        &self,
        server: &Server,
        kind: Kind,
    ) -> Result<Option<OwnedSemaphorePermit>, UpstreamError> {
        if kind.pkioperation {
            self.admit(server).await.map(Some)
        } else {
            Ok(None)
        }
    }

    /// The answer's duration and status in the server's series: those of a 200 resolved once,
    /// since a label lookup hashes every label.
    fn count_answer(&self, server: &Server, operation: &str, status: u16, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        let known = OPERATIONS.iter().position(|o| *o == operation);
        match known.map(|i| &server.answered[i]) {
            Some(a) => a.duration.observe(seconds),
            None => self
                .metrics
                .upstream_duration_seconds
                .with_label_values(&[operation, &server.label])
                .observe(seconds),
        }
        match known.map(|i| &server.answered[i]) {
            Some(a) if status == 200 => a.ok.inc(),
            _ => {
                let status = http::StatusCode::from_u16(status);
                let status = status.as_ref().map_or("other", |s| s.as_str());
                self.metrics
                    .upstream_requests_total
                    .with_label_values(&[operation, &server.label, status])
                    .inc();
            }
        }
    }

    /// A slot for a PKIOperation on `server`: at once if one is free, else after a wait in the
    /// bounded queue; a full queue or a wait past `queue_timeout` is a 503.
    async fn admit(&self, server: &Server) -> Result<OwnedSemaphorePermit, UpstreamError> {
        if let Ok(permit) = server.pkioperations.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let busy = |message: String| UpstreamError {
            kind: UpstreamErrorKind::Busy,
            message,
        };
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        self.m.pkioperation_queue_depth.inc();
        let _waiting = Waiting(&self.waiting, &self.m.pkioperation_queue_depth);
        if waiting > self.pkioperation_queue {
            self.m.shed_full.inc();
            return Err(busy(format!(
                "{} PKIOperations already wait (upstream.pkioperation_queue)",
                self.pkioperation_queue
            )));
        }
        match tokio::time::timeout(
            self.queue_timeout,
            server.pkioperations.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                self.m.shed_timeout.inc();
                Err(busy(format!(
                    "no PKIOperation slot on {} within upstream.queue_timeout (upstream.max_pkioperations_per_server)",
                    server.label
                )))
            }
        }
    }

    /// Retry-After for a 503.
    pub fn retry_after(&self) -> u64 {
        self.retry_after
    }

    /// The trust settings of `c` (a config read again) for every server.
    pub fn reload_trust(&self, c: &UpstreamConfig) -> Result<(), ConfigError> {
        let list = c.server_list();
        for (server, s) in self.servers.iter().zip(&list) {
            server.upstream.reload_trust(&c.for_server(s))?;
        }
        Ok(())
    }

    /// Whether at least one server is up by its probe; and those that are not, with why.
    pub fn readiness(&self) -> (bool, Vec<String>) {
        let mut down = Vec::new();
        for s in &self.servers {
            if !s.probed_up() {
                down.push(format!("{} ({})", s.label, s.why_down()));
            }
        }
        (down.len() < self.servers.len(), down)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts a request on its way to a server while it lives.
struct Load<'a>(&'a AtomicUsize);

impl<'a> Load<'a> {
    fn on(load: &'a AtomicUsize) -> Load<'a> {
        load.fetch_add(1, Ordering::Relaxed);
        Load(load)
    }
}

impl Drop for Load<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place in the PKIOperation queue, left when dropped (answered, refused or cancelled).
struct Waiting<'a>(&'a AtomicUsize, &'a IntGauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.dec();
    }
}

/// Nothing of the request reached the server: it may go to another.
fn unsent(e: &UpstreamError) -> bool {
    matches!(
        e.kind,
        UpstreamErrorKind::Connect
            | UpstreamErrorKind::TlsChain
            | UpstreamErrorKind::TlsName
            | UpstreamErrorKind::PinMismatch
            | UpstreamErrorKind::Busy
    )
}

/// The client's path and query, which one server answers alike for the TTL.
/// What one server answers alike for the TTL: the operation on its path. NDES publishes one CA
/// and answers GetCACaps and GetCACert whatever their `message` says, so the message is left
/// out: a client varying it can neither fill the cache nor get past it.
type CacheKey = (&'static str, &'static str);

/// A cheap random number for the balancer's two picks: xorshift, per thread, seeded from the
/// standard library's random hasher keys.
fn random() -> u64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x9e37_79b9_7f4a_7c15);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}
