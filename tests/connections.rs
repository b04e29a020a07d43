//! Connection handling: keep-alive, the idle timeout, the connection cap.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEEP_ALIVE: &str =
    "GET /certsrv/mscep/mscep.dll?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn keep_alive_serves_several_requests_then_the_idle_timeout_closes() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.listen.idle_timeout = Duration::from_millis(300);
    // Longer than the test waits, so only the idle timeout can close the connection.
    config.limits.header_timeout = Duration::from_secs(600);
    let gw = ndes_gateway::Gateway::start(&config).await.unwrap();
    let mut tls = tls_connect(gw.local_addr(), pki.root()).await;
    for _ in 0..3 {
        tls.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut tls).await.status_line, "HTTP/1.1 200 OK");
    }
    assert_eq!(upstream.count(), 3);
    // Then nothing: the gateway closes the connection by itself.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(IO_TIMEOUT, tls.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle connection was not closed");
    assert!(rest.is_empty());
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_a_freed_slot_is_reused() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.listen.max_connections = 2;
    let gw = ndes_gateway::Gateway::start(&config).await.unwrap();
    let a = tls_connect(gw.local_addr(), pki.root()).await;
    let _b = tls_connect(gw.local_addr(), pki.root()).await;

    // The third is closed before any TLS: its handshake fails.
    let tcp = tokio::net::TcpStream::connect(gw.local_addr())
        .await
        .unwrap();
    let third = tls_connector(pki.root(), &[b"http/1.1"]).connect(
        rustls::pki_types::ServerName::try_from("scep.example.test").unwrap(),
        tcp,
    );
    let third = tokio::time::timeout(IO_TIMEOUT, third)
        .await
        .expect("the third connection hung");
    assert!(
        third.is_err(),
        "a third connection was accepted past listen.max_connections = 2"
    );

    // Closing one frees its slot once the gateway has seen it go; try a bounded number of times.
    drop(a);
    let mut served = false;
    for _ in 0..100 {
        let tcp = tokio::net::TcpStream::connect(gw.local_addr())
            .await
            .unwrap();
        let conn = tls_connector(pki.root(), &[b"http/1.1"])
            .connect(
                rustls::pki_types::ServerName::try_from("scep.example.test").unwrap(),
                tcp,
            )
            .await;
        if let Ok(mut tls) = conn {
            tls.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
            served = read_response(&mut tls).await.status_line == "HTTP/1.1 200 OK";
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the freed slot was never given to a new connection");
}

#[tokio::test]
async fn http2_pings_alone_do_not_keep_a_connection_open() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.listen.idle_timeout = Duration::from_millis(300);
    let gw = ndes_gateway::Gateway::start(&config).await.unwrap();
    let tcp = tokio::net::TcpStream::connect(gw.local_addr())
        .await
        .unwrap();
    let tls = tls_connector(pki.root(), &[b"h2"])
        .connect(
            rustls::pki_types::ServerName::try_from("scep.example.test").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    // A client that sends a PING every 50 ms and never a request.
    let (_send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(50))
            .keep_alive_while_idle(true)
            .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    // Well under the 60 s default idle timeout: only the configured 300 ms can end it in time.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(
        ended.is_ok(),
        "a connection with PINGs and no request was kept open"
    );
    assert_eq!(upstream.count(), 0);
}
