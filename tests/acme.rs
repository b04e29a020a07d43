//! The public certificate by ACME against a real ACME server: Debian's Pebble and
//! pebble-challtestsrv on loopback, started and stopped by each test. challtestsrv answers every
//! name with 127.0.0.1, Pebble validates tls-alpn-01 on the gateway's own listener (its `tlsPort`)
//! and http-01 on the gateway's `http01_addr` (its `httpPort`).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ndes_gateway::config::Config;
use ndes_gateway::dev::demo::{self, ScepServer};
use ndes_gateway::dev::devpki::DevCa;
use ndes_gateway::Gateway;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Issuance against Pebble takes about a second; renewal waits on the certificate's short life.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pebble's example EAB key (base64url), as a commercial CA hands one out.
const EAB_KID: &str = "kid-1";
const EAB_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

/// A loopback port free now; the tests need them before anything binds them, because Pebble's
/// config names the gateway's ports.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Clone, Default)]
struct PebbleOptions {
    /// Where Pebble dials to validate tls-alpn-01 and http-01.
    tls_port: u16,
    http_port: u16,
    /// certificateValidityPeriod, seconds.
    validity: Option<u64>,
    eab_required: bool,
    /// Pebble's default 5% of rejected nonces left on.
    reject_nonces: bool,
}

/// Pebble and its DNS, killed on drop.
struct Pebble {
    dir: PathBuf,
    options: PebbleOptions,
    /// The CA of Pebble's own TLS certificate (what `listen.acme.ca` names).
    tls_ca: PathBuf,
    port: u16,
    management: u16,
    dns: u16,
    children: Vec<Child>,
}

impl Pebble {
    fn start(dir: &Path, options: PebbleOptions) -> Pebble {
        let dir = dir.join("pebble");
        std::fs::create_dir_all(&dir).unwrap();
        // The Debian package has no test certificates: Pebble's own TLS certificate is made here.
        let ca = DevCa::new("Pebble TLS test CA").unwrap();
        let (cert, key) = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(dir.join("tls-ca.pem"), &ca.pem).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let mut pebble = Pebble {
            tls_ca: dir.join("tls-ca.pem"),
            dir,
            options,
            port: free_port(),
            management: free_port(),
            dns: free_port(),
            children: Vec::new(),
        };
        pebble.write_config();
        pebble.run();
        pebble
    }

