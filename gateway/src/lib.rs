//! ndes-gateway publishes a Microsoft NDES (SCEP) server to the internet.
//!
//! A request passes the stages in this order, one module each: [`listener`] (TCP, TLS, HTTP),
//! [`filter`] (IIS-equivalent request filtering), [`proxy`] (the request's straight line) and
//! [`upstream`] (pinned TLS to NDES). [`config`] reads the file; [`tls`] loads the listener's
//! certificate; [`devpki`] and [`demo`] serve the local demo and the tests.

pub mod config;
pub mod demo;
pub mod devpki;
pub mod filter;
pub mod listener;
pub mod logging;
pub mod proxy;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError};
use crate::filter::RequestLimits;
use crate::listener::ListenerSettings;
use crate::proxy::Proxy;
use crate::upstream::{Upstream, UpstreamTarget};

/// Everything loaded from a config, checked, but not yet listening.
pub struct Prepared {
    pub config: Config,
    pub tls: Arc<rustls::ServerConfig>,
    pub target: UpstreamTarget,
}

/// Loads and checks the certificates and the upstream settings; what `check` runs.
pub fn prepare(config: &Config) -> Result<Prepared, ConfigError> {
    let key = tls::load_certified_key(&config.listen.cert, &config.listen.key)?;
    let tls = tls::server_config(key, config.listen.http2)?;
    let target = UpstreamTarget::from_config(&config.upstream)?;
    Ok(Prepared {
        config: config.clone(),
        tls,
        target,
    })
}

/// A running gateway: its address, and the handle that stops it.
pub struct Gateway {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Gateway {
    /// Loads everything, binds the public listener and starts serving on the current runtime.
    pub async fn start(config: &Config) -> Result<Gateway, ConfigError> {
        let prepared = prepare(config)?;
        if prepared.target.tls.is_none() {
            tracing::warn!(
                target: "ndes_gateway::upstream",
                url = %config.upstream.url,
                "upstream is plain http:// on loopback: only for a SCEP server on this host"
            );
        }
        let listener = TcpListener::bind(config.listen.addr).await.map_err(|e| {
            ConfigError(format!(
                "listen.addr: cannot listen on {}: {e}",
                config.listen.addr
            ))
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| ConfigError(format!("listen.addr: {e}")))?;
        let proxy = Arc::new(Proxy {
            limits: RequestLimits::from(&config.limits),
            body_timeout: config.limits.body_timeout,
            upstream: Upstream::new(prepared.target, &config.upstream),
        });
        let settings = Arc::new(ListenerSettings::from_config(config));
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(listener::run(
            listener,
            TlsAcceptor::from(prepared.tls),
            settings,
            proxy,
            rx,
        ));
        tracing::info!(target: "ndes_gateway", addr = %local_addr, upstream = %config.upstream.url, "listening");
        Ok(Gateway {
            local_addr,
            shutdown,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets open connections finish their requests, then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Serves until the listener task ends.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}
