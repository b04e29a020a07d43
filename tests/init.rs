//! `ndes-gateway init` as an operator meets it: answered by keystrokes in a real terminal (tmux)
//! against the demo's NDES stand-in (micromdm scepserver behind TLS), then `serve` on what it
//! wrote and a real enrolment with scepclient; the unattended form with flags; a fingerprint that
//! matches nothing refused with nothing written.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ndes_gateway::dev::demo::{self, free_port, ScepServer};
use ndes_gateway::dev::devpki::{self, DevPki};
use ndes_gateway::Gateway;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

const BIN: &str = env!("CARGO_BIN_EXE_ndes-gateway");
/// How long a screen may take to show what the test waits for: init connects to NDES and runs
/// doctor's long-URL checks between some of them.
const SCREEN_WAIT: Duration = Duration::from_secs(60);

/// scepserver and the NDES stand-in in front of it, with a dev PKI, in a temporary folder.
struct Ndes {
    dir: tempfile::TempDir,
    pki: DevPki,
    /// The demo's NDES stand-in: a gateway with the NDES certificate in front of scepserver.
    stand_in: Gateway,
    _scep: ScepServer,
}

impl Ndes {
    /// `full_chain`: the stand-in presents its certificate and the root, as IIS sends the
    /// chain; otherwise its own certificate alone.
    async fn start(full_chain: bool) -> Ndes {
        let dir = tempfile::tempdir().unwrap();
        let pki = devpki::generate(&dir.path().join("pki")).unwrap();
        let scep = ScepServer::start(dir.path()).await.unwrap();
        let mut presented = pki.clone();
        if full_chain {
            let chain = format!(
                "{}{}",
                std::fs::read_to_string(&pki.ndes_cert).unwrap(),
                std::fs::read_to_string(&pki.root).unwrap()
            );
            presented.ndes_cert = dir.path().join("pki/ndes-chain.pem");
            std::fs::write(&presented.ndes_cert, chain).unwrap();
        }
        let stand_in = Gateway::start(&demo::front_config(&presented, &scep.url()).unwrap())
            .await
            .unwrap();
        Ndes {
            dir,
            pki,
            stand_in,
            _scep: scep,
        }
    }

    fn url(&self) -> String {
        format!(
            "https://{}/certsrv/mscep/mscep.dll",
            self.stand_in.local_addr()
        )
    }

    /// The SHA-256 fingerprint of the NDES certificate, as read on the NDES server.
    fn leaf_fingerprint(&self) -> String {
        let der = CertificateDer::from_pem_file(&self.pki.ndes_cert).unwrap();
        ndes_gateway::cli::init::fingerprint(&der)
    }
}