    fn write_config(&self) {
        let o = &self.options;
        let mut pebble = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{}", self.port),
            "managementListenAddress": format!("127.0.0.1:{}", self.management),
            "certificate": self.dir.join("cert.pem"),
            "privateKey": self.dir.join("key.pem"),
            "httpPort": o.http_port,
            "tlsPort": o.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": o.eab_required,
        });
        if o.eab_required {
            pebble["externalAccountMACKeys"] = serde_json::json!({ EAB_KID: EAB_KEY });
        }
        if let Some(v) = o.validity {
            pebble["certificateValidityPeriod"] = v.into();
        }
        let text = serde_json::json!({ "pebble": pebble }).to_string();
        std::fs::write(self.dir.join("pebble.json"), text).unwrap();
    }

    /// Starts challtestsrv and Pebble and waits for both to listen.
    fn run(&mut self) {
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(name))
                .unwrap()
        };
        let dns = format!("127.0.0.1:{}", self.dns);
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args([
                "-dns01",
                &dns,
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ])
            .args(["-management", &format!("127.0.0.1:{}", free_port())])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.log"))
            .spawn()
            .expect("pebble-challtestsrv (Debian package pebble)");
        self.children.push(challtestsrv);
        let mut pebble = Command::new("pebble");
        pebble
            .arg("-config")
            .arg(self.dir.join("pebble.json"))
            .args(["-dnsserver", &dns])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.log"));
        if !self.options.reject_nonces {
            pebble.env("PEBBLE_WFE_NONCEREJECT", "0");
        }
        self.children
            .push(pebble.spawn().expect("pebble (Debian package pebble)"));
        for port in [self.port, self.management] {
            let deadline = std::time::Instant::now() + IO_TIMEOUT;
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "Pebble never listened on {port}:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn stop(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn directory(&self) -> String {
        format!("https://localhost:{}/dir", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }

    /// The root Pebble issues under now (it changes at every start), written to a file.
    async fn root(&self) -> PathBuf {
        let tcp = TcpStream::connect(("127.0.0.1", self.management))
            .await
            .unwrap();
        let mut tls = tls_connector(&self.tls_ca, &[b"http/1.1"])
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"GET /roots/0 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = tokio::time::timeout(IO_TIMEOUT, read_response(&mut tls))
            .await
            .unwrap();
        assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
        let path = self.dir.join(format!("root-{}.pem", self.children[1].id()));
        std::fs::write(&path, &answer.body).unwrap();
        path
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `[listen.acme]` for `pebble`, the certificate kept in `state_dir`.
fn acme_section(pebble: &Pebble, domain: &str, state_dir: &Path, extra: &str) -> String {
    format!(
        r#"
[listen.acme]
directory = "{directory}"
ca = {ca:?}
contact = ["mailto:pki@acme.test"]
domains = ["{domain}"]
state_dir = {state:?}
{extra}
"#,
        directory = pebble.directory(),
        ca = pebble.tls_ca.display().to_string(),
        state = state_dir.display().to_string(),
    )
}

/// A temporary folder, a recording NDES stand-in, the gateway's port fixed in advance, and Pebble
/// validating tls-alpn-01 there (unless the options name other ports).
struct Bench {
    dir: tempfile::TempDir,
    pki: Pki,
    upstream: Upstream,
    port: u16,
    pebble: Pebble,
}

impl Bench {
    async fn start(mut options: PebbleOptions) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let upstream = Upstream::tls(&pki.ndes_cert, &pki.ndes_key).await;
        let port = free_port();
        if options.tls_port == 0 {
            options.tls_port = port;
        }
        if options.http_port == 0 {
            options.http_port = free_port();
        }
        let pebble = Pebble::start(dir.path(), options);
        Bench {
            dir,
            pki,
            upstream,
            port,
            pebble,
        }
    }

    fn state(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A gateway on `port` with `[listen.acme]` for `domain` (its state in the folder `state`),
    /// in front of the stand-in over TLS with the dev root.
    fn config(&self, port: u16, domain: &str, state: &str, acme: &str, admin: &str) -> String {
        format!(
            r#"
[listen]
addr = "127.0.0.1:{port}"
[upstream]
url = "https://{upstream}{SCEP}"
ca = {root:?}
server_name = "{ndes}"
[admin]
{admin}
[log]
format = "json"
{section}
"#,
            upstream = self.upstream.addr,
            root = self.pki.root().display().to_string(),
            ndes = ndes_gateway::dev::devpki::NDES_NAME,
            section = acme_section(&self.pebble, domain, &self.state(state), acme),
        )
    }

    async fn gateway(&self, port: u16, domain: &str, state: &str, acme: &str) -> Gateway {
        let text = self.config(port, domain, state, acme, "enabled = false");
        Gateway::start(&Config::parse(&text).unwrap())
            .await
            .unwrap()
    }
}

/// The chain the gateway presents for `domain`, when it verifies under `root`.
async fn served(
    addr: SocketAddr,
    domain: &str,
    root: &Path,
) -> Option<Vec<CertificateDer<'static>>> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let connect = tls_connector(root, &[b"http/1.1"])
        .connect(ServerName::try_from(domain.to_owned()).unwrap(), tcp);
    let tls = tokio::time::timeout(IO_TIMEOUT, connect).await.ok()?.ok()?;
    tls.get_ref().1.peer_certificates().map(<[_]>::to_vec)
}

/// Waits, within `bound`, for the gateway to present a chain under `root` other than `not`.
async fn wait_served(
    addr: SocketAddr,
    domain: &str,
    root: &Path,
    not: Option<&[CertificateDer<'static>]>,
    bound: Duration,
) -> Vec<CertificateDer<'static>> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(chain) = served(addr, domain, root).await {
            if Some(chain.as_slice()) != not {
                return chain;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new certificate for {domain} within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + bound;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn orders(gateway: &Gateway, result: &str) -> u64 {
    gateway
        .metrics
        .acme_orders_total
        .with_label_values(&[result])
        .get()
}

fn verdict(findings: &[ndes_gateway::cli::doctor::Finding], check: &str) -> &'static str {
    findings
        .iter()
        .find(|f| f.check == check)
        .map_or("missing", |f| f.verdict.as_str())
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// From nothing: the gateway starts without a certificate, obtains one by tls-alpn-01 on its own
/// listener (with Pebble rejecting 5% of nonces, as it does by default), serves it, and a real
/// enrolment goes through it. Restarted, it serves the stored certificate at once with the same
/// account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_by_tls_alpn_serves_and_enrols() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ndes_gateway::dev::devpki::generate(&dir.path().join("pki")).unwrap();
    let scep = ScepServer::start(dir.path())
        .await
        .expect("scepserver (Debian package scep)");
    let front = Gateway::start(&demo::front_config(&pki, &scep.url()).unwrap())
        .await
        .unwrap();
    let port = free_port();
    let pebble = Pebble::start(
        dir.path(),
        PebbleOptions {
            tls_port: port,
            http_port: free_port(),
            reject_nonces: true,
            ..Default::default()
        },
    );
    // The demo's public gateway, its cert and key replaced by [listen.acme].
    let state = dir.path().join("acme");
    let text = demo::public_config_text(
        &pki,
        format!("127.0.0.1:{port}").parse().unwrap(),
        front.local_addr(),
    )
    .unwrap()
    .lines()
    .filter(|l| !l.starts_with("cert = ") && !l.starts_with("key = "))
    .collect::<Vec<_>>()
    .join("\n")
        + &acme_section(&pebble, "localhost", &state, "");
    let config = Config::parse(&text).unwrap();
    let public = Gateway::start(&config).await.unwrap();

    let root = pebble.root().await;
    let chain = wait_served(public.local_addr(), "localhost", &root, None, ISSUE_TIMEOUT).await;
    assert_eq!(orders(&public, "ok"), 1);
    let scrape = public.metrics.render();
    assert!(
        scrape.contains("ndes_gateway_certificate_expiry_timestamp_seconds{role=\"listener\",server=\"\",subject=\"CN=localhost\"}"),
        "{scrape}"
    );
    #[cfg(unix)]
    {
        assert_eq!(mode(&state), 0o700);
        for file in ["account.json", "certificate.pem", "certificate.key"] {
            assert_eq!(mode(&state.join(file)), 0o600, "{file}");
        }
    }

    let url = format!("https://localhost:{port}{SCEP}");
    let cert = demo::enrol(&dir.path().join("client"), &url, &root, "acme-device")
        .await
        .unwrap();
    let (subject, _, _) = ndes_gateway::tls::describe_certificate(&cert).unwrap();
    assert!(subject.contains("CN=acme-device"), "{subject}");

    // doctor reads what the renewal loop wrote, and checks the stored certificate.
    let findings = ndes_gateway::cli::doctor::run(&config, None).await;
    for check in [
        "acme_account",
        "acme_last_order",
        "acme_next_renewal",
        "listener_key",
    ] {
        assert_eq!(verdict(&findings, check), "pass", "{findings:?}");
    }

    // Restarted: the stored certificate at the first handshake, no order, the same account.
    let account = std::fs::read(state.join("account.json")).unwrap();
    public.shutdown().await;
    let again = Gateway::start(&config).await.unwrap();
    assert_eq!(
        served(again.local_addr(), "localhost", &root).await,
        Some(chain.clone())
    );
    assert_eq!(orders(&again, "ok"), 0);
    assert_eq!(std::fs::read(state.join("account.json")).unwrap(), account);
    again.shutdown().await;

    // A name added to `domains`: the stored certificate serves while a new one is ordered at once.
    let text = text.replace(
        "domains = [\"localhost\"]",
        "domains = [\"localhost\", \"scep.acme.test\"]",
    );
    let widened = Gateway::start(&Config::parse(&text).unwrap())
        .await
        .unwrap();
    let fresh = wait_served(
        widened.local_addr(),
        "scep.acme.test",
        &root,
        None,
        ISSUE_TIMEOUT,
    )
    .await;
    assert_ne!(fresh[0], chain[0]);
    assert_eq!(std::fs::read(state.join("account.json")).unwrap(), account);
    widened.shutdown().await;
}

/// With a short certificateValidityPeriod the gateway renews on its own at two thirds of the
/// lifetime, serves the new certificate to new connections, and a keep-alive connection opened
/// before keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_on_its_own_and_open_connections_keep_going() {
    let bench = Bench::start(PebbleOptions {
        validity: Some(15),
        ..Default::default()
    })
    .await;
    let domain = "renew.acme.test";
    let gateway = bench.gateway(bench.port, domain, "acme", "").await;
    let root = bench.pebble.root().await;
    let first = wait_served(gateway.local_addr(), domain, &root, None, ISSUE_TIMEOUT).await;

    let tcp = TcpStream::connect(gateway.local_addr()).await.unwrap();
    let mut kept = tls_connector(&root, &[b"http/1.1"])
        .connect(ServerName::try_from(domain).unwrap(), tcp)
        .await
        .unwrap();
    let caps = format!("GET {SCEP}?operation=GetCACaps HTTP/1.1\r\nHost: {domain}\r\n\r\n");
    kept.write_all(caps.as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut kept).await.status_line,
        "HTTP/1.1 200 OK"
    );

    let second = wait_served(
        gateway.local_addr(),
        domain,
        &root,
        Some(&first),
        ISSUE_TIMEOUT,
    )
    .await;
    assert_ne!(first[0], second[0]);
    assert!(orders(&gateway, "ok") >= 2);
    kept.write_all(caps.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(IO_TIMEOUT, read_response(&mut kept))
        .await
        .unwrap();
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
    // The expiry gauge follows the certificate in service.
    let not_after = |der: &CertificateDer<'_>| {
        use der::Decode;
        x509_cert::Certificate::from_der(der)
            .unwrap()
            .tbs_certificate
            .validity
            .not_after
            .to_unix_duration()
            .as_secs()
    };
    let scrape = gateway.metrics.render();
    let line = format!(
        "ndes_gateway_certificate_expiry_timestamp_seconds{{role=\"listener\",server=\"\",subject=\"CN={domain}\"}} {}",
        not_after(&second[0])
    );
    // A third renewal may have come meanwhile; the gauge shows whatever is in service.
    let now_served = served(gateway.local_addr(), domain, &root).await.unwrap();
    if now_served == second {
        assert!(scrape.contains(&line), "{line} not in\n{scrape}");
    }
    gateway.shutdown().await;
}

