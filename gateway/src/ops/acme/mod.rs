//! The public certificate by ACME (`[listen.acme]`): obtained at start when none is stored,
//! renewed at two thirds of its life, swapped in like a reload, failures retried with backoff.

mod ari;
pub mod challenge;
pub mod http;
mod order;
pub mod state;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use instant_acme::{Account, Error, ExternalAccountKey, NewAccount};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::{AcmeChallenge, AcmeConfig, ConfigError};
use crate::metrics::Metrics;
use crate::ops::certwatch::Expiry;
use crate::tls::ListenerCertificate;

use self::challenge::Http01Answers;
use self::http::AcmeHttp;
use self::state::{StateDir, Status};

/// Renewal starts at this fraction of the lifetime (Let's Encrypt's and certbot's advice:
/// a 90-day certificate renewed with 30 days left, time for many retries).
const RENEW_AT: f64 = 2.0 / 3.0;
/// Renewals are spread over up to this fraction of the lifetime before the renewal point, so
/// replicas and fleets do not all order at the same instant.
const JITTER: f64 = 1.0 / 15.0;
/// With no certificate there is nothing to scale a retry by: start here.
const FIRST_RETRY_WITHOUT_CERTIFICATE: Duration = Duration::from_secs(10);
/// The longest wait between two tries; a CA that asks for more (Retry-After) gets what it asks
/// up to [`MAX_ASKED_WAIT`].
const MAX_RETRY: Duration = Duration::from_secs(6 * 3600);
const MAX_ASKED_WAIT: Duration = Duration::from_secs(24 * 3600);

const RATE_LIMITED: &str = "urn:ietf:params:acme:error:rateLimited";
const ACCOUNT_DOES_NOT_EXIST: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

/// What `[listen.acme]` needs loaded, checked once, as `check` and the start do.
pub struct AcmeSetup {
    pub config: AcmeConfig,
    pub state: StateDir,
    http: AcmeHttp,
    /// The external account binding: key id and the decoded HMAC key (never logged).
    eab: Option<(String, Vec<u8>)>,
    /// The certificate found in `state_dir`, served at once.
    pub stored: Option<Arc<CertifiedKey>>,
}

impl AcmeSetup {
    pub fn load(config: &AcmeConfig) -> Result<AcmeSetup, ConfigError> {
        let http = AcmeHttp::new(config.ca.as_deref())?;
        let eab = match (&config.eab_kid, &config.eab_hmac_key_file) {
            (Some(kid), Some(file)) => Some((kid.clone(), eab_key(file)?)),
            _ => None,
        };
        let state = StateDir::new(&config.state_dir);
        let stored = state.certificate()?;
        Ok(AcmeSetup {
            config: config.clone(),
            state,
            http,
            eab,
            stored,
        })
    }
}

/// The HMAC key as CAs hand it out: base64url, padded or not, on one line.
fn eab_key(file: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigError(format!(
            "listen.acme.eab_hmac_key_file: {}: {e}",
            file.display()
        ))
    })?;
    let trimmed = text.trim().trim_end_matches('=');
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .map_err(|_| {
            // The content is a secret: the message says what is wrong, never what is there.
            ConfigError(format!(
                "listen.acme.eab_hmac_key_file: {}: not a base64url key as the CA gives it",
                file.display()
            ))
        })?;
    if key.is_empty() {
        return Err(ConfigError(format!(
            "listen.acme.eab_hmac_key_file: {}: empty",
            file.display()
        )));
    }
    Ok(key)
}

/// The renewal loop of a running gateway.
pub struct Acme {
    pub setup: AcmeSetup,
    pub listener: Arc<ListenerCertificate>,
    pub http01: Arc<Http01Answers>,
    pub metrics: Arc<Metrics>,
    pub expiry: Arc<Expiry>,
}

/// Results of `acme_orders_total`.
pub const RESULTS: [&str; 3] = ["ok", "error", "rate_limited"];

