//! The limits and filter rules over raw TLS sockets, HTTP/1.1: the exact status line at each limit
//! and one past it, what the upstream receives, and that it receives nothing for a refusal.

mod common;

use common::*;

#[tokio::test]
async fn request_target_of_65534_bytes_is_forwarded_byte_identical() {
    let s = Setup::new().await;
    let target = pki_target(SCEP, 65_534);
    assert_eq!(target.len(), 65_534);
    let r = s.get(&target).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.text(), "POSTPKIOperation\nSHA-256\nAES\n");
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
    let seen = s.upstream.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.target.len(), 65_534);
    assert!(
        seen.target == target,
        "the upstream received a different request-target"
    );
}

#[tokio::test]
async fn request_target_of_65535_bytes_is_answered_414_and_not_forwarded() {
    let s = Setup::new().await;
    let r = s.get(&pki_target(SCEP, 65_535)).await;
    assert_eq!(r.status_line, "HTTP/1.1 414 URI Too Long");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert!(r.text().contains("limits.max_uri_bytes"), "{}", r.text());
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn pkiclient_exe_suffix_is_kept_and_query_forwarded_unchanged() {
    let s = Setup::new().await;
    let target = format!("{SCEP}/pkiclient.exe?message=a+b/c%2Bd%0A==&operation=PKIOperation");
    let r = s.get(&target).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(s.upstream.last().target, target);
}

#[tokio::test]
async fn configured_uri_limit_answers_414_naming_its_key() {
    let s = Setup::with("", "max_uri_bytes = 1000").await;
    let r = s.get(&pki_target(SCEP, 1000)).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(s.upstream.last().target.len(), 1000);
    let r = s.get(&pki_target(SCEP, 1001)).await;
    assert_eq!(r.status_line, "HTTP/1.1 414 URI Too Long");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert!(r.text().contains("limits.max_uri_bytes"), "{}", r.text());
    assert!(r.text().contains("1001"), "{}", r.text());
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn configured_query_limit_answers_414_naming_its_key() {
    let s = Setup::with("", "max_query_bytes = 900").await;
    let at = pki_target(SCEP, SCEP.len() + 1 + 900);
    assert_eq!(s.get(&at).await.status_line, "HTTP/1.1 200 OK");
    let past = pki_target(SCEP, SCEP.len() + 1 + 901);
    let r = s.get(&past).await;
    assert_eq!(r.status_line, "HTTP/1.1 414 URI Too Long");
    assert!(r.text().contains("limits.max_query_bytes"), "{}", r.text());
    assert_eq!(s.upstream.count(), 1);
}

/// A request whose header section (each `name: value\r\n`, the request line excluded) is exactly
/// `bytes` long.
fn request_with_header_bytes(bytes: usize) -> String {
    let fixed = ["Host: scep.example.test\r\n", "Connection: close\r\n"];
    let used: usize = fixed.iter().map(|l| l.len()).sum();
    let filler_overhead = "X-Fill: \r\n".len();
    let value = "v".repeat(bytes - used - filler_overhead);
    format!(
        "GET {SCEP}?operation=GetCACaps HTTP/1.1\r\n{}{}X-Fill: {value}\r\n\r\n",
        fixed[0], fixed[1]
    )
}

#[tokio::test]
async fn headers_of_16_kib_pass_and_one_byte_more_gets_431() {
    let s = Setup::new().await;
    let r = s.raw(request_with_header_bytes(16_384).as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(s.upstream.count(), 1);
    let r = s.raw(request_with_header_bytes(16_385).as_bytes()).await;
    assert_eq!(
        r.status_line,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert!(r.text().contains("limits.max_header_bytes"), "{}", r.text());
    assert_eq!(s.upstream.count(), 1);
}

fn post(body_len: usize, chunked: bool) -> (Vec<u8>, Vec<u8>) {
    let body: Vec<u8> = (0..body_len).map(|i| (i % 251) as u8).collect();
    let mut req = format!(
        "POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: scep.example.test\r\nConnection: close\r\nContent-Type: application/x-pki-message\r\n"
    )
    .into_bytes();
    if chunked {
        req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        for part in body.chunks(10_000) {
            req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            req.extend_from_slice(part);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
    } else {
        req.extend_from_slice(format!("Content-Length: {body_len}\r\n\r\n").as_bytes());
        req.extend_from_slice(&body);
    }
    (req, body)
}

#[tokio::test]
async fn body_of_64_kib_is_forwarded_whole_and_one_byte_more_gets_413() {
    let s = Setup::new().await;
    let (req, body) = post(65_536, false);
    let r = s.raw(&req).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    let seen = s.upstream.last();
    assert_eq!(seen.body.len(), 65_536);
    assert!(seen.body == body, "the upstream received a different body");
    assert_eq!(seen.headers.get("content-length").unwrap(), "65536");

    let (req, _) = post(65_537, false);
    let r = s.raw(&req).await;
    assert_eq!(r.status_line, "HTTP/1.1 413 Payload Too Large");
    assert!(r.text().contains("limits.max_body_bytes"), "{}", r.text());
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn a_chunked_body_is_read_whole_and_forwarded_with_a_length() {
    let s = Setup::new().await;
    // At the limit, in chunks, then one byte past it.
    let (req, body) = post(65_536, true);
    let r = s.raw(&req).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    let seen = s.upstream.last();
    assert_eq!(seen.body, body);
    assert_eq!(seen.headers.get("content-length").unwrap(), "65536");
    assert!(seen.headers.get("transfer-encoding").is_none());
    let (req, _) = post(65_537, true);
    let r = s.raw(&req).await;
    assert_eq!(r.status_line, "HTTP/1.1 413 Payload Too Large");
    assert!(r.text().contains("limits.max_body_bytes"), "{}", r.text());
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn paths_other_than_the_two_scep_paths_are_404_and_never_forwarded() {
    let s = Setup::new().await;
    for target in [
        "/certsrv/mscep_admin/",
        "/certsrv/mscep_admin/?operation=GetCACaps",
        "/",
        "/CertificateRegistrationSvc/Certificate/VerifyRequest",
        "/certsrv/mscep/mscep.dll/../../mscep_admin/",
        "/certsrv/mscep/mscep.dll/",
        "/certsrv/",
    ] {
        let r = s.get(target).await;
        assert_eq!(r.status_line, "HTTP/1.1 404 Not Found", "{target}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("text/plain; charset=utf-8")
        );
    }
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn methods_other_than_get_and_post_are_405_with_allow() {
    let s = Setup::new().await;
    for method in ["PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"] {
        let req = format!(
            "{method} {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let r = s.raw(req.as_bytes()).await;
        assert_eq!(r.status_line, "HTTP/1.1 405 Method Not Allowed", "{method}");
        assert_eq!(r.header("allow").as_deref(), Some("GET, POST"), "{method}");
    }
    for op in ["GetCACaps", "GetCACert", "GetNextCACert"] {
        let req = format!("POST {SCEP}?operation={op} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        let r = s.raw(req.as_bytes()).await;
        assert_eq!(r.status_line, "HTTP/1.1 405 Method Not Allowed", "{op}");
        assert_eq!(r.header("allow").as_deref(), Some("GET"), "{op}");
    }
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn operations_are_matched_in_any_case_and_order_and_unknown_ones_are_400() {
    let s = Setup::new().await;
    for target in [
        format!("{SCEP}?operation=GetCACaps&message=default"),
        format!("{SCEP}?message=ca&operation=getcacert"),
        format!("{SCEP}/pkiclient.exe?OPERATION=GETNEXTCACERT&message=SCEP%20Authority"),
    ] {
        assert_eq!(
            s.get(&target).await.status_line,
            "HTTP/1.1 200 OK",
            "{target}"
        );
        assert_eq!(s.upstream.last().target, target);
    }
    let forwarded = s.upstream.count();
    for target in [
        format!("{SCEP}?operation=GetCRL"),
        format!("{SCEP}?message=x"),
        format!("{SCEP}?operation=GetCACaps&operation=PKIOperation"),
    ] {
        let r = s.get(&target).await;
        assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request", "{target}");
    }
    assert_eq!(s.upstream.count(), forwarded);
}

#[tokio::test]
async fn the_bare_scep_path_is_forwarded_for_the_403_check() {
    let s = Setup::new().await;
    let r = s.get(SCEP).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    let seen = s.upstream.last();
    assert_eq!(seen.target, SCEP);
    assert_eq!(seen.headers.get("host").unwrap(), "ndes.corp.test");
}

#[tokio::test]
async fn forwarding_headers_are_set_by_the_gateway_and_hop_by_hop_ones_dropped() {
    let s = Setup::new().await;
    let req = format!(
        "GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: scep.example.test\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Proto: http\r\nAuthorization: NTLM TlRMTVNTUAABAAAA\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nUser-Agent: Mozilla/4.0 (compatible; Win32; NDES client)\r\n\r\n"
    );
    assert_eq!(s.raw(req.as_bytes()).await.status_line, "HTTP/1.1 200 OK");
    let h = s.upstream.last().headers;
    assert_eq!(h.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(h.get("host").unwrap(), "ndes.corp.test");
    assert!(h.get("x-hop").is_none());
    assert!(h.get("authorization").is_none());
    assert!(h.get("forwarded").is_none());
    assert_eq!(h.get_all("x-forwarded-proto").iter().count(), 1);
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(
        h.get("user-agent").unwrap(),
        "Mozilla/4.0 (compatible; Win32; NDES client)"
    );
}

#[tokio::test]
async fn post_body_types_other_than_pki_message_are_415() {
    let s = Setup::new().await;
    let req = format!("POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi");
    let r = s.raw(req.as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 415 Unsupported Media Type");
    // scepclient's type and no type at all are both SCEP.
    for ct in ["Content-Type: application/octet-stream\r\n", ""] {
        let req = format!("POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{ct}Content-Length: 2\r\n\r\nhi");
        assert_eq!(
            s.raw(req.as_bytes()).await.status_line,
            "HTTP/1.1 200 OK",
            "{ct}"
        );
    }
    assert_eq!(s.upstream.count(), 2);
}

#[tokio::test]
async fn upstream_status_content_type_and_body_pass_through_unchanged() {
    let pki = Pki::new();
    let body: &'static [u8] = b"\x30\x82\x01\x00 not really DER";
    let upstream = Upstream::start(
        Some((pki.ndes_cert.clone(), pki.ndes_key.clone())),
        std::sync::Arc::new(move |_: &Seen| {
            http::Response::builder()
                .status(403)
                .header("content-type", "application/x-x509-ca-ra-cert")
                .header("x-powered-by", "ASP.NET")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
                .unwrap()
        }),
    )
    .await;
    let gw = ndes_gateway::Gateway::start(&gateway_config(&pki, upstream.addr, "", ""))
        .await
        .unwrap();
    let r = raw_request(
        gw.local_addr(),
        pki.root(),
        format!("GET {SCEP} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 403 Forbidden");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/x-x509-ca-ra-cert")
    );
    // What fingerprints the internal host stays inside.
    assert_eq!(r.header("x-powered-by"), None);
    assert_eq!(r.body, body);
}
