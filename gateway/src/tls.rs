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

/// Hands out the one certificate whatever the SNI: devices may use the public name, an alias, or
/// an address, and a name mismatch is theirs to report, not a reason for us to abort. Replaced
/// on reload; handshakes under way keep the one they started with.
#[derive(Debug)]
pub struct ListenerCertificate(std::sync::RwLock<Arc<CertifiedKey>>);

impl ListenerCertificate {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<ListenerCertificate> {
        Arc::new(ListenerCertificate(std::sync::RwLock::new(key)))
    }

    /// Loads the pair again; one that does not load or does not match is refused, the
    /// certificate in force kept.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), ConfigError> {
        let fresh = load_certified_key(cert, key)?;
        // A poisoned lock only means a panic elsewhere while swapping; the value is whole.
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ResolvesServerCert for ListenerCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

pub fn server_config(
    key: Arc<ListenerCertificate>,
    http2: bool,
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
