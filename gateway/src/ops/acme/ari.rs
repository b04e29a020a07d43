//! ACME Renewal Information (RFC 9773): the window in which the CA suggests renewing a
//! certificate, where the CA offers it (its directory names `renewalInfo`). A CA may move the
//! window earlier, to have certificates replaced before it revokes them after an incident.

use std::time::{Duration, SystemTime};

use base64::Engine;
use der::oid::AssociatedOid;
use der::Decode;
use serde::Deserialize;
use x509_cert::ext::pkix::AuthorityKeyIdentifier;
use x509_cert::Certificate;

use crate::ops::acme::http::AcmeHttp;

/// How often the window is asked for again while waiting for it, when the CA does not say.
pub const RECHECK: Duration = Duration::from_secs(6 * 3600);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Directory {
    renewal_info: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RenewalInfo {
    suggested_window: Window,
}

#[derive(Deserialize)]
struct Window {
    start: String,
    end: String,
}

/// The certificate's ARI identifier: base64url of its authority key identifier, a dot, and
/// base64url of its serial number's DER content (RFC 9773, section 4.1).
pub fn certificate_id(leaf: &[u8]) -> Option<String> {
    let cert = Certificate::from_der(leaf).ok()?;
    let tbs = &cert.tbs_certificate;
    let aki = tbs
        .extensions
        .as_ref()?
        .iter()
        .find(|e| e.extn_id == AuthorityKeyIdentifier::OID)?;
    let aki = AuthorityKeyIdentifier::from_der(aki.extn_value.as_bytes()).ok()?;
    let key_id = aki.key_identifier?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    Some(format!(
        "{}.{}",
        b64.encode(key_id.as_bytes()),
        b64.encode(tbs.serial_number.as_bytes())
    ))
}

/// The suggested window for `leaf`, or `None` when the CA has no ARI or does not answer.
pub async fn suggested_window(
    http: &AcmeHttp,
    directory: &str,
    leaf: &[u8],
) -> Option<(SystemTime, SystemTime)> {
    let id = certificate_id(leaf)?;
    let listed: Directory = serde_json::from_slice(&http.get(directory).await.ok()?).ok()?;
    let base = listed.renewal_info?;
    let answer = http
        .get(&format!("{}/{id}", base.trim_end_matches('/')))
        .await
        .ok()?;
    window(&answer)
}

fn window(body: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let info: RenewalInfo = serde_json::from_slice(body).ok()?;
    let start = humantime::parse_rfc3339_weak(&info.suggested_window.start).ok()?;
    let end = humantime::parse_rfc3339_weak(&info.suggested_window.end).ok()?;
    (start < end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_read_and_a_reversed_one_refused() {
        let body = br#"{"suggestedWindow":{"start":"2025-01-02T04:00:00Z","end":"2025-01-03T04:00:00Z"},"explanationURL":"https://ca.test/why"}"#;
        let (start, end) = window(body).unwrap();
        assert_eq!(
            end.duration_since(start).unwrap(),
            Duration::from_secs(86_400)
        );
        let reversed =
            br#"{"suggestedWindow":{"start":"2025-01-03T04:00:00Z","end":"2025-01-02T04:00:00Z"}}"#;
        assert!(window(reversed).is_none());
        assert!(window(b"{}").is_none());
    }

    /// A CA with ARI, over plain HTTP on loopback: the directory names `renewalInfo`, which
    /// answers for the certificate's identifier only.
    #[tokio::test]
    async fn the_window_is_asked_for_at_the_directory_s_renewal_info() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (leaf, id) = leaf_and_id();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let directory = format!(r#"{{"renewalInfo":"{base}/ari/"}}"#);
        let window =
            r#"{"suggestedWindow":{"start":"2030-01-02T04:00:00Z","end":"2030-01-03T04:00:00Z"}}"#;
        let wanted = format!("GET /ari/{id} ");
        tokio::spawn(async move {
            for _ in 0..2 {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut head = vec![0u8; 4096];
                let n = tcp.read(&mut head).await.unwrap();
                let head = String::from_utf8_lossy(&head[..n]).into_owned();
                let body = if head.starts_with("GET /dir ") {
                    directory.as_str()
                } else if head.starts_with(&wanted) {
                    window
                } else {
                    "{}"
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                tcp.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let tmp = tempfile::tempdir().unwrap();
        let anchors = tmp.path().join("ca.pem");
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        std::fs::write(&anchors, ca.pem()).unwrap();
        let http = AcmeHttp::new(Some(&anchors)).unwrap();
        let (start, end) = suggested_window(&http, &format!("{base}/dir"), &leaf)
            .await
            .unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(start).to_string(),
            "2030-01-02T04:00:00Z"
        );
        assert_eq!(
            humantime::format_rfc3339_seconds(end).to_string(),
            "2030-01-03T04:00:00Z"
        );
    }

    fn leaf_and_id() -> (Vec<u8>, String) {
        let leaf = issued(true);
        let id = certificate_id(&leaf).unwrap();
        (leaf, id)
    }

    /// A leaf from a throwaway CA, with or without the authority key identifier.
    fn issued(with_key_id: bool) -> Vec<u8> {
        use rcgen::{CertificateParams, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = Issuer::new(ca, KeyPair::generate().unwrap());
        let mut leaf = CertificateParams::new(vec!["scep.acme.test".to_owned()]).unwrap();
        leaf.use_authority_key_identifier_extension = with_key_id;
        let cert = leaf
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap();
        cert.der().to_vec()
    }

    #[test]
    fn the_certificate_id_is_key_id_dot_serial() {
        let (leaf, id) = leaf_and_id();
        let (key_id, serial) = id.split_once('.').unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        assert_eq!(b64.decode(key_id).unwrap().len(), 20);
        let parsed = Certificate::from_der(&leaf).unwrap();
        assert_eq!(
            b64.decode(serial).unwrap(),
            parsed.tbs_certificate.serial_number.as_bytes()
        );
        // Without an authority key identifier there is no ARI identifier.
        assert!(certificate_id(&issued(false)).is_none());
    }
}
