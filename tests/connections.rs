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

/// Polls `parked` (bounded) until it reads `want`.
async fn wait_parked(gw: &ndes_gateway::Gateway, want: i64, at: &str) {
    for _ in 0..200 {
        if gw.metrics().connections_parked.get() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{at}: connections_parked stayed at {}, not {want}",
        gw.metrics().connections_parked.get()
    );
}

fn parking_config(pki: &Pki, upstream: &Upstream) -> ndes_gateway::config::Config {
    let mut config = gateway_config(pki, upstream.addr, "", "");
    config.listen.idle_timeout = Duration::from_secs(60);
    config.limits.header_timeout = Duration::from_secs(600);
    config
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_parked_and_resumes_with_every_byte() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let gw = ndes_gateway::Gateway::start(&parking_config(&pki, &upstream))
        .await
        .unwrap();
    let mut tls = tls_connect(gw.local_addr(), pki.root()).await;
    tls.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tls).await.status_line, "HTTP/1.1 200 OK");
    wait_parked(&gw, 1, "after the first request").await;

    // A 65534-byte request-target, its first bytes alone: the parked connection wakes on them
    // and the rest follows through the new HTTP state.
    let target = pki_target("/certsrv/mscep/mscep.dll", 65534);
    let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
    tls.write_all(&request.as_bytes()[..5]).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tls.write_all(&request.as_bytes()[5..]).await.unwrap();
    assert_eq!(read_response(&mut tls).await.status_line, "HTTP/1.1 200 OK");
    assert_eq!(gw.metrics().connections_parked.get(), 0);
    let seen = upstream.last();
    assert_eq!(
        seen.target, target,
        "the request-target was not forwarded whole"
    );

    // Parked again, then two pipelined requests in one write: both answered, in order.
    wait_parked(&gw, 1, "after the long request").await;
    let two = format!(
        "{KEEP_ALIVE}GET /certsrv/mscep/mscep.dll?operation=GetCACert HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    tls.write_all(two.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tls).await.status_line, "HTTP/1.1 200 OK");
    assert_eq!(read_response(&mut tls).await.status_line, "HTTP/1.1 200 OK");
    assert_eq!(upstream.count(), 4);
    assert_eq!(
        upstream.last().target,
        "/certsrv/mscep/mscep.dll?operation=GetCACert"
    );
}

#[tokio::test]
async fn a_parked_connection_is_closed_by_the_idle_timeout_and_by_the_drain() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = parking_config(&pki, &upstream);
    config.listen.idle_timeout = Duration::from_secs(3);
    // Longer than the test waits: only a drain that closes parked connections ends in time.
    config.listen.drain_timeout = Duration::from_secs(600);
    let gw = ndes_gateway::Gateway::start(&config).await.unwrap();

    let mut idle = tls_connect(gw.local_addr(), pki.root()).await;
    idle.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut idle).await.status_line,
        "HTTP/1.1 200 OK"
    );
    wait_parked(&gw, 1, "after the first request").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(IO_TIMEOUT, idle.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the parked connection was not closed cleanly at the idle timeout: {closed:?}"
    );
    wait_parked(&gw, 0, "after the idle close").await;

    let mut held = tls_connect(gw.local_addr(), pki.root()).await;
    held.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut held).await.status_line,
        "HTTP/1.1 200 OK"
    );
    wait_parked(&gw, 1, "before the drain").await;
    tokio::time::timeout(IO_TIMEOUT, gw.shutdown())
        .await
        .expect("the drain waited on a parked connection");
    let closed = tokio::time::timeout(IO_TIMEOUT, held.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the drain did not close the parked connection: {closed:?}"
    );
}

#[tokio::test]
async fn connections_to_ndes_are_reused_until_their_idle_timeout() {
    use std::sync::atomic::Ordering::SeqCst;
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.upstream.pool_idle_timeout = Duration::from_millis(300);
    let gw = ndes_gateway::Gateway::start(&config).await.unwrap();
    let mut tls = tls_connect(gw.local_addr(), pki.root()).await;
    let post = "POST /certsrv/mscep/mscep.dll?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-pki-message\r\nContent-Length: 4\r\n\r\nabcd";
    for request in [KEEP_ALIVE, post, KEEP_ALIVE, post, KEEP_ALIVE] {
        tls.write_all(request.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut tls).await.status_line, "HTTP/1.1 200 OK");
    }
    assert_eq!(upstream.count(), 5);
    assert_eq!(
        upstream.connections.load(SeqCst),
        1,
        "sequential requests did not share one connection to NDES"
    );
    // Past upstream.pool_idle_timeout the idle connection is not used again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    tls.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tls).await.status_line, "HTTP/1.1 200 OK");
    assert_eq!(upstream.connections.load(SeqCst), 2);
}
