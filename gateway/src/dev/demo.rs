//! The local demo: a real SCEP enrolment through the gateway, on loopback.
//!
//! micromdm scepserver plays the CA; a second gateway process plays IIS in front of it (TLS with
//! the NDES certificate, the NDES path mapped onto scepserver's `/scep`); the public gateway
//! publishes it with pinned trust; scepclient enrols through the public gateway. Like the NDES
//! host's own logs, scepserver's and the stand-in's go to files in the demo folder: the terminal
//! shows the public gateway's access lines, one per request a client sent.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::config::{Config, ConfigError};
use crate::dev::devpki::{self, DevPki, NDES_NAME};
use crate::upstream::spki_sha256;
use crate::Gateway;

/// The enrolment challenge scepserver is started with.
pub const CHALLENGE: &str = "secret";

/// A port free on loopback right now (the OS picks it; a tiny race with other programs remains).
pub fn free_port() -> std::io::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Finds a program on PATH, or says how to install it.
pub fn require_program(name: &str, package: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!("{name} not found on PATH: install it with `sudo apt-get install -y {package}`")
        })
}

/// micromdm scepserver, started on a free port with a fresh CA in `dir/depot`. Killed on drop.
pub struct ScepServer {
    pub port: u16,
    pub depot: PathBuf,
    child: Child,
}

impl ScepServer {
    pub async fn start(dir: &Path) -> Result<ScepServer, String> {
        Self::start_as(dir, "scep-ca").await
    }

