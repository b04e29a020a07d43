//! `ndes-gateway certs`: a key and CSR for the public certificate, SPKI pins of a file or of a
//! live server, and the dev PKI.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::upstream::spki_sha256;

/// A new key and a CSR for the public certificate: subject CN the public name, the public and
/// internal names as DNS SANs, server authentication requested. Returns (key PEM, CSR PEM).
pub fn csr(public_name: &str, internal_name: Option<&str>) -> Result<(String, String), String> {
    let mut names = vec![public_name.to_owned()];
    names.extend(internal_name.map(str::to_owned));
    let mut params = CertificateParams::new(names).map_err(|e| format!("names: {e}"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, public_name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().map_err(|e| format!("key: {e}"))?;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("CSR: {e}"))?;
    Ok((
        key.serialize_pem(),
        csr.pem().map_err(|e| format!("CSR: {e}"))?,
    ))
}

/// The pin of every certificate in a PEM file, with its subject.
pub fn pins_of_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", path.display()));
    }
    Ok(certs.iter().map(|c| pin_and_subject(c)).collect())
}

fn pin_and_subject(cert: &[u8]) -> (String, String) {
    use der::Decode;
    let subject = x509_cert::Certificate::from_der(cert)
        .map(|c| c.tbs_certificate.subject.to_string())
        .unwrap_or_else(|_| "(unreadable certificate)".to_owned());
    (spki_sha256(cert).unwrap_or_default(), subject)
}

/// Accepts any certificate, to read what a server presents. Used only to print pins, never to
/// send anything: the handshake is closed as soon as the chain is known.
#[derive(Debug)]
struct DangerRecordOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for DangerRecordOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The pins of the chain a live server presents for `server_name`, server certificate first.
pub async fn pins_of_server(
    addr: &str,
    server_name: &str,
) -> Result<Vec<(String, String)>, String> {
    let chain = chain_of_server(addr, server_name).await?;
    Ok(chain.iter().map(|c| pin_and_subject(c)).collect())
}

/// The chain a live server presents for `server_name`, server certificate first, unverified:
/// for a person to look at and decide on, never to trust as it is.
pub async fn chain_of_server(
    addr: &str,
    server_name: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let provider = crate::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DangerRecordOnly(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| format!("{server_name:?} is not a server name"))?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?
        .collect();
    let first = addrs.first().ok_or_else(|| format!("{addr}: no address"))?;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(first)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{addr}: TLS: {e}"))
    };
    let tls = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
        .await
        .map_err(|_| format!("{addr}: no TLS handshake within 10 s"))??;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("the server sent no certificate")?;
    Ok(chain.iter().map(|c| c.clone().into_owned()).collect())
}