impl Acme {
    pub async fn run(self, stop: CancellationToken) {
        let mut account: Option<Account> = None;
        let mut failures: u32 = 0;
        let mut retry_at: Option<SystemTime> = None;
        let mut status = self.setup.state.status().unwrap_or_default();
        if let Err(e) = self.setup.state.prepare() {
            tracing::error!(target: "ndes_gateway::acme", error = %e, "the ACME state folder cannot be made; orders will fail until it can");
        }
        loop {
            let current = self.listener.current();
            let (due, recheck) = match retry_at {
                Some(at) => (at, None),
                None => self.due(current.as_deref()).await,
            };
            status.next_renewal_at = Some(unix(due));
            status.not_after = current
                .as_deref()
                .and_then(validity)
                .map(|(_, end)| unix(end));
            self.save(&status);
            let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
            // Woken early to ask for the CA's renewal window again, not to order.
            let recheck = recheck.filter(|r| *r < wait);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(recheck.unwrap_or(wait)) => {}
            }
            if recheck.is_some() {
                continue;
            }
            let attempt = tokio::select! {
                _ = stop.cancelled() => return,
                attempt = self.renew(&mut account) => attempt,
            };
            status.last_order_at = Some(unix(SystemTime::now()));
            status.account = account.as_ref().map(|a| a.id().to_owned());
            match attempt {
                Ok(fresh) => {
                    failures = 0;
                    retry_at = None;
                    self.succeeded(fresh, &mut status);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if problem_type(&e) == Some(ACCOUNT_DOES_NOT_EXIST) {
                        // The CA lost or closed the account: the next try registers anew.
                        account = None;
                        self.setup.state.forget_account();
                    }
                    retry_at = Some(self.failed(&e, failures, &mut status));
                }
            }
        }
    }

    /// Counted, written for `doctor`, then swapped in.
    fn succeeded(&self, fresh: Arc<CertifiedKey>, status: &mut Status) {
        status.last_order_result = Some("ok".to_owned());
        status.last_problem = None;
        status.not_after = validity(&fresh).map(|(_, end)| unix(end));
        self.save(status);
        self.metrics
            .acme_orders_total
            .with_label_values(&["ok"])
            .inc();
        self.install(fresh);
    }

    /// Counted, written and logged; returns when to try again.
    fn failed(&self, e: &Error, failures: u32, status: &mut Status) -> SystemTime {
        let result = if problem_type(e) == Some(RATE_LIMITED) {
            "rate_limited"
        } else {
            "error"
        };
        // The CA's wait is honoured for its rate limit; other failures back off on their own.
        let asked = self
            .setup
            .http
            .take_retry_after()
            .filter(|_| result == "rate_limited");
        let delay = retry_delay(failures, self.listener.current().as_deref(), asked);
        let retry_at = SystemTime::now() + delay;
        let problem = describe(e);
        status.last_order_result = Some(result.to_owned());
        status.last_problem = Some(problem.clone());
        status.next_renewal_at = Some(unix(retry_at));
        // Counted and written before the warning: whoever reads the log finds the metric and
        // `doctor` saying so already.
        self.save(status);
        self.metrics
            .acme_orders_total
            .with_label_values(&[result])
            .inc();
        tracing::warn!(
            target: "ndes_gateway::acme",
            directory = %self.setup.config.directory,
            result,
            failures,
            retry_in_s = delay.as_secs(),
            problem = %problem,
            "ACME order failed; the certificate in force stays"
        );
        retry_at
    }

    fn save(&self, status: &Status) {
        if let Err(e) = self.setup.state.save_status(status) {
            tracing::debug!(target: "ndes_gateway::acme", error = %e, "ACME status not written");
        }
    }

    /// When to order next, and how soon to look again: the CA's renewal window (a random
    /// point in it) where it offers ARI, asked for again every [`ari::RECHECK`]; else two thirds
    /// of the lifetime.
    async fn due(&self, current: Option<&CertifiedKey>) -> (SystemTime, Option<Duration>) {
        let Some(leaf) = current.and_then(|c| c.cert.first()) else {
            return (SystemTime::now(), None);
        };
        let issued = names_in(leaf);
        let wanted = normalized(self.setup.config.domains.clone());
        if !wanted.iter().all(|name| issued.contains(name)) {
            // A configured name is missing from the stored certificate (`domains` changed since
            // it was issued): order for the new set now; the old certificate serves meanwhile.
            // Names the CA added on its own are no reason: ordering again would get them again.
            return (SystemTime::now(), None);
        }
        let directory = &self.setup.config.directory;
        match ari::suggested_window(&self.setup.http, directory, leaf).await {
            Some((start, end)) => {
                let span = end.duration_since(start).unwrap_or_default();
                (start + span.mul_f64(random_fraction()), Some(ari::RECHECK))
            }
            None => (renewal_due(current), None),
        }
    }

    /// One order, start to end: the new certificate, stored.
    async fn renew(&self, account: &mut Option<Account>) -> Result<Arc<CertifiedKey>, Error> {
        let acme_account = match account {
            Some(a) => a.clone(),
            None => {
                let a = self.account().await?;
                *account = Some(a.clone());
                a
            }
        };
        let responders = order::Responders {
            challenge: self.setup.config.challenge,
            listener: &self.listener,
            http01: &self.http01,
        };
        // A Retry-After from before (an ARI look, an earlier try) says nothing of this order.
        let _ = self.setup.http.take_retry_after();
        let issued = order::order(&acme_account, &self.setup.config.domains, &responders).await?;
        self.setup.state.prepare().map_err(other)?;
        self.setup
            .state
            .save_certificate(&issued.chain_pem, &issued.key_pem)
            .map_err(other)?;
        // Read back as a restart would read it: what is served is what is stored.
        match self.setup.state.certificate() {
            Ok(Some(fresh)) => Ok(fresh),
            Ok(None) => Err(other(
                "the certificate just written is not there".to_owned(),
            )),
            Err(e) => Err(other(e.0)),
        }
    }

    /// The swap, as a reload does it: new handshakes get the new certificate, open connections
    /// keep the one they have.
    fn install(&self, fresh: Arc<CertifiedKey>) {
        let not_after = validity(&fresh).map(|(_, end)| humantime::format_rfc3339_seconds(end));
        self.listener.set(fresh);
        self.expiry.set_listener(&self.listener);
        tracing::info!(
            target: "ndes_gateway::acme",
            domains = %self.setup.config.domains.join(","),
            not_after = %not_after.map_or_else(String::new, |t| t.to_string()),
            "ACME certificate issued and in service"
        );
    }

    /// The stored account, or a new one registered (with the external account binding when
    /// configured) and stored: a new account only when none is stored for this directory.
    async fn account(&self) -> Result<Account, Error> {
        let builder = || Account::builder_with_http(Box::new(self.setup.http.clone()));
        let config = &self.setup.config;
        if let Some(credentials) = self.setup.state.account(&config.directory).map_err(other)? {
            return builder().from_credentials(credentials).await;
        }
        let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
        let eab = self
            .setup
            .eab
            .as_ref()
            .map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
        let new = NewAccount {
            contact: &contact,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, credentials) = builder()
            .create(&new, config.directory.clone(), eab.as_ref())
            .await?;
        self.setup.state.save_account(&credentials).map_err(other)?;
        tracing::info!(target: "ndes_gateway::acme", account = account.id(), directory = %config.directory, "ACME account registered");
        Ok(account)
    }
}

