//! Clients that do not take their answer, or go away before it: a reader that reads nothing loses
//! its connection (HTTP/1.1) or its streams (HTTP/2) after `listen.send_timeout` without holding a
//! connection to NDES; a client that hangs up while NDES works, or mid-body, is counted as
//! cancelled; the per-client connection cap counts an IPv6 /64 as one client.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use ndes_gateway::Gateway;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The body of the large answer in the first test: far more than the socket buffers between the
/// gateway and a client that reads nothing can hold.
const BIG_BODY: usize = 8 * 1024 * 1024;

/// The series of a Prometheus text, as `name{label="value",...}` with the labels sorted.
fn scrape(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Ok(v) = value.parse() {
            out.insert(normalise(series), v);
        }
    }
    out
}

fn normalise(series: &str) -> String {
    match series.split_once('{') {
        None => series.to_owned(),
        Some((name, labels)) => {
            let mut pairs: Vec<&str> = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
                .collect();
            pairs.sort_unstable();
            format!("{name}{{{}}}", pairs.join(","))
        }
    }
}

/// A series' value, if the gateway has it.
fn value(text: &str, key: &str) -> Option<f64> {
    scrape(text).get(&normalise(key)).copied()
}

/// A series the gateway exports from its start (every reject reason is there at 0).
fn counter(gw: &Gateway, key: &str) -> f64 {
    let text = gw.metrics.render();
    value(&text, key).unwrap_or_else(|| panic!("no series {key} in:\n{text}"))
}

/// A series that appears only once counted: 0 until then.
fn count_of(gw: &Gateway, key: &str) -> f64 {
    value(&gw.metrics.render(), key).unwrap_or(0.0)
}

fn rejected(reason: &str) -> String {
    format!("ndes_gateway_rejected_total{{reason=\"{reason}\"}}")
}

/// Polls `check` every 50 ms until it holds or `limit` has passed; true if it held.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    for _ in 0..10_000 {
        if check() {
            return true;
        }
        if started.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// Polls a counter until it reaches `want` (or `limit` passes), then returns what it shows.
async fn wait_for_counter(gw: &Gateway, key: &str, want: f64, limit: Duration) -> f64 {
    eventually(limit, || counter(gw, key) >= want).await;
    counter(gw, key)
}

/// The same for a series that appears only once counted; 10 s at most.
async fn wait_for_count(gw: &Gateway, key: &str, want: f64) -> f64 {
    eventually(Duration::from_secs(10), || count_of(gw, key) >= want).await;
    count_of(gw, key)
}

/// Polls until `n` requests have reached the upstream (10 s at most); true if they have.
async fn arrived(upstream: &Upstream, n: usize) -> bool {
    eventually(Duration::from_secs(10), || {
        upstream.arrived.load(Ordering::SeqCst) >= n
    })
    .await
}

fn caps_get() -> String {
    format!("GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: scep.example.test\r\nConnection: close\r\n\r\n")
}

/// One ordinary GetCACaps over HTTP/1.1: its status line.
async fn caps_status(gw: &Gateway, pki: &Pki) -> String {
    raw_request(gw.local_addr(), pki.root(), caps_get().as_bytes())
        .await
        .status_line
}

async fn tls_over(
    tcp: TcpStream,
    pki: &Pki,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_connector(pki.root(), &[b"http/1.1"])
        .connect(ServerName::try_from("scep.example.test").unwrap(), tcp)
        .await
}

