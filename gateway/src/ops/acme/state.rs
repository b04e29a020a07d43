//! `listen.acme.state_dir`: the account key, the certificate and its key, and what the renewal
//! loop last did (for `doctor`). The folder is 0700 and every file 0600: the account key lets
//! anyone who holds it order and revoke certificates for the domains.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use instant_acme::AccountCredentials;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::tls;

const ACCOUNT: &str = "account.json";
const CERTIFICATE: &str = "certificate.pem";
const KEY: &str = "certificate.key";
const STATUS: &str = "status.json";
/// The suffix of a certificate or key written and not yet in place.
const NEXT: &str = ".next";

/// What the renewal loop last did, written after each order for `doctor` to read.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Status {
    /// The account's URL at the CA (its id, not a secret).
    pub account: Option<String>,
    /// Unix time of the last order, and how it ended: "ok", "error" or "rate_limited".
    pub last_order_at: Option<u64>,
    pub last_order_result: Option<String>,
    /// The CA's problem document (or the local error) of the last failed order.
    pub last_problem: Option<String>,
    /// Unix time of the next order.
    pub next_renewal_at: Option<u64>,
    /// notAfter of the certificate in service.
    pub not_after: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_path_buf(),
        }
    }

    pub fn certificate_path(&self) -> PathBuf {
        self.dir.join(CERTIFICATE)
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY)
    }

    /// Creates the folder if needed and makes it 0700.
    pub fn prepare(&self) -> Result<(), String> {
        let fail =
            |e: std::io::Error| format!("listen.acme.state_dir: {}: {e}", self.dir.display());
        std::fs::create_dir_all(&self.dir).map_err(fail)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(fail)?;
        }
        Ok(())
    }

    /// The stored certificate and key, when both are there. A pair that does not load is an
    /// error: better said at start than replaced behind the operator's back.
    pub fn certificate(&self) -> Result<Option<Arc<CertifiedKey>>, ConfigError> {
        self.finish_swap();
        let (cert, key) = (self.certificate_path(), self.key_path());
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        tls::load_certified_key(&cert, &key).map(Some)
    }

    /// Both files are written whole beside the pair in force first, then put in place key
    /// first: a stop between the two renames leaves the new certificate waiting as
    /// `certificate.pem.next`, which the next load puts in place, so the pair on disk always
    /// matches.
    pub fn save_certificate(&self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        let (cert_next, key_next) = (format!("{CERTIFICATE}{NEXT}"), format!("{KEY}{NEXT}"));
        self.write_private(&key_next, key_pem.as_bytes())?;
        self.write_private(&cert_next, chain_pem.as_bytes())?;
        let rename = |from: &str, to: &str| {
            std::fs::rename(self.dir.join(from), self.dir.join(to))
                .map_err(|e| format!("{}: {e}", self.dir.join(to).display()))
        };
        rename(&key_next, KEY)?;
        rename(&cert_next, CERTIFICATE)?;
        self.sync_dir();
        Ok(())
    }

    /// Completes a swap a stop cut short: the new key is in place and its certificate still
    /// waits. A swap that had not begun (both waiting) is dropped: the old pair still matches.
    fn finish_swap(&self) {
        let cert_next = self.dir.join(format!("{CERTIFICATE}{NEXT}"));
        let key_next = self.dir.join(format!("{KEY}{NEXT}"));
        match (cert_next.exists(), key_next.exists()) {
            (true, false) => {
                let _ = std::fs::rename(&cert_next, self.certificate_path());
            }
            (true, true) | (false, true) => {
                let _ = std::fs::remove_file(&cert_next);
                let _ = std::fs::remove_file(&key_next);
            }
            (false, false) => {}
        }
        self.sync_dir();
    }

    /// The renames made durable: a power cut after a swap finds the new pair, or the old.
    fn sync_dir(&self) {
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
    }

    /// The stored account, when it belongs to `directory`: an account at another CA (the
    /// directory changed in the config) is of no use there.
    pub fn account(&self, directory: &str) -> Result<Option<AccountCredentials>, String> {
        let path = self.dir.join(ACCOUNT);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        // serde's messages name a position, never the content (the account key).
        let bad =
            |e: serde_json::Error| format!("{}: not a stored ACME account: {e}", path.display());
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(bad)?;
        if value.get("directory").and_then(|d| d.as_str()) != Some(directory) {
            return Ok(None);
        }
        serde_json::from_value(value).map(Some).map_err(bad)
    }

    /// Whether an account is stored, for `doctor`.
    pub fn has_account(&self) -> bool {
        self.dir.join(ACCOUNT).exists()
    }

    /// The CA no longer knows the stored account: the next order registers a new one.
    pub fn forget_account(&self) {
        let _ = std::fs::remove_file(self.dir.join(ACCOUNT));
    }

    pub fn save_account(&self, credentials: &AccountCredentials) -> Result<(), String> {
        let json = serde_json::to_vec(credentials).map_err(|e| format!("account: {e}"))?;
        self.write_private(ACCOUNT, &json)
    }

    pub fn status(&self) -> Option<Status> {
        let bytes = std::fs::read(self.dir.join(STATUS)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save_status(&self, status: &Status) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(status).map_err(|e| format!("status: {e}"))?;
        self.write_private(STATUS, &json)
    }

    /// Written beside, then renamed over: a reader sees the old file or the new one, whole, and
    /// a crash mid-write leaves the old one in place.
    fn write_private(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let path = self.dir.join(name);
        let partial = self.dir.join(format!(".{name}.partial"));
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        let _ = std::fs::remove_file(&partial);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&partial).map_err(fail)?;
        file.write_all(bytes).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&partial, &path).map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_cut_short_between_its_renames_is_completed_at_the_next_load() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(&tmp.path().join("acme"));
        state.prepare().unwrap();
        let old = rcgen::generate_simple_self_signed(vec!["old.test".to_owned()]).unwrap();
        let new = rcgen::generate_simple_self_signed(vec!["new.test".to_owned()]).unwrap();
        state
            .save_certificate(&old.cert.pem(), &old.signing_key.serialize_pem())
            .unwrap();
        // The new pair written, the key put in place, then a stop.
        state
            .save_certificate(&new.cert.pem(), &new.signing_key.serialize_pem())
            .unwrap();
        std::fs::rename(
            state.certificate_path(),
            state.dir.join(format!("{CERTIFICATE}{NEXT}")),
        )
        .unwrap();
        std::fs::write(state.certificate_path(), old.cert.pem()).unwrap();
        let loaded = state.certificate().unwrap().expect("a pair");
        assert_eq!(loaded.cert[0].as_ref(), new.cert.der().as_ref());
        // Both waiting: the swap had not begun, the old pair stays.
        state
            .save_certificate(&old.cert.pem(), &old.signing_key.serialize_pem())
            .unwrap();
        std::fs::write(
            state.dir.join(format!("{KEY}{NEXT}")),
            new.signing_key.serialize_pem(),
        )
        .unwrap();
        std::fs::write(
            state.dir.join(format!("{CERTIFICATE}{NEXT}")),
            new.cert.pem(),
        )
        .unwrap();
        let loaded = state.certificate().unwrap().expect("a pair");
        assert_eq!(loaded.cert[0].as_ref(), old.cert.der().as_ref());
    }

    #[cfg(unix)]
    #[test]
    fn the_folder_is_0700_and_its_files_0600() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(&tmp.path().join("acme"));
        state.prepare().unwrap();
        state.save_certificate("chain", "key").unwrap();
        state.save_status(&Status::default()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tmp.path().join("acme")), 0o700);
        for name in [CERTIFICATE, KEY, STATUS] {
            assert_eq!(mode(&tmp.path().join("acme").join(name)), 0o600, "{name}");
        }
        assert!(state.account("https://ca.test/dir").unwrap().is_none());
    }
}
