//! What an operator relies on: NDES closing its keep-alive connections costs no request, the
//! readiness probe answers under load, the queue's limit answers 503, `scep.strict` refuses what
//! it cannot read, a rejected NDES certificate never reaches the metrics, and gateways stop on
//! their own signal.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ndes_gateway::config::Config;
use ndes_gateway::dev::demo::{self, ScepServer};
use ndes_gateway::dev::devpki::{self, DevCa};
use ndes_gateway::Gateway;
use tokio::io::AsyncWriteExt;

/// A gateway with plain-text settings in front of `upstream` over TLS with the dev root; the
/// cache off, so that what NDES counts is what clients sent.
fn config(pki: &Pki, upstream: std::net::SocketAddr, extra: &str) -> Config {
    Config::parse(&format!(
        r#"
[listen]
addr = "127.0.0.1:0"
cert = {cert:?}
key = {key:?}
[upstream]
url = "https://{upstream}{SCEP}"
ca = {ca:?}
server_name = "{ndes}"
cache_ttl = "0s"
{extra}
"#,
        cert = pki.pki.gateway_cert.display().to_string(),
        key = pki.pki.gateway_key.display().to_string(),
        ca = pki.root().display().to_string(),
        ndes = devpki::NDES_NAME,
    ))
    .unwrap()
}

fn assert_has(scrape: &str, line: &str) {
    assert!(scrape.contains(line), "{line} is not in:\n{scrape}");
}

