//! ndes-gateway publishes a Microsoft NDES (SCEP) server to the internet.
//!
//! The folders follow a request's path, each importing only what lies further along it or the
//! shared modules beside this one:
//!
//! - [`edge`]: accepting, the PROXY header, TLS, HTTP/1.1 and HTTP/2 connections, slow clients.
//! - [`pipeline`]: the client address, rate limits, IIS-equivalent filtering, the header
//!   allowlist, the request's straight line to NDES and back.
//! - [`upstream`]: the pinned TLS connection to NDES, its pool and in-flight limit.
//! - [`scep`]: reading SCEP messages and CA certificate sets.
//! - [`ops`]: the admin listener, readiness, the certificate watch, reload, logging.
//! - [`cli`]: `doctor` and the certificate helpers.
//! - `dev`: the development PKI and the local demo, with the `dev` feature only (the tests and
//!   `scripts/demo.sh` turn it on; a production build carries neither).
//!
//! Shared by all: [`config`] (the settings), [`metrics`] (the counters) and [`tls`] (the crypto
//! provider, PEM loading and the listener's certificate). This module assembles a running
//! [`Gateway`] from them.

pub mod cli;
pub mod config;
#[cfg(feature = "dev")]
pub mod dev;
pub mod edge;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod scep;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError};
use crate::edge::listener::{self, ListenerSettings};
use crate::metrics::Metrics;
use crate::ops::admin::{self, Readiness};
use crate::ops::{certwatch, reload};
use crate::pipeline::client_addr::TrustedProxies;
use crate::pipeline::filter::RequestLimits;
use crate::pipeline::proxy;
use crate::pipeline::proxy::Proxy;
use crate::pipeline::ratelimit::RateLimits;
use crate::upstream::cluster::Cluster;
use crate::upstream::UpstreamTarget;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what systemd, Docker and Kubernetes send): both
/// stop the process the same orderly way, children included. The handlers are installed when
/// this is called, not when the future is first polled, so call it before announcing readiness:
/// a signal sent in between would otherwise meet the default action and end the process
/// without its shutdown.
#[cfg(unix)]
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (term, interrupt) {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            (Ok(mut term), Err(_)) => {
                term.recv().await;
            }
            (Err(_), Ok(mut interrupt)) => {
                interrupt.recv().await;
            }
            (Err(_), Err(_)) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(not(unix))]
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Everything loaded from a config, checked, but not yet listening.
pub struct Prepared {
    pub config: Config,
    pub certificate: Arc<tls::ListenerCertificate>,
    pub tls: Arc<rustls::ServerConfig>,
    /// One per NDES server, in the config's order.
    pub targets: Vec<UpstreamTarget>,
    /// With `[listen.acme]`: what the renewal loop needs; the certificate is the stored one, or
    /// none yet.
    pub acme: Option<ops::acme::AcmeSetup>,
}

/// Loads and checks the certificates and the upstream settings; what `check` runs.
pub fn prepare(config: &Config) -> Result<Prepared, ConfigError> {
    let acme = config
        .listen
        .acme
        .as_ref()
        .map(ops::acme::AcmeSetup::load)
        .transpose()?;
    let certificate = match &acme {
        Some(setup) => match &setup.stored {
            Some(key) => tls::ListenerCertificate::new(key.clone()),
            None => tls::ListenerCertificate::empty(),
        },
        None => tls::ListenerCertificate::new(tls::load_certified_key(
            &config.listen.cert,
            &config.listen.key,
        )?),
    };
    let acme_tls_alpn = config
        .listen
        .acme
        .as_ref()
        .is_some_and(ops::acme::answers_on_listener);
    let tls = tls::server_config(certificate.clone(), config.listen.http2, acme_tls_alpn)?;
    let targets = Cluster::targets(&config.upstream)?;
    Ok(Prepared {
        config: config.clone(),
        certificate,
        tls,
        targets,
        acme,
    })
}

