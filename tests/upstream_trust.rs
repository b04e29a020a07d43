//! Trust in NDES: only the configured CA, the configured name, and the pins if any. Any failure is
//! a 502 and the upstream never sees a request.

mod common;

use std::sync::Arc;

use common::*;
use ndes_gateway::config::Config;
use ndes_gateway::upstream::{
    spki_sha256, Upstream as UpstreamPool, UpstreamErrorKind, UpstreamTarget,
};
use ndes_gateway::Gateway;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

fn pin_of(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    spki_sha256(&der).unwrap()
}

const CACAPS: &str = "/certsrv/mscep/mscep.dll?operation=GetCACaps&message=default";

/// GetCACaps through the gateway, on a connection of its own.
async fn caps_through(gw: &Gateway, pki: &Pki) -> RawResponse {
    let req = format!("GET {CACAPS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    raw_request(gw.local_addr(), pki.root(), req.as_bytes()).await
}

/// What the gateway's pool says when asked to reach the upstream directly: the error kind that the
/// log line and the metric label carry.
async fn pool_error(config: &Config) -> Option<UpstreamErrorKind> {
    let target = UpstreamTarget::from_config(&config.upstream).unwrap();
    let uri = target.uri_for("", Some("operation=GetCACaps")).unwrap();
    let pool = UpstreamPool::new(target, &config.upstream);
    let req = http::Request::get(uri)
        .header("host", "ndes.corp.test")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    pool.send(req, true).await.err().map(|e| e.kind)
}

#[tokio::test]
async fn a_certificate_from_another_ca_gets_502_and_no_request_reaches_the_upstream() {
    let pki = Pki::new();
    let (cert, key) = Pki::foreign_ndes_cert();
    let upstream = Upstream::start(Some((cert, key)), Arc::new(caps_response)).await;
    let config = gateway_config(&pki, upstream.addr, "", "");
    let gw = Gateway::start(&config).await.unwrap();
    let r = caps_through(&gw, &pki).await;
    assert_eq!(r.status_line, "HTTP/1.1 502 Bad Gateway");
    assert!(
        !r.text().contains("ndes.corp.test"),
        "internal names stay in the log: {}",
        r.text()
    );
    assert_eq!(upstream.count(), 0);
    assert_eq!(pool_error(&config).await, Some(UpstreamErrorKind::TlsChain));
}

#[tokio::test]
async fn the_right_ca_with_the_wrong_name_gets_502() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.upstream.server_name = Some("ndes2.corp.test".to_owned());
    let gw = Gateway::start(&config).await.unwrap();
    let r = caps_through(&gw, &pki).await;
    assert_eq!(r.status_line, "HTTP/1.1 502 Bad Gateway");
    assert_eq!(upstream.count(), 0);
    assert_eq!(pool_error(&config).await, Some(UpstreamErrorKind::TlsName));
}

#[tokio::test]
async fn a_matching_spki_pin_is_served_and_a_wrong_one_gets_502() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;

    let good = format!("spki_sha256 = [\"{}\"]", pin_of(&pki.ndes_cert));
    let gw = Gateway::start(&gateway_config(&pki, upstream.addr, &good, ""))
        .await
        .unwrap();
    assert_eq!(caps_through(&gw, &pki).await.status_line, "HTTP/1.1 200 OK");
    assert_eq!(upstream.count(), 1);

    // A pin of another key, valid chain and name: the pin decides.
    let (other, _) = Pki::foreign_ndes_cert();
    let wrong = format!("spki_sha256 = [\"{}\"]", pin_of(&other));
    let config = gateway_config(&pki, upstream.addr, &wrong, "");
    let gw = Gateway::start(&config).await.unwrap();
    assert_eq!(
        caps_through(&gw, &pki).await.status_line,
        "HTTP/1.1 502 Bad Gateway"
    );
    assert_eq!(upstream.count(), 1);
    assert_eq!(
        pool_error(&config).await,
        Some(UpstreamErrorKind::PinMismatch)
    );
}

#[tokio::test]
async fn a_pinned_certificate_appended_to_another_chain_does_not_satisfy_the_pin() {
    let pki = Pki::new();
    // An impostor with its own certificate for the NDES name from the trusted CA, sending the
    // real (public) NDES certificate after it.
    let (impostor_cert, impostor_key) = pki
        .ca
        .issue_server(&["ndes.corp.test", "127.0.0.1"])
        .unwrap();
    let chain = format!("{impostor_cert}{}", pki.ndes_cert);
    let upstream = Upstream::start(Some((chain, impostor_key)), Arc::new(caps_response)).await;
    let pin = format!("spki_sha256 = [\"{}\"]", pin_of(&pki.ndes_cert));
    let config = gateway_config(&pki, upstream.addr, &pin, "");
    assert_eq!(
        pool_error(&config).await,
        Some(UpstreamErrorKind::PinMismatch)
    );
    // Without the pin the impostor passes: the pin is what stops it.
    let config = gateway_config(&pki, upstream.addr, "", "");
    assert_eq!(pool_error(&config).await, None);
}

#[tokio::test]
async fn an_upstream_that_is_down_gets_502_and_a_silent_one_504() {
    let pki = Pki::new();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = gateway_config(&pki, closed, "", "");
    assert_eq!(pool_error(&config).await, Some(UpstreamErrorKind::Connect));
    let gw = Gateway::start(&config).await.unwrap();
    assert_eq!(
        caps_through(&gw, &pki).await.status_line,
        "HTTP/1.1 502 Bad Gateway"
    );

    // Accepts TCP and never answers: the connect timeout (TLS handshake) runs out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = gateway_config(
        &pki,
        silent.local_addr().unwrap(),
        "connect_timeout = \"300ms\"",
        "",
    );
    let gw = Gateway::start(&config).await.unwrap();
    assert_eq!(
        caps_through(&gw, &pki).await.status_line,
        "HTTP/1.1 504 Gateway Timeout"
    );
    assert_eq!(pool_error(&config).await, Some(UpstreamErrorKind::Timeout));
    drop(silent);
}

#[test]
fn plain_http_upstream_only_on_loopback() {
    let base = |url: &str| {
        format!("[listen]\naddr = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\n[upstream]\nurl = \"{url}\"\n")
    };
    let ok = Config::parse(&base("http://127.0.0.1:8080/scep")).unwrap();
    assert!(UpstreamTarget::from_config(&ok.upstream)
        .unwrap()
        .tls
        .is_none());
    let c = Config::parse(&base("http://ndes.corp.test/certsrv/mscep/mscep.dll")).unwrap();
    let err = UpstreamTarget::from_config(&c.upstream)
        .unwrap_err()
        .to_string();
    assert!(err.contains("loopback"), "{err}");
    let c = Config::parse(&base("https://ndes.corp.test/certsrv/mscep/mscep.dll")).unwrap();
    let err = UpstreamTarget::from_config(&c.upstream)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("upstream.ca"), "{err}");
}
