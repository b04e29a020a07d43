//! The command line as a user meets it: `check` on good and broken configs, and the demo.

use std::path::Path;
use std::process::{Command, Output};

use ndes_gateway::devpki;

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

    let out = gateway(&["check", "--config", "/nonexistent/gateway.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gateway.toml"));
}

#[test]
fn the_demo_enrols_a_device_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(&[
        "demo",
        "--once",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("subject:   CN=demo-device"), "{stdout}");
    assert!(dir.path().join("client/device.pem").is_file());
}
