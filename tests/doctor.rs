//! `doctor` against upstreams that answer like NDES in each of its known states, and the
//! certificate expiry watch.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use der::Decode;
use http_body_util::Full;
use ndes_gateway::cli::doctor::{self, Finding, Verdict};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

#[derive(Clone, Copy)]
struct Ndes {
    /// What the bare mscep.dll answers.
    bare: u16,
    /// Request-targets longer than this get IIS's 404 (request filtering not raised).
    max_url: usize,
    ra_expired: bool,
}

const HEALTHY: Ndes = Ndes {
    bare: 403,
    max_url: 65_534,
    ra_expired: false,
};

fn der_of(pem: &str) -> x509_cert::Certificate {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    x509_cert::Certificate::from_der(&der).unwrap()
}

/// An upstream with the dev NDES certificate that answers like IIS with NDES in state `ndes`.
async fn ndes_upstream(pki: &Pki, ndes: Ndes) -> Upstream {
    let root = der_of(&std::fs::read_to_string(pki.root()).unwrap());
    let ra = der_of(
        &pki.ca
            .issue_ra("NDES-RA-Encryption", ndes.ra_expired)
            .unwrap(),
    );
    let ca_ra = Bytes::from(ndes_gateway::scep::degenerate_pkcs7(&[root, ra]).unwrap());
    Upstream::start(
        Some((pki.ndes_cert.clone(), pki.ndes_key.clone())),
        Arc::new(move |seen: &Seen| {
            let iis = http::Response::builder().header("server", "Microsoft-IIS/10.0");
            let (status, ct, body) = if seen.target.len() > ndes.max_url {
                (404, "text/html", Bytes::from_static(b"<h1>404.15</h1>"))
            } else if seen.target.contains("GetCACaps") {
                (
                    200,
                    "text/plain",
                    Bytes::from_static(
                        b"POSTPKIOperation\r\nRenewal\r\nSHA-512\r\nSHA-256\r\nSHA-1\r\nDES3\r\n",
                    ),
                )
            } else if seen.target.contains("GetCACert") {
                (200, "application/x-x509-ca-ra-cert", ca_ra.clone())
            } else {
                (
                    ndes.bare,
                    "text/html",
                    Bytes::from_static(b"<html>Network Device Enrollment Service</html>"),
                )
            };
            iis.status(status)
                .header("content-type", ct)
                .body(Full::new(body))
                .unwrap()
        }),
    )
    .await
}

async fn run_doctor(ndes: Ndes) -> Vec<Finding> {
    let pki = Pki::new();
    let upstream = ndes_upstream(&pki, ndes).await;
    doctor::run(&gateway_config(&pki, upstream.addr, "", ""), None).await
}

fn verdict<'a>(findings: &'a [Finding], check: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.check == check)
        .unwrap_or_else(|| panic!("no {check} in {findings:?}"))
}

#[tokio::test]
async fn a_healthy_ndes_passes_with_the_known_warnings() {
    let f = run_doctor(HEALTHY).await;
    assert!(!doctor::failed(&f), "{}", doctor::render_text(&f));
    assert_eq!(verdict(&f, "policy_module").verdict, Verdict::Pass);
    assert_eq!(verdict(&f, "upstream_tls").verdict, Verdict::Pass);
    assert_eq!(verdict(&f, "getcacert").verdict, Verdict::Pass);
    assert_eq!(verdict(&f, "ra_expiry").verdict, Verdict::Pass);
    assert_eq!(verdict(&f, "long_url_65k").verdict, Verdict::Pass);
    // NDES on Windows Server 2016-2022 does not advertise AES.
    let caps = verdict(&f, "getcacaps");
    assert_eq!(caps.verdict, Verdict::Warn);
    assert!(caps.detail.contains("AES"), "{}", caps.detail);
}

#[tokio::test]
async fn each_ndes_state_of_the_bare_dll_is_diagnosed() {
    for (bare, verdict_wanted, words) in [
        (200, Verdict::Fail, "Certificate Connector"),
        (503, Verdict::Fail, "application pool"),
        (500, Verdict::Fail, "IIS_IUSRS"),
    ] {
        let f = run_doctor(Ndes { bare, ..HEALTHY }).await;
        let p = verdict(&f, "policy_module");
        assert_eq!(p.verdict, verdict_wanted, "{bare}: {p:?}");
        assert!(
            format!("{} {}", p.detail, p.fix).contains(words),
            "{bare}: {p:?}"
        );
        assert!(doctor::failed(&f));
    }
}

