//! The command line as a user meets it: `check` on good and broken configs, and the demo.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use ndes_gateway::config::Config;
use ndes_gateway::dev::devpki;

fn gateway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ndes-gateway"))
        .args(args)
        .output()
        .unwrap()
}

fn config(dir: &Path, cert: &Path, key: &Path, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n[upstream]\nurl = \"https://ndes.corp.test/certsrv/mscep/mscep.dll\"\nca = \"root.pem\"\n{extra}",
        cert.display().to_string(),
        key.display().to_string()
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_prints_the_effective_settings_of_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(dir.path()).unwrap();
    let path = config(dir.path(), &pki.gateway_cert, &pki.gateway_key, "");
    let out = gateway(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("max_uri_bytes = 65534"), "{stdout}");
    assert!(stdout.contains("response_timeout = \"2m\""), "{stdout}");
    assert!(
        stdout.contains("server_name = \"ndes.corp.test\""),
        "{stdout}"
    );
    assert!(stdout.contains("CN=scep.example.test"), "{stdout}");
    // After the first line, TOML that reads back as the config that was checked: every key.
    let (_, settings) = stdout.split_once('\n').unwrap();
    let printed = Config::parse(settings).unwrap_or_else(|e| panic!("{e}\n{stdout}"));
    let mut checked = Config::load(&path).unwrap();
    checked.source = None;
    assert_eq!(format!("{printed:?}"), format!("{checked:?}"));
}

#[test]
fn check_prints_the_headers_that_reach_ndes_and_refuses_dangerous_ones() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(dir.path()).unwrap();
    let path = config(
        dir.path(),
        &pki.gateway_cert,
        &pki.gateway_key,
        "forward_headers = [\"X-Site-Tag\"]\n",
    );
    let out = gateway(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("# request headers that reach NDES, all others dropped: host, content-type, content-length, user-agent, accept, x-forwarded-for, x-forwarded-proto, x-site-tag"),
        "{stdout}"
    );
    for key in [
        "send_timeout = \"30s\"",
        "max_response_bytes = 262144",
        "max_header_count = 100",
        "request_timeout = \"3m\"",
        "max_connections_per_client = 512",
    ] {
        assert!(stdout.contains(key), "{key} missing from:\n{stdout}");
    }
    let path = config(
        dir.path(),
        &pki.gateway_cert,
        &pki.gateway_key,
        "forward_headers = [\"Range\"]\n",
    );
    let out = gateway(&["check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("upstream.forward_headers") && stderr.contains("Range"),
        "{stderr}"
    );
}