// On worker threads of their own, the gateway's connection tasks cannot hold up the test's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_loses_its_http1_connection() {
    let pki = Pki::new();
    let big = Bytes::from(vec![b'x'; BIG_BODY]);
    let upstream = Upstream::start(
        Some((pki.ndes_cert.clone(), pki.ndes_key.clone())),
        // The large answer only for the client that stalls; the others get the usual few bytes.
        Arc::new(move |seen: &Seen| {
            if !seen.target.contains("message=big") {
                return caps_response(seen);
            }
            http::Response::builder()
                .header("content-type", "application/octet-stream")
                .body(Full::new(big.clone()))
                .unwrap()
        }),
    )
    .await;
    let mut config = gateway_config(&pki, upstream.addr, "max_response_bytes = 16777216", "");
    config.listen.send_timeout = Duration::from_secs(1);
    assert_eq!(config.upstream.max_response_bytes, 16 * 1024 * 1024);
    let gw = Gateway::start(&config).await.unwrap();

    // A receive window of a few KB: the gateway's writes block once its own send buffer is full.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = tokio::time::timeout(IO_TIMEOUT, socket.connect(gw.local_addr()))
        .await
        .unwrap()
        .unwrap();
    let mut tls = tokio::time::timeout(IO_TIMEOUT, tls_over(tcp, &pki))
        .await
        .unwrap()
        .unwrap();
    tls.write_all(
        format!("GET {SCEP}?operation=GetCACaps&message=big HTTP/1.1\r\nHost: scep.example.test\r\nConnection: keep-alive\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();

    // Reads nothing for a while; another client is served meanwhile.
    let stalled_at = Instant::now();
    assert_eq!(caps_status(&gw, &pki).await, "HTTP/1.1 200 OK");
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(stalled_at.elapsed())).await;

    // Then reads what is left: the gateway has given up, so the stream ends before the answer
    // does (what its socket buffer held still arrives).
    let mut head: Vec<u8> = Vec::new();
    let mut total = 0usize;
    let mut ended_by = String::new();
    let read = tokio::time::timeout(IO_TIMEOUT, async {
        let mut chunk = vec![0u8; 64 * 1024];
        for _ in 0..1_000_000 {
            match tls.read(&mut chunk).await {
                Ok(0) => {
                    ended_by = "EOF".to_owned();
                    return;
                }
                Ok(n) => {
                    if head.len() < 64 {
                        head.extend_from_slice(&chunk[..n.min(64)]);
                    }
                    total += n;
                }
                Err(e) => {
                    ended_by = format!("error: {e}");
                    return;
                }
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection was still open {IO_TIMEOUT:?} after the client started reading ({total} bytes read)"
    );
    assert!(
        total < BIG_BODY,
        "the client received {total} bytes (the whole {BIG_BODY}-byte answer) although it read nothing for 4 s with send_timeout = 1s; ended by {ended_by}"
    );
    if !head.is_empty() {
        assert!(
            head.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{:?}",
            String::from_utf8_lossy(&head)
        );
    }
    assert_eq!(
        wait_for_counter(&gw, &rejected("send_timeout"), 1.0, Duration::from_secs(10)).await,
        1.0
    );
    // The connection was the client's fault, not NDES's: one request each reached it.
    assert_eq!(upstream.count(), 2);
    // And the gateway still serves.
    assert_eq!(caps_status(&gw, &pki).await, "HTTP/1.1 200 OK");
    assert_eq!(counter(&gw, &rejected("send_timeout")), 1.0);
}

/// What the HTTP/2 stall tool reported.
async fn h2_stall(
    gw: &Gateway,
    pki: &Pki,
    connections: usize,
    streams: usize,
    max_seconds: u64,
) -> serde_json::Value {
    let stall = Stall {
        connections,
        streams,
        max_seconds,
        window: 0,
        dead: false,
    };
    h2_stall_with(gw, pki, &stall).await
}

/// The stall tool's clients: how many, with how many streams, for how long, the stream window
/// they announce, and whether they answer nothing at all (not even PINGs).
struct Stall {
    connections: usize,
    streams: usize,
    max_seconds: u64,
    window: u32,
    dead: bool,
}

async fn h2_stall_with(gw: &Gateway, pki: &Pki, stall: &Stall) -> serde_json::Value {
    let &Stall {
        connections,
        streams,
        max_seconds,
        window,
        dead,
    } = stall;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/tools/h2_stall.py");
    let run = tokio::process::Command::new("/usr/bin/python3")
        .args([script, "127.0.0.1", &gw.local_addr().port().to_string()])
        .arg(pki.root())
        .args([
            "scep.example.test",
            &connections.to_string(),
            &streams.to_string(),
            &max_seconds.to_string(),
            &window.to_string(),
            &format!("{SCEP}?operation=GetCACert"),
        ])
        .env("H2_STALL_DEAD", if dead { "1" } else { "0" })
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(max_seconds + 30), run)
        .await
        .expect("h2_stall.py did not end within its own time limit")
        .expect("python3 with the h2 library (Debian python3-h2) is needed");
    assert!(
        out.status.success(),
        "h2_stall.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "h2_stall.py printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn stalled_http2_streams_are_reset_and_ndes_is_not_held() {
    const CONNECTIONS: usize = 4;
    const STREAMS: usize = 16;
    const MAX_SECONDS: u64 = 30;
    /// Requests to NDES at once, as many as the pool keeps idle. The 64 streams arrive together:
    /// without a bound each opens a connection of its own, stalled or not (64 of them were seen
    /// with the default max_in_flight). With one, answers read whole hand the same few connections
    /// from one request to the next, while streams that held their NDES connection until reset
    /// would open new ones every send_timeout and leave the rest waiting for a slot.
    const IN_FLIGHT: usize = 4;
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(
        &pki,
        upstream.addr,
        // The wait for a slot is queue_timeout: room for 68 requests through 4 slots on a
        // loaded machine.
        &format!("pool_max_idle = 4\nmax_in_flight = {IN_FLIGHT}\nqueue_timeout = \"20s\""),
        // Room for that wait in the request's own deadline.
        "request_timeout = \"300s\"",
    );
    config.listen.send_timeout = Duration::from_secs(2);
    assert_eq!(config.upstream.pool_max_idle, 4);
    assert_eq!(config.listen.max_concurrent_streams, STREAMS as u32);
    let gw = Gateway::start(&config).await.unwrap();

    // Ordinary clients while the stalled ones sit on their streams.
    let ordinary = async {
        let mut statuses = Vec::new();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            statuses.push(caps_status(&gw, &pki).await);
        }
        statuses
    };
    let (report, statuses) = tokio::join!(
        h2_stall(&gw, &pki, CONNECTIONS, STREAMS, MAX_SECONDS),
        ordinary
    );
    let total = (CONNECTIONS * STREAMS) as f64;
    eventually(Duration::from_secs(10), || {
        counter(&gw, &rejected("send_timeout")) >= total
    })
    .await;
    let send_timeouts = counter(&gw, &rejected("send_timeout"));
    let opened = upstream.connections.load(Ordering::SeqCst);
    let arrived = upstream.arrived.load(Ordering::SeqCst);
    let summary = format!(
        "h2_stall.py: {report}\nordinary requests: {statuses:?}\nrejected{{send_timeout}} = {send_timeouts}\nconnections opened to NDES: {opened}; requests that reached it: {arrived}"
    );
    eprintln!("{summary}");

    for status in &statuses {
        assert_eq!(status, "HTTP/1.1 200 OK", "{summary}");
    }
    let conns = report["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("{summary}"));
    assert_eq!(conns.len(), CONNECTIONS, "{summary}");
    for (i, c) in conns.iter().enumerate() {
        assert!(
            c["error"].is_null(),
            "connection {i}: the tool failed: {c}\n{summary}"
        );
        assert!(
            c["closed_at"]
                .as_f64()
                .is_some_and(|t| t < MAX_SECONDS as f64),
            "connection {i} was not closed by the gateway within {MAX_SECONDS} s: {c}\n{summary}"
        );
        // Each stream gets its answer's head, then a reset once its body waited send_timeout on
        // the zero window: a reset for every one of them.
        assert_eq!(
            c["resets"].as_u64(),
            Some(STREAMS as u64),
            "connection {i}: not every stalled stream was reset: {c}\n{summary}"
        );
    }
    assert_eq!(send_timeouts, total, "{summary}");
    assert_eq!(arrived, CONNECTIONS * STREAMS + statuses.len(), "{summary}");
    // The stalled streams hold no connection to NDES: IN_FLIGHT of them carry everything.
    assert!(opened <= IN_FLIGHT + 4, "{summary}");
}

/// A PKIOperation POST that NDES takes 1.5 s to answer.
fn slow_post_target() -> String {
    format!("{SCEP}?operation=PKIOperation&delay_ms=1500")
}

fn status_499() -> &'static str {
    "ndes_gateway_requests_total{operation=\"PKIOperation\",method=\"POST\",status=\"499\"}"
}

#[tokio::test]
async fn a_client_that_hangs_up_while_ndes_works_leaves_a_record() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let gw = Gateway::start(&gateway_config(&pki, upstream.addr, "", ""))
        .await
        .unwrap();
    let body = vec![0x30u8; 200];

    // HTTP/1.1: the whole request, then the client closes while NDES works on it.
    let mut tls = tls_connect(gw.local_addr(), pki.root()).await;
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: scep.example.test\r\nContent-Type: application/x-pki-message\r\nContent-Length: {}\r\n\r\n",
        slow_post_target(),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    tls.write_all(&request).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tls);

    assert!(
        arrived(&upstream, 1).await,
        "the POST never reached the upstream"
    );
    assert_eq!(
        wait_for_counter(
            &gw,
            &rejected("client_cancelled"),
            1.0,
            Duration::from_secs(10)
        )
        .await,
        1.0,
        "{}",
        gw.metrics.render()
    );
    assert_eq!(
        wait_for_count(&gw, status_499(), 1.0).await,
        1.0,
        "{}",
        gw.metrics.render()
    );

    // HTTP/2: the response future is dropped while NDES works, which resets the stream.
    let mut client = h2_client(gw.local_addr(), pki.root()).await;
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTPS);
    parts.authority = Some("scep.example.test".parse().unwrap());
    parts.path_and_query = Some(slow_post_target().parse().unwrap());
    let req = http::Request::post(http::Uri::from_parts(parts).unwrap())
        .header("content-type", "application/x-pki-message")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let sent = tokio::time::timeout(Duration::from_millis(300), client.send_request(req)).await;
    assert!(
        sent.is_err(),
        "the gateway answered before NDES did: {sent:?}"
    );
    drop(client);

    assert!(
        arrived(&upstream, 2).await,
        "the HTTP/2 POST never reached the upstream"
    );
    assert_eq!(
        wait_for_counter(
            &gw,
            &rejected("client_cancelled"),
            2.0,
            Duration::from_secs(10)
        )
        .await,
        2.0,
        "{}",
        gw.metrics.render()
    );
    assert_eq!(
        wait_for_count(&gw, status_499(), 2.0).await,
        2.0,
        "{}",
        gw.metrics.render()
    );
    assert_eq!(upstream.arrived.load(Ordering::SeqCst), 2);
    // Nothing else was counted as answered.
    let text = gw.metrics.render();
    for status in ["200", "400", "502", "503", "504"] {
        let key = format!("ndes_gateway_requests_total{{operation=\"PKIOperation\",method=\"POST\",status=\"{status}\"}}");
        assert_eq!(value(&text, &key).unwrap_or(0.0), 0.0, "{key}\n{text}");
    }
}

