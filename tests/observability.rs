//! Metrics, readiness, rate limits and the real client address, observed from outside: a
//! Prometheus scrape of the admin listener, what the upstream receives, what clients are answered.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use ndes_gateway::Gateway;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// The test config with the admin listener on a free port, probing every `probe`.
fn with_admin(
    pki: &Pki,
    upstream: SocketAddr,
    upstream_extra: &str,
    extra: &str,
    probe: &str,
) -> ndes_gateway::config::Config {
    let mut c = gateway_config(pki, upstream, upstream_extra, "");
    let more = ndes_gateway::config::Config::parse(&format!(
        "[listen]\naddr = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\n{extra}\n[upstream]\nurl = \"https://x/certsrv/mscep/mscep.dll\"\n[admin]\naddr = \"127.0.0.1:0\"\nprobe_interval = \"{probe}\"\n"
    ))
    .unwrap();
    c.admin = more.admin;
    c.rate_limit = more.rate_limit;
    c.listen.proxy_protocol = more.listen.proxy_protocol;
    c.listen.trusted_proxies = more.listen.trusted_proxies;
    c
}

async fn admin_get(gw: &Gateway, path: &str) -> RawResponse {
    let mut s = TcpStream::connect(gw.admin_addr().unwrap()).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    read_response(&mut s).await
}

/// A scrape as `name{label="value",...}` (labels sorted) to value.
async fn scrape(gw: &Gateway) -> (String, BTreeMap<String, f64>) {
    let r = admin_get(gw, "/metrics").await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    let text = r.text();
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let key = match series.split_once('{') {
            None => series.to_owned(),
            Some((name, labels)) => {
                let mut pairs: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                pairs.sort();
                format!("{name}{{{}}}", pairs.join(","))
            }
        };
        out.insert(key, value.parse().unwrap());
    }
    (text, out)
}

/// The series `key` names, summed over the labels it leaves out (the NDES server's, for one).
fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    if let Some(v) = m.get(key) {
        return *v;
    }
    let text: String = m.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    let v = series_sum(&text, key);
    assert!(!v.is_nan(), "no series {key} in the scrape");
    v
}