/// `ndes-gateway serve` with its JSON log on stderr, read on a thread of its own.
struct Served {
    child: Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    admin: SocketAddr,
}

impl Served {
    fn start(config: &Path) -> Served {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_ndes-gateway"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let Ok(value) = serde_json::from_str(&line) else {
                    continue;
                };
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        let mut served = Served {
            child,
            lines,
            admin: "0.0.0.0:0".parse().unwrap(),
        };
        let listening = served.wait_for(IO_TIMEOUT, |v| v["message"] == "listening");
        served.admin = listening["admin"].as_str().unwrap().parse().unwrap();
        served
    }

    fn wait_for(
        &mut self,
        bound: Duration,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if matches(&v) => return v,
                Ok(_) => {}
                Err(e) => panic!("the log line never came: {e}"),
            }
        }
    }

    async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(IO_TIMEOUT, read_response(&mut s))
            .await
            .unwrap()
            .text()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pebble down when the renewal is due: the certificate in force stays in service, the failure
/// is counted and logged with what went wrong, and once Pebble is back (a new Pebble knows no
/// account: the gateway registers again) the next try succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_keeps_the_certificate_and_a_later_try_succeeds() {
    let mut bench = Bench::start(PebbleOptions {
        validity: Some(20),
        ..Default::default()
    })
    .await;
    let (domain, port) = ("retry.acme.test", bench.port);
    let state = bench.state("acme");
    let text = bench.config(port, domain, "acme", "", "addr = \"127.0.0.1:0\"");
    let config = bench.state("gateway.toml");
    std::fs::write(&config, text).unwrap();
    let mut gateway = Served::start(&config);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let root = bench.pebble.root().await;
    let first = wait_served(addr, domain, &root, None, ISSUE_TIMEOUT).await;
    bench.pebble.stop();

    let failed = gateway.wait_for(ISSUE_TIMEOUT, |v| {
        v["message"] == "ACME order failed; the certificate in force stays"
    });
    assert_eq!(failed["level"], "WARN", "{failed}");
    let problem = failed["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains(&format!("localhost:{}", bench.pebble.port)),
        "{failed}"
    );
    assert_eq!(served(addr, domain, &root).await, Some(first.clone()));
    let scrape = gateway.metrics().await;
    assert!(
        !scrape.contains("ndes_gateway_acme_orders_total{result=\"error\"} 0"),
        "{scrape}"
    );
    assert!(
        scrape.contains("ndes_gateway_acme_orders_total{result=\"ok\"} 1"),
        "{scrape}"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["last_order_result"], "error", "{status}");

    bench.pebble.run();
    let root = bench.pebble.root().await;
    let second = wait_served(addr, domain, &root, Some(&first), ISSUE_TIMEOUT).await;
    assert_ne!(first[0], second[0]);
}