/// notBefore and notAfter of the served leaf.
fn validity(key: &CertifiedKey) -> Option<(SystemTime, SystemTime)> {
    use der::Decode;
    let leaf = x509_cert::Certificate::from_der(key.cert.first()?).ok()?;
    let v = &leaf.tbs_certificate.validity;
    Some((
        UNIX_EPOCH + v.not_before.to_unix_duration(),
        UNIX_EPOCH + v.not_after.to_unix_duration(),
    ))
}

/// The DNS names in a certificate's subject alternative names, lower case, sorted.
fn names_in(leaf: &[u8]) -> Vec<String> {
    use der::oid::AssociatedOid;
    use der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let Ok(cert) = x509_cert::Certificate::from_der(leaf) else {
        return Vec::new();
    };
    let extensions = cert.tbs_certificate.extensions.unwrap_or_default();
    let Some(san) = extensions.iter().find(|e| e.extn_id == SubjectAltName::OID) else {
        return Vec::new();
    };
    let names: Vec<String> = SubjectAltName::from_der(san.extn_value.as_bytes())
        .map(|san| san.0)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|name| match name {
            GeneralName::DnsName(dns) => Some(dns.to_string()),
            _ => None,
        })
        .collect();
    normalized(names)
}

/// DNS names compare without regard to case or order.
fn normalized(mut names: Vec<String>) -> Vec<String> {
    for name in &mut names {
        name.make_ascii_lowercase();
    }
    names.sort();
    names.dedup();
    names
}