#[tokio::test]
async fn iis_limits_not_raised_are_named() {
    let f = run_doctor(Ndes {
        max_url: 20_000,
        ..HEALTHY
    })
    .await;
    for check in ["long_url_40k", "long_url_65k"] {
        let l = verdict(&f, check);
        assert_eq!(l.verdict, Verdict::Fail, "{l:?}");
        assert!(l.detail.contains("404"), "{l:?}");
        assert!(
            l.fix.contains("MaxFieldLength") && l.fix.contains("Maximum query string"),
            "{l:?}"
        );
    }
    let f = run_doctor(Ndes {
        max_url: 50_000,
        ..HEALTHY
    })
    .await;
    assert_eq!(verdict(&f, "long_url_40k").verdict, Verdict::Pass);
    assert_eq!(verdict(&f, "long_url_65k").verdict, Verdict::Fail);
}

#[tokio::test]
async fn an_expired_ra_certificate_is_diagnosed() {
    let f = run_doctor(Ndes {
        ra_expired: true,
        ..HEALTHY
    })
    .await;
    let ra = verdict(&f, "ra_expiry");
    assert_eq!(ra.verdict, Verdict::Fail, "{ra:?}");
    assert!(
        ra.detail.contains("NDES-RA-Encryption") && ra.detail.contains("2021-01-01"),
        "{ra:?}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_diagnosed() {
    let pki = Pki::new();
    let upstream = Upstream::start(Some(Pki::foreign_ndes_cert()), Arc::new(caps_response)).await;
    let f = doctor::run(&gateway_config(&pki, upstream.addr, "", ""), None).await;
    let t = verdict(&f, "upstream_tls");
    assert_eq!(t.verdict, Verdict::Fail);
    assert!(
        t.detail.starts_with("tls_chain") && t.fix.contains("upstream.ca"),
        "{t:?}"
    );
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn the_expiry_watch_exports_real_dates_and_an_expired_ra_fails_readiness() {
    let pki = Pki::new();
    let upstream = ndes_upstream(
        &pki,
        Ndes {
            ra_expired: true,
            ..HEALTHY
        },
    )
    .await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.admin.enabled = true;
    config.admin.addr = "127.0.0.1:0".parse().unwrap();
    config.admin.probe_interval = std::time::Duration::from_millis(50);
    config.scep.cert_check_interval = std::time::Duration::from_millis(50);
    let gw = ndes_gateway::Gateway::start(&config).await.unwrap();
    let server = upstream.addr.to_string();
    let ready = format!("ndes_gateway_upstream_ready{{server=\"{server}\"}} 1");
    // Bounded wait for the first GetCACert and the first probe.
    let mut scrape = String::new();
    for _ in 0..400 {
        scrape = gw.metrics.render();
        if scrape.contains("role=\"ra\"")
            && scrape.contains("role=\"upstream_tls\"")
            && scrape.contains(&ready)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // 2021-01-01T00:00:00Z, the RA certificate's notAfter.
    assert!(
        scrape.contains(&format!("ndes_gateway_certificate_expiry_timestamp_seconds{{role=\"ra\",server=\"{server}\",subject=\"CN=NDES-RA-Encryption\"}} 1609459200")),
        "{scrape}"
    );
    // rcgen's default notAfter for the others: 4096-01-01.
    assert!(
        scrape.contains(
            "{role=\"listener\",server=\"\",subject=\"CN=scep.example.test\"} 67090118400"
        ),
        "{scrape}"
    );
    assert!(
        scrape.contains(&format!("{{role=\"upstream_tls\",server=\"{server}\",subject=\"CN=ndes.corp.test\"}} 67090118400")),
        "{scrape}"
    );
    assert!(scrape.contains("role=\"ca\""), "{scrape}");
    // NDES answers GetCACaps (upstream_ready 1) and still the gateway is not ready: the RA
    // certificate has expired.
    assert!(scrape.contains(&ready), "{scrape}");
    assert!(!gw.readiness.is_ready());
}