#[tokio::test]
async fn a_client_that_aborts_its_body_is_counted_as_cancelled() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let gw = Gateway::start(&gateway_config(&pki, upstream.addr, "", ""))
        .await
        .unwrap();
    let mut tls = tls_connect(gw.local_addr(), pki.root()).await;
    let mut request = format!(
        "POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: scep.example.test\r\nContent-Type: application/x-pki-message\r\nContent-Length: 4000\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(&[0x30u8; 100]);
    tls.write_all(&request).await.unwrap();
    tls.flush().await.unwrap();
    // Long enough for the head and the first bytes to be read as a request whose body is coming.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tls);

    assert_eq!(
        wait_for_counter(
            &gw,
            &rejected("client_cancelled"),
            1.0,
            Duration::from_secs(10)
        )
        .await,
        1.0,
        "{}",
        gw.metrics.render()
    );
    // Settled: nothing else is counted afterwards.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counter(&gw, &rejected("client_cancelled")), 1.0);
    assert_eq!(counter(&gw, &rejected("bad_request")), 0.0);
    assert_eq!(counter(&gw, &rejected("body_timeout")), 0.0);
    assert_eq!(upstream.count(), 0);
    assert_eq!(upstream.arrived.load(Ordering::SeqCst), 0);
}

/// A TLS connection whose PROXY v1 header names `source` as the client.
async fn connect_as(
    gw: &Gateway,
    pki: &Pki,
    source: &str,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    tcp.write_all(format!("PROXY TCP6 {source} ::1 51000 443\r\n").as_bytes())
        .await
        .ok()?;
    tokio::time::timeout(IO_TIMEOUT, tls_over(tcp, pki))
        .await
        .ok()?
        .ok()
}

