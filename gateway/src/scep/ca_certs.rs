//! The CA and RA certificates of a GetCACert answer.

use super::*;

/// The certificates of a GetCACert answer: one DER certificate (x-x509-ca-cert), or a degenerate
/// certs-only SignedData with the CA and the RA certificates (x-x509-ca-ra-cert).
pub fn parse_ca_certs(body: &[u8]) -> Result<Vec<Certificate>, ScepError> {
    if let Ok(cert) = Certificate::from_der(body) {
        return Ok(vec![cert]);
    }
    let signed = signed_data(body)?;
    let certs: Vec<Certificate> = signed
        .certificates
        .map(|set| {
            set.0
                .into_vec()
                .into_iter()
                .filter_map(|c| match c {
                    CertificateChoices::Certificate(c) => Some(c),
                    CertificateChoices::Other(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if certs.is_empty() {
        return Err(ScepError("no certificate in the GetCACert answer"));
    }
    Ok(certs)
}

/// A certificate with the role it plays for the service.
#[derive(Debug, Clone)]
pub struct Watched {
    pub role: &'static str,
    /// The NDES server it came from (`host:port`); empty for the listener's.
    pub server: String,
    pub subject: String,
    pub not_after: u64,
}

impl Watched {
    pub fn of(role: &'static str, cert: &Certificate) -> Watched {
        Watched {
            role,
            server: String::new(),
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

/// A CA certificate (basicConstraints cA), as opposed to an RA certificate.
pub fn is_ca(cert: &Certificate) -> bool {
    const BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
    cert.tbs_certificate
        .extensions
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .filter(|e| e.extn_id == BASIC_CONSTRAINTS)
        .filter_map(|e| {
            x509_cert::ext::pkix::BasicConstraints::from_der(e.extn_value.as_bytes()).ok()
        })
        .any(|bc| bc.ca)
}

/// notAfter as seconds since the Unix epoch.
pub fn not_after_unix(cert: &Certificate) -> u64 {
    cert.tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs()
}

/// The DER of a degenerate certs-only SignedData holding `certs`: what NDES sends for GetCACert
/// when it has RA certificates. Tests and the stand-ins use it; a production build has no use for it.
#[cfg(any(test, feature = "dev"))]
pub fn degenerate_pkcs7(certs: &[Certificate]) -> Result<Vec<u8>, der::Error> {
    use cms::content_info::{CmsVersion, ContentInfo};
    use cms::signed_data::{CertificateSet, EncapsulatedContentInfo, SignerInfos};
    use der::asn1::SetOfVec;
    use der::Encode;
    const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
    let mut set = SetOfVec::new();
    for c in certs {
        set.insert(CertificateChoices::Certificate(c.clone()))?;
    }
    let signed = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::new(),
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: None,
        },
        certificates: Some(CertificateSet(set)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::new()),
    };
    ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: der::Any::encode_from(&signed)?,
    }
    .to_der()
}