/// Where, the public name and NDES's URL: what every unattended run answers.
fn answers(ndes: &Ndes, out: &Path) -> Vec<String> {
    [
        "--yes",
        "--config",
        out.to_str().unwrap(),
        "--public-name",
        devpki::PUBLIC_NAME,
        "--ndes-url",
        &ndes.url(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The same, with the public certificate as PEM files.
fn unattended(ndes: &Ndes, out: &Path) -> Vec<String> {
    let pki = &ndes.pki;
    let mut args = answers(ndes, out);
    args.extend(
        [
            "--cert",
            pki.gateway_cert.to_str().unwrap(),
            "--key",
            pki.gateway_key.to_str().unwrap(),
        ]
        .map(str::to_owned),
    );
    args
}

fn init<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(BIN)
        .arg("init")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `check` passes on the written config; the config, as the gateway reads it.
fn checked(config: &Path) -> ndes_gateway::config::Config {
    let check = Command::new(BIN)
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    ndes_gateway::config::Config::load(config).unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A tmux server of the test's own, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let tmux = Tmux {
            socket: format!("ndes-gateway-init-{}", std::process::id()),
        };
        let status = Command::new("tmux")
            .args(["-L", &tmux.socket, "-f", "/dev/null", "new-session", "-d"])
            .args(["-x", "200", "-y", "60", command])
            .status()
            .expect("tmux (Debian package tmux)");
        assert!(status.success(), "tmux new-session failed");
        tmux
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-J", "-S", "-200"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen shows `needle` `times` times, and returns it.
    fn wait_for(&self, needle: &str, times: usize) -> String {
        let deadline = Instant::now() + SCREEN_WAIT;
        loop {
            let screen = self.screen();
            if screen.matches(needle).count() >= times {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {needle:?} ({times}x):\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let status = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", "0"])
            .args(keys)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Types an answer and Enter.
    fn answer(&self, text: &str) {
        self.keys(&["-l", text]);
        self.keys(&["Enter"]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// `serve` on a config, killed on drop.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn serve(config: &Path, listen: SocketAddr) -> Served {
    let log = std::fs::File::create(config.with_extension("log")).unwrap();
    let mut child = Served(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let up = demo::wait_for_port(listen, Duration::from_secs(20)).await;
    if up.is_err() || !matches!(child.0.try_wait(), Ok(None)) {
        panic!(
            "serve did not start:\n{}",
            std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
        );
    }
    child
}

fn loopback_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()))
}

#[tokio::test(flavor = "multi_thread")]
async fn init_answered_in_a_terminal_gives_a_config_that_enrols_a_device() {
    let ndes = Ndes::start(true).await;
    let out = ndes.dir.path().join("etc/gateway.toml");
    let (listen, admin) = (loopback_port(), loopback_port());
    let command = format!(
        "{BIN} init --config {} --listen {listen} --admin-addr {admin}; echo \"init exited $?\"; sleep 600",
        out.display()
    );
    let tmux = Tmux::start(&command);

    tmux.wait_for("Public name devices use", 1);
    // A wrong answer is said, and asked again.
    tmux.answer("scep");
    tmux.wait_for("is not a DNS name", 1);
    tmux.wait_for("Public name devices use", 2);
    tmux.answer(devpki::PUBLIC_NAME);

    tmux.wait_for("NDES URL", 1);
    // Nothing listens there: said, and asked again.
    tmux.answer("https://127.0.0.1:1/certsrv/mscep/mscep.dll");
    tmux.wait_for("cannot be reached", 1);
    tmux.wait_for("NDES URL", 2);
    tmux.answer(&ndes.url());
    let screen = tmux.wait_for("Trust this chain?", 1);
    // The chain NDES presents, with what a person compares before saying yes.
    assert!(screen.contains("CN=ndes.corp.test"), "{screen}");
    assert!(screen.contains("CN=ndes-gateway dev root CA"), "{screen}");
    assert!(screen.contains(&ndes.leaf_fingerprint()), "{screen}");
    tmux.keys(&["y"]);

    let screen = tmux.wait_for("Another NDES server", 1);
    assert!(screen.contains("GetCACaps: 200"), "{screen}");
    assert!(screen.contains("GetCACert: 1 certificate(s)"), "{screen}");
    tmux.keys(&["Enter"]);

    tmux.wait_for("The public certificate", 1);
    tmux.keys(&["Enter"]);
    tmux.wait_for("Public certificate, PEM", 1);
    // Not the offered default: the dev PKI's public certificate.
    tmux.answer(&ndes.pki.gateway_cert.display().to_string());
    tmux.wait_for("Its private key, PEM", 1);
    tmux.answer(&ndes.pki.gateway_key.display().to_string());

    let screen = tmux.wait_for("init exited", 1);
    assert!(screen.contains("init exited 0"), "{screen}");
    assert!(screen.contains("gateway.toml: OK"), "{screen}");
    assert!(screen.contains("0 failed"), "{screen}");
    assert!(
        screen.contains("systemctl enable --now ndes-gateway"),
        "{screen}"
    );

    let _gateway = serve(&out, listen).await;
    let url = format!(
        "https://localhost:{}/certsrv/mscep/mscep.dll",
        listen.port()
    );
    let cert = demo::enrol(
        &ndes.dir.path().join("client"),
        &url,
        &ndes.pki.root,
        "init-device",
    )
    .await
    .unwrap();
    let (subject, _, _) = ndes_gateway::tls::describe_certificate(&cert).unwrap();
    assert!(subject.contains("CN=init-device"), "{subject}");
}

#[tokio::test(flavor = "multi_thread")]
async fn init_runs_unattended_from_flags_and_never_overwrites() {
    let ndes = Ndes::start(false).await;
    let out = ndes.dir.path().join("etc/gateway.toml");
    let url = ndes.url();
    let (fingerprint, root) = (ndes.leaf_fingerprint(), ndes.pki.root.display().to_string());
    let mut args = unattended(&ndes, &out);
    let confirmation = [
        "--trust-fingerprint",
        &fingerprint,
        // NDES sends its own certificate alone here: its issuer comes from a file.
        "--ndes-ca",
        &root,
    ];
    args.extend(confirmation.map(str::to_owned));
    args.extend(["--listen", "127.0.0.1:0", "--admin-addr"].map(str::to_owned));
    args.push(loopback_port().to_string());
    let run = init(&args);
    assert!(run.status.success(), "{}", text(&run));
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.contains(&format!("url = \"{url}\"")), "{written}");
    let config = checked(&out);
    assert_eq!(config.upstream.spki_sha256.len(), 1);
    let anchors = |path: &Path| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(
        anchors(&config.upstream.ca.unwrap()),
        anchors(&ndes.pki.root)
    );

    let again = init(&args);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(text(&again).contains("already exists"), "{}", text(&again));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), written);

    // Without the operator's word on the chain, nothing is trusted.
    let unconfirmed: Vec<&String> = args
        .iter()
        .filter(|a| !confirmation.contains(&a.as_str()))
        .collect();
    let refused = init(&[&unconfirmed[..], &[&"--force".to_owned()]].concat());
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("--trust-fingerprint"),
        "{}",
        text(&refused)
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), written);
}