/// A GetCACaps from `source` (by its PROXY header): the status line, or None when the connection
/// was refused before an answer.
async fn caps_from(gw: &Gateway, pki: &Pki, source: &str) -> Option<String> {
    let mut tls = connect_as(gw, pki, source).await?;
    tls.write_all(caps_get().as_bytes()).await.ok()?;
    tls.flush().await.ok()?;
    let r = read_response(&mut tls).await;
    Some(r.status_line).filter(|s| !s.is_empty())
}

#[tokio::test]
async fn the_per_client_connection_cap_counts_an_ipv6_64_as_one_client() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.listen.proxy_protocol = true;
    config.listen.max_connections_per_client = 1;
    let gw = Gateway::start(&config).await.unwrap();
    let key = "ndes_gateway_connections_refused_total{reason=\"max_connections_per_client\"}";

    // One client holds its one connection open, sending nothing.
    let held = connect_as(&gw, &pki, "2001:db8:1:2::1")
        .await
        .expect("the first connection completes its TLS handshake");
    // Another address in the same /64 is the same client.
    let same = caps_from(&gw, &pki, "2001:db8:1:2::99").await;
    assert_ne!(
        same.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "a second connection from the same /64 was served"
    );
    // The next /64 is another client.
    assert_eq!(
        caps_from(&gw, &pki, "2001:db8:1:3::1").await.as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    assert_eq!(counter(&gw, key), 1.0);
    assert_eq!(upstream.count(), 1);
    drop(held);
}

