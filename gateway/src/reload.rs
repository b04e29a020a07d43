//! Certificate hot reload: on SIGHUP, and when the certificate, key or CA files change (a
//! Kubernetes Secret update swaps a symlink; a renewal rewrites the file). Open connections keep
//! going; new handshakes get the new certificate. A set that does not load is refused, the one in
//! force kept, and the failure logged and counted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::tls::ListenerCertificate;
use crate::upstream::Upstream;

/// What identifies a file's content without reading it: the real path behind any symlinks, its
/// modification time and its length.
fn fingerprint(path: &Path) -> Option<(PathBuf, SystemTime, u64)> {
    let real = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&real).ok()?;
    Some((real, meta.modified().ok()?, meta.len()))
}

pub struct Reloader {
    pub certificate: Arc<ListenerCertificate>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub check_interval: Duration,
}

impl Reloader {
    fn fingerprints(&self) -> Vec<Option<(PathBuf, SystemTime, u64)>> {
        [Some(&self.cert), Some(&self.key), self.ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| fingerprint(p))
            .collect()
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut hangup = hangup_signal();
        let mut seen = self.fingerprints();
        let mut tick = tokio::time::interval(self.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = shutdown.changed() => return,
                _ = hangup_recv(&mut hangup) => "SIGHUP",
                _ = tick.tick() => {
                    let now = self.fingerprints();
                    if now == seen {
                        continue;
                    }
                    // A Secret update writes files one by one: wait for them to settle.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    "files changed"
                }
            };
            seen = self.fingerprints();
            self.reload(why);
        }
    }

    fn reload(&self, why: &str) {
        let listener = self.certificate.reload(&self.cert, &self.key);
        let upstream = self.upstream.reload_trust();
        for (target, result) in [("listener", listener), ("upstream_trust", upstream)] {
            match result {
                Ok(()) => {
                    self.metrics
                        .reloads_total
                        .with_label_values(&[target, "ok"])
                        .inc();
                    tracing::info!(target: "ndes_gateway::reload", what = target, trigger = why, "reloaded");
                }
                Err(e) => {
                    self.metrics
                        .reloads_total
                        .with_label_values(&[target, "error"])
                        .inc();
                    tracing::error!(target: "ndes_gateway::reload", what = target, trigger = why, error = %e, "reload refused: keeping the certificates in force");
                }
            }
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {}

#[cfg(unix)]
async fn hangup_recv(h: &mut Hangup) {
    match h {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn hangup_recv(_: &mut Hangup) {
    std::future::pending().await
}