/// `upstream_errors_total` of `kind`, over every NDES server.
fn assert_upstream_errors(scrape: &str, kind: &str, count: u32) {
    let series = format!("ndes_gateway_upstream_errors_total{{kind=\"{kind}\"}}");
    assert_eq!(series_sum(scrape, &series), f64::from(count), "{scrape}");
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A recording TLS upstream with the dev NDES certificate, and a gateway in front of it.
async fn upstream_and_gateway(pki: &Pki, extra: &str) -> (Upstream, Gateway) {
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let gateway = Gateway::start(&config(pki, upstream.addr, extra))
        .await
        .unwrap();
    (upstream, gateway)
}

/// A GET with `Connection: close` over a new TLS connection, sent from a task of its own.
fn get_in_background(
    addr: std::net::SocketAddr,
    root: &std::path::Path,
    target: String,
) -> tokio::task::JoinHandle<RawResponse> {
    let root = root.to_path_buf();
    tokio::spawn(async move {
        raw_request(
            addr,
            &root,
            format!(
                "GET {target} HTTP/1.1\r\nHost: scep.example.test\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndes_closing_each_connection_after_its_answer_costs_no_getcacaps() {
    let pki = Pki::new();
    let backend = Upstream::start(None, std::sync::Arc::new(caps_response)).await;
    // The close comes a moment after each answer, while the next request may be on its way.
    let ndes = ClosingNdes::start(&pki, backend.addr, SCEP, Duration::from_millis(1)).await;
    let gateway = Gateway::start(&config(&pki, ndes.addr, "[admin]\nenabled = false\n"))
        .await
        .unwrap();

    // One keep-alive client connection, 200 requests one after another.
    let mut tls = tls_connect(gateway.local_addr(), pki.root()).await;
    let mut failures = Vec::new();
    for i in 0..200 {
        tls.write_all(
            format!(
                "GET {SCEP}?operation=GetCACaps&message={i} HTTP/1.1\r\nHost: scep.example.test\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let r = read_response(&mut tls).await;
        if r.status_line != "HTTP/1.1 200 OK" || r.body != b"POSTPKIOperation\nSHA-256\nAES\n" {
            failures.push(format!("{i}: {} {}", r.status_line, r.text()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(
        backend.count(),
        200,
        "each request reached NDES exactly once"
    );
    // Every answer ended its connection: the gateway opened one per request, or more.
    assert!(ndes.connections.load(Ordering::SeqCst) >= 200);
    let scrape = gateway.metrics.render();
    assert_upstream_errors(&scrape, "protocol", 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndes_closing_each_connection_after_its_answer_costs_no_enrolment() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let scep = ScepServer::start(dir.path())
        .await
        .expect("scepserver (Debian package scep)");
    let backend: std::net::SocketAddr = format!("127.0.0.1:{}", scep.port).parse().unwrap();
    let ndes = ClosingNdes::start(&pki, backend, "/scep", Duration::ZERO).await;
    let gateway = Gateway::start(&config(&pki, ndes.addr, "[admin]\nenabled = false\n"))
        .await
        .unwrap();
    let url = format!("https://localhost:{}{SCEP}", gateway.local_addr().port());
    for i in 0..20 {
        let cn = format!("closing-{i}");
        let cert = demo::enrol(&dir.path().join(&cn), &url, pki.root(), &cn)
            .await
            .unwrap_or_else(|e| panic!("enrolment {i} failed: {e}"));
        let (subject, _, _) = ndes_gateway::tls::describe_certificate(&cert).unwrap();
        assert!(subject.contains(&format!("CN={cn}")), "{subject}");
    }
    let scrape = gateway.metrics.render();
    assert_has(&scrape, "ndes_gateway_scep_messages_total{fail_info=\"none\",message_type=\"PKCSReq\",pki_status=\"SUCCESS\"} 20");
    assert_upstream_errors(&scrape, "protocol", 0);
}

/// The readiness probe has a slot of its own: a replica whose `max_in_flight` requests all wait
/// on a slow NDES still answers its probe and stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_holds_while_every_in_flight_slot_waits_on_ndes() {
    let pki = Pki::new();
    let (upstream, gateway) = upstream_and_gateway(
        &pki,
        "max_in_flight = 2\nqueue_timeout = \"10s\"\n[admin]\naddr = \"127.0.0.1:0\"\nprobe_interval = \"100ms\"\nprobe_timeout = \"1s\"\n",
    )
    .await;
    let readiness = gateway.readiness.clone();
    wait_until("ready at start", || readiness.is_ready()).await;

    // Two requests NDES takes 6 s over hold both slots; a third waits in the queue.
    let addr = gateway.local_addr();
    let slow: Vec<_> = (0..3)
        .map(|i| {
            get_in_background(
                addr,
                pki.root(),
                format!("{SCEP}?operation=GetCACert&message={i}&delay_ms=6000"),
            )
        })
        .collect();
    wait_until("both slots taken", || {
        upstream.arrived.load(Ordering::SeqCst) >= 2 && upstream.seen.lock().unwrap().len() < 2
    })
    .await;
    let probes = upstream.probes.lock().unwrap().len();
    // Probes keep reaching NDES while the slots are taken, and the replica stays ready.
    wait_until("two more probes answered", || {
        upstream.probes.lock().unwrap().len() >= probes + 2
    })
    .await;
    assert!(
        upstream.seen.lock().unwrap().len() < 2,
        "the slow requests ended before the probes were checked"
    );
    let admin = gateway.admin_addr().unwrap();
    let ready = admin_get(admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200 OK"), "{ready}");
    for task in slow {
        assert_eq!(task.await.unwrap().status_line, "HTTP/1.1 200 OK");
    }
}

async fn admin_get(admin: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let r = read_response(&mut s).await;
    format!("{}\n{}", r.status_line, r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_counted_as_busy_and_forwards_nothing() {
    let pki = Pki::new();
    // The queue's wait is upstream.queue_timeout.
    let (upstream, gateway) = upstream_and_gateway(
        &pki,
        "max_in_flight = 1\nqueue_timeout = \"500ms\"\n[admin]\nenabled = false\n",
    )
    .await;
    let addr = gateway.local_addr();
    let slow = get_in_background(
        addr,
        pki.root(),
        format!("{SCEP}?operation=GetCACert&message=slow&delay_ms=4000"),
    );
    wait_until("the slot taken", || {
        upstream.arrived.load(Ordering::SeqCst) == 1
    })
    .await;
    let r = raw_request(
        addr,
        pki.root(),
        format!("GET {SCEP}?operation=GetCACaps&message=queued HTTP/1.1\r\nHost: scep.example.test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 503 Service Unavailable");
    assert!(
        r.text().contains("too many requests are waiting on NDES"),
        "{}",
        r.text()
    );
    assert_eq!(
        upstream.arrived.load(Ordering::SeqCst),
        1,
        "the refused request reached NDES"
    );
    let scrape = gateway.metrics.render();
    assert_upstream_errors(&scrape, "busy", 1);
    assert_has(
        &scrape,
        "ndes_gateway_requests_total{method=\"GET\",operation=\"GetCACaps\",status=\"503\"} 1",
    );
    assert_eq!(slow.await.unwrap().status_line, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scep_strict_refuses_an_unreadable_pkioperation_with_400() {
    let setup = Setup::with("", "").await;
    let scep_strict = Gateway::start(&config(
        &setup.pki,
        setup.upstream.addr,
        "[scep]\nstrict = true\n[admin]\nenabled = false\n",
    ))
    .await
    .unwrap();
    let addr = scep_strict.local_addr();
    let body = b"this is no pkiMessage";
    let mut post = format!(
        "POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: scep.example.test\r\nContent-Type: application/x-pki-message\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    post.extend_from_slice(body);
    let r = raw_request(addr, setup.pki.root(), &post).await;
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
    assert!(r.text().contains("not a SCEP pkiMessage"), "{}", r.text());
    let r = raw_request(
        addr,
        setup.pki.root(),
        format!("GET {SCEP}?operation=PKIOperation&message=bm90IGEgbWVzc2FnZQ%3D%3D HTTP/1.1\r\nHost: scep.example.test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
    assert_eq!(setup.upstream.count(), 0, "a refused message reached NDES");
    let scrape = scep_strict.metrics.render();
    assert_has(
        &scrape,
        "ndes_gateway_rejected_total{reason=\"scep_unparsable\"} 2",
    );
    // Without scep.strict the same POST is NDES's to judge.
    let r = setup.raw(&post).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(setup.upstream.count(), 1);
    assert_eq!(&setup.upstream.last().body[..], body);
}

/// A certificate NDES presents that fails the chain or the pin carries a subject of the
/// presenter's choosing: it must never become a series of the expiry gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_upstream_certificate_never_reaches_the_metrics() {
    let pki = Pki::new();
    let impostor_ca = DevCa::new("Impostor CA").unwrap();
    let (foreign_cert, foreign_key) = impostor_ca
        .issue_server(&["impostor-chain.example", devpki::NDES_NAME, "127.0.0.1"])
        .unwrap();
    // Chains to the trusted root, but its key is not the pinned one.
    let (unpinned_cert, unpinned_key) = pki
        .ca
        .issue_server(&["impostor-pin.example", devpki::NDES_NAME, "127.0.0.1"])
        .unwrap();
    let pinned = {
        use rustls::pki_types::pem::PemObject;
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(pki.ndes_cert.as_bytes()).unwrap();
        ndes_gateway::upstream::spki_sha256(&der).unwrap()
    };
    for (cert, key, kind) in [
        (&foreign_cert, &foreign_key, "tls_chain"),
        (&unpinned_cert, &unpinned_key, "pin_mismatch"),
    ] {
        let upstream = Upstream::tls(cert, key).await;
        let gateway = Gateway::start(&config(
            &pki,
            upstream.addr,
            &format!(
                "spki_sha256 = [{pinned:?}]\n[admin]\naddr = \"127.0.0.1:0\"\nprobe_interval = \"1h\"\n[scep]\ncert_check_interval = \"1h\"\n"
            ),
        ))
        .await
        .unwrap();
        // At start the probe and the certificate watch each try NDES once.
        wait_until("both checks tried NDES", || {
            upstream.connections.load(Ordering::SeqCst) >= 2
        })
        .await;
        let admin = gateway.admin_addr().unwrap();
        let mut seen = String::new();
        for _ in 0..25 {
            seen = admin_get(admin, "/readyz").await;
            if seen.contains(kind) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert!(seen.contains(kind), "{seen}");
        // Whatever the watch does with what it saw, it has done it well within this.
        for _ in 0..10 {
            let scrape = admin_get(admin, "/metrics").await;
            assert!(!scrape.contains("impostor"), "{scrape}");
            assert!(!scrape.contains("role=\"upstream_tls\""), "{scrape}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(upstream.count() + upstream.probes.lock().unwrap().len(), 0);
        gateway.shutdown().await;
    }
}

/// Two gateways in one process: stopping one leaves the other serving, and each drains its own
/// connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_in_one_process_stop_independently() {
    let first = Setup::new().await;
    let second = Setup::new().await;
    // A keep-alive connection to the first, idle between requests.
    let mut idle = tls_connect(first.addr(), first.pki.root()).await;
    idle.write_all(
        format!(
            "GET {SCEP}?operation=GetCACaps&message=a HTTP/1.1\r\nHost: scep.example.test\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(
        read_response(&mut idle).await.status_line,
        "HTTP/1.1 200 OK"
    );

    let first_addr = first.addr();
    tokio::time::timeout(IO_TIMEOUT, first.gateway.shutdown())
        .await
        .expect("the first gateway did not stop");
    // Its idle connection was closed by the drain, and it accepts no more.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(
        IO_TIMEOUT,
        tokio::io::AsyncReadExt::read_to_end(&mut idle, &mut rest),
    )
    .await;
    assert!(end.is_ok(), "the drain left a connection open");
    assert!(tokio::net::TcpStream::connect(first_addr).await.is_err());

    let r = second
        .get(&format!("{SCEP}?operation=GetCACaps&message=b"))
        .await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    tokio::time::timeout(IO_TIMEOUT, second.gateway.shutdown())
        .await
        .expect("the second gateway did not stop");
}

/// A connection still open at the drain deadline (here, a TLS handshake that never comes, within
/// its own longer timeout) is dropped and counted, and the gateway stops on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_left_at_the_drain_deadline_are_dropped_and_counted() {
    let pki = Pki::new();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let text = format!(
        r#"
[listen]
addr = "127.0.0.1:0"
cert = {cert:?}
key = {key:?}
handshake_timeout = "60s"
drain_timeout = "1s"
[upstream]
url = "https://{upstream}{SCEP}"
ca = {ca:?}
server_name = "{ndes}"
[admin]
enabled = false
"#,
        cert = pki.pki.gateway_cert.display().to_string(),
        key = pki.pki.gateway_key.display().to_string(),
        ca = pki.root().display().to_string(),
        upstream = upstream.addr,
        ndes = devpki::NDES_NAME,
    );
    let gateway = Gateway::start(&Config::parse(&text).unwrap())
        .await
        .unwrap();
    let metrics = gateway.metrics.clone();
    // Connected, and silent: the handshake waits for a ClientHello.
    let _silent = tokio::net::TcpStream::connect(gateway.local_addr())
        .await
        .unwrap();
    wait_until("the connection accepted", || {
        metrics.connections_active.get() == 1
    })
    .await;
    tokio::time::timeout(IO_TIMEOUT, gateway.shutdown())
        .await
        .expect("the gateway did not stop at its drain deadline");
    assert_eq!(metrics.connections_aborted_total.get(), 1);
    assert_eq!(metrics.connections_active.get(), 0);
}

/// `ndes-gateway serve` as systemd runs it, with its JSON log lines read on a thread of their own
/// and `NOTIFY_SOCKET` pointing at the test's own socket.
struct Served {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Served {
    fn start(config: &std::path::Path, notify: Option<&std::path::Path>) -> Served {
        use std::io::BufRead;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ndes-gateway"));
        command
            .args(["serve", "--config", config.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stderr(std::process::Stdio::piped());
        if let Some(socket) = notify {
            command.env("NOTIFY_SOCKET", socket);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        let mut served = Served {
            child,
            lines,
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
        };
        let listening = served.wait_for(|v| v["message"] == "listening");
        served.addr = listening["addr"].as_str().unwrap().parse().unwrap();
        served.admin = listening["admin"].as_str().unwrap().parse().unwrap();
        served
    }

    /// The next log line that `matches`, within the test's bound.
    fn wait_for(&mut self, matches: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if matches(&v) => return v,
                Ok(_) => {}
                Err(e) => panic!("the log line never came: {e}"),
            }
        }
    }

    fn signal(&self, name: &str) {
        // The shell's own kill: no procps needed.
        let sent = std::process::Command::new("sh")
            .args(["-c", &format!("kill -{name} {}", self.child.id())])
            .status()
            .unwrap();
        assert!(sent.success());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn served_config(
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    root: &std::path::Path,
    upstream: std::net::SocketAddr,
    pin: &str,
) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[listen]
addr = "127.0.0.1:0"
cert = {cert:?}
key = {key:?}
# Only SIGHUP reloads here: the file watch would otherwise do it by itself.
reload_check_interval = "1h"
[upstream]
url = "https://{upstream}{SCEP}"
ca = {root:?}
server_name = "{ndes}"
spki_sha256 = [{pin:?}]
[admin]
addr = "127.0.0.1:0"
[log]
format = "json"
"#,
            cert = cert.display().to_string(),
            key = key.display().to_string(),
            root = root.display().to_string(),
            ndes = devpki::NDES_NAME,
        ),
    )
    .unwrap();
    path
}

/// The certificate a new TLS connection to `addr` is shown.
async fn presented(addr: std::net::SocketAddr, root: &std::path::Path) -> Vec<u8> {
    let tls = tls_connect(addr, root).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn first_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("no message on NOTIFY_SOCKET");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// SIGHUP reads the config file again: a new certificate file and new pins take effect, the
/// listener's expiry gauge follows, and systemd hears RELOADING=1 then READY=1 around it, READY=1
/// at start and STOPPING=1 at the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificate_and_pins_and_tells_systemd() {
    let pki = Pki::new();
    let dir = pki.dir.path().to_path_buf();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let right_pin = ndes_gateway::upstream::spki_sha256(&first_der(&pki.ndes_cert)).unwrap();
    // A key NDES does not have: every request fails the pin until the reload.
    let wrong_pin = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let (rotated_pem, rotated_key) = pki
        .ca
        .issue_server(&["rotated.example.test", devpki::PUBLIC_NAME, "localhost"])
        .unwrap();
    let rotated_cert = pki.write("rotated.pem", &rotated_pem);
    let rotated_key = pki.write("rotated.key", &rotated_key);
    let notify_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(IO_TIMEOUT)).unwrap();

    let config = served_config(
        &dir,
        &pki.pki.gateway_cert,
        &pki.pki.gateway_key,
        pki.root(),
        upstream.addr,
        wrong_pin,
    );
    let mut served = Served::start(&config, Some(&notify_path));
    assert_eq!(next_notification(&notify), "READY=1\n");
    let caps = format!("GET {SCEP}?operation=GetCACaps&message=x HTTP/1.1\r\nHost: scep.example.test\r\nConnection: close\r\n\r\n");
    let before = raw_request(served.addr, pki.root(), caps.as_bytes()).await;
    assert_eq!(before.status_line, "HTTP/1.1 502 Bad Gateway");
    let original = std::fs::read_to_string(&pki.pki.gateway_cert).unwrap();
    assert_eq!(
        presented(served.addr, pki.root()).await,
        first_der(&original)
    );
    let scrape = admin_get(served.admin, "/metrics").await;
    assert_has(
        &scrape,
        "role=\"listener\",server=\"\",subject=\"CN=scep.example.test\"",
    );

    served_config(
        &dir,
        &rotated_cert,
        &rotated_key,
        pki.root(),
        upstream.addr,
        &right_pin,
    );
    served.signal("HUP");
    let reloading = next_notification(&notify);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next_notification(&notify), "READY=1\n");
    served.wait_for(|v| v["message"] == "reloaded" && v["what"] == "upstream_trust");

    assert_eq!(
        presented(served.addr, pki.root()).await,
        first_der(&rotated_pem)
    );
    let after = raw_request(served.addr, pki.root(), caps.as_bytes()).await;
    assert_eq!(after.status_line, "HTTP/1.1 200 OK");
    let scrape = admin_get(served.admin, "/metrics").await;
    assert_has(
        &scrape,
        "role=\"listener\",server=\"\",subject=\"CN=rotated.example.test\"",
    );
    assert!(!scrape.contains("CN=scep.example.test"), "{scrape}");
    for target in ["config", "listener", "upstream_trust"] {
        assert!(
            scrape.contains(&format!(
                "ndes_gateway_reloads_total{{result=\"ok\",target=\"{target}\"}} 1"
            )),
            "{scrape}"
        );
    }

    served.signal("TERM");
    assert_eq!(next_notification(&notify), "STOPPING=1\n");
    assert_eq!(served.child.wait().unwrap().code(), Some(0));
}

/// A config that no longer loads is refused whole: the certificate and trust in force stay,
/// and the refusal is counted and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_config_keeps_what_is_in_force() {
    let pki = Pki::new();
    let dir = pki.dir.path().to_path_buf();
    let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let pin = ndes_gateway::upstream::spki_sha256(&first_der(&pki.ndes_cert)).unwrap();
    let config = served_config(
        &dir,
        &pki.pki.gateway_cert,
        &pki.pki.gateway_key,
        pki.root(),
        upstream.addr,
        &pin,
    );
    let mut served = Served::start(&config, None);
    // At once, as `systemctl reload` right after start would: the process must live on.
    served.signal("HUP");
    served.wait_for(|v| v["message"] == "reloaded" && v["what"] == "listener");
    std::fs::write(
        &config,
        "[listen]\naddr = \"127.0.0.1:0\"\nnot toml at all [[[",
    )
    .unwrap();
    served.signal("HUP");
    let refused = served.wait_for(|v| {
        v["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("reload refused")
    });
    assert!(
        refused["error"].as_str().unwrap().contains("gateway.toml"),
        "{refused}"
    );
    let caps = format!("GET {SCEP}?operation=GetCACaps&message=x HTTP/1.1\r\nHost: scep.example.test\r\nConnection: close\r\n\r\n");
    let r = raw_request(served.addr, pki.root(), caps.as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    let scrape = admin_get(served.admin, "/metrics").await;
    assert_has(
        &scrape,
        "ndes_gateway_reloads_total{result=\"error\",target=\"config\"} 1",
    );
    served.signal("TERM");
    assert_eq!(served.child.wait().unwrap().code(), Some(0));
}

/// A scraper's keep-alive connection to the admin listener ends with the gateway: a stopped
/// gateway answers nothing more, on any listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_gateway_answers_no_more_on_its_admin_connections() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let (_upstream, gateway) =
        upstream_and_gateway(&pki, "[admin]\naddr = \"127.0.0.1:0\"\n").await;
    let mut scraper = tokio::net::TcpStream::connect(gateway.admin_addr().unwrap())
        .await
        .unwrap();
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n";
    scraper.write_all(healthz).await.unwrap();
    assert_eq!(
        read_response(&mut scraper).await.status_line,
        "HTTP/1.1 200 OK"
    );
    tokio::time::timeout(IO_TIMEOUT, gateway.shutdown())
        .await
        .expect("the gateway did not stop");
    // The same connection, after the stop: closed, or at least silent and then closed.
    let _ = scraper.write_all(healthz).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(IO_TIMEOUT, scraper.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the admin connection outlived the gateway");
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "a stopped gateway answered: {}",
        String::from_utf8_lossy(&rest)
    );
}