/// http-01, answered on its own plain-HTTP port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_by_http01_on_its_own_port() {
    let http_port = free_port();
    let bench = Bench::start(PebbleOptions {
        // Nothing listens there: tls-alpn-01 cannot be what validates.
        tls_port: free_port(),
        http_port,
        ..Default::default()
    })
    .await;
    let domain = "http01.acme.test";
    let extra = format!("challenge = \"http-01\"\nhttp01_addr = \"127.0.0.1:{http_port}\"");
    let gateway = bench.gateway(bench.port, domain, "acme", &extra).await;
    let root = bench.pebble.root().await;
    wait_served(gateway.local_addr(), domain, &root, None, ISSUE_TIMEOUT).await;
    assert_eq!(orders(&gateway, "ok"), 1);
    // The challenge port answers nothing but challenges.
    let mut s = TcpStream::connect(("127.0.0.1", http_port)).await.unwrap();
    s.write_all(b"GET /certsrv/mscep/mscep.dll HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = tokio::time::timeout(IO_TIMEOUT, read_response(&mut s))
        .await
        .unwrap();
    assert_eq!(answer.status_line, "HTTP/1.1 404 Not Found");
    gateway.shutdown().await;
}

/// A CA that requires external account binding: with the key id and HMAC key the account is
/// registered and the certificate issued; without them the order fails with the CA's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding_is_sent_when_required() {
    let bench = Bench::start(PebbleOptions {
        eab_required: true,
        ..Default::default()
    })
    .await;
    let key_file = bench.state("eab.key");
    std::fs::write(&key_file, format!("{EAB_KEY}\n")).unwrap();
    let without = bench
        .gateway(free_port(), "noeab.acme.test", "without", "")
        .await;
    let eab = format!(
        "eab_kid = \"{EAB_KID}\"\neab_hmac_key_file = {:?}",
        key_file.display().to_string()
    );
    let with = bench
        .gateway(bench.port, "eab.acme.test", "with", &eab)
        .await;
    let root = bench.pebble.root().await;
    wait_served(
        with.local_addr(),
        "eab.acme.test",
        &root,
        None,
        ISSUE_TIMEOUT,
    )
    .await;
    assert_eq!(orders(&with, "ok"), 1);

    wait_for("the order without EAB fails", ISSUE_TIMEOUT, || {
        orders(&without, "error") >= 1
    })
    .await;
    assert_eq!(orders(&without, "ok"), 0);
    assert!(served(without.local_addr(), "noeab.acme.test", &root)
        .await
        .is_none());
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bench.state("without").join("status.json")).unwrap())
            .unwrap();
    let problem = status["last_problem"].as_str().unwrap_or_default();
    assert!(problem.contains("externalAccountRequired"), "{status}");
    let config = Config::parse(&bench.config(1, "noeab.acme.test", "without", "", "")).unwrap();
    let findings = ndes_gateway::cli::doctor::run(&config, None).await;
    assert_eq!(verdict(&findings, "acme_last_order"), "fail");
    assert!(
        findings
            .iter()
            .any(|f| f.detail.contains("externalAccountRequired")),
        "{findings:?}"
    );
    // The HMAC key never reaches the state or its report.
    assert!(!status.to_string().contains(EAB_KEY));
    with.shutdown().await;
    without.shutdown().await;
}

/// `check` on an ACME config: the section printed back, and where the certificate stands; with a
/// certificate and `[listen.acme]` at once, a clear refusal.
#[test]
fn check_says_where_the_certificate_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let acme = "[listen.acme]\ndirectory = \"https://acme-v02.api.letsencrypt.org/directory\"\ndomains = [\"scep.contoso.com\"]\nstate_dir = \"acme\"\n";
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:8443\"\n[upstream]\nurl = \"http://127.0.0.1:8080{SCEP}\"\n{acme}"
    );
    let check = |text: &str| {
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_ndes-gateway"))
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = check(&text);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[listen.acme]"), "{stdout}");
    assert!(stdout.contains("challenge = \"tls-alpn-01\""), "{stdout}");
    assert!(
        stdout.contains("none stored yet: obtained at start"),
        "{stdout}"
    );
    assert!(!stdout.contains("cert = "), "{stdout}");

    let both = text.replace(
        "[upstream]",
        "cert = \"gw.pem\"\nkey = \"gw.key\"\n[upstream]",
    );
    let out = check(&both);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listen.cert, listen.key: left out with [listen.acme]"),
        "{stderr}"
    );
}