/// When to order: now without a certificate, else at two thirds of its life less a jitter.
fn renewal_due(current: Option<&CertifiedKey>) -> SystemTime {
    let Some((start, end)) = current.and_then(validity) else {
        return SystemTime::now();
    };
    let lifetime = end.duration_since(start).unwrap_or_default();
    let early = lifetime.mul_f64(JITTER * random_fraction());
    start + lifetime.mul_f64(RENEW_AT) - early
}

/// How long after the `failures`-th failure in a row to try again: what a rate-limiting CA
/// asked for, else a doubling wait that starts at a hundredth of the lifetime and never passes a
/// quarter of the time left, so a failing renewal still gets several tries before expiry.
fn retry_delay(
    failures: u32,
    current: Option<&CertifiedKey>,
    asked: Option<SystemTime>,
) -> Duration {
    let now = SystemTime::now();
    let (first, left) = match current.and_then(validity) {
        Some((start, end)) => {
            let lifetime = end.duration_since(start).unwrap_or_default();
            let first = (lifetime / 100).clamp(Duration::from_secs(1), Duration::from_secs(300));
            (first, Some(end.duration_since(now).unwrap_or_default()))
        }
        None => (FIRST_RETRY_WITHOUT_CERTIFICATE, None),
    };
    if let Some(asked) = asked {
        let wait = asked.duration_since(now).unwrap_or_default();
        // Never so long that the certificate in force runs out meanwhile: half the time left.
        let latest = left.map_or(MAX_ASKED_WAIT, |l| (l / 2).max(first));
        return wait.clamp(first, MAX_ASKED_WAIT).min(latest);
    }
    let doubled = first.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20)));
    let mut delay = doubled.min(MAX_RETRY);
    if let Some(left) = left {
        delay = delay.min((left / 4).max(first));
    }
    delay
}

/// A number in [0, 1) that differs between processes and calls; jitter needs no more.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn problem_type(e: &Error) -> Option<&str> {
    match e {
        Error::Api(problem) => problem.r#type.as_deref(),
        _ => None,
    }
}

/// The problem document as the CA sent it (type, detail, subproblems), or the local error.
fn describe(e: &Error) -> String {
    match e {
        Error::Api(problem) => {
            let mut text = format!(
                "{} {}: {}",
                problem.status.map_or_else(String::new, |s| s.to_string()),
                problem.r#type.as_deref().unwrap_or("(no type)"),
                problem.detail.as_deref().unwrap_or("(no detail)")
            );
            for sub in &problem.subproblems {
                text.push_str(&format!("; {sub}"));
            }
            text.trim_start().to_owned()
        }
        other => other.to_string(),
    }
}

fn other(message: String) -> Error {
    Error::Other(message.into())
}

/// Whether the listener must offer `acme-tls/1`.
pub fn answers_on_listener(config: &AcmeConfig) -> bool {
    config.challenge == AcmeChallenge::TlsAlpn01
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_and_stay_within_the_time_left() {
        assert_eq!(retry_delay(1, None, None), Duration::from_secs(10));
        assert_eq!(retry_delay(3, None, None), Duration::from_secs(40));
        assert_eq!(retry_delay(40, None, None), MAX_RETRY);
        let asked = SystemTime::now() + Duration::from_secs(3600);
        let d = retry_delay(1, None, Some(asked));
        assert!(d > Duration::from_secs(3500) && d <= Duration::from_secs(3600));
    }

    #[test]
    fn problems_are_told_with_type_and_detail() {
        let problem: instant_acme::Problem = serde_json::from_str(
            r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many","status":429}"#,
        )
        .unwrap();
        let e = Error::Api(problem);
        assert_eq!(problem_type(&e), Some(RATE_LIMITED));
        assert_eq!(
            describe(&e),
            "429 urn:ietf:params:acme:error:rateLimited: too many"
        );
    }

    #[test]
    fn the_names_of_a_certificate_are_compared_as_a_set() {
        let mut params =
            rcgen::CertificateParams::new(vec!["B.acme.test".to_owned(), "a.acme.test".to_owned()])
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        assert_eq!(names_in(cert.der()), ["a.acme.test", "b.acme.test"]);
        assert!(names_in(b"not a certificate").is_empty());
    }

    #[test]
    fn jitter_is_a_fraction() {
        for _ in 0..100 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f));
        }
    }
}
