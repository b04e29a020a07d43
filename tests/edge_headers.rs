//! What crosses the gateway besides the request line: only allowlisted request headers reach
//! NDES, NDES's fingerprinting headers never reach the client, NDES's answer is re-framed by the
//! gateway (one Content-Length, no chunks, no trailers) or refused when its framing is ambiguous,
//! and request heads the HTTP parser would quietly accept (a fragment, no Host, too many fields,
//! an absurd length) get their own answer.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use ndes_gateway::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Request headers no client may get through to IIS, in odd case.
const HOSTILE: &[(&str, &str)] = &[
    ("RaNgE", "bytes=0-18446744073709551615"),
    ("x-ORIGINAL-url", "/certsrv/mscep_admin/"),
    ("X-Rewrite-URL", "/certsrv/mscep_admin/"),
    ("Translate", "f"),
    ("Cookie", "ASP.NET_SessionId=abc"),
    ("Accept-Encoding", "gzip"),
    ("If-Modified-Since", "Sat, 1 Jan 2000 00:00:00 GMT"),
    ("Authorization", "Negotiate YIIB"),
    ("X-Custom", "1"),
];

fn allowed_only(h: &http::HeaderMap, extra: &[&str]) {
    let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    let mut want = vec![
        "accept",
        "host",
        "user-agent",
        "x-forwarded-for",
        "x-forwarded-proto",
    ];
    want.extend_from_slice(extra);
    want.sort_unstable();
    assert_eq!(names, want, "{h:?}");
    assert_eq!(h.get("user-agent").unwrap(), "sscep/0.10");
    assert_eq!(h.get("accept").unwrap(), "*/*");
}

