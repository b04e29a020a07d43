//! Prometheus metrics that speak SCEP: by operation, by refusal reason, by upstream failure kind.
//! One registry per gateway, so two gateways in one process (the demo, the tests) count apart.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// From a cached GetCACaps (milliseconds) to a PKIOperation that waited on Intune's challenge
/// check and the CA (tens of seconds) up to the 120 s response timeout.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0,
];
/// Where SCEP clients and proxies break: 2 KiB (IIS maxQueryString default), 4 KiB (maxUrl
/// default), ~5.1 KB (WAP without its hotfix), 8 and 16 KiB (nginx and http.sys defaults), 40 KB
/// (Intune's stated need), 65534 (the configured maximum).
const TARGET_BYTES_BUCKETS: &[f64] = &[
    256.0, 1024.0, 2048.0, 4096.0, 5120.0, 8192.0, 16384.0, 32768.0, 40960.0, 49152.0, 65534.0,
];

/// Refusals that happen before a request reaches the filter, beside the filter's own reasons.
pub const REASON_RATE_LIMITED: &str = "rate_limited";
pub const REASON_MALFORMED: &str = "malformed";
pub const REASON_HEADER_TIMEOUT: &str = "header_timeout";

pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub upstream_duration_seconds: HistogramVec,
    pub rejected_total: IntCounterVec,
    pub upstream_errors_total: IntCounterVec,
    pub connections_active: IntGauge,
    pub connections_parked: IntGauge,
    pub connections_total: IntCounter,
    pub connections_refused_total: IntCounterVec,
    pub tls_handshake_failures_total: IntCounter,
    pub request_target_bytes: Histogram,
    pub upstream_ready: IntGaugeVec,
    pub upstream_requests_total: IntCounterVec,
    pub cache_requests_total: IntCounterVec,
    pub pkioperation_queue_depth: IntGauge,
    pub pkioperations_shed_total: IntCounterVec,
    pub scep_routing_total: IntCounterVec,
    pub scep_messages_total: IntCounterVec,
    pub scep_parse_errors_total: IntCounterVec,
    pub certificate_expiry_timestamp_seconds: IntGaugeVec,
    pub reloads_total: IntCounterVec,
    pub upstream_retries_total: IntCounterVec,
    pub connections_aborted_total: IntCounter,
    pub acme_orders_total: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        Self::build().expect("metric definitions are static and valid")
    }

    fn build() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("ndes_gateway".to_owned()), None)?;
        let requests_total = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by SCEP operation, method and status.",
            ),
            &["operation", "method", "status"],
        )?;
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from request head to response head, by SCEP operation.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["operation"],
        )?;
        let upstream_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "upstream_duration_seconds",
                "Time NDES took to answer, by SCEP operation and NDES server.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["operation", "server"],
        )?;
        let rejected_total = IntCounterVec::new(
            Opts::new(
                "rejected_total",
                "Requests answered by the gateway itself and never forwarded, by reason.",
            ),
            &["reason"],
        )?;
        let upstream_errors_total = IntCounterVec::new(
            Opts::new(
                "upstream_errors_total",
                "Requests an NDES server could not answer, by kind of failure and server (a request that went on to another server counts at each).",
            ),
            &["kind", "server"],
        )?;
        let connections_active =
            IntGauge::new("connections_active", "Client connections open now.")?;
        let connections_parked = IntGauge::new(
            "connections_parked",
            "Open HTTP/1.1 connections idle between requests with their HTTP state released.",
        )?;
        let connections_total =
            IntCounter::new("connections_total", "Client connections accepted.")?;
        let connections_refused_total = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "Client connections closed at accept, by reason.",
            ),
            &["reason"],
        )?;
        let tls_handshake_failures_total = IntCounter::new(
            "tls_handshake_failures_total",
            "Client TLS handshakes that failed or timed out.",
        )?;
        let request_target_bytes = Histogram::with_opts(
            HistogramOpts::new(
                "request_target_bytes",
                "Length of the request-target (path and query) clients send.",
            )
            .buckets(TARGET_BYTES_BUCKETS.to_vec()),
        )?;
        let upstream_ready = IntGaugeVec::new(
            Opts::new(
                "upstream_ready",
                "1 when the NDES server answered the last GetCACaps probe with 200, by server.",
            ),
            &["server"],
        )?;
        let upstream_requests_total = IntCounterVec::new(
            Opts::new(
                "upstream_requests_total",
                "Requests answered by an NDES server, by SCEP operation, server and status.",
            ),
            &["operation", "server", "status"],
        )?;
        let cache_requests_total = IntCounterVec::new(
            Opts::new(
                "cache_requests_total",
                "GetCACaps and GetCACert answers looked up in the cache (upstream.cache_ttl), by operation and result (hit, miss).",
            ),
            &["operation", "result"],
        )?;
        let pkioperation_queue_depth = IntGauge::new(
            "pkioperation_queue_depth",
            "PKIOperations waiting for a slot (upstream.max_pkioperations_per_server) now.",
        )?;
        let pkioperations_shed_total = IntCounterVec::new(
            Opts::new(
                "pkioperations_shed_total",
                "PKIOperations answered 503 without reaching NDES, by reason: queue_full (upstream.pkioperation_queue), queue_timeout (no slot within upstream.queue_timeout).",
            ),
            &["reason"],
        )?;
        let scep_routing_total = IntCounterVec::new(
            Opts::new(
                "scep_routing_total",
                "PKIOperations routed by their recipient with several NDES servers: matched (sent to the server holding the RA certificate), unmatched (no single server holds it: balanced), unavailable (that server is down: 503).",
            ),
            &["result"],
        )?;
        let scep_messages_total = IntCounterVec::new(
            Opts::new(
                "scep_messages_total",
                "PKIOperations, by the request's messageType and the CertRep's pkiStatus and failInfo.",
            ),
            &["message_type", "pki_status", "fail_info"],
        )?;
        let scep_parse_errors_total = IntCounterVec::new(
            Opts::new(
                "scep_parse_errors_total",
                "SCEP messages that could not be read, by direction.",
            ),
            &["direction"],
        )?;
        let certificate_expiry_timestamp_seconds = IntGaugeVec::new(
            Opts::new(
                "certificate_expiry_timestamp_seconds",
                "notAfter of the certificates the service depends on, by role (ca, ra, listener, upstream_tls), NDES server (empty for the listener's) and subject.",
            ),
            &["role", "server", "subject"],
        )?;
        let reloads_total = IntCounterVec::new(
            Opts::new(
                "reloads_total",
                "Certificate reloads, by what was reloaded and the result.",
            ),
            &["target", "result"],
        )?;
        let upstream_retries_total = IntCounterVec::new(
            Opts::new(
                "upstream_retries_total",
                "Requests sent to NDES a second time on a new connection, by reason: unsent (the pooled connection closed before any of the request was written), no_answer (GetCACaps or GetCACert on a reused connection that closed before any byte of an answer).",
            ),
            &["reason"],
        )?;
        let connections_aborted_total = IntCounter::new(
            "connections_aborted_total",
            "Client connections still open at the end of the drain (listen.drain_timeout), dropped.",
        )?;
        let acme_orders_total = IntCounterVec::new(
            Opts::new(
                "acme_orders_total",
                "Certificate orders to the ACME CA ([listen.acme]), by result: ok, error, rate_limited.",
            ),
            &["result"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "The running version."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(request_duration_seconds.clone()))?;
        registry.register(Box::new(upstream_duration_seconds.clone()))?;
        registry.register(Box::new(rejected_total.clone()))?;
        registry.register(Box::new(upstream_errors_total.clone()))?;
        registry.register(Box::new(connections_active.clone()))?;
        registry.register(Box::new(connections_parked.clone()))?;
        registry.register(Box::new(connections_total.clone()))?;
        registry.register(Box::new(connections_refused_total.clone()))?;
        registry.register(Box::new(tls_handshake_failures_total.clone()))?;
        registry.register(Box::new(request_target_bytes.clone()))?;
        registry.register(Box::new(upstream_ready.clone()))?;
        registry.register(Box::new(upstream_requests_total.clone()))?;
        registry.register(Box::new(cache_requests_total.clone()))?;
        registry.register(Box::new(pkioperation_queue_depth.clone()))?;
        registry.register(Box::new(pkioperations_shed_total.clone()))?;
        registry.register(Box::new(scep_routing_total.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(scep_messages_total.clone()))?;
        registry.register(Box::new(scep_parse_errors_total.clone()))?;
        registry.register(Box::new(certificate_expiry_timestamp_seconds.clone()))?;
        registry.register(Box::new(reloads_total.clone()))?;
        registry.register(Box::new(upstream_retries_total.clone()))?;
        registry.register(Box::new(connections_aborted_total.clone()))?;
        registry.register(Box::new(acme_orders_total.clone()))?;
        for target in ["config", "listener", "upstream_trust"] {
            for result in ["ok", "error"] {
                reloads_total.with_label_values(&[target, result]);
            }
        }
        for direction in ["request", "response"] {
            scep_parse_errors_total.with_label_values(&[direction]);
        }

        // Every reason and kind exists from the start at 0, so an alert on a rate sees its first
        // increase rather than a series appearing.
        for reason in [REASON_RATE_LIMITED, REASON_MALFORMED, REASON_HEADER_TIMEOUT] {
            rejected_total.with_label_values(&[reason]);
        }
        for reason in [
            "max_connections",
            "max_connections_per_client",
            "proxy_protocol",
        ] {
            connections_refused_total.with_label_values(&[reason]);
        }
        Ok(Metrics {
            registry,
            requests_total,
            request_duration_seconds,
            upstream_duration_seconds,
            rejected_total,
            upstream_errors_total,
            connections_active,
            connections_parked,
            connections_total,
            connections_refused_total,
            tls_handshake_failures_total,
            request_target_bytes,
            upstream_ready,
            upstream_requests_total,
            cache_requests_total,
            pkioperation_queue_depth,
            pkioperations_shed_total,
            scep_routing_total,
            scep_messages_total,
            scep_parse_errors_total,
            certificate_expiry_timestamp_seconds,
            reloads_total,
            upstream_retries_total,
            connections_aborted_total,
            acme_orders_total,
        })
    }

    /// Makes each label the stages can give exist at 0 from the start, so an alert on a rate sees
    /// its first increase rather than a series appearing. The stages that decide the labels name
    /// them; this module knows none of them.
    pub fn start_at_zero<'a>(
        &self,
        rejected: impl IntoIterator<Item = &'a str>,
        upstream_errors: &[&'a str],
        servers: &[&'a str],
        retries: impl IntoIterator<Item = &'a str>,
    ) {
        for reason in rejected {
            self.rejected_total.with_label_values(&[reason]);
        }
        for server in servers {
            for kind in upstream_errors {
                self.upstream_errors_total
                    .with_label_values(&[kind, server]);
            }
            self.upstream_ready.with_label_values(&[server]);
        }
        for reason in ["queue_full", "queue_timeout"] {
            self.pkioperations_shed_total.with_label_values(&[reason]);
        }
        for reason in retries {
            self.upstream_retries_total.with_label_values(&[reason]);
        }
    }

    pub fn reject(&self, reason: &str) {
        self.rejected_total.with_label_values(&[reason]).inc();
    }

    /// The text exposition format, as /metrics serves it.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a failure would be a malformed metric family,
        // which the static definitions above exclude.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
