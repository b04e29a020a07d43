//! Keeping enrolments going through operations and abuse: a graceful drain that loses no request
//! in flight, certificate hot reload under open connections, the per-client connection cap.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ndes_gateway::Gateway;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Waits, a bounded number of times, for `ready` to hold.
async fn eventually(what: &str, mut ready: impl FnMut() -> bool) {
    for _ in 0..400 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test]
async fn a_drain_finishes_the_request_in_flight_and_refuses_new_connections() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let gw = Gateway::start(&gateway_config(&pki, upstream.addr, "", ""))
        .await
        .unwrap();
    let addr = gw.local_addr();
    let readiness = gw.readiness.clone();
    let root = pki.root().to_path_buf();
    // A PKIOperation-like request that NDES takes 1.5 s to answer.
    let slow = tokio::spawn(async move {
        let req = format!("GET {SCEP}?operation=GetCACaps&delay_ms=1500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        raw_request(addr, &root, req.as_bytes()).await
    });
    let arrived = upstream.arrived.clone();
    eventually("the request reached NDES", || {
        arrived.load(Ordering::SeqCst) == 1
    })
    .await;
    let drain = tokio::spawn(gw.shutdown());
    eventually("readiness off", || !readiness.is_ready()).await;
    // Once the listener is closed, new connections are refused.
    let mut refused = false;
    for _ in 0..400 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the stopping gateway still accepted connections");
    let r = slow.await.unwrap();
    assert_eq!(
        r.status_line, "HTTP/1.1 200 OK",
        "the request in flight was lost"
    );
    tokio::time::timeout(IO_TIMEOUT, drain)
        .await
        .expect("the drain never ended")
        .unwrap();
}

/// The server certificate a new TLS connection gets, and that connection.
async fn connect(
    addr: std::net::SocketAddr,
    pki: &Pki,
) -> (Vec<u8>, tokio_rustls::client::TlsStream<TcpStream>) {
    let tls = tls_connect(addr, pki.root()).await;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (leaf, tls)
}

const KEEP_ALIVE: &str =
    "GET /certsrv/mscep/mscep.dll?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn a_new_certificate_is_taken_without_dropping_connections_and_a_broken_one_is_refused() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.listen.reload_check_interval = Duration::from_millis(100);
    let gw = Gateway::start(&config).await.unwrap();
    let (first, mut open) = connect(gw.local_addr(), &pki).await;
    open.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut open).await.status_line,
        "HTTP/1.1 200 OK"
    );

    // A renewal: new files, written as a Secret update does (new file, then rename).
    let (cert, key) = pki
        .ca
        .issue_server(&["scep.example.test", "localhost", "127.0.0.1"])
        .unwrap();
    let tmp_key = pki.write("new.key", &key);
    let tmp_cert = pki.write("new.pem", &cert);
    std::fs::rename(tmp_key, &pki.pki.gateway_key).unwrap();
    std::fs::rename(tmp_cert, &pki.pki.gateway_cert).unwrap();
    let mut second = first.clone();
    for _ in 0..400 {
        second = connect(gw.local_addr(), &pki).await.0;
        if second != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_ne!(
        second, first,
        "new connections never got the new certificate"
    );
    // The connection opened before still works.
    open.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut open).await.status_line,
        "HTTP/1.1 200 OK"
    );

    // A certificate with a key that is not its own: refused, the one in force kept.
    let (other_cert, _) = pki.ca.issue_server(&["scep.example.test"]).unwrap();
    let tmp = pki.write("broken.pem", &other_cert);
    std::fs::rename(tmp, &pki.pki.gateway_cert).unwrap();
    let metrics = gw.metrics.clone();
    eventually("the broken pair refused", || {
        metrics
            .render()
            .contains("ndes_gateway_reloads_total{result=\"error\",target=\"listener\"} 1")
    })
    .await;
    let (third, mut tls) = connect(gw.local_addr(), &pki).await;
    assert_eq!(third, second, "a broken certificate replaced a working one");
    tls.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tls).await.status_line, "HTTP/1.1 200 OK");
}

async fn tls_from(
    source: &str,
    gw: &Gateway,
    pki: &Pki,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(gw.local_addr()).await.unwrap();
    let connect = tls_connector(pki.root(), &[b"http/1.1"])
        .connect(ServerName::try_from("scep.example.test").unwrap(), tcp);
    tokio::time::timeout(IO_TIMEOUT, connect)
        .await
        .expect("handshake hung")
        .ok()
}

#[tokio::test]
async fn one_client_address_cannot_hold_more_than_its_share_of_connections() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.listen.max_connections_per_client = 2;
    let gw = Gateway::start(&config).await.unwrap();
    let a = tls_from("127.0.0.1", &gw, &pki).await.unwrap();
    let _b = tls_from("127.0.0.1", &gw, &pki).await.unwrap();
    assert!(
        tls_from("127.0.0.1", &gw, &pki).await.is_none(),
        "a third connection from one address"
    );
    let mut other = tls_from("127.0.0.2", &gw, &pki)
        .await
        .expect("another address is not affected");
    other.write_all(KEEP_ALIVE.as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut other).await.status_line,
        "HTTP/1.1 200 OK"
    );
    assert!(gw.metrics.render().contains(
        "ndes_gateway_connections_refused_total{reason=\"max_connections_per_client\"} 1"
    ));
    // A slot comes back when a connection closes.
    drop(a);
    let mut back = None;
    for _ in 0..400 {
        back = tls_from("127.0.0.1", &gw, &pki).await;
        if back.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(back.is_some(), "the freed slot never came back");
}