    /// With its CA certificate's organization set: `ca -init` makes every CA "C=US, O=scep-ca,
    /// OU=SCEP CA" with serial 1, and two CAs named alike cannot be told apart by the
    /// issuerAndSerialNumber a PKIOperation names its recipient by. (Real NDES RA certificates,
    /// issued by the enterprise CA, each have a serial of their own.)
    pub async fn start_as(dir: &Path, organization: &str) -> Result<ScepServer, String> {
        let program = require_program("scepserver", "scep")?;
        let depot = dir.join("depot");
        let init = Command::new(&program)
            .args([
                "ca",
                "-init",
                "-keySize",
                "2048",
                "-organization",
                organization,
                "-depot",
            ])
            .arg(&depot)
            .output()
            .await
            .map_err(|e| format!("scepserver ca -init: {e}"))?;
        if !init.status.success() {
            return Err(format!(
                "scepserver ca -init failed: {}",
                String::from_utf8_lossy(&init.stderr)
            ));
        }
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let log = std::fs::File::create(dir.join("scepserver.log"))
            .map_err(|e| format!("scepserver.log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("scepserver.log: {e}"))?;
        // scepserver 2.1.0 has no bind-address flag: it listens on every interface.
        let child = Command::new(&program)
            .arg("-depot")
            .arg(&depot)
            .args(["-port", &port.to_string(), "-challenge", CHALLENGE])
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting scepserver: {e}"))?;
        let server = ScepServer { port, depot, child };
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(15),
        )
        .await
        .map_err(|_| {
            format!(
                "scepserver did not start listening on port {port}; see {}",
                dir.join("scepserver.log").display()
            )
        })?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/scep", self.port)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for ScepServer {
    fn drop(&mut self) {
        end_now(&mut self.child);
    }
}

pub async fn wait_for_port(addr: SocketAddr, within: Duration) -> Result<(), ()> {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(())
}

/// The TLS front that plays IIS on the NDES host: the NDES certificate, plain HTTP to scepserver
/// on loopback. Limits as wide as the public gateway's, so it never refuses what the gateway passes.
pub fn front_config(pki: &DevPki, scepserver_url: &str) -> Result<Config, ConfigError> {
    Config::parse(&front_config_text(
        pki,
        scepserver_url,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    ))
}

fn front_config_text(pki: &DevPki, scepserver_url: &str, listen: SocketAddr) -> String {
    // Its log is the NDES host's IIS log: every request that reaches NDES, the probes included.
    format!(
        r#"
[listen]
addr = "{listen}"
cert = {cert:?}
key = {key:?}
[upstream]
url = {url:?}
[log]
level = "info"
[admin]
enabled = false
"#,
        cert = pki.ndes_cert.display().to_string(),
        key = pki.ndes_key.display().to_string(),
        url = scepserver_url,
    )
}

/// [`front_config`] served by `ndes-gateway serve` in a process of its own, so that its log goes to
/// `dir/ndes-stand-in.log` as IIS's stays on the NDES host: in the demo's terminal each request
/// would show twice, and the readiness probe every 2 s. Killed on drop.
pub struct NdesStandIn {
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl NdesStandIn {
    pub async fn start(
        dir: &Path,
        pki: &DevPki,
        scepserver_url: &str,
    ) -> Result<NdesStandIn, String> {
        let program =
            std::env::current_exe().map_err(|e| format!("the gateway's own program: {e}"))?;
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let config = dir.join("ndes-stand-in.toml");
        std::fs::write(&config, front_config_text(pki, scepserver_url, addr))
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let log = dir.join("ndes-stand-in.log");
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(program)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the NDES stand-in: {e}"))?;
        tokio::select! {
            up = wait_for_port(addr, Duration::from_secs(15)) => up.map_err(|_| {
                format!("the NDES stand-in did not start listening on {addr}; see {}", log.display())
            })?,
            exited = child.wait() => {
                return Err(format!(
                    "the NDES stand-in exited ({}); see {}",
                    exited.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    log.display()
                ));
            }
        }
        Ok(NdesStandIn { addr, log, child })
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for NdesStandIn {
    fn drop(&mut self) {
        end_now(&mut self.child);
    }
}

/// Kills a child and waits (a second at most) until it is gone: dropped on the way out of a demo
/// stopped while starting, it must not outlive the demo's own exit, which follows at once.
fn end_now(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let _ = child.start_kill();
    for _ in 0..100 {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The public gateway's config, as an operator would write it for a real NDES.
pub fn public_config_text(
    pki: &DevPki,
    listen: SocketAddr,
    ndes: SocketAddr,
) -> Result<String, String> {
    public_config_text_for(pki, listen, &[ndes])
}

/// The same for several NDES hosts: one `[[upstream.server]]` entry each, the CA and the pin
/// shared (the stand-ins present the same NDES certificate).
pub fn public_config_text_for(
    pki: &DevPki,
    listen: SocketAddr,
    ndes: &[SocketAddr],
) -> Result<String, String> {
    let first = ndes.first().ok_or("no NDES host")?;
    let ndes_pem =
        std::fs::read(&pki.ndes_cert).map_err(|e| format!("{}: {e}", pki.ndes_cert.display()))?;
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(&ndes_pem)
        .map(|c: rustls_pki_types::CertificateDer<'static>| c)
        .map_err(|e| format!("{}: {e}", pki.ndes_cert.display()))?;
    let pin = spki_sha256(&der).ok_or("cannot read the NDES certificate's public key")?;
    let text = include_str!("../../../config/demo.toml")
        .replace("{listen}", &listen.to_string())
        .replace("{gateway_cert}", &pki.gateway_cert.display().to_string())
        .replace("{gateway_key}", &pki.gateway_key.display().to_string())
        .replace("{ndes}", &first.to_string())
        .replace("{root}", &pki.root.display().to_string())
        .replace("{pin}", &pin);
    if ndes.len() == 1 {
        return Ok(text);
    }
    let entries: String = ndes
        .iter()
        .map(|addr| {
            format!("[[upstream.server]]\nurl = \"https://{addr}/certsrv/mscep/mscep.dll\"\nserver_name = \"{NDES_NAME}\"\n\n")
        })
        .collect();
    Ok(text
        .lines()
        .filter(|l| !l.starts_with("url = ") && !l.starts_with("server_name = "))
        .map(|l| {
            if l == "[admin]" {
                format!("{entries}{l}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect())
}

/// Runs scepclient in `dir` (it keeps state in the current folder) against `url`.
pub async fn enrol(dir: &Path, url: &str, root: &Path, cn: &str) -> Result<PathBuf, String> {
    let program = require_program("scepclient", "scep")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let run = Command::new(program)
        .current_dir(dir)
        .env("SSL_CERT_FILE", root)
        .args([
            "-server-url",
            url,
            "-challenge",
            CHALLENGE,
            "-private-key",
            "device.key",
        ])
        .args([
            "-certificate",
            "device.pem",
            "-cn",
            cn,
            "-organization",
            "ndes-gateway demo",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .map_err(|_| "scepclient did not finish within 120 s".to_owned())?
        .map_err(|e| format!("scepclient: {e}"))?;
    let cert = dir.join("device.pem");
    if !out.status.success() || !cert.is_file() {
        return Err(format!(
            "scepclient failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(cert)
}

pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// Stop after the enrolment instead of waiting for Ctrl-C (for scripts).
    pub once: bool,
    /// NDES hosts, each with its own CA (1 to 4).
    pub ndes: usize,
}

pub async fn run(opts: DemoOptions) -> Result<(), String> {
    // Installed first, so that SIGINT or SIGTERM at any point stops the demo with scepserver:
    // left to its default action, SIGTERM would end the process without the shutdown below,
    // and scepserver would outlive the demo. Stopped before it is up, the demo's pieces are
    // dropped, and scepserver is killed with its handle.
    let stop = crate::stop_signal();
    tokio::pin!(stop);
    let once = opts.once;
    let running = tokio::select! {
        running = start_and_enrol(opts) => running?,
        () = &mut stop => return Err("stopped before the demo was up".to_owned()),
    };
    let Running {
        public,
        hosts,
        outcome,
    } = running;
    if outcome.is_ok() && !once {
        println!("Press Ctrl-C to stop.");
        stop.await;
        println!("stopping...");
    }
    public.shutdown().await;
    for (stand_in, scep) in hosts {
        stand_in.stop().await;
        scep.stop().await;
    }
    outcome
}

/// What the demo keeps running once the device has enrolled, or failed to.
struct Running {
    public: Gateway,
    /// Each NDES host: its stand-in and its CA.
    hosts: Vec<(NdesStandIn, ScepServer)>,
    outcome: Result<(), String>,
}

async fn start_and_enrol(opts: DemoOptions) -> Result<Running, String> {
    require_program("scepserver", "scep")?;
    require_program("scepclient", "scep")?;
    let dir = match opts.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("ndes-gateway-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    println!("demo folder: {}", dir.display());

    let pki = devpki::generate(&dir.join("pki"))?;
    println!(
        "dev PKI: root {}, NDES certificate for {NDES_NAME}",
        pki.root.display()
    );

    let mut hosts = Vec::new();
    for n in 1..=opts.ndes.max(1) {
        // One host: the folder itself, as always. Several: a folder and a CA name each, so the
        // hosts' CAs differ as NDES hosts' RA certificates do.
        let (host_dir, organization) = if opts.ndes <= 1 {
            (dir.clone(), "scep-ca".to_owned())
        } else {
            (dir.join(format!("ndes0{n}")), format!("ndes0{n}"))
        };
        std::fs::create_dir_all(&host_dir).map_err(|e| format!("{}: {e}", host_dir.display()))?;
        let scep = ScepServer::start_as(&host_dir, &organization).await?;
        println!(
            "CA: micromdm scepserver on {} (challenge {CHALLENGE:?}), log {}",
            scep.url(),
            host_dir.join("scepserver.log").display()
        );
        let stand_in = NdesStandIn::start(&host_dir, &pki, &scep.url()).await?;
        println!(
            "NDES stand-in: https://{}/certsrv/mscep/mscep.dll (TLS as {NDES_NAME}) -> scepserver, log {}",
            stand_in.addr,
            stand_in.log.display()
        );
        hosts.push((stand_in, scep));
    }
    let addrs: Vec<SocketAddr> = hosts.iter().map(|(s, _)| s.addr).collect();

    let text = public_config_text_for(&pki, opts.listen, &addrs)?;
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, &text).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let public = Gateway::start(&config).await.map_err(|e| {
        format!(
            "public gateway: {e}\n(another program on {}? try `demo --listen 127.0.0.1:0`)",
            opts.listen
        )
    })?;
    let addr = public.local_addr();
    let url = format!("https://localhost:{}/certsrv/mscep/mscep.dll", addr.port());
    println!("gateway: {url} (config {})", config_path.display());
    if let Some(admin) = public.admin_addr() {
        println!("admin:   http://{admin}/metrics  /healthz  /readyz");
    }

    println!("\nenrolling with scepclient through the gateway...");
    let outcome = if hosts.len() == 1 {
        enrol_and_show(&dir.join("client"), &url, &pki.root, "demo-device").await
    } else {
        enrol_on_every_host(&dir, &url, &pki.root, &hosts).await
    };
    if outcome.is_ok() {
        let root = pki.root.display();
        println!(
            r#"
Try it by hand while the demo runs:
  curl --cacert {root} '{url}?operation=GetCACaps'
  curl --cacert {root} -o ca.der '{url}?operation=GetCACert&message=demo'
  curl --cacert {root} -i 'https://localhost:{port}/certsrv/mscep_admin/'      # 404: never published
  curl --cacert {root} -i '{url}?operation=Nope'                              # 400
  (cd "$(mktemp -d)" && SSL_CERT_FILE={root} scepclient -server-url {url} -challenge {CHALLENGE} -private-key k.key -certificate k.pem -cn my-device)
  {exe} check --config {config}
  {exe} doctor --config {config}
Each request you send gets one access line below; what reached NDES, the readiness probe
included, is in {stand_in_log}.
"#,
            exe = std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "ndes-gateway".to_owned()),
            port = addr.port(),
            config = config_path.display(),
            stand_in_log = hosts
                .iter()
                .map(|(s, _)| s.log.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    Ok(Running {
        public,
        hosts,
        outcome,
    })
}

/// One enrolment, and the certificate it gave.
async fn enrol_and_show(dir: &Path, url: &str, root: &Path, cn: &str) -> Result<(), String> {
    let cert = enrol(dir, url, root, cn)
        .await
        .map_err(|e| format!("enrolment through the gateway failed: {e}"))?;
    let (subject, issuer, not_after) = crate::tls::describe_certificate(&cert)?;
    println!("enrolled: certificate {}", cert.display());
    println!("  subject:   {subject}");
    println!("  issuer:    {issuer}");
    println!("  not after: {not_after}");
    Ok(())
}

/// Enrolments until every host has issued one (each is chosen by load, at random between equals),
/// at most 8 per host: every one must succeed, whichever host its GetCACert came from.
async fn enrol_on_every_host(
    dir: &Path,
    url: &str,
    root: &Path,
    hosts: &[(NdesStandIn, ScepServer)],
) -> Result<(), String> {
    let issued_by = |scep: &ScepServer| -> usize {
        std::fs::read_dir(&scep.depot)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with("demo-device-") && n.ends_with(".pem"))
                    .count()
            })
            .unwrap_or(0)
    };
    for n in 1..=hosts.len() * 8 {
        let cn = format!("demo-device-{n}");
        let cert = enrol(&dir.join("clients").join(&cn), url, root, &cn)
            .await
            .map_err(|e| format!("enrolment {n} through the gateway failed: {e}"))?;
        let (_, issuer, _) = crate::tls::describe_certificate(&cert)?;
        println!("enrolled {cn}: issued by {issuer}");
        let counts: Vec<usize> = hosts.iter().map(|(_, scep)| issued_by(scep)).collect();
        if counts.iter().all(|&c| c > 0) {
            println!(
                "every NDES host issued (by host: {}): each PKIOperation went to the host holding its RA key",
                counts
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(());
        }
    }
    Err("an NDES host issued nothing: the gateway sent it no enrolment".to_owned())
}