#[tokio::test]
async fn only_allowlisted_request_headers_reach_ndes_over_http1() {
    let s = Setup::new().await;
    let mut req =
        format!("GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: scep.example.test\r\nConnection: close\r\nUser-Agent: sscep/0.10\r\nAccept: */*\r\n");
    for (n, v) in HOSTILE {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    assert_eq!(s.raw(req.as_bytes()).await.status_line, "HTTP/1.1 200 OK");
    allowed_only(&s.upstream.last().headers, &[]);

    // A POST keeps its type and gets the gateway's length.
    let body = "abcd";
    let post = format!("POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nConnection: close\r\nUser-Agent: sscep/0.10\r\nAccept: */*\r\nRange: bytes=0-1\r\nContent-Type: application/x-pki-message\r\nContent-Length: 4\r\n\r\n{body}");
    assert_eq!(s.raw(post.as_bytes()).await.status_line, "HTTP/1.1 200 OK");
    let seen = s.upstream.last();
    allowed_only(&seen.headers, &["content-length", "content-type"]);
    assert_eq!(seen.headers.get("content-length").unwrap(), "4");
    assert_eq!(&seen.body[..], body.as_bytes());
}

#[tokio::test]
async fn only_allowlisted_request_headers_reach_ndes_over_http2() {
    let s = Setup::new().await;
    let mut send = h2_client(s.addr(), s.pki.root()).await;
    let mut req = http::Request::builder()
        .uri(format!(
            "https://scep.example.test{SCEP}?operation=GetCACaps"
        ))
        .header("user-agent", "sscep/0.10")
        .header("accept", "*/*");
    for (n, v) in HOSTILE {
        req = req.header(n.to_ascii_lowercase(), *v);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    allowed_only(&s.upstream.last().headers, &[]);
}

#[tokio::test]
async fn forward_headers_adds_a_name_and_check_refuses_dangerous_ones() {
    let s = Setup::with("forward_headers = [\"X-Custom\"]", "").await;
    let req = format!("GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\nUser-Agent: sscep/0.10\r\nAccept: */*\r\nx-custom: 1\r\nCookie: a=b\r\n\r\n");
    assert_eq!(s.raw(req.as_bytes()).await.status_line, "HTTP/1.1 200 OK");
    allowed_only(&s.upstream.last().headers, &["x-custom"]);

    for name in [
        "Range",
        "X-Original-URL",
        "host",
        "Transfer-Encoding",
        "bad name",
    ] {
        let text = format!(
            "[listen]\naddr = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\n[upstream]\nurl = \"https://n/certsrv/mscep/mscep.dll\"\nforward_headers = [{name:?}]\n"
        );
        let err = ndes_gateway::config::Config::parse(&text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("upstream.forward_headers"), "{name}: {err}");
    }
}

/// A GetCACert through the gateway over HTTP/1.1, `extra` appended to the query.
async fn get_ca_cert(gw: &Gateway, pki: &Pki, extra: &str) -> RawResponse {
    raw_request(
        gw.local_addr(),
        pki.root(),
        format!("GET {SCEP}?operation=GetCACert{extra} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
}

/// An upstream that answers what IIS adds to every answer.
#[tokio::test]
async fn headers_that_fingerprint_iis_never_reach_the_client() {
    let pki = Pki::new();
    let upstream = Upstream::start(
        Some((pki.ndes_cert.clone(), pki.ndes_key.clone())),
        Arc::new(|_: &Seen| {
            http::Response::builder()
                .header("content-type", "application/x-x509-ca-cert")
                .header("server", "Microsoft-IIS/10.0")
                .header("x-powered-by", "ASP.NET")
                .header("x-aspnet-version", "4.0.30319")
                .header("x-aspnetmvc-version", "5.2")
                .body(Full::new(Bytes::from_static(b"0123456789")))
                .unwrap()
        }),
    )
    .await;
    let gw = Gateway::start(&gateway_config(&pki, upstream.addr, "", ""))
        .await
        .unwrap();
    let r = get_ca_cert(&gw, &pki, "").await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.body, b"0123456789");
    let head = r.head.to_ascii_lowercase();
    for gone in ["server:", "x-powered-by", "x-aspnet"] {
        assert!(!head.contains(gone), "{gone} in {head}");
    }
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/x-x509-ca-cert")
    );
}

/// A TLS upstream that answers every request with `answer`, written as it is, and then closes the
/// connection when `close` says so. Counts the requests it read.
struct RawUpstream {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_upstream(pki: &Pki, answer: &'static [u8], close: bool) -> RawUpstream {
    let acceptor = tls_acceptor(&pki.ndes_cert, &pki.ndes_key);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Bounded: the gateway's requests here are small and few.
                for _ in 0..64 {
                    let n = match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        counted.fetch_add(1, Ordering::SeqCst);
                        if tls.write_all(answer).await.is_err() {
                            return;
                        }
                        let _ = tls.flush().await;
                        if close {
                            let _ = tls.shutdown().await;
                            return;
                        }
                    }
                }
            });
        }
    });
    RawUpstream {
        addr,
        requests,
        task,
    }
}

async fn through(answer: &'static [u8], close: bool) -> (RawResponse, RawUpstream, Gateway, Pki) {
    let pki = Pki::new();
    let up = raw_upstream(&pki, answer, close).await;
    let gw = Gateway::start(&gateway_config(&pki, up.addr, "", ""))
        .await
        .unwrap();
    let r = get_ca_cert(&gw, &pki, "").await;
    (r, up, gw, pki)
}

fn metric(gw: &Gateway, series: &str) -> f64 {
    series_sum(&gw.metrics.render(), series)
}

#[tokio::test]
async fn a_chunked_answer_with_trailers_is_sent_whole_with_a_length() {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-x509-ca-cert\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Checksum: 1\r\n\r\n";
    let (r, _up, gw, pki) = through(ANSWER, false).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.header("content-length").as_deref(), Some("7"));
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.header("trailer"), None);
    assert_eq!(r.body, b"abcdefg");

    // HTTP/2: a length, the data, no trailing HEADERS frame.
    let mut send = h2_client(gw.local_addr(), pki.root()).await;
    let req = http::Request::builder()
        .uri(format!(
            "https://scep.example.test{SCEP}?operation=GetCACert"
        ))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-length").unwrap(), "7");
    let collected = resp.into_body().collect().await.unwrap();
    assert!(collected.trailers().is_none());
    assert_eq!(&collected.to_bytes()[..], b"abcdefg");
}

