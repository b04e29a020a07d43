//! The same limits over HTTP/2: the header list size is raised so a 65534-byte :path arrives whole.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};

fn absolute(path: &str) -> http::Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTPS);
    parts.authority = Some("scep.example.test".parse().unwrap());
    parts.path_and_query = Some(path.parse().unwrap());
    http::Uri::from_parts(parts).unwrap()
}

async fn h2_get(s: &Setup, path: &str) -> (u16, String, String) {
    let mut client = h2_client(s.addr(), s.pki.root()).await;
    let req = http::Request::get(absolute(path))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(IO_TIMEOUT, client.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ct, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_65534_byte_path_is_forwarded_byte_identical() {
    let s = Setup::new().await;
    let target = pki_target(SCEP, 65_534);
    let (status, _, body) = h2_get(&s, &target).await;
    assert_eq!(status, 200);
    assert_eq!(body, "POSTPKIOperation\nSHA-256\nAES\n");
    let seen = s.upstream.last();
    assert!(
        seen.target == target,
        "the upstream received a different request-target"
    );
    // NDES gets HTTP/1.1 with the internal Host, whatever the client spoke.
    assert_eq!(seen.headers.get("host").unwrap(), "ndes.corp.test");
}

#[tokio::test]
async fn configured_limits_answer_414_over_http2_with_the_reason() {
    let s = Setup::with("", "max_uri_bytes = 1000").await;
    assert_eq!(h2_get(&s, &pki_target(SCEP, 1000)).await.0, 200);
    let (status, ct, body) = h2_get(&s, &pki_target(SCEP, 1001)).await;
    assert_eq!(status, 414);
    assert_eq!(ct, "text/plain; charset=utf-8");
    assert!(body.contains("limits.max_uri_bytes"), "{body}");
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn filter_rules_apply_over_http2() {
    let s = Setup::new().await;
    assert_eq!(h2_get(&s, "/certsrv/mscep_admin/").await.0, 404);
    assert_eq!(h2_get(&s, &format!("{SCEP}?operation=Nope")).await.0, 400);
    assert_eq!(s.upstream.count(), 0);
    let mut client = h2_client(s.addr(), s.pki.root()).await;
    let body: Vec<u8> = (0..65_537u32).map(|i| i as u8).collect();
    let req = http::Request::post(absolute(&format!("{SCEP}?operation=PKIOperation")))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(s.upstream.count(), 0);
}

async fn python_h2(s: &Setup, length: usize) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/tools/h2_request.py");
    let out = tokio::process::Command::new("/usr/bin/python3")
        .args([script, "127.0.0.1", &s.addr().port().to_string()])
        .arg(s.pki.root())
        .args(["scep.example.test", &length.to_string()])
        .output()
        .await
        .expect("python3 with the h2 library (Debian python3-h2) is needed");
    assert!(
        out.status.success(),
        "h2_request.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_65534_byte_path_from_another_http2_stack() {
    let s = Setup::new().await;
    let r = python_h2(&s, 65_534).await;
    assert_eq!(r["status"], 200, "{r:?}");
    assert_eq!(s.upstream.last().target.len(), 65_534);
}

#[tokio::test]
async fn a_65535_byte_path_is_refused_and_never_forwarded() {
    let s = Setup::new().await;
    let r = python_h2(&s, 65_535).await;
    // The HTTP/2 layer (h2) refuses a :path past the URI type's 65534-byte ceiling with a stream
    // reset (PROTOCOL_ERROR, code 1) before the filter sees it: no 414 can be written there.
    assert!(r["status"].is_null(), "{r:?}");
    assert_eq!(r["reset"], 1, "{r:?}");
    assert_eq!(s.upstream.count(), 0);
    // The connection still serves the next client.
    assert_eq!(python_h2(&s, 200).await["status"], 200);
}

/// A body of `total` bytes in 10 000-byte DATA frames, with no length known in advance: the client
/// sends no Content-Length, so only the gateway's reading limit can stop it.
struct Unsized {
    left: usize,
}

impl hyper::body::Body for Unsized {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(10_000);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![
            b'x';
            n
        ])))))
    }
}

async fn h2_send(s: &Setup, method: http::Method, path: &str, body: Unsized) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let tls = tls_connector(s.pki.root(), &[b"h2"])
        .connect(
            rustls::pki_types::ServerName::try_from("scep.example.test").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(absolute(path))
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(IO_TIMEOUT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_body_without_content_length_is_capped_while_it_streams() {
    let s = Setup::new().await;
    let post = format!("{SCEP}?operation=PKIOperation");
    let (status, _) = h2_send(&s, http::Method::POST, &post, Unsized { left: 65_536 }).await;
    assert_eq!(status, 200);
    let seen = s.upstream.last();
    assert_eq!(seen.body.len(), 65_536);
    assert_eq!(seen.headers.get("content-length").unwrap(), "65536");
    let (status, body) = h2_send(&s, http::Method::POST, &post, Unsized { left: 65_537 }).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("limits.max_body_bytes"), "{body}");
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn a_get_ended_by_an_empty_data_frame_is_served() {
    let s = Setup::new().await;
    let (status, _) = h2_send(
        &s,
        http::Method::GET,
        &format!("{SCEP}?operation=GetCACaps"),
        Unsized { left: 0 },
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn a_get_with_data_frames_is_400() {
    let s = Setup::new().await;
    let (status, _) = h2_send(
        &s,
        http::Method::GET,
        &format!("{SCEP}?operation=GetCACaps"),
        Unsized { left: 10 },
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(s.upstream.count(), 0);
}
