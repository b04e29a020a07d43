//! Certificate expiry watch: the listener's certificate, the certificate NDES presents, and the
//! CA and RA certificates NDES hands out in GetCACert. An expired RA certificate is the classic
//! silent NDES outage (NDES answers 500 to every enrolment): readiness reports it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::Decode;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use x509_cert::Certificate;

use crate::admin::Readiness;
use crate::config::ExpiredRa;
use crate::metrics::Metrics;
use crate::scep::{is_ca, not_after_unix, parse_ca_certs};
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

pub struct CertWatch {
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub listener: Vec<CertificateDer<'static>>,
    pub interval: Duration,
    pub expired_ra: ExpiredRa,
}

impl CertWatch {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.check().await,
            }
        }
    }

    async fn check(&self) {
        let mut watched: Vec<Watched> = self
            .listener
            .first()
            .and_then(|c| Watched::from_der("listener", c))
            .into_iter()
            .collect();
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
        let gauge = &self.metrics.certificate_expiry_timestamp_seconds;
        gauge.reset();
        for w in &watched {
            gauge
                .with_label_values(&[w.role, &w.subject])
                .set(i64::try_from(w.not_after).unwrap_or(i64::MAX));
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
    }
}
