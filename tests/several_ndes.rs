//! Several NDES servers behind one public name, with the real tools: two micromdm scepservers,
//! each with its own CA (its own `ca -init` depot) and so its own recipient key, each behind its
//! own TLS front (IIS on its NDES host), and the gateway with both as `[[upstream.server]]`.
//! A PKIOperation can only be opened by the server it is encrypted to: these tests fail for a
//! balancer that does not route by recipient.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::*;
use ndes_gateway::config::Config;
use ndes_gateway::dev::demo::{self, ScepServer};
use ndes_gateway::dev::devpki::{self, DevPki};
use ndes_gateway::Gateway;

/// One NDES host: scepserver as its CA, and its TLS front on a port of its own.
struct Ndes {
    scep: ScepServer,
    front: Option<Gateway>,
    addr: SocketAddr,
    front_config: Config,
}

impl Ndes {
    async fn start(dir: &Path, pki: &DevPki, organization: &str) -> Ndes {
        std::fs::create_dir_all(dir).unwrap();
        let scep = ScepServer::start_as(dir, organization)
            .await
            .expect("scepserver (Debian package scep)");
        let front_config = demo::front_config(pki, &scep.url()).unwrap();
        let front = Gateway::start(&front_config).await.unwrap();
        let addr = front.local_addr();
        let mut front_config = front_config;
        // A restart comes back on the same address, as an IIS would.
        front_config.listen.addr = addr;
        Ndes {
            scep,
            front: Some(front),
            addr,
            front_config,
        }
    }

    fn label(&self) -> String {
        self.addr.to_string()
    }

    /// Certificates this server's CA issued for names starting with `prefix`.
    fn issued(&self, prefix: &str) -> usize {
        std::fs::read_dir(&self.scep.depot)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix) && n.ends_with(".pem"))
            .count()
    }

    /// PKIOperations that reached this NDES host, as its front counted them.
    fn pkioperations(&self) -> u64 {
        let front = self.front.as_ref().expect("the front is running");
        sum_metric(
            &front.metrics.render(),
            "ndes_gateway_requests_total{",
            "operation=\"PKIOperation\"",
        )
    }

    async fn stop(&mut self) {
        if let Some(front) = self.front.take() {
            front.shutdown().await;
        }
    }

    async fn restart(&mut self) {
        self.front = Some(Gateway::start(&self.front_config).await.unwrap());
    }
}

/// The sum of every series of `prefix` whose labels contain `with`.
fn sum_metric(scrape: &str, prefix: &str, with: &str) -> u64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains(with))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

struct Site {
    dir: tempfile::TempDir,
    pki: DevPki,
    ndes: Vec<Ndes>,
}

impl Site {
    async fn start() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let pki = devpki::generate(&dir.path().join("pki")).unwrap();
        let a = Ndes::start(&dir.path().join("ndes1"), &pki, "ndes01").await;
        let b = Ndes::start(&dir.path().join("ndes2"), &pki, "ndes02").await;
        // Each `ca -init` made a CA of its own: the two servers' recipients differ.
        let ca = |n: &Ndes| std::fs::read(n.scep.depot.join("ca.pem")).unwrap();
        assert_ne!(ca(&a), ca(&b));
        Site {
            dir,
            pki,
            ndes: vec![a, b],
        }
    }

    fn config_text(&self, extra: &str) -> String {
        let servers: String = self
            .ndes
            .iter()
            .map(|n| {
                format!(
                    "[[upstream.server]]\nurl = \"https://{}{SCEP}\"\nserver_name = \"{}\"\n",
                    n.addr,
                    devpki::NDES_NAME
                )
            })
            .collect();
        format!(
            "[listen]\naddr = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n[upstream]\nca = {:?}\n{extra}\n{servers}[admin]\naddr = \"127.0.0.1:0\"\nprobe_interval = \"1s\"\n",
            self.pki.gateway_cert.display().to_string(),
            self.pki.gateway_key.display().to_string(),
            self.pki.root.display().to_string(),
        )
    }

    async fn gateway(&self, extra: &str) -> Gateway {
        let gw = Gateway::start(&Config::parse(&self.config_text(extra)).unwrap())
            .await
            .unwrap();
        // Routing needs each server's RA set; the watch reads them at start.
        for n in &self.ndes {
            wait_for_metric(
                &gw,
                &format!("ndes_gateway_upstream_ready{{server=\"{}\"}} 1", n.label()),
            )
            .await;
        }
        gw
    }

    async fn enrol(&self, gw: &Gateway, cn: &str) -> Result<PathBuf, String> {
        let url = format!("https://localhost:{}{SCEP}", gw.local_addr().port());
        demo::enrol(
            &self.dir.path().join("clients").join(cn),
            &url,
            &self.pki.root,
            cn,
        )
        .await
    }

    async fn pkcsreq_for(&self, ca_der: Bytes, cn: &str) -> Bytes {
        let dir = self.dir.path().join("recording");
        pkcsreq_for(&dir, &self.pki.root, ca_der, cn).await
    }

    /// A PKCSReq encrypted to server `i`'s CA, fetched from that server directly.
    async fn pkcsreq_to(&self, i: usize, cn: &str) -> Bytes {
        let ca = direct_get(
            self.ndes[i].scep.port,
            "/scep?operation=GetCACert&message=ca",
        )
        .await;
        assert_eq!(ca.status_line, "HTTP/1.1 200 OK");
        self.pkcsreq_for(Bytes::from(ca.body), cn).await
    }
}