#[test]
fn check_names_the_file_key_and_problem_of_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(dir.path()).unwrap();
    // The NDES key with the gateway certificate: a pair that does not belong together.
    let path = config(dir.path(), &pki.gateway_cert, &pki.ndes_key, "");
    let out = gateway(&["check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("gateway.toml")
            && stderr.contains("listen.key")
            && stderr.contains("does not belong"),
        "{stderr}"
    );

    let path = config(
        dir.path(),
        &pki.gateway_cert,
        &pki.gateway_key,
        "[limits]\nmax_body_bytes = \"big\"\n",
    );
    let out = gateway(&["check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("max_body_bytes"), "{stderr}");

    // A count no semaphore can hold is refused by check, not met as a panic at start.
    let path = config(
        dir.path(),
        &pki.gateway_cert,
        &pki.gateway_key,
        "max_in_flight = 9223372036854775807\n",
    );
    let out = gateway(&["check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("gateway.toml") && stderr.contains("upstream.max_in_flight"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = gateway(&["check", "--config", "/nonexistent/gateway.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gateway.toml"));
}

/// `demo --once` in `dir` with `extra` arguments; its output, once it succeeded.
fn demo_once(dir: &std::path::Path, extra: &[&str]) -> String {
    let mut args = vec![
        "demo",
        "--once",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = gateway(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_demo_enrols_a_device_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = demo_once(dir.path(), &[]);
    assert!(stdout.contains("subject:   CN=demo-device"), "{stdout}");
    assert!(dir.path().join("client/device.pem").is_file());
}

#[test]
fn the_demo_with_two_ndes_hosts_enrols_through_both() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = demo_once(dir.path(), &["--ndes", "2"]);
    assert!(stdout.contains("every NDES host issued"), "{stdout}");
    for host in ["ndes01", "ndes02"] {
        assert!(
            stdout.contains(&format!("issued by OU=SCEP CA,O={host}")),
            "{stdout}"
        );
        let issued = std::fs::read_dir(dir.path().join(host).join("depot"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("demo-device-"))
            .count();
        assert!(issued > 0, "{host} issued nothing");
    }
    let config = std::fs::read_to_string(dir.path().join("gateway.toml")).unwrap();
    assert_eq!(config.matches("[[upstream.server]]").count(), 2, "{config}");
    let refused = gateway(&["demo", "--ndes", "5"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--ndes"));
}

/// The process ids of running processes that have `needle` in their command line.
fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
        })
        .collect()
}

/// Starts the demo, sends it SIGTERM once it has printed a line containing `after`, and returns
/// its exit status and what it printed next. Whatever still runs on its folder (scepserver on its
/// depot, the NDES stand-in on its config) then is killed, so a failing run leaves nothing behind
/// either, and returned.
fn demo_stopped_by_sigterm(after: &str) -> (std::process::ExitStatus, Vec<String>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let depot = dir.path().join("depot");
    let depot = depot.to_str().unwrap();
    let mut demo = Killed(
        Command::new(env!("CARGO_BIN_EXE_ndes-gateway"))
            .args(["demo", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The reader stays open until the demo has exited: it prints as it stops.
    let mut lines = BufReader::new(demo.0.stdout.take().unwrap()).lines();
    let reached = lines
        .by_ref()
        .take(200)
        .map_while(Result::ok)
        .any(|line| line.contains(after));
    assert!(reached, "the demo never printed {after:?}");
    assert_eq!(
        processes_mentioning(depot).len(),
        1,
        "scepserver runs for the demo"
    );
    sigterm(&demo.0);
    let status = demo.0.wait().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let left = processes_mentioning(dir.path().to_str().unwrap());
    for pid in &left {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    (status, rest, left)
}

/// systemd, Docker and a test script stop the demo with SIGTERM: the CA and the NDES stand-in it
/// started go too.
#[test]
fn the_demo_stops_its_ca_on_sigterm() {
    let (status, rest, left) = demo_stopped_by_sigterm("Press Ctrl-C");
    assert!(status.success(), "{status}: {rest:?}");
    assert_eq!(rest, ["stopping..."]);
    assert!(
        left.is_empty(),
        "scepserver or the NDES stand-in outlived the demo"
    );
}

/// Stopped while it is still starting, the demo takes the CA and the NDES stand-in down as well.
#[test]
fn the_demo_stops_its_ca_on_sigterm_while_starting() {
    let (status, rest, left) = demo_stopped_by_sigterm("CA: micromdm scepserver on");
    assert_eq!(status.code(), Some(1), "{status}: {rest:?}");
    assert!(
        left.is_empty(),
        "scepserver or the NDES stand-in outlived the demo"
    );
}

#[test]
fn serve_logs_json_access_lines_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(dir.path()).unwrap();
    // The upstream is down: the request is answered 502, and that is logged too.
    let mut served = Served::start(
        dir.path(),
        &pki.gateway_cert,
        &pki.gateway_key,
        &pki.root,
        "[admin]\naddr = \"127.0.0.1:0\"\n",
    );
    let status = curl_status(&pki.root, served.addr.port(), GET_CA_CAPS);
    assert_eq!(status, "502");

    let access = (0..10)
        .map(|_| served.next_json())
        .find(|v| v["target"] == "ndes_gateway::access")
        .expect("no access line");
    assert_eq!(access["status"], 502, "{access}");
    assert_eq!(access["operation"], "GetCACaps", "{access}");
    assert_eq!(access["upstream_error"], "connect", "{access}");
    assert_eq!(access["client"], "127.0.0.1", "{access}");
    assert!(access["target_bytes"].as_u64().unwrap() > 0);

    sigterm(&served.child.0);
    let status = served.child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// journald, `kubectl logs` and log files take stderr through a pipe and keep every byte: the
/// text they store must carry no terminal colour codes.
#[test]
fn serve_writes_text_logs_without_colour_codes_into_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(dir.path()).unwrap();
    let mut child = serve(
        dir.path(),
        &pki.gateway_cert,
        &pki.gateway_key,
        &pki.root,
        "text",
        "[admin]\nenabled = false\n",
    );
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut log = String::new();
    let listening = loop {
        let mut line = String::new();
        let read = stderr.read_line(&mut line).unwrap();
        assert!(read > 0, "the gateway exited before listening:\n{log}");
        log.push_str(&line);
        if line.contains("listening") {
            break line;
        }
    };
    // The port follows the listener's address, with or without escape codes around the field.
    let port: u16 = listening
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no listening address in {listening:?}"));
    assert_eq!(curl_status(&pki.root, port, GET_CA_CAPS), "502");
    assert_eq!(curl_status(&pki.root, port, "/certsrv/mscep_admin/"), "404");
    sigterm(&child.0);
    let status = child.0.wait().unwrap();
    stderr.read_to_string(&mut log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log:\n{log:?}");
    for expected in [
        "ndes_gateway::access",
        "status=502",
        "status=404",
        "stopping",
    ] {
        assert!(log.contains(expected), "{expected:?} missing from:\n{log}");
    }
}

const GET_CA_CAPS: &str = "/certsrv/mscep/mscep.dll?operation=GetCACaps&message=x";

/// The status curl gets for `target` on the gateway at localhost:`port`, trusting `root`.
fn curl_status(root: &Path, port: u16, target: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(root)
        .arg(format!("https://localhost:{port}{target}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The shell's own kill: no procps needed.
fn sigterm(child: &std::process::Child) {
    let sent = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// `ndes-gateway serve` on a free port with `format` logs, in front of an upstream nothing listens
/// on (`extra` is appended to the config), its stderr piped; killed when dropped.
fn serve(dir: &Path, cert: &Path, key: &Path, root: &Path, format: &str, extra: &str) -> Killed {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n[upstream]\nurl = \"https://{closed}/certsrv/mscep/mscep.dll\"\nca = {:?}\nserver_name = \"ndes.corp.test\"\n[log]\nformat = \"{format}\"\n{extra}",
        cert.display().to_string(),
        key.display().to_string(),
        root.display().to_string(),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    // What the gateway logs must not depend on the environment the tests run in.
    Killed(
        Command::new(env!("CARGO_BIN_EXE_ndes-gateway"))
            .args(["serve", "--config", path.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// [`serve`] with JSON logs, its address read from the "listening" line.
struct Served {
    child: Killed,
    lines: std::io::Lines<BufReader<std::process::ChildStderr>>,
    addr: std::net::SocketAddr,
}

impl Served {
    fn start(dir: &Path, cert: &Path, key: &Path, root: &Path, extra: &str) -> Served {
        let mut child = serve(dir, cert, key, root, "json", extra);
        let lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
        let mut served = Served {
            child,
            lines,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let listening = (0..10)
            .map(|_| served.next_json())
            .find(|v| v["message"] == "listening")
            .expect("never listening");
        served.addr = listening["addr"].as_str().unwrap().parse().unwrap();
        served
    }

    fn next_json(&mut self) -> serde_json::Value {
        let line = self
            .lines
            .next()
            .expect("the gateway stopped logging")
            .unwrap();
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"))
    }
}

/// The child process, killed if the test fails before it stops by itself.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn certs_csr_carries_the_names_and_eku_and_verifies_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    let csr = dir.path().join("r.csr");
    let out = gateway(&[
        "certs",
        "csr",
        "--public-name",
        "scep.contoso.com",
        "--internal-name",
        "ndes01.corp.contoso.com",
        "--key-out",
        key.to_str().unwrap(),
        "--csr-out",
        csr.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = openssl(&[
        "req",
        "-in",
        csr.to_str().unwrap(),
        "-noout",
        "-verify",
        "-text",
    ]);
    assert!(
        text.contains("CN = scep.contoso.com") || text.contains("CN=scep.contoso.com"),
        "{text}"
    );
    assert!(
        text.contains("DNS:scep.contoso.com, DNS:ndes01.corp.contoso.com"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    // The key matches the CSR, and is never overwritten.
    let pubkey_of_key = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
    let pubkey_of_csr = openssl(&["req", "-in", csr.to_str().unwrap(), "-noout", "-pubkey"]);
    assert_eq!(pubkey_of_key, pubkey_of_csr);
    let again = gateway(&[
        "certs",
        "csr",
        "--public-name",
        "x.test",
        "--key-out",
        key.to_str().unwrap(),
        "--csr-out",
        dir.path().join("b.csr").to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1));
}

#[test]
fn certs_pin_agrees_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(dir.path()).unwrap();
    let out = gateway(&["certs", "pin", pki.ndes_cert.to_str().unwrap()]);
    let ours = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    let pipeline = format!(
        "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        pki.ndes_cert.display()
    );
    let theirs = Command::new("sh").args(["-c", &pipeline]).output().unwrap();
    assert_eq!(ours, String::from_utf8_lossy(&theirs.stdout).trim());
    assert_eq!(ours.len(), 44);
}

#[test]
fn certs_pin_connect_reads_a_live_server() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(dir.path()).unwrap();
    let served = Served::start(
        dir.path(),
        &pki.ndes_cert,
        &pki.ndes_key,
        &pki.root,
        "[admin]\nenabled = false\n",
    );
    let addr = served.addr.to_string();
    let out = gateway(&[
        "certs",
        "pin",
        "--connect",
        &addr,
        "--server-name",
        "ndes.corp.test",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let file = gateway(&["certs", "pin", pki.ndes_cert.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().next(),
        String::from_utf8_lossy(&file.stdout).lines().next()
    );
}

#[test]
fn doctor_says_what_fails_as_json_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let pki = devpki::generate(dir.path()).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n[upstream]\nurl = \"https://{closed}/certsrv/mscep/mscep.dll\"\nca = {:?}\nserver_name = \"ndes.corp.test\"\nconnect_timeout = \"2s\"\n",
        pki.gateway_cert.display().to_string(),
        pki.gateway_key.display().to_string(),
        pki.root.display().to_string(),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let out = gateway(&["doctor", "--config", path.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let findings = report["findings"].as_array().unwrap();
    let verdict = |check: &str| {
        findings
            .iter()
            .find(|f| f["check"] == check)
            .map(|f| f["verdict"].as_str().unwrap().to_owned())
    };
    assert_eq!(verdict("listener_key").as_deref(), Some("pass"));
    assert_eq!(verdict("listener_name").as_deref(), Some("pass"));
    assert_eq!(verdict("upstream_tls").as_deref(), Some("fail"));
    let tls = findings
        .iter()
        .find(|f| f["check"] == "upstream_tls")
        .unwrap();
    assert!(tls["fix"].as_str().unwrap().contains("firewall"), "{tls}");
}
