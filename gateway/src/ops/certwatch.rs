//! Certificate expiry watch: the listener's certificate, the certificate NDES presents, and the
//! CA and RA certificates NDES hands out in GetCACert. An expired RA certificate is the classic
//! silent NDES outage (NDES answers 500 to every enrolment): readiness reports it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::Decode;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use x509_cert::Certificate;

use crate::config::ExpiredRa;
use crate::metrics::Metrics;
use crate::ops::admin::Readiness;
use crate::scep::{is_ca, not_after_unix, parse_ca_certs};
use crate::tls::ListenerCertificate;
use crate::upstream::Upstream;

/// GetCACert answers are a few KB; anything past this is not one.
const MAX_CA_CERT_BYTES: usize = 256 * 1024;

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A certificate with the role it plays for the service.
#[derive(Debug, Clone)]
pub struct Watched {
    pub role: &'static str,
    pub subject: String,
    pub not_after: u64,
}

impl Watched {
    pub fn of(role: &'static str, cert: &Certificate) -> Watched {
        Watched {
            role,
            subject: cert.tbs_certificate.subject.to_string(),
            not_after: not_after_unix(cert),
        }
    }

    pub fn from_der(role: &'static str, der: &[u8]) -> Option<Watched> {
        Certificate::from_der(der)
            .ok()
            .map(|c| Watched::of(role, &c))
    }
}

/// The CA and RA certificates of a GetCACert answer, each with its role.
pub fn ca_and_ra(body: &[u8]) -> Result<Vec<Watched>, String> {
    let certs = parse_ca_certs(body).map_err(|e| e.to_string())?;
    let single = certs.len() == 1;
    Ok(certs
        .iter()
        .map(|c| Watched::of(if single || is_ca(c) { "ca" } else { "ra" }, c))
        .collect())
}

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
                .with_label_values(&[w.role, &w.subject])
                .set(i64::try_from(w.not_after).unwrap_or(i64::MAX));
        }
    }
}

pub struct CertWatch {
    pub upstream: Arc<Upstream>,
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
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.expiry.recheck.notified() => {}
            }
            self.check().await;
        }
    }

    async fn check(&self) {
        self.expiry.set_listener(&self.listener);
        let mut watched = Vec::new();
        match self
            .upstream
            .get_all(
                "",
                Some("operation=GetCACert&message=ndes-gateway"),
                MAX_CA_CERT_BYTES,
            )
            .await
        {
            Ok(a) if a.status == 200 => match ca_and_ra(&a.body) {
                Ok(certs) => watched.extend(certs),
                Err(e) => {
                    tracing::warn!(target: "ndes_gateway::scep", error = %e, "GetCACert answer from NDES not readable")
                }
            },
            Ok(a) => {
                tracing::warn!(target: "ndes_gateway::scep", status = a.status, "NDES answered GetCACert with an error")
            }
            Err(e) => {
                tracing::debug!(target: "ndes_gateway::scep", error = %e, "GetCACert not fetched")
            }
        }
        let leaf = self
            .upstream
            .target
            .seen_leaf
            .lock()
            .ok()
            .and_then(|l| l.clone());
        if let Some(w) = leaf.and_then(|der| Watched::from_der("upstream_tls", &der)) {
            watched.push(w);
        }
        let now = now_unix();
        let expired: Vec<String> = watched
            .iter()
            .filter(|w| w.role == "ra" && w.not_after <= now)
            .map(|w| w.subject.clone())
            .collect();
        let problem = (!expired.is_empty()).then(|| {
            format!(
                "NDES's RA certificate expired ({}): renew the CEP Encryption and Exchange Enrollment Agent certificates on the NDES server",
                expired.join("; ")
            )
        });
        if let Some(p) = &problem {
            tracing::warn!(target: "ndes_gateway::scep", problem = %p, "RA certificate expired");
        }
        self.readiness
            .set_ra_problem(if self.expired_ra == ExpiredRa::Fail {
                problem
            } else {
                None
            });
        self.expiry.set_upstream(watched);
    }
}