/// Polls the gateway's metrics until `line` is there (bounded).
async fn wait_for_metric(gw: &Gateway, line: &str) {
    for _ in 0..300 {
        if gw.metrics.render().lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never saw {line:?} in:\n{}", gw.metrics.render());
}

fn post(body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-pki-message\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

fn get(body: &[u8]) -> Vec<u8> {
    let message = percent_encode(&base64::engine::general_purpose::STANDARD.encode(body));
    format!("GET {SCEP}?operation=PKIOperation&message={message} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").into_bytes()
}

/// The pkiStatus of a CertRep.
fn pki_status(r: &RawResponse) -> Option<u32> {
    ndes_gateway::scep::parse_pki_message(&r.body)
        .ok()?
        .pki_status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_enrolments_over_two_servers_all_succeed_and_both_servers_issue() {
    let site = Site::start().await;
    let gw = site.gateway("").await;
    for n in 0..20 {
        let cn = format!("device-{n}");
        site.enrol(&gw, &cn)
            .await
            .unwrap_or_else(|e| panic!("enrolment {n}: {e}"));
    }
    let issued: Vec<usize> = site.ndes.iter().map(|n| n.issued("device-")).collect();
    assert_eq!(issued.iter().sum::<usize>(), 20, "{issued:?}");
    assert!(
        issued.iter().all(|&i| i > 0),
        "one server issued nothing: {issued:?}"
    );
    let scrape = gw.metrics.render();
    assert_eq!(
        sum_metric(
            &scrape,
            "ndes_gateway_scep_routing_total",
            "result=\"matched\""
        ),
        20,
        "{scrape}"
    );
    assert_eq!(
        sum_metric(
            &scrape,
            "ndes_gateway_scep_routing_total",
            "result=\"unmatched\""
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pkcsreq_reaches_the_server_it_is_encrypted_to_as_post_and_as_get() {
    let site = Site::start().await;
    let gw = site.gateway("").await;
    for target in [0, 1] {
        let other = 1 - target;
        let before = (
            site.ndes[target].pkioperations(),
            site.ndes[other].pkioperations(),
        );
        for round in 0..3 {
            let cn = format!("routed-{target}-{round}");
            let pkcsreq = site.pkcsreq_to(target, &cn).await;
            for (form, request) in [("POST", post(&pkcsreq)), ("GET", get(&pkcsreq))] {
                let r = raw_request(gw.local_addr(), &site.pki.root, &request).await;
                assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{form}: {}", r.text());
                assert_eq!(
                    r.header("content-type").as_deref(),
                    Some("application/x-pki-message")
                );
                // Only the server holding the key can answer with a CertRep at all.
                assert!(pki_status(&r).is_some(), "{form}: no CertRep");
            }
            assert!(
                site.ndes[target].issued(&cn) >= 1,
                "server {target} issued nothing for {cn}"
            );
            assert_eq!(site.ndes[other].issued(&cn), 0);
        }
        assert_eq!(site.ndes[target].pkioperations(), before.0 + 6);
        assert_eq!(
            site.ndes[other].pkioperations(),
            before.1,
            "the other server saw a PKIOperation it cannot open"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_server_down_enrolments_go_on_and_its_own_requests_get_503() {
    let mut site = Site::start().await;
    let gw = site.gateway("").await;
    // Made while server 2 is up: what a device that fetched its GetCACert just before holds.
    let to_down = site.pkcsreq_to(1, "stranded").await;
    let down_label = site.ndes[1].label();
    site.ndes[1].stop().await;
    wait_for_metric(
        &gw,
        &format!("ndes_gateway_upstream_ready{{server=\"{down_label}\"}} 0"),
    )
    .await;
    let readyz = admin_get(&gw, "/readyz").await;
    assert!(readyz.starts_with("HTTP/1.1 200 OK"), "{readyz}");
    assert!(readyz.contains(&down_label), "{readyz}");

    for n in 0..4 {
        let cn = format!("while-down-{n}");
        site.enrol(&gw, &cn)
            .await
            .unwrap_or_else(|e| panic!("enrolment {n} with a server down: {e}"));
    }
    assert_eq!(site.ndes[0].issued("while-down-"), 4);

    let up_before = site.ndes[0].pkioperations();
    for request in [post(&to_down), get(&to_down)] {
        let r = raw_request(gw.local_addr(), &site.pki.root, &request).await;
        assert_eq!(
            r.status_line,
            "HTTP/1.1 503 Service Unavailable",
            "{}",
            r.text()
        );
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        assert!(r.text().contains("server 2"), "{}", r.text());
        assert!(
            !r.text().contains(&down_label),
            "internal address leaked: {}",
            r.text()
        );
    }
    assert_eq!(
        site.ndes[0].pkioperations(),
        up_before,
        "sent to a server that cannot open it"
    );
    assert_eq!(site.ndes[1].issued("stranded"), 0);
    let scrape = gw.metrics.render();
    assert_eq!(
        sum_metric(
            &scrape,
            "ndes_gateway_scep_routing_total",
            "result=\"unavailable\""
        ),
        2,
        "{scrape}"
    );

    site.ndes[1].restart().await;
    wait_for_metric(
        &gw,
        &format!("ndes_gateway_upstream_ready{{server=\"{down_label}\"}} 1"),
    )
    .await;
    // Back: it takes enrolments again (balanced at random, so within a bounded number).
    for n in 0..30 {
        if site.ndes[1].issued("after-") > 0 {
            break;
        }
        site.enrol(&gw, &format!("after-{n}"))
            .await
            .unwrap_or_else(|e| panic!("enrolment {n} after the restart: {e}"));
    }
    assert!(
        site.ndes[1].issued("after-") > 0,
        "the server that came back takes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_ca_cert_through_one_gateway_and_the_pkioperation_through_another_enrol() {
    let site = Site::start().await;
    let first = site.gateway("").await;
    let second = site.gateway("").await;
    let caps = "operation=GetCACert&message=ca";
    for round in 0..6 {
        let r = raw_request(
            first.local_addr(),
            &site.pki.root,
            format!("GET {SCEP}?{caps} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        let cn = format!("replica-{round}");
        let pkcsreq = site.pkcsreq_for(Bytes::from(r.body), &cn).await;
        let r = raw_request(second.local_addr(), &site.pki.root, &post(&pkcsreq)).await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{}", r.text());
        assert_eq!(pki_status(&r), Some(0), "round {round}: not SUCCESS");
        let issued: usize = site.ndes.iter().map(|n| n.issued(&cn)).sum();
        assert_eq!(issued, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pkioperation_storm_past_the_queue_gets_503_and_get_ca_caps_still_answers() {
    let s = Setup::with(
        "max_pkioperations_per_server = 1\npkioperation_queue = 1\nqueue_timeout = \"20s\"",
        "request_timeout = \"300s\"",
    )
    .await;
    let addr = s.addr();
    let root = s.pki.root().to_path_buf();
    // Each PKIOperation takes NDES 3 s: the first holds the one slot, the second waits in the
    // queue, the other two find it full.
    let slow = format!(
        "POST {SCEP}?operation=PKIOperation&delay_ms=3000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbody"
    );
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let root = root.clone();
            let req = slow.clone();
            tokio::spawn(async move { raw_request(addr, &root, req.as_bytes()).await })
        })
        .collect();
    // The shed ones are answered at once; GetCACaps meanwhile is not behind the storm.
    let scrape_has = |text: &str| s.gateway.metrics.render().contains(text);
    for _ in 0..400 {
        if scrape_has("ndes_gateway_pkioperations_shed_total{reason=\"queue_full\"} 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let caps = s
        .get(&format!("{SCEP}?operation=GetCACaps&message=x"))
        .await;
    assert_eq!(caps.status_line, "HTTP/1.1 200 OK");
    let mut statuses = Vec::new();
    for b in burst {
        let r = b.await.unwrap();
        if r.status_line.contains("503") {
            let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!(retry >= 1);
        }
        statuses.push(r.status_line);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 503 Service Unavailable",
            "HTTP/1.1 503 Service Unavailable"
        ]
    );
    let pkioperations = s
        .upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.target.contains("PKIOperation"))
        .count();
    assert_eq!(pkioperations, 2, "a shed PKIOperation reached NDES");
    let scrape = s.gateway.metrics.render();
    assert!(
        scrape.contains("ndes_gateway_pkioperation_queue_depth 0"),
        "{scrape}"
    );
}

#[tokio::test]
async fn a_second_get_ca_cert_within_the_ttl_is_answered_from_the_cache() {
    let s = Setup::with("cache_ttl = \"60s\"", "").await;
    let target = format!("{SCEP}?operation=GetCACert&message=ca");
    let first = s.get(&target).await;
    let second = s.get(&target).await;
    assert_eq!(first.status_line, "HTTP/1.1 200 OK");
    assert_eq!(second.status_line, "HTTP/1.1 200 OK");
    assert_eq!(first.body, second.body);
    assert_eq!(first.header("content-type"), second.header("content-type"));
    assert_eq!(s.upstream.count(), 1, "the second GetCACert reached NDES");
    // NDES answers GetCACert alike whatever the message: another one is no way past the cache.
    let other = s
        .get(&format!("{SCEP}?operation=GetCACert&message=other"))
        .await;
    assert_eq!(other.body, first.body);
    assert_eq!(
        s.upstream.count(),
        1,
        "a GetCACert with another message reached NDES"
    );
    // Another question is another entry: it goes to NDES.
    let caps = s
        .get(&format!("{SCEP}?operation=GetCACaps&message=ca"))
        .await;
    assert_eq!(caps.status_line, "HTTP/1.1 200 OK");
    assert_eq!(s.upstream.count(), 2);
    let scrape = s.gateway.metrics.render();
    for line in [
        "ndes_gateway_cache_requests_total{operation=\"GetCACert\",result=\"hit\"} 2",
        "ndes_gateway_cache_requests_total{operation=\"GetCACert\",result=\"miss\"} 1",
        "ndes_gateway_cache_requests_total{operation=\"GetCACaps\",result=\"miss\"} 1",
    ] {
        assert!(scrape.contains(line), "{line} not in:\n{scrape}");
    }
}

#[tokio::test]
async fn with_the_cache_off_every_get_ca_cert_reaches_ndes() {
    let s = Setup::with("cache_ttl = \"0s\"", "").await;
    let target = format!("{SCEP}?operation=GetCACert&message=ca");
    for _ in 0..3 {
        assert_eq!(s.get(&target).await.status_line, "HTTP/1.1 200 OK");
    }
    assert_eq!(s.upstream.count(), 3);
}

async fn admin_get(gw: &Gateway, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.admin_addr().unwrap())
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_each_server_and_compares_their_certificates() {
    use ndes_gateway::cli::doctor::{self, Verdict};
    let site = Site::start().await;
    let config = Config::parse(&site.config_text("")).unwrap();
    let findings = doctor::run(&config, Some("localhost")).await;
    for n in &site.ndes {
        let tls = findings
            .iter()
            .find(|f| f.check == "upstream_tls" && f.server.as_deref() == Some(&n.label()))
            .unwrap_or_else(|| panic!("no TLS check for {}: {findings:#?}", n.label()));
        assert_eq!(tls.verdict, Verdict::Pass, "{tls:?}");
    }
    let check = |name: &str| {
        findings
            .iter()
            .find(|f| f.check == name)
            .unwrap_or_else(|| panic!("no {name}: {findings:#?}"))
    };
    // Two CAs behind one name: a warning. Their RA keys differ, and routing handles it.
    assert_eq!(check("servers_ca").verdict, Verdict::Warn);
    assert_eq!(check("servers_ra").verdict, Verdict::Pass);
    assert!(
        check("servers_ra").detail.contains("differ"),
        "{:?}",
        check("servers_ra")
    );
    let text = doctor::render_text(&findings);
    assert!(
        text.contains(&format!("[{}]", site.ndes[1].label())),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_warns_when_two_servers_certificates_cannot_be_told_apart() {
    use ndes_gateway::cli::doctor::{self, Verdict};
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(&dir.path().join("pki")).unwrap();
    // scepserver's default CA name and serial, twice, with two keys.
    let site = Site {
        ndes: vec![
            Ndes::start(&dir.path().join("a"), &pki, "scep-ca").await,
            Ndes::start(&dir.path().join("b"), &pki, "scep-ca").await,
        ],
        dir,
        pki,
    };
    let config = Config::parse(&site.config_text("")).unwrap();
    let findings = doctor::run(&config, Some("localhost")).await;
    let ra = findings.iter().find(|f| f.check == "servers_ra").unwrap();
    assert_eq!(ra.verdict, Verdict::Warn, "{ra:?}");
    assert!(
        ra.detail.contains("same issuer and serial number"),
        "{ra:?}"
    );
}

/// A gateway over in-process NDES stand-ins, the cache off, no idle connection kept, probed
/// once at start: after that, what the requests themselves meet decides where they go.
async fn over(pki: &Pki, servers: &[SocketAddr]) -> Gateway {
    let entries: String = servers
        .iter()
        .map(|a| {
            format!(
                "[[upstream.server]]\nurl = \"https://{a}{SCEP}\"\nserver_name = \"{}\"\n",
                devpki::NDES_NAME
            )
        })
        .collect();
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n[upstream]\nca = {:?}\ncache_ttl = \"0s\"\nconnect_timeout = \"1s\"\npool_max_idle = 0\n{entries}[admin]\naddr = \"127.0.0.1:0\"\nprobe_interval = \"1h\"\n",
        pki.pki.gateway_cert.display().to_string(),
        pki.pki.gateway_key.display().to_string(),
        pki.root().display().to_string(),
    );
    let gw = Gateway::start(&Config::parse(&text).unwrap())
        .await
        .unwrap();
    for a in servers {
        wait_for_metric(
            &gw,
            &format!("ndes_gateway_upstream_ready{{server=\"{a}\"}} 1"),
        )
        .await;
    }
    gw
}

fn caps_get() -> String {
    format!(
        "GET {SCEP}?operation=GetCACaps&message=x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_taking_connections_is_passed_over_and_set_aside() {
    let pki = Pki::new();
    let good = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let going = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let gone = going.addr;
    let gw = over(&pki, &[gone, good.addr]).await;
    // Up at its probe, gone since: its port refuses connections until the next probe, in 1 h.
    drop(going);
    for _ in 0..20 {
        let r = raw_request(gw.local_addr(), pki.root(), caps_get().as_bytes()).await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{}", r.text());
    }
    assert_eq!(good.count(), 20);
    let scrape = gw.metrics.render();
    let refusals = series_sum(
        &scrape,
        &format!("ndes_gateway_upstream_errors_total{{kind=\"connect\",server=\"{gone}\"}}"),
    );
    // Tried, then set aside for 1 s, 2 s, 4 s...: five tries cover 31 s of requests. Asked at
    // random instead, it would have refused about 10 of the 20.
    assert!((1.0..=5.0).contains(&refusals), "{refusals}\n{scrape}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_ca_caps_answered_500_by_one_server_is_asked_of_the_other() {
    let pki = Pki::new();
    // Answers its probe, and 500 to everything a client sends.
    let broken = Upstream::start(
        Some((pki.ndes_cert.clone(), pki.ndes_key.clone())),
        Arc::new(|seen: &Seen| {
            if seen.target.contains("message=ndes-gateway") {
                return caps_response(seen);
            }
            http::Response::builder()
                .status(500)
                .body(http_body_util::Full::new(Bytes::from_static(b"broken")))
                .unwrap()
        }),
    )
    .await;
    let good = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
    let gw = over(&pki, &[broken.addr, good.addr]).await;
    for _ in 0..10 {
        let r = raw_request(gw.local_addr(), pki.root(), caps_get().as_bytes()).await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{}", r.text());
    }
    assert_eq!(good.count(), 10);
    assert!(broken.count() > 0, "the broken server was never asked");
    // A PKIOperation is never asked twice: the broken server's 500 is the answer.
    let pkiop = format!("POST {SCEP}?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbody");
    let mut statuses = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let before = broken.count() + good.count();
        let r = raw_request(gw.local_addr(), pki.root(), pkiop.as_bytes()).await;
        assert_eq!(broken.count() + good.count(), before + 1, "sent twice");
        statuses.insert(r.status_line);
    }
    assert!(
        statuses.contains("HTTP/1.1 500 Internal Server Error"),
        "{statuses:?}"
    );
}
