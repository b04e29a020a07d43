//! Hot reload: on SIGHUP, and when the config file or the certificate, key or CA files it names
//! change (a Kubernetes Secret update swaps a symlink; a renewal rewrites the file). The config
//! file is read again, so new file paths and new pins take effect too. Open connections keep
//! going; new handshakes get the new certificate, new connections to NDES the new trust. A set
//! that does not load is refused, the one in force kept, and the failure logged and counted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::ops::certwatch::Expiry;
use crate::tls::ListenerCertificate;
use crate::upstream::cluster::Cluster;

/// What identifies a file's content without reading it: the real path behind any symlinks, its
/// modification time and its length.
type Fingerprint = Option<(PathBuf, SystemTime, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    let real = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&real).ok()?;
    Some((real, meta.modified().ok()?, meta.len()))
}

pub struct Reloader {
    pub certificate: Arc<ListenerCertificate>,
    /// The settings in force: the config as read at start, then as each accepted reload read it.
    pub config: Config,
    /// The file the config came from, read again on every reload; `None` for a config built in
    /// memory, whose certificate files are still reloaded.
    pub path: Option<PathBuf>,
    pub cluster: Arc<Cluster>,
    pub metrics: Arc<Metrics>,
    pub expiry: Arc<Expiry>,
    /// Subscribed before the gateway said it was listening: a `systemctl reload` sent right
    /// after start must not meet SIGHUP's default action, which ends the process.
    pub hangup: Hangup,
}

impl Reloader {
    fn fingerprints(&self) -> Vec<Fingerprint> {
        let c = &self.config;
        [
            self.path.as_ref(),
            Some(&c.listen.cert),
            Some(&c.listen.key),
            c.upstream.ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| fingerprint(p))
        .collect()
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut seen = self.fingerprints();
        let mut tick = tokio::time::interval(self.config.listen.reload_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = stop.cancelled() => return,
                _ = hangup_recv(&mut self.hangup) => "SIGHUP",
                _ = tick.tick() => {
                    if self.fingerprints() == seen {
                        continue;
                    }
                    // A Secret update writes files one by one: wait for them to settle.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    "files changed"
                }
            };
            // systemd 253 and later want the time beside RELOADING=1.
            let mut reloading = vec![sd_notify::NotifyState::Reloading];
            reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
            notify_systemd(&reloading);
            self.reload(why);
            seen = self.fingerprints();
            notify_systemd(&[sd_notify::NotifyState::Ready]);
        }
    }

    fn count(&self, target: &str, result: &str) {
        self.metrics
            .reloads_total
            .with_label_values(&[target, result])
            .inc();
    }

    fn reload(&mut self, why: &str) {
        if let Some(path) = &self.path {
            match Config::load(path) {
                Ok(fresh) => {
                    self.count("config", "ok");
                    let needs_restart = restart_keys(&self.config, &fresh);
                    if !needs_restart.is_empty() {
                        tracing::warn!(
                            target: "ndes_gateway::ops::reload",
                            trigger = why,
                            keys = %needs_restart.join(", "),
                            "these changes take effect at the next restart; the rest is reloaded now"
                        );
                    }
                    // Only what a reload applies is taken; the rest stays as the process runs it.
                    self.config.listen.cert = fresh.listen.cert;
                    self.config.listen.key = fresh.listen.key;
                    self.config.upstream.ca = fresh.upstream.ca;
                    self.config.upstream.spki_sha256 = fresh.upstream.spki_sha256;
                }
                Err(e) => {
                    self.count("config", "error");
                    tracing::error!(target: "ndes_gateway::ops::reload", trigger = why, error = %e, "reload refused: the config file does not load; keeping the settings in force");
                    return;
                }
            }
        }
        let c = &self.config;
        // With [listen.acme] the renewal loop swaps the certificate; there are no files to read.
        let listener = c
            .listen
            .acme
            .is_none()
            .then(|| self.certificate.reload(&c.listen.cert, &c.listen.key));
        if matches!(listener, Some(Ok(()))) {
            self.expiry.set_listener(&self.certificate);
        }
        let upstream = Some(self.cluster.reload_trust(&c.upstream));
        let results = [("listener", listener), ("upstream_trust", upstream)];
        for (target, result) in results.into_iter().filter_map(|(t, r)| Some((t, r?))) {
            match result {
                Ok(()) => {
                    self.count(target, "ok");
                    tracing::info!(target: "ndes_gateway::ops::reload", what = target, trigger = why, "reloaded");
                }
                Err(e) => {
                    self.count(target, "error");
                    tracing::error!(target: "ndes_gateway::ops::reload", what = target, trigger = why, error = %e, "reload refused: keeping the certificates in force");
                }
            }
        }
        // NDES's certificate as seen under the new trust, and the RA set, at once rather than at
        // the next scep.cert_check_interval.
        self.expiry.recheck.notify_one();
    }
}

/// The keys that changed between `old` and `new` that a reload does not apply.
fn restart_keys(old: &Config, new: &Config) -> Vec<String> {
    let mut same = new.clone();
    same.listen.cert.clone_from(&old.listen.cert);
    same.listen.key.clone_from(&old.listen.key);
    same.upstream.ca.clone_from(&old.upstream.ca);
    same.upstream
        .spki_sha256
        .clone_from(&old.upstream.spki_sha256);
    // Compared as check prints them, key by key, so the warning names each one.
    let (Ok(toml::Value::Table(before)), Ok(toml::Value::Table(after))) =
        (toml::Value::try_from(old), toml::Value::try_from(&same))
    else {
        return vec!["(the settings could not be compared)".to_owned()];
    };
    let mut changed = Vec::new();
    for (section, value) in &after {
        let (Some(toml::Value::Table(was)), toml::Value::Table(now)) = (before.get(section), value)
        else {
            continue;
        };
        for key in was
            .keys()
            .chain(now.keys().filter(|k| !was.contains_key(*k)))
        {
            if was.get(key) != now.get(key) {
                changed.push(format!("{section}.{key}"));
            }
        }
    }
    changed
}

/// Tells systemd (Type=notify) what the gateway is doing; nothing without `NOTIFY_SOCKET`.
pub fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(target: "ndes_gateway", error = %e, "cannot notify the service manager");
    }
}

#[cfg(unix)]
pub type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub type Hangup = ();

/// Subscribes to SIGHUP. From the first call on, SIGHUP no longer ends the process.
#[cfg(unix)]
pub fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
pub fn hangup_signal() -> Hangup {}

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

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[listen]\naddr = \"127.0.0.1:0\"\ncert = \"a.pem\"\nkey = \"a.key\"\n[upstream]\nurl = \"https://ndes.corp.test/certsrv/mscep/mscep.dll\"\nca = \"root.pem\"\n";

    #[test]
    fn only_what_a_reload_cannot_apply_is_named() {
        let old = Config::parse(TEXT).unwrap();
        let text = TEXT
            .replace("a.pem", "b.pem")
            .replace("root.pem", "other-root.pem")
            .replace("[upstream]", "idle_timeout = \"2m\"\n[upstream]")
            + "spki_sha256 = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n[log]\nlevel = \"debug\"\n";
        let new = Config::parse(&text).unwrap();
        let mut changed = restart_keys(&old, &new);
        changed.sort();
        assert_eq!(changed, ["listen.idle_timeout", "log.level"]);
        assert!(restart_keys(&old, &old).is_empty());
    }
}