/// How often idle per-client rate-limit entries are forgotten.
const RATE_LIMIT_PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// A running gateway: its addresses, and the handle that stops it.
pub struct Gateway {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Level-triggered: a task that starts after the stop still sees it.
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Gateway {
    /// Loads everything, binds the public and admin listeners and starts serving on the current
    /// runtime.
    pub async fn start(config: &Config) -> Result<Gateway, ConfigError> {
        let mut prepared = prepare(config)?;
        let http01 = match config.listen.acme.as_ref().and_then(|a| a.http01_addr) {
            Some(addr) => Some(ops::acme::challenge::bind_http01(addr).await?),
            None => None,
        };
        for target in prepared.targets.iter().filter(|t| t.tls.is_none()) {
            tracing::warn!(
                target: "ndes_gateway::upstream",
                server = %target.authority,
                "upstream is plain http:// on loopback: only for a SCEP server on this host"
            );
        }
        let trusted_proxies = TrustedProxies::parse(&config.listen.trusted_proxies)?;
        let listener = TcpListener::bind(config.listen.addr).await.map_err(|e| {
            ConfigError(format!(
                "listen.addr: cannot listen on {}: {e}",
                config.listen.addr
            ))
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| ConfigError(format!("listen.addr: {e}")))?;
        let admin_listener = if config.admin.enabled {
            Some(admin::bind(config.admin.addr).await?)
        } else {
            None
        };
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

        let metrics = Arc::new(Metrics::new());
        let cluster = Arc::new(Cluster::new(
            prepared.targets,
            &config.upstream,
            metrics.clone(),
            config.admin.probe_interval,
            config.scep.expired_ra == config::ExpiredRa::Fail,
            config
                .limits
                .request_timeout
                .saturating_sub(config.limits.body_timeout),
        )?);
        let labels: Vec<&str> = cluster.servers.iter().map(|s| s.label.as_str()).collect();
        metrics.start_at_zero(
            pipeline::filter::RejectReason::ALL
                .iter()
                .map(|r| r.label()),
            &upstream::UpstreamErrorKind::ALL.map(|k| k.label()),
            &labels,
            [upstream::RETRY_UNSENT, upstream::RETRY_NO_ANSWER],
        );
        let readiness = Arc::new(Readiness::default());
        let rate_limits = Arc::new(RateLimits::new(&config.rate_limit));
        let proxy = Arc::new(Proxy::new(
            RequestLimits::from(&config.limits),
            config.limits.body_timeout,
            cluster.clone(),
            metrics.clone(),
            rate_limits.clone(),
            trusted_proxies,
            config.scep.strict,
            proxy::ForwardHeaders::parse(&config.upstream.forward_headers)?,
        ));
        let settings = Arc::new(ListenerSettings::from_config(config));
        let stop = CancellationToken::new();
        let expiry = certwatch::Expiry::new(metrics.clone());
        expiry.set_listener(&prepared.certificate);

        let tasks = TaskTracker::new();
        if let Some(setup) = prepared.acme.take() {
            for result in ops::acme::RESULTS {
                metrics.acme_orders_total.with_label_values(&[result]);
            }
            let answers = Arc::new(ops::acme::challenge::Http01Answers::default());
            if let Some(l) = http01 {
                tasks.spawn(ops::acme::challenge::serve_http01(
                    l,
                    answers.clone(),
                    stop.clone(),
                ));
            }
            let acme = ops::acme::Acme {
                setup,
                listener: prepared.certificate.clone(),
                http01: answers,
                metrics: metrics.clone(),
                expiry: expiry.clone(),
            };
            tasks.spawn(acme.run(stop.clone()));
        }
        // With several servers the probes and the RA sets steer every request, admin or not.
        let watching = admin_listener.is_some() || cluster.is_many();
        if let Some(l) = admin_listener {
            tasks.spawn(admin::serve(
                l,
                metrics.clone(),
                readiness.clone(),
                stop.clone(),
            ));
        }
        if watching {
            let watch = certwatch::CertWatch {
                cluster: cluster.clone(),
                readiness: readiness.clone(),
                listener: prepared.certificate.clone(),
                expiry: expiry.clone(),
                interval: config.scep.cert_check_interval,
                expired_ra: config.scep.expired_ra,
            };
            tasks.spawn(watch.run(stop.clone()));
            tasks.spawn(admin::probe_loop(
                cluster.clone(),
                readiness.clone(),
                config.admin.probe_interval,
                config.admin.probe_timeout,
                stop.clone(),
            ));
        }
        // Subscribed here, before "listening" is logged, not in the task: the task may first
        // run after a supervisor has already sent its reload.
        let hangup = reload::hangup_signal();
        tasks.spawn(
            reload::Reloader {
                certificate: prepared.certificate.clone(),
                config: config.clone(),
                path: config.source.clone(),
                cluster: cluster.clone(),
                metrics: metrics.clone(),
                expiry,
                hangup,
            }
            .run(stop.clone()),
        );
        if !rate_limits.is_off() {
            let stop = stop.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(RATE_LIMIT_PRUNE_INTERVAL);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => rate_limits.prune(),
                    }
                }
            });
        }
        tasks.close();
        let listener_task = listener::run(
            listener,
            TlsAcceptor::from(prepared.tls),
            settings,
            proxy,
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            listener_task.await;
            tasks.wait().await;
        });
        tracing::info!(
            target: "ndes_gateway",
            addr = %local_addr,
            admin = %admin_addr.map_or("off".to_owned(), |a| a.to_string()),
            upstream = %config.upstream.describe(),
            "listening"
        );
        Ok(Gateway {
            local_addr,
            admin_addr,
            metrics,
            readiness,
            stop,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The gateway's metrics, as `/metrics` serves them.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The admin listener's address, when it is enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Turns readiness off, stops accepting, lets requests in flight finish (up to
    /// `listen.drain_timeout`), closes idle connections, then returns.
    pub async fn shutdown(self) {
        self.readiness.set_draining();
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Serves until the listener task ends.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}
