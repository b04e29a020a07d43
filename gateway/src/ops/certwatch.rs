//! Certificate expiry watch: the listener's certificate, the certificate NDES presents, and the
//! CA and RA certificates NDES hands out in GetCACert. An expired RA certificate is the classic
//! silent NDES outage (NDES answers 500 to every enrolment): readiness reports it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::ExpiredRa;
use crate::metrics::Metrics;
use crate::ops::admin::Readiness;
use crate::tls::ListenerCertificate;
use crate::upstream::cluster::{Cluster, Server};

/// How soon a server whose RA set is not known yet is asked for it again.
const UNKNOWN_RA_RETRY: Duration = Duration::from_secs(10);

/// GetCACert answers are a few KB; anything past this is not one.
const MAX_CA_CERT_BYTES: usize = 256 * 1024;

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub use crate::scep::{ca_and_ra, Watched};

/// The certificates `certificate_expiry_timestamp_seconds` shows: the listener's, in force now,
/// and those NDES presented and handed out at the last look. Each part is replaced whole, and
/// the gauge rewritten from both, so a certificate rotated out leaves no series behind.
pub struct Expiry {
    metrics: Arc<Metrics>,
    parts: Mutex<(Vec<Watched>, Vec<Watched>)>,
    /// Asks the watch for a look now rather than at its next tick (after a reload).
    pub recheck: Notify,
}

impl Expiry {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Expiry> {
        Arc::new(Expiry {
            metrics,
            parts: Mutex::new((Vec::new(), Vec::new())),
            recheck: Notify::new(),
        })
    }

    /// The listener's certificate, as the TLS acceptor serves it now.
    pub fn set_listener(&self, certificate: &ListenerCertificate) {
        let listener = certificate
            .current()
            .and_then(|key| {
                key.cert
                    .first()
                    .and_then(|c| Watched::from_der("listener", c))
            })
            .into_iter()
            .collect();
        self.update(|parts| parts.0 = listener);
    }

    pub fn set_upstream(&self, upstream: Vec<Watched>) {
        self.update(|parts| parts.1 = upstream);
    }

    fn update(&self, change: impl FnOnce(&mut (Vec<Watched>, Vec<Watched>))) {
        // A poisoned lock only means a panic elsewhere mid-update; the lists are whole.
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut parts);
        let gauge = &self.metrics.certificate_expiry_timestamp_seconds;
        gauge.reset();
        for w in parts.0.iter().chain(parts.1.iter()) {
            gauge
                .with_label_values(&[w.role, &w.server, &w.subject])
                .set(i64::try_from(w.not_after).unwrap_or(i64::MAX));
        }
    }
}

pub struct CertWatch {
    pub cluster: Arc<Cluster>,
    pub readiness: Arc<Readiness>,
    pub listener: Arc<ListenerCertificate>,
    pub expiry: Arc<Expiry>,
    pub interval: Duration,
    pub expired_ra: ExpiredRa,
}

impl CertWatch {
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unknown = false;
        loop {
            // A server whose RA set is not known yet (down at start, say) cannot be routed to:
            // it is asked again soon rather than at the next interval.
            let soon = async {
                if unknown {
                    tokio::time::sleep(UNKNOWN_RA_RETRY).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = soon => {}
                _ = self.expiry.recheck.notified() => {}
            }
            self.check().await;
            unknown = self.cluster.servers.iter().any(|s| s.knows_no_ra_set());
        }
    }

    /// Every server's GetCACert (its RA set, for routing too) and TLS certificate, at once.
    async fn check(&self) {
        self.expiry.set_listener(&self.listener);
        let mut looks = tokio::task::JoinSet::new();
        for server in &self.cluster.servers {
            let server = server.clone();
            looks.spawn(async move {
                let watched = look(&server).await;
                (server, watched)
            });
        }
        let mut watched = Vec::new();
        let mut problems = Vec::new();
        let now = now_unix();
        while let Some(Ok((server, certs))) = looks.join_next().await {
            let expired: Vec<String> = certs
                .iter()
                .filter(|w| w.role == "ra" && w.not_after <= now)
                .map(|w| w.subject.clone())
                .collect();
            if !expired.is_empty() {
                let problem = format!(
                    "NDES's RA certificate expired on {} ({}): renew the CEP Encryption and Exchange Enrollment Agent certificates on that NDES server",
                    server.label,
                    expired.join("; ")
                );
                tracing::warn!(target: "ndes_gateway::scep", server = %server.label, problem = %problem, "RA certificate expired");
                problems.push(problem);
            }
            server.set_ra_expired(!expired.is_empty() && self.expired_ra == ExpiredRa::Fail);
            watched.extend(certs);
        }
        // Not ready when no server is left whose RA certificates are valid.
        let all_expired = problems.len() == self.cluster.servers.len();
        self.readiness.set_ra_problem(
            (all_expired && self.expired_ra == ExpiredRa::Fail).then(|| problems.join("; ")),
        );
        self.expiry.set_upstream(watched);
    }
}

/// One server's certificates: the CA and RA set of its GetCACert answer, learnt for routing, and
/// the TLS certificate it presented last.
async fn look(server: &Server) -> Vec<Watched> {
    let mut watched = Vec::new();
    match server
        .upstream
        .get_all(
            "",
            Some("operation=GetCACert&message=ndes-gateway"),
            MAX_CA_CERT_BYTES,
        )
        .await
    {
        Ok(a) if a.status == 200 => match server.learn_ra_set(&a.body) {
            Ok(_) => watched.extend(server.ra_set().watched.iter().cloned()),
            Err(e) => {
                tracing::warn!(target: "ndes_gateway::scep", server = %server.label, error = %e, "GetCACert answer from NDES not readable")
            }
        },
        Ok(a) => {
            tracing::warn!(target: "ndes_gateway::scep", server = %server.label, status = a.status, "NDES answered GetCACert with an error")
        }
        Err(e) => {
            tracing::debug!(target: "ndes_gateway::scep", server = %server.label, error = %e, "GetCACert not fetched");
            // Not reached now: what it handed out last still stands.
            watched.extend(server.ra_set().watched.iter().cloned());
        }
    }
    let leaf = server
        .upstream
        .target
        .seen_leaf
        .lock()
        .ok()
        .and_then(|l| l.clone());
    if let Some(mut w) = leaf.and_then(|der| Watched::from_der("upstream_tls", &der)) {
        w.server.clone_from(&server.label);
        watched.push(w);
    }
    watched
}