async fn get_status(gw: &Gateway, pki: &Pki, target: &str) -> String {
    raw_request(
        gw.local_addr(),
        pki.root(),
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .status_line
}

#[tokio::test]
async fn a_scrape_counts_a_known_mix_of_traffic_and_promtool_accepts_it() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let gw = Gateway::start(&with_admin(&pki, upstream.addr, "", "", "1h"))
        .await
        .unwrap();
    let caps = format!("{SCEP}?operation=GetCACaps&message=default");
    for _ in 0..3 {
        assert_eq!(get_status(&gw, &pki, &caps).await, "HTTP/1.1 200 OK");
    }
    let post = format!("POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\n\r\nabcd");
    assert_eq!(
        raw_request(gw.local_addr(), pki.root(), post.as_bytes())
            .await
            .status_line,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        get_status(&gw, &pki, "/certsrv/mscep_admin/").await,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        get_status(&gw, &pki, "/metrics").await,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        get_status(&gw, &pki, &format!("{SCEP}?operation=Nope")).await,
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        get_status(&gw, &pki, &pki_target(SCEP, 65_535)).await,
        "HTTP/1.1 414 URI Too Long"
    );
    let big = format!("POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 70000\r\n\r\n");
    assert_eq!(
        raw_request(gw.local_addr(), pki.root(), big.as_bytes())
            .await
            .status_line,
        "HTTP/1.1 413 Payload Too Large"
    );
    // A TLS handshake that fails.
    let mut junk = TcpStream::connect(gw.local_addr()).await.unwrap();
    junk.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        IO_TIMEOUT,
        tokio::io::AsyncReadExt::read_to_end(&mut junk, &mut buf),
    )
    .await;

    let (text, m) = scrape(&gw).await;
    let req = |op: &str, method: &str, status: &str| {
        value(&m, &format!("ndes_gateway_requests_total{{method=\"{method}\",operation=\"{op}\",status=\"{status}\"}}"))
    };
    assert_eq!(req("GetCACaps", "GET", "200"), 3.0);
    assert_eq!(req("PKIOperation", "POST", "200"), 1.0);
    assert_eq!(req("none", "GET", "404"), 2.0);
    assert_eq!(req("none", "GET", "400"), 1.0);
    assert_eq!(req("none", "POST", "413"), 1.0);
    let rejected = |reason: &str| {
        value(
            &m,
            &format!("ndes_gateway_rejected_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(rejected("path_not_published"), 2.0);
    assert_eq!(rejected("unknown_operation"), 1.0);
    assert_eq!(
        rejected("uri_too_long"),
        1.0,
        "hyper's own 414 is counted too"
    );
    assert_eq!(rejected("body_too_large"), 1.0);
    assert_eq!(rejected("rate_limited"), 0.0);
    assert_eq!(
        value(
            &m,
            "ndes_gateway_upstream_errors_total{kind=\"pin_mismatch\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "ndes_gateway_request_duration_seconds_count{operation=\"GetCACaps\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "ndes_gateway_upstream_duration_seconds_count{operation=\"GetCACaps\"}"
        ),
        3.0
    );
    // The 65535-byte target never became a request: the HTTP parser refused it (counted above).
    assert_eq!(value(&m, "ndes_gateway_request_target_bytes_count"), 8.0);
    // Nine TLS connections above plus the junk one, which failed its handshake.
    assert_eq!(value(&m, "ndes_gateway_connections_total"), 10.0);
    assert_eq!(value(&m, "ndes_gateway_tls_handshake_failures_total"), 1.0);
    assert_eq!(value(&m, "ndes_gateway_upstream_ready"), 1.0);
    assert_eq!(
        value(
            &m,
            &format!(
                "ndes_gateway_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(m.contains_key("ndes_gateway_connections_active"));
    promtool_check(&text).await;
}

/// `promtool check metrics` on a scrape: Prometheus's own linter (Debian package prometheus).
async fn promtool_check(text: &str) {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is needed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn upstream_failures_are_counted_by_kind() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let wrong_pin = "spki_sha256 = [\"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\"]";
    let gw = Gateway::start(&with_admin(&pki, upstream.addr, wrong_pin, "", "1h"))
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            get_status(&gw, &pki, &format!("{SCEP}?operation=GetCACert")).await,
            "HTTP/1.1 502 Bad Gateway"
        );
    }
    let (_, m) = scrape(&gw).await;
    assert_eq!(
        value(
            &m,
            "ndes_gateway_upstream_errors_total{kind=\"pin_mismatch\"}"
        ),
        2.0
    );
    assert_eq!(
        value(&m, "ndes_gateway_upstream_errors_total{kind=\"tls_chain\"}"),
        0.0
    );
    assert_eq!(value(&m, "ndes_gateway_upstream_ready"), 0.0);
    // 503 alone proves nothing ("NDES not probed yet" is 503 too): the reason must name the
    // failure the first probe (run at start, whatever the interval) met.
    let mut last = None;
    for _ in 0..400 {
        let r = admin_get(&gw, "/readyz").await;
        if r.text().contains("pin_mismatch") {
            last = Some(r);
            break;
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = last.unwrap();
    assert_eq!(r.status_line, "HTTP/1.1 503 Service Unavailable", "{r:?}");
    assert!(r.text().contains("pin_mismatch"), "/readyz: {:?}", r.text());
    assert_eq!(upstream.count(), 0);
}

/// Polls /readyz until it gives `status`, a bounded number of times.
async fn wait_ready(gw: &Gateway, status: &str) {
    for _ in 0..400 {
        if admin_get(gw, "/readyz").await.status_line == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("/readyz never answered {status}");
}

#[tokio::test]
async fn readiness_follows_ndes_going_down_and_coming_back() {
    let pki = Pki::new();
    let up = Arc::new(AtomicBool::new(true));
    let flag = up.clone();
    let upstream = Upstream::start(
        Some((pki.ndes_cert.clone(), pki.ndes_key.clone())),
        Arc::new(move |seen: &Seen| {
            if flag.load(Ordering::SeqCst) {
                caps_response(seen)
            } else {
                // What IIS answers when the NDES application pool is stopped.
                http::Response::builder()
                    .status(503)
                    .body(Full::new(Bytes::from_static(b"Service Unavailable")))
                    .unwrap()
            }
        }),
    )
    .await;
    let gw = Gateway::start(&with_admin(&pki, upstream.addr, "", "", "50ms"))
        .await
        .unwrap();
    assert_eq!(
        admin_get(&gw, "/healthz").await.status_line,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        admin_get(&gw, "/nothing").await.status_line,
        "HTTP/1.1 404 Not Found"
    );
    wait_ready(&gw, "HTTP/1.1 200 OK").await;
    up.store(false, Ordering::SeqCst);
    wait_ready(&gw, "HTTP/1.1 503 Service Unavailable").await;
    assert!(admin_get(&gw, "/readyz").await.text().contains("503"));
    up.store(true, Ordering::SeqCst);
    wait_ready(&gw, "HTTP/1.1 200 OK").await;
    // The probe asks for GetCACaps, as a client would, with the NDES Host.
    let probe = upstream
        .probes
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|p| p.target.contains("GetCACaps"))
        .cloned()
        .unwrap();
    assert!(
        probe
            .target
            .starts_with("/certsrv/mscep/mscep.dll?operation=GetCACaps"),
        "{}",
        probe.target
    );
    assert_eq!(probe.headers.get("host").unwrap(), "ndes.corp.test");
}

/// The status line of a GetCACaps from a chosen loopback source address, no PROXY header.
async fn status_from(source: &str, gw: &Gateway, pki: &Pki) -> String {
    request_from(source, gw, pki, b"")
        .await
        .unwrap()
        .status_line
}

/// A TLS request over a TCP connection from a chosen loopback source address.
async fn request_from(source: &str, gw: &Gateway, pki: &Pki, prefix: &[u8]) -> Option<RawResponse> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(gw.local_addr()).await.unwrap();
    tcp.write_all(prefix).await.unwrap();
    let tls = tls_connector(pki.root(), &[b"http/1.1"])
        .connect(ServerName::try_from("scep.example.test").unwrap(), tcp)
        .await;
    let mut tls = tls.ok()?;
    tls.write_all(
        format!("GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .ok()?;
    Some(read_response(&mut tls).await)
}

#[tokio::test]
async fn the_request_past_the_burst_gets_429_and_another_client_is_unaffected() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    // One request every 1000 s after a burst of 2: the third within the test is always over.
    let limits = "[rate_limit]\nper_client_rps = 0.001\nper_client_burst = 2";
    let gw = Gateway::start(&with_admin(&pki, upstream.addr, "", limits, "1h"))
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(status_from("127.0.0.1", &gw, &pki).await, "HTTP/1.1 200 OK");
    }
    let r = request_from("127.0.0.1", &gw, &pki, b"").await.unwrap();
    assert_eq!(r.status_line, "HTTP/1.1 429 Too Many Requests");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=1000).contains(&retry), "Retry-After {retry}");
    assert!(
        r.text().contains("rate_limit.per_client_rps"),
        "{}",
        r.text()
    );
    assert_eq!(status_from("127.0.0.2", &gw, &pki).await, "HTTP/1.1 200 OK");
    assert_eq!(upstream.count(), 3);
    let (_, m) = scrape(&gw).await;
    assert_eq!(
        value(&m, "ndes_gateway_rejected_total{reason=\"rate_limited\"}"),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "ndes_gateway_requests_total{method=\"GET\",operation=\"none\",status=\"429\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn the_global_limit_covers_every_client() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let limits = "[rate_limit]\nglobal_rps = 0.001\nglobal_burst = 1";
    let gw = Gateway::start(&with_admin(&pki, upstream.addr, "", limits, "1h"))
        .await
        .unwrap();
    assert_eq!(status_from("127.0.0.1", &gw, &pki).await, "HTTP/1.1 200 OK");
    let r = request_from("127.0.0.2", &gw, &pki, b"").await.unwrap();
    assert_eq!(r.status_line, "HTTP/1.1 429 Too Many Requests");
    assert!(r.text().contains("rate_limit.global_rps"));
}

fn proxy_v2(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&source);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_set_the_client_address_and_bad_headers_are_refused() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let limits =
        "proxy_protocol = true\n[rate_limit]\nper_client_rps = 0.001\nper_client_burst = 1";
    let gw = Gateway::start(&with_admin(&pki, upstream.addr, "", limits, "1h"))
        .await
        .unwrap();

    let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\r\n";
    assert_eq!(
        request_from("127.0.0.1", &gw, &pki, v1)
            .await
            .unwrap()
            .status_line,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        upstream.last().headers.get("x-forwarded-for").unwrap(),
        "203.0.113.7"
    );
    // The address is the one rate-limited: a second request from it is over its burst of 1...
    let r = request_from("127.0.0.1", &gw, &pki, v1).await.unwrap();
    assert_eq!(r.status_line, "HTTP/1.1 429 Too Many Requests");
    // ...while another address behind the same balancer is served.
    let v2 = proxy_v2([198, 51, 100, 9], 40000);
    assert_eq!(
        request_from("127.0.0.1", &gw, &pki, &v2)
            .await
            .unwrap()
            .status_line,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        upstream.last().headers.get("x-forwarded-for").unwrap(),
        "198.51.100.9"
    );

    let count = upstream.count();
    for bad in [
        &b""[..],                                        // no header: straight to TLS
        b"PROXY TCP4 nonsense here\r\n",                 // malformed
        b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\n", // no CR
        &proxy_v2([1, 2, 3, 4], 1)[..20],                // truncated v2 (the TLS hello follows)
    ] {
        assert!(
            request_from("127.0.0.1", &gw, &pki, bad).await.is_none(),
            "{bad:?} was accepted"
        );
    }
    // Cut short: header started, then the connection closes.
    let mut cut = TcpStream::connect(gw.local_addr()).await.unwrap();
    cut.write_all(b"PROXY TCP4 203.0").await.unwrap();
    drop(cut);
    assert_eq!(upstream.count(), count);
    let (_, m) = scrape(&gw).await;
    assert!(
        value(
            &m,
            "ndes_gateway_connections_refused_total{reason=\"proxy_protocol\"}"
        ) >= 4.0
    );
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let req = format!("GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6, 198.51.100.4\r\nConnection: close\r\n\r\n");

    // The peer (127.0.0.1) inside trusted_proxies: the client is the right-most entry. Outside:
    // the header is ignored and the peer is the client.
    for (trusted, client) in [("127.0.0.0/8", "198.51.100.4"), ("10.0.0.0/8", "127.0.0.1")] {
        let extra = format!("trusted_proxies = [\"{trusted}\"]");
        let gw = Gateway::start(&with_admin(&pki, upstream.addr, "", &extra, "1h"))
            .await
            .unwrap();
        let r = raw_request(gw.local_addr(), pki.root(), req.as_bytes()).await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert_eq!(
            upstream.last().headers.get("x-forwarded-for").unwrap(),
            client,
            "{trusted}"
        );
    }
}