#[tokio::test]
async fn a_close_delimited_answer_is_read_to_its_end_and_given_a_length() {
    const ANSWER: &[u8] =
        b"HTTP/1.0 200 OK\r\nContent-Type: application/x-x509-ca-cert\r\n\r\nwhole answer";
    let (r, _up, _gw, _pki) = through(ANSWER, true).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.header("content-length").as_deref(), Some("12"));
    assert_eq!(r.body, b"whole answer");
}

#[tokio::test]
async fn answers_framed_two_ways_are_502_and_the_connection_is_not_reused() {
    let cases: [(&str, &'static [u8], bool); 4] = [
        (
            "CL+TE",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
            false,
        ),
        (
            "two lengths",
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
            false,
        ),
        (
            "shorter than its length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd",
            true,
        ),
        (
            "longer than its length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabcdHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
    ];
    for (name, answer, close) in cases {
        let (r, up, gw, pki) = through(answer, close).await;
        assert_eq!(r.status_line, "HTTP/1.1 502 Bad Gateway", "{name}");
        assert_eq!(
            metric(&gw, "ndes_gateway_upstream_errors_total{kind=\"protocol\"}"),
            1.0,
            "{name}"
        );
        // The next request opens a new connection: the upstream reads it, and answers the same.
        let again = get_ca_cert(&gw, &pki, "").await;
        assert_eq!(again.status_line, "HTTP/1.1 502 Bad Gateway", "{name}");
        assert_eq!(up.requests.load(Ordering::SeqCst), 2, "{name}");
    }
}

#[tokio::test]
async fn an_answer_over_max_response_bytes_is_502() {
    let pki = Pki::new();
    let upstream = Upstream::start(
        Some((pki.ndes_cert.clone(), pki.ndes_key.clone())),
        Arc::new(|seen: &Seen| {
            let n = if seen.target.contains("big") {
                1025
            } else {
                1024
            };
            http::Response::new(Full::new(Bytes::from(vec![b'x'; n])))
        }),
    )
    .await;
    let gw = Gateway::start(&gateway_config(
        &pki,
        upstream.addr,
        "max_response_bytes = 1024",
        "",
    ))
    .await
    .unwrap();
    let at = get_ca_cert(&gw, &pki, "&x").await;
    assert_eq!(at.status_line, "HTTP/1.1 200 OK");
    assert_eq!(at.body.len(), 1024);
    let over = get_ca_cert(&gw, &pki, "&big").await;
    assert_eq!(over.status_line, "HTTP/1.1 502 Bad Gateway");
    assert!(
        over.text().contains("upstream.max_response_bytes"),
        "{}",
        over.text()
    );
    assert_eq!(
        metric(
            &gw,
            "ndes_gateway_upstream_errors_total{kind=\"response_too_large\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn a_fragment_in_the_request_target_is_400_and_never_forwarded() {
    let s = Setup::new().await;
    for target in [
        format!("{SCEP}#x?operation=Evil"),
        format!("{SCEP}?operation=GetCACaps#&operation=Evil"),
        format!("{SCEP}#"),
    ] {
        let r = s.get(&target).await;
        assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request", "{target}");
        assert!(r.text().contains("fragment"), "{}", r.text());
    }
    assert_eq!(s.upstream.count(), 0);
    assert_eq!(
        metric(
            &s.gateway,
            "ndes_gateway_rejected_total{reason=\"fragment\"}"
        ),
        3.0
    );
    // The same request-target without the fragment goes through.
    assert_eq!(
        s.get(&format!("{SCEP}?operation=GetCACaps"))
            .await
            .status_line,
        "HTTP/1.1 200 OK"
    );
}

#[tokio::test]
async fn http11_needs_exactly_one_host() {
    let s = Setup::new().await;
    let q = format!("{SCEP}?operation=GetCACaps");
    let none = s
        .raw(format!("GET {q} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())
        .await;
    assert_eq!(none.status_line, "HTTP/1.1 400 Bad Request");
    assert!(none.text().contains("Host"), "{}", none.text());
    let two = s
        .raw(
            format!("GET {q} HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
    assert_eq!(two.status_line, "HTTP/1.1 400 Bad Request");
    // HTTP/1.0 has no such rule.
    let old = s.raw(format!("GET {q} HTTP/1.0\r\n\r\n").as_bytes()).await;
    assert_eq!(old.status_line, "HTTP/1.0 200 OK");
    assert_eq!(s.upstream.count(), 1);
}

fn with_fields(n: usize) -> String {
    // Host is one of the n fields.
    let mut req = format!("GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n");
    for i in 0..n - 1 {
        req.push_str(&format!("X-F{i}: 1\r\n"));
    }
    req.push_str("\r\n");
    req
}

#[tokio::test]
async fn one_header_count_limit_for_both_versions() {
    let s = Setup::new().await;
    let at = s.raw(with_fields(100).as_bytes()).await;
    assert_eq!(at.status_line, "HTTP/1.1 200 OK");
    let over = s.raw(with_fields(101).as_bytes()).await;
    assert_eq!(
        over.status_line,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert!(
        over.text().contains("limits.max_header_count"),
        "{}",
        over.text()
    );

    // HTTP/2: no Host; :authority is a pseudo-header, not a field.
    let mut send = h2_client(s.addr(), s.pki.root()).await;
    for (n, status) in [(100, 200), (101, 431)] {
        let mut req = http::Request::builder().uri(format!(
            "https://scep.example.test{SCEP}?operation=GetCACaps"
        ));
        for i in 0..n {
            req = req.header(format!("x-f{i}"), "1");
        }
        let resp = send
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{n} fields");
    }
    assert_eq!(s.upstream.count(), 2);

    // A configured limit, at and one past it.
    let s = Setup::with("", "max_header_count = 10").await;
    assert_eq!(
        s.raw(with_fields(10).as_bytes()).await.status_line,
        "HTTP/1.1 200 OK"
    );
    let over = s.raw(with_fields(11).as_bytes()).await;
    assert_eq!(
        over.status_line,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert!(
        over.text().contains("limits.max_header_count"),
        "{}",
        over.text()
    );
}

#[tokio::test]
async fn an_absurd_content_length_is_413() {
    let s = Setup::new().await;
    for len in ["18446744073709551615", "18446744073709551614", "65537"] {
        let r = s
            .raw(format!("POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\nabcd").as_bytes())
            .await;
        assert_eq!(r.status_line, "HTTP/1.1 413 Payload Too Large", "{len}");
    }
    assert_eq!(s.upstream.count(), 0);
    assert_eq!(
        metric(
            &s.gateway,
            "ndes_gateway_rejected_total{reason=\"body_too_large\"}"
        ),
        3.0
    );
}

#[tokio::test]
async fn a_header_the_connection_header_names_is_not_forwarded() {
    let s = Setup::new().await;
    let req = format!("GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close, User-Agent\r\nUser-Agent: sscep/0.10\r\nAccept: */*\r\n\r\n");
    assert_eq!(s.raw(req.as_bytes()).await.status_line, "HTTP/1.1 200 OK");
    let h = s.upstream.last().headers;
    assert!(h.get("user-agent").is_none(), "{h:?}");
    assert_eq!(h.get("accept").unwrap(), "*/*");
}

#[tokio::test]
async fn chunked_bodies_elsewhere_get_the_status_of_what_is_wrong_first() {
    let s = Setup::new().await;
    let chunked = "Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n";
    for (request, status) in [
        (
            format!("PUT {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{chunked}"),
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            format!("POST /certsrv/mscep_admin/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{chunked}"),
            "HTTP/1.1 404 Not Found",
        ),
        (
            format!("GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{chunked}"),
            "HTTP/1.1 400 Bad Request",
        ),
    ] {
        assert_eq!(s.raw(request.as_bytes()).await.status_line, status, "{request}");
    }
    assert_eq!(s.upstream.count(), 0);
}
