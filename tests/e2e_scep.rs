//! End to end with the real tools (Debian package `scep`): micromdm scepserver as the CA, a second
//! gateway instance as its TLS front (IIS on the NDES host), the public gateway with pinned trust,
//! and scepclient enrolling through it.

mod common;

use base64::Engine;
use bytes::Bytes;
use common::*;
use ndes_gateway::config::Config;
use ndes_gateway::dev::demo::{self, ScepServer};
use ndes_gateway::Gateway;

struct Chain {
    dir: tempfile::TempDir,
    pki: ndes_gateway::dev::devpki::DevPki,
    scep: ScepServer,
    _front: Gateway,
    public: Gateway,
}

impl Chain {
    async fn start() -> Chain {
        let dir = tempfile::tempdir().unwrap();
        let pki = ndes_gateway::dev::devpki::generate(&dir.path().join("pki")).unwrap();
        let scep = ScepServer::start(dir.path())
            .await
            .expect("scepserver (Debian package scep)");
        let front = Gateway::start(&demo::front_config(&pki, &scep.url()).unwrap())
            .await
            .unwrap();
        let text =
            demo::public_config_text(&pki, "127.0.0.1:0".parse().unwrap(), front.local_addr())
                .unwrap();
        let public = Gateway::start(&Config::parse(&text).unwrap())
            .await
            .unwrap();
        Chain {
            dir,
            pki,
            scep,
            _front: front,
            public,
        }
    }

    fn url(&self) -> String {
        format!(
            "https://localhost:{}{SCEP}",
            self.public.local_addr().port()
        )
    }

    fn issued(&self, cn: &str) -> Vec<String> {
        std::fs::read_dir(&self.scep.depot)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&format!("{cn}.")) && n.ends_with(".pem"))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scepclient_enrols_through_the_gateway() {
    let chain = Chain::start().await;
    let cert = demo::enrol(
        &chain.dir.path().join("client"),
        &chain.url(),
        &chain.pki.root,
        "e2e-device",
    )
    .await
    .unwrap();
    let (subject, issuer, _) = ndes_gateway::tls::describe_certificate(&cert).unwrap();
    assert!(subject.contains("CN=e2e-device"), "{subject}");
    assert!(issuer.contains("SCEP CA"), "{issuer}");
    assert_eq!(chain.issued("e2e-device").len(), 1);
    // The gateway read both sides of the exchange.
    let scrape = chain.public.metrics.render();
    assert!(
        scrape.contains("ndes_gateway_scep_messages_total{fail_info=\"none\",message_type=\"PKCSReq\",pki_status=\"SUCCESS\"} 1"),
        "{scrape}"
    );
    assert!(
        scrape.contains("ndes_gateway_scep_parse_errors_total{direction=\"request\"} 0"),
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_ca_cert_through_the_gateway_is_byte_identical_to_direct() {
    let chain = Chain::start().await;
    for op in ["GetCACert&message=ca", "GetCACaps&message=default"] {
        let direct = direct_get(chain.scep.port, &format!("/scep?operation={op}")).await;
        let through = raw_request(
            chain.public.local_addr(),
            &chain.pki.root,
            format!("GET {SCEP}?operation={op} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(direct.status_line, "HTTP/1.1 200 OK", "{op}");
        assert_eq!(through.status_line, "HTTP/1.1 200 OK", "{op}");
        assert!(!through.body.is_empty());
        assert!(
            through.body == direct.body,
            "{op}: the body changed on the way"
        );
        assert_eq!(
            through.header("content-type"),
            direct.header("content-type"),
            "{op}"
        );
    }
}

/// A PKCSReq made by scepclient for the chain's CA.
async fn record_pkcsreq(chain: &Chain, cn: &str) -> Bytes {
    let ca = direct_get(chain.scep.port, "/scep?operation=GetCACert&message=ca").await;
    assert_eq!(ca.status_line, "HTTP/1.1 200 OK");
    pkcsreq_for(
        &chain.dir.path().join("recording"),
        &chain.pki.root,
        Bytes::from(ca.body),
        cn,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_pkcsreq_sent_as_get_enrols_through_the_gateway() {
    let chain = Chain::start().await;
    let pkcsreq = record_pkcsreq(&chain, "get-device").await;
    assert!(pkcsreq.len() > 1000, "a PKCSReq is a few KB of DER");
    let request = ndes_gateway::scep::parse_pki_message(&pkcsreq).unwrap();
    assert_eq!(request.message_type, Some(19), "PKCSReq");
    assert_eq!(request.sender_nonce.as_ref().map(Vec::len), Some(16));
    let transaction_id = request.transaction_id.clone().unwrap();
    assert!(!transaction_id.is_empty());
    let message = percent_encode(&base64::engine::general_purpose::STANDARD.encode(&pkcsreq));
    let target = format!("{SCEP}?operation=PKIOperation&message={message}");
    let r = raw_request(
        chain.public.local_addr(),
        &chain.pki.root,
        format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/x-pki-message")
    );
    assert_eq!(
        chain.issued("get-device").len(),
        1,
        "scepserver issued no certificate for the GET"
    );
    // The gateway read the message from the request-target, as it reads a POST body.
    assert_eq!(
        ndes_gateway::scep::parse_get_message(target.split_once('?').unwrap().1),
        Ok(request)
    );
    let scrape = chain.public.metrics.render();
    assert!(
        scrape.contains("ndes_gateway_scep_messages_total{fail_info=\"none\",message_type=\"PKCSReq\",pki_status=\"SUCCESS\"} 1"),
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_pkcsreq_posted_chunked_enrols_through_the_gateway() {
    let chain = Chain::start().await;
    let pkcsreq = record_pkcsreq(&chain, "chunked-device").await;
    // As Java and Go clients stream a body: chunked, no Content-Length, in uneven pieces.
    let mut req = format!(
        "POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-pki-message\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for part in pkcsreq.chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = raw_request(chain.public.local_addr(), &chain.pki.root, &req).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/x-pki-message")
    );
    assert_eq!(
        chain.issued("chunked-device").len(),
        1,
        "scepserver issued no certificate for the chunked POST"
    );
    let scrape = chain.public.metrics.render();
    assert!(
        scrape.contains("ndes_gateway_scep_messages_total{fail_info=\"none\",message_type=\"PKCSReq\",pki_status=\"SUCCESS\"} 1"),
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_against_scepserver_behind_a_tls_front() {
    let chain = Chain::start().await;
    let text = demo::public_config_text(
        &chain.pki,
        "127.0.0.1:0".parse().unwrap(),
        chain._front.local_addr(),
    )
    .unwrap();
    let config = Config::parse(&text).unwrap();
    let findings = ndes_gateway::cli::doctor::run(&config, None).await;
    let report = ndes_gateway::cli::doctor::render_text(&findings);
    assert!(!ndes_gateway::cli::doctor::failed(&findings), "{report}");
    let warned: Vec<&str> = findings
        .iter()
        .filter(|f| f.verdict == ndes_gateway::cli::doctor::Verdict::Warn)
        .map(|f| f.check)
        .collect();
    // The dev certificate comes straight from the root; scepserver is not IIS.
    assert_eq!(warned, ["listener_chain", "policy_module"], "{report}");
}
