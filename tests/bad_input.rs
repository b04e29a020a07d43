//! Hostile and broken input: a 400 or a closed connection, nothing forwarded, and another client
//! served normally at the same time.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GOOD: &str = "GET /certsrv/mscep/mscep.dll?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Half the 10 s defaults of the handshake and header timeouts: a test that sets them to 300 ms
/// and sees the connection closed within this knows its setting, not the default, did it.
const WITHIN_DEFAULTS: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads until the peer closes; returns what it sent. Bounded by WITHIN_DEFAULTS: a connection the
/// gateway does not close by then fails the test.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(WITHIN_DEFAULTS, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway kept the connection open");
    out
}

async fn assert_served(s: &Setup) {
    assert_eq!(s.raw(GOOD.as_bytes()).await.status_line, "HTTP/1.1 200 OK");
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// The first bytes of a TLS 1.2 ClientHello record that announces 512 bytes and sends 11.
const PARTIAL_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";

#[tokio::test]
async fn a_handshake_cut_short_is_dropped_and_others_are_served_meanwhile() {
    let s = Setup::with("", "").await;
    let mut held = tcp(s.addr()).await;
    held.write_all(PARTIAL_HELLO).await.unwrap();
    assert_served(&s).await;
    let mut dropped = tcp(s.addr()).await;
    dropped.write_all(PARTIAL_HELLO).await.unwrap();
    drop(dropped);
    assert_served(&s).await;
    drop(held);
    assert_served(&s).await;
    assert_eq!(s.upstream.count(), 3);
}

#[tokio::test]
async fn a_silent_client_is_cut_at_the_handshake_timeout() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.listen.handshake_timeout = std::time::Duration::from_millis(300);
    let gw = ndes_gateway::Gateway::start(&config).await.unwrap();
    let mut silent = tcp(gw.local_addr()).await;
    let mut half = tcp(gw.local_addr()).await;
    half.write_all(PARTIAL_HELLO).await.unwrap();
    assert!(read_until_closed(&mut silent).await.is_empty());
    read_until_closed(&mut half).await;
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_closed_without_an_answer() {
    let s = Setup::new().await;
    let mut plain = tcp(s.addr()).await;
    plain.write_all(GOOD.as_bytes()).await.unwrap();
    let got = read_until_closed(&mut plain).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "answered plain HTTP: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_served(&s).await;
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn garbage_on_the_tls_port_is_closed() {
    let s = Setup::new().await;
    let mut g = tcp(s.addr()).await;
    // A fixed pseudo-random sequence (xorshift), so a failure can be replayed.
    let mut x: u32 = 0x9e37_79b9;
    let junk: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let _ = g.write_all(&junk).await;
    read_until_closed(&mut g).await;
    assert_served(&s).await;
    assert_eq!(s.upstream.count(), 1);
}

/// Sends a malformed request over TLS while a good client is served on another connection.
async fn malformed(s: &Setup, request: &str) -> RawResponse {
    let bad = raw_request(s.addr(), s.pki.root(), request.as_bytes());
    let good = raw_request(s.addr(), s.pki.root(), GOOD.as_bytes());
    let (bad, good) = tokio::join!(bad, good);
    assert_eq!(good.status_line, "HTTP/1.1 200 OK");
    bad
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_400_and_never_forwarded() {
    let s = Setup::new().await;
    let r = malformed(
        &s,
        "POST /certsrv/mscep/mscep.dll?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
    assert_eq!(s.upstream.count(), 1);
    assert!(s
        .upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|seen| seen.method == "GET"));
}

#[tokio::test]
async fn two_different_content_lengths_are_400() {
    let s = Setup::new().await;
    let r = malformed(
        &s,
        "POST /certsrv/mscep/mscep.dll?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn a_header_without_a_colon_is_400() {
    let s = Setup::new().await;
    let r = malformed(
        &s,
        "GET /certsrv/mscep/mscep.dll?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nThis line has no colon\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn a_get_with_a_body_is_400() {
    let s = Setup::new().await;
    let r = malformed(
        &s,
        "GET /certsrv/mscep/mscep.dll?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn a_head_sent_too_slowly_is_cut_at_the_header_timeout() {
    let s = Setup::with("", "header_timeout = \"300ms\"").await;
    let mut tls = tls_connect(s.addr(), s.pki.root()).await;
    tls.write_all(b"GET /certsrv/mscep/mscep.dll?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(WITHIN_DEFAULTS, tls.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "the slow head was not cut at limits.header_timeout"
    );
    assert_eq!(s.upstream.count(), 0);
}
