//! TLS shared by the stages: the crypto provider, PEM loading, and the public listener's
//! certificate and settings: TLS 1.2 and 1.3 only, HTTP/2 and HTTP/1.1 by ALPN, and no client
//! certificate requested (macOS offers the certificate it is renewing, and a server that asks for
//! one breaks renewals).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigError;

/// One provider for the whole process; ring builds quickly and has no C toolchain demands.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every CERTIFICATE block of a PEM file, in order.
pub fn load_certificates(
    path: &Path,
    key: &str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| {
        ConfigError(format!(
            "{key}: {}: cannot read certificates: {e}",
            path.display()
        ))
    })?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError(format!("{key}: {}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ConfigError(format!(
            "{key}: {}: no CERTIFICATE block found",
            path.display()
        )));
    }
    Ok(certs)
}

/// The listener's chain and key, checked to belong together so a mismatched pair is refused at
/// start rather than at each client's handshake.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, ConfigError> {
    let chain = load_certificates(cert, "listen.cert")?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        ConfigError(format!(
            "listen.key: {}: no usable private key: {e}",
            key.display()
        ))
    })?;
    let signing_key = provider().key_provider.load_private_key(der).map_err(|e| {
        ConfigError(format!(
            "listen.key: {}: unsupported private key: {e}",
            key.display()
        ))
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        ConfigError(format!(
            "listen.key: {} does not belong to the certificate in {}: {e}",
            key.display(),
            cert.display()
        ))
    })?;
    Ok(Arc::new(certified))
}

/// The ALPN protocol of the tls-alpn-01 challenge (RFC 8737): a handshake that offers it is the
/// ACME CA validating, never a device.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Hands out the one certificate whatever the SNI: devices may use the public name, an alias, or
/// an address, and a name mismatch is theirs to report, not a reason for us to abort. Replaced
/// on reload; handshakes under way keep the one they started with. With ACME it starts empty
/// (handshakes fail until the first certificate arrives) and also holds the tls-alpn-01
/// challenge certificates, by domain, while an order is being validated.
#[derive(Debug, Default)]
pub struct ListenerCertificate {
    current: std::sync::RwLock<Option<Arc<CertifiedKey>>>,
    challenges: std::sync::RwLock<std::collections::HashMap<String, Arc<CertifiedKey>>>,
}

impl ListenerCertificate {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<ListenerCertificate> {
        let certificate = ListenerCertificate::default();
        certificate.set(key);
        Arc::new(certificate)
    }

    /// No certificate yet: ACME is to obtain the first one.
    pub fn empty() -> Arc<ListenerCertificate> {
        Arc::new(ListenerCertificate::default())
    }

    /// Loads the pair again; one that does not load or does not match is refused, the
    /// certificate in force kept.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), ConfigError> {
        self.set(load_certified_key(cert, key)?);
        Ok(())
    }

    /// Swaps in a new certificate; open connections keep the one they were made with.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        // A poisoned lock only means a panic elsewhere while swapping; the value is whole.
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Answers tls-alpn-01 for `domain` with `key` until [`Self::clear_challenge`].
    pub fn set_challenge(&self, domain: &str, key: Arc<CertifiedKey>) {
        let mut challenges = self.challenges.write().unwrap_or_else(|e| e.into_inner());
        challenges.insert(domain.to_ascii_lowercase(), key);
    }

    pub fn clear_challenge(&self, domain: &str) {
        let mut challenges = self.challenges.write().unwrap_or_else(|e| e.into_inner());
        challenges.remove(&domain.to_ascii_lowercase());
    }
}

impl ResolvesServerCert for ListenerCertificate {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A validation offers `acme-tls/1` and nothing else (RFC 8737, section 3); a client
        // that offers it among others is an ordinary one and gets the serving certificate.
        let acme = hello.alpn().is_some_and(|mut offered| {
            offered.next() == Some(ACME_TLS_ALPN) && offered.next().is_none()
        });
        if acme {
            // Only the challenge certificate, and only for a name being validated: the CA must
            // never see the serving certificate on this protocol (RFC 8737, section 3).
            let name = hello.server_name()?.to_ascii_lowercase();
            let challenges = self.challenges.read().unwrap_or_else(|e| e.into_inner());
            return challenges.get(&name).cloned();
        }
        self.current()
    }
}

/// `acme_tls_alpn`: also offer `acme-tls/1`, for the tls-alpn-01 challenge on this listener.
pub fn server_config(
    key: Arc<ListenerCertificate>,
    http2: bool,
    acme_tls_alpn: bool,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigError(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(key);
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    if acme_tls_alpn {
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(config))
}

/// Subject, issuer and expiry of the first certificate in a PEM file, for people to read.
pub fn describe_certificate(
    pem_path: &std::path::Path,
) -> Result<(String, String, String), String> {
    use der::Decode;
    let der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_file(pem_path)
            .map_err(|e| format!("{}: {e}", pem_path.display()))?;
    let cert = x509_cert::Certificate::from_der(&der)
        .map_err(|e| format!("{}: {e}", pem_path.display()))?;
    let tbs = &cert.tbs_certificate;
    Ok((
        tbs.subject.to_string(),
        tbs.issuer.to_string(),
        tbs.validity.not_after.to_string(),
    ))
}