/// A client that takes the first byte of each answer and nothing more: the answer goes out in
/// slices, the slice after the first is never asked for, and the stream is reset all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_with_a_nearly_shut_window_loses_its_streams() {
    const STREAMS: usize = 4;
    const ANSWER: usize = 64 * 1024;
    let pki = Pki::new();
    let upstream = Upstream::start(
        Some((pki.ndes_cert.clone(), pki.ndes_key.clone())),
        Arc::new(|_: &Seen| http::Response::new(Full::new(Bytes::from(vec![b'x'; ANSWER])))),
    )
    .await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    config.listen.send_timeout = Duration::from_secs(2);
    let gw = Gateway::start(&config).await.unwrap();
    let stall = Stall {
        connections: 1,
        streams: STREAMS,
        max_seconds: 30,
        window: 1,
        dead: false,
    };
    let report = h2_stall_with(&gw, &pki, &stall).await;
    let c = &report["connections"][0];
    assert_eq!(c["responses"], STREAMS, "{report}");
    assert_eq!(c["resets"], STREAMS, "{report}");
    // One byte each, as the window allowed; never the whole answer.
    assert_eq!(c["data_bytes"], STREAMS, "{report}");
    assert!(
        c["closed_at"].as_f64().is_some_and(|t| t < 30.0),
        "{report}"
    );
    assert_eq!(counter(&gw, &rejected("send_timeout")), STREAMS as f64);
}

/// A client that takes its answer a few KB at a time: the request's own deadline
/// (`limits.request_timeout`, plus the grace that lets a gateway answer out) ends it, long before
/// the answer is through. The gateway's side is what counts: what its socket buffer already held
/// still reaches the client after the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_reader_is_cut_at_the_request_deadline() {
    const BIG: usize = 8 * 1024 * 1024;
    let pki = Pki::new();
    let upstream = Upstream::start(
        Some((pki.ndes_cert.clone(), pki.ndes_key.clone())),
        Arc::new(|_: &Seen| http::Response::new(Full::new(Bytes::from(vec![b'x'; BIG])))),
    )
    .await;
    // The smallest deadline the config takes: body 1 s + queue 1 s + connect 1 s + response
    // 1 s. The send timeout stays far beyond it.
    let config = gateway_config(
        &pki,
        upstream.addr,
        "max_response_bytes = 16777216\nqueue_timeout = \"1s\"\nconnect_timeout = \"1s\"\nresponse_timeout = \"1s\"",
        "body_timeout = \"1s\"\nrequest_timeout = \"4s\"",
    );
    let gw = Gateway::start(&config).await.unwrap();

    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(gw.local_addr()).await.unwrap();
    let mut tls = tls_over(tcp, &pki).await.unwrap();
    tls.write_all(caps_get().as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut total = 0usize;
    let mut chunk = vec![0u8; 4096];
    // 30 reads half a second apart: 15 s, past the 4 s deadline and its 5 s grace.
    for _ in 0..30 {
        match tokio::time::timeout(IO_TIMEOUT, tls.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => total += n,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(total < BIG, "the whole answer went through ({total} bytes)");
    assert_eq!(
        wait_for_counter(
            &gw,
            &rejected("request_timeout"),
            1.0,
            Duration::from_secs(10)
        )
        .await,
        1.0
    );
    eventually(Duration::from_secs(10), || {
        counter(&gw, "ndes_gateway_connections_active") == 0.0
    })
    .await;
    assert_eq!(counter(&gw, "ndes_gateway_connections_active"), 0.0);
    assert_eq!(counter(&gw, &rejected("send_timeout")), 0.0);
}

/// A peer gone without a word (no FIN, no answer to anything): the gateway's PINGs go
/// unanswered and the connection is closed, long before the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_peer_that_answers_no_ping_is_closed() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let mut config = gateway_config(&pki, upstream.addr, "", "");
    // PINGs every 2 s, 2 s to answer; the idle timeout stays at 60 s.
    config.listen.send_timeout = Duration::from_secs(2);
    let gw = Gateway::start(&config).await.unwrap();
    let stall = Stall {
        connections: 1,
        streams: 0,
        max_seconds: 30,
        window: 65_535,
        dead: true,
    };
    let report = h2_stall_with(&gw, &pki, &stall).await;
    let c = &report["connections"][0];
    assert!(c["pings"].as_u64().is_some_and(|n| n >= 1), "{report}");
    assert!(
        c["closed_at"].as_f64().is_some_and(|t| t < 30.0),
        "the silent peer was still connected after 30 s: {report}"
    );
}