#[tokio::test(flavor = "multi_thread")]
async fn init_with_two_ndes_urls_writes_server_entries_the_gateway_reads() {
    let ndes = Ndes::start(false).await;
    // A second NDES host: its own CA, the same NDES certificate (one name, one TLS key here).
    let second_dir = ndes.dir.path().join("ndes02");
    std::fs::create_dir_all(&second_dir).unwrap();
    let scep = ScepServer::start_as(&second_dir, "ndes02").await.unwrap();
    let second = Gateway::start(&demo::front_config(&ndes.pki, &scep.url()).unwrap())
        .await
        .unwrap();
    let second_url = format!("https://{}/certsrv/mscep/mscep.dll", second.local_addr());
    let out = ndes.dir.path().join("etc/gateway.toml");
    let mut args = unattended(&ndes, &out);
    args.extend(
        [
            "--ndes-url",
            &second_url,
            "--trust-fingerprint",
            &ndes.leaf_fingerprint(),
            "--ndes-ca",
            &ndes.pki.root.display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ]
        .map(str::to_owned),
    );
    let run = init(&args);
    assert!(run.status.success(), "{}", text(&run));
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        written.matches("[[upstream.server]]").count(),
        2,
        "{written}"
    );
    let config = checked(&out);
    let urls: Vec<String> = config
        .upstream
        .server_list()
        .into_iter()
        .map(|s| s.url)
        .collect();
    assert_eq!(urls, [ndes.url(), second_url]);
}

#[tokio::test(flavor = "multi_thread")]
async fn init_with_acme_writes_a_config_whose_certificate_comes_at_the_first_start() {
    let ndes = Ndes::start(false).await;
    let out = ndes.dir.path().join("etc/gateway.toml");
    let mut args = answers(&ndes, &out);
    let more = [
        "--trust-fingerprint",
        &ndes.leaf_fingerprint(),
        "--ndes-ca",
        ndes.pki.root.to_str().unwrap(),
        "--cert-source",
        "acme",
        "--acme-directory",
        "https://127.0.0.1:14000/dir",
        "--acme-contact",
        "pki@example.test",
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend(more.map(str::to_owned));
    let run = init(&args);
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        text(&run).contains("comes from the ACME server"),
        "{}",
        text(&run)
    );
    let config = checked(&out);
    let acme = config.listen.acme.expect("a [listen.acme] section");
    assert_eq!(acme.directory, "https://127.0.0.1:14000/dir");
    assert_eq!(acme.domains, [devpki::PUBLIC_NAME]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fingerprint_that_matches_nothing_is_refused_and_nothing_written() {
    let ndes = Ndes::start(true).await;
    let etc: PathBuf = ndes.dir.path().join("etc");
    let out = etc.join("gateway.toml");
    let mut args = unattended(&ndes, &out);
    args.extend(["--trust-fingerprint".to_owned(), "00".repeat(32)]);
    let run = init(&args);
    let said = text(&run);
    assert_eq!(run.status.code(), Some(1), "{said}");
    assert!(
        said.contains("matches no certificate NDES presents"),
        "{said}"
    );
    assert!(said.contains("nothing written"), "{said}");
    // The chain is shown, for the operator to find the right fingerprint.
    assert!(said.contains(&ndes.leaf_fingerprint()), "{said}");
    assert!(
        !etc.exists(),
        "init wrote something: {:?}",
        std::fs::read_dir(&etc)
    );
}
