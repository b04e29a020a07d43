//! The `ndes-gateway` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ndes_gateway::config::Config;
use ndes_gateway::pipeline::proxy::ForwardHeaders;
use ndes_gateway::{ops::logging, prepare, Gateway, Prepared};

/// Publishes a Microsoft NDES (SCEP) server to the internet: TLS for the public name, IIS-equivalent
/// request filtering at the edge, and a pinned TLS connection to the internal NDES.
#[derive(Parser)]
#[command(name = "ndes-gateway", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a first configuration: asks for the public name, the NDES URL and the public
    /// certificate, shows the chain NDES presents for you to confirm, writes the NDES CA file,
    /// the pins and a commented gateway.toml, and runs check and doctor on it. Every question
    /// has a flag; with --yes (or without a terminal) nothing is asked.
    ///
    /// Unattended, for example:
    ///   ndes-gateway init --yes --public-name scep.contoso.com \
    ///     --ndes-url ndes01.corp.contoso.com --trust-fingerprint 3F:A2:... \
    ///     --cert public.pem --key public.key --config /etc/ndes-gateway/gateway.toml
    #[command(verbatim_doc_comment)]
    Init(Box<ndes_gateway::cli::init::InitOptions>),
    /// Serve: publish the configured NDES until stopped (Ctrl-C or SIGTERM).
    Serve {
        /// The configuration file (TOML); see config/gateway.example.toml.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a configuration: parse it, load the certificates, check the key matches, print the
    /// effective settings. Exit 0 when all is well, 1 with the file, key and problem otherwise.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Diagnose the configured NDES and the gateway's own settings: a checklist of pass, warn and
    /// fail with the fix in NDES and IIS terms. Exit 0 when nothing fails, 1 otherwise.
    Doctor {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print the findings as one JSON object.
        #[arg(long)]
        json: bool,
        /// The name devices use (the SCEP URL's host); default: the listener certificate's CN.
        #[arg(long, value_name = "NAME")]
        public_name: Option<String>,
    },
    /// Certificate helpers: a CSR for the public name, SPKI pins, the dev PKI.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run the local demo: a dev PKI, micromdm scepserver behind a TLS front, the gateway in
    /// front of that, and a real enrolment with scepclient through it (needs the Debian package
    /// `scep`).
    Demo {
        /// Where the demo writes its PKI, logs and the enrolled certificate (default: a new
        /// folder under the temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The public gateway's address.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Stop after the enrolment instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
        /// NDES hosts behind the gateway, each with its own CA and RA key: with 2 or more, the
        /// demo enrols until every one has issued a certificate, each PKIOperation routed to the
        /// host it is encrypted to.
        #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=4))]
        ndes: u8,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a new private key and a CSR for the public certificate: subject CN the public name,
    /// SANs the public and internal names, server authentication requested.
    Csr {
        #[arg(long, value_name = "NAME")]
        public_name: String,
        #[arg(long, value_name = "NAME")]
        internal_name: Option<String>,
        /// Where to write the key (created with mode 0600; never overwritten).
        #[arg(long, value_name = "FILE", default_value = "public.key")]
        key_out: PathBuf,
        #[arg(long, value_name = "FILE", default_value = "public.csr")]
        csr_out: PathBuf,
    },
    /// Print the SPKI SHA-256 pins (for upstream.spki_sha256) of the certificates in a PEM file,
    /// or of the chain a live server presents.
    Pin {
        /// A PEM file of certificates.
        #[arg(required_unless_present = "connect", conflicts_with = "connect")]
        file: Option<PathBuf>,
        /// HOST:PORT of a live server, e.g. ndes01.corp.contoso.com:443.
        #[arg(long, value_name = "HOST:PORT", requires = "server_name")]
        connect: Option<String>,
        /// The name to ask the server for (SNI).
        #[arg(long, value_name = "NAME")]
        server_name: Option<String>,
    },
    /// Write the development PKI the demo and the tests use (never for production).
    Dev {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ndes-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Init(options) => ndes_gateway::cli::init::run(&options, &runtime),
        Command::Serve { config } => runtime.block_on(serve(config)),
        Command::Check { config } => check(config),
        Command::Doctor {
            config,
            json,
            public_name,
        } => {
            return runtime.block_on(doctor(config, json, public_name));
        }
        Command::Certs { command } => runtime.block_on(certs(command)),
        Command::Demo {
            dir,
            listen,
            once,
            ndes,
        } => {
            logging::init(&ndes_gateway::config::LogConfig {
                level: "warn,ndes_gateway::access=info".to_owned(),
                ..Default::default()
            });
            runtime.block_on(demo(dir, listen, once, ndes))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ndes-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn doctor(path: PathBuf, json: bool, public_name: Option<String>) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ndes-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    let findings = ndes_gateway::cli::doctor::run(&config, public_name.as_deref()).await;
    if json {
        println!("{}", ndes_gateway::cli::doctor::render_json(&findings));
    } else {
        print!("{}", ndes_gateway::cli::doctor::render_text(&findings));
    }
    if ndes_gateway::cli::doctor::failed(&findings) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn certs(command: CertsCommand) -> Result<(), String> {
    use ndes_gateway::cli::certs;
    match command {
        CertsCommand::Csr {
            public_name,
            internal_name,
            key_out,
            csr_out,
        } => {
            let (key, csr) = certs::csr(&public_name, internal_name.as_deref())?;
            write_new(&key_out, &key, true)?;
            write_new(&csr_out, &csr, false)?;
            println!("key: {}\nCSR: {}", key_out.display(), csr_out.display());
            Ok(())
        }
        CertsCommand::Pin {
            file,
            connect,
            server_name,
        } => {
            let pins = match (file, connect, server_name) {
                (Some(f), _, _) => certs::pins_of_file(&f)?,
                (None, Some(addr), Some(name)) => certs::pins_of_server(&addr, &name).await?,
                _ => {
                    return Err(
                        "give a PEM file, or --connect HOST:PORT --server-name NAME".to_owned()
                    )
                }
            };
            for (pin, subject) in pins {
                println!("{pin}  # {subject}");
            }
            Ok(())
        }
        CertsCommand::Dev { out } => dev_pki(&out),
    }
}

#[cfg(feature = "dev")]
async fn demo(
    dir: Option<PathBuf>,
    listen: SocketAddr,
    once: bool,
    ndes: u8,
) -> Result<(), String> {
    use ndes_gateway::dev::demo;
    demo::run(demo::DemoOptions {
        dir,
        listen,
        once,
        ndes: usize::from(ndes),
    })
    .await
}

#[cfg(feature = "dev")]
fn dev_pki(out: &std::path::Path) -> Result<(), String> {
    let pki = ndes_gateway::dev::devpki::generate(out)?;
    println!(
        "dev PKI in {} (root.pem, ndes.pem/.key, gateway.pem/.key)",
        pki.dir.display()
    );
    Ok(())
}

/// A production build carries no demo and no development PKI: they are for trying the gateway
/// and for its tests, and a key from them must never end up in front of a real NDES.
#[cfg(not(feature = "dev"))]
const NO_DEV: &str = "this build has no demo and no development PKI (built without the `dev` feature): run `bash scripts/demo.sh` from the source, or build with `cargo build --features dev`";

#[cfg(not(feature = "dev"))]
async fn demo(_: Option<PathBuf>, _: SocketAddr, _: bool, _: u8) -> Result<(), String> {
    Err(NO_DEV.to_owned())
}

#[cfg(not(feature = "dev"))]
fn dev_pki(_: &std::path::Path) -> Result<(), String> {
    Err(NO_DEV.to_owned())
}

/// Writes a new file, never over an existing one (a key overwritten is a key lost).
fn write_new(path: &std::path::Path, text: &str, private: bool) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

async fn serve(path: PathBuf) -> Result<(), String> {
    use ndes_gateway::ops::reload::notify_systemd;
    use sd_notify::NotifyState;
    // First of all: a supervisor may send SIGHUP (`systemctl reload`) or SIGTERM as soon as the
    // process exists, and their default actions would end it without a word (systemd counts a
    // SIGHUP death as a clean exit, so Restart=on-failure would not bring it back).
    let _hangup = ndes_gateway::ops::reload::hangup_signal();
    let stop = ndes_gateway::stop_signal();
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    logging::init(&config.log);
    raise_open_file_limit(config.listen.max_connections);
    let gateway = Gateway::start(&config).await.map_err(|e| e.to_string())?;
    // Type=notify: started means the listeners are bound and the handlers in place.
    notify_systemd(&[NotifyState::Ready]);
    stop.await;
    notify_systemd(&[NotifyState::Stopping]);
    tracing::info!(target: "ndes_gateway", "stopping: finishing requests in flight");
    gateway.shutdown().await;
    Ok(())
}

/// Each client connection takes a file descriptor, and so may its upstream connection: the common
/// default soft limit of 1024 would refuse clients long before `listen.max_connections`.
fn raise_open_file_limit(max_connections: usize) {
    let wanted = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => tracing::warn!(
            target: "ndes_gateway",
            open_files = got,
            wanted,
            "the open-file limit is below what listen.max_connections needs; raise LimitNOFILE"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(target: "ndes_gateway", error = %e, "cannot raise the open-file limit")
        }
    }
}

fn check(path: PathBuf) -> Result<(), String> {
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    let prepared = prepare(&config).map_err(|e| format!("{}: {e}", path.display()))?;
    let settings = effective_settings(&prepared)?;
    println!("{}: OK", path.display());
    print!("{settings}");
    Ok(())
}

/// Every setting in force as TOML, serialized from the config itself so that no key can be left
/// out, with [`notes`] as comments.
fn effective_settings(prepared: &Prepared) -> Result<String, String> {
    let cannot = |e: &dyn std::fmt::Display| format!("cannot print the settings: {e}");
    let text = toml::to_string(&prepared.config).map_err(|e| cannot(&e))?;
    let mut settings: toml_edit::DocumentMut = text.parse().map_err(|e| cannot(&e))?;
    for (section, key, note) in notes(prepared)? {
        let value = settings
            .get_mut(section)
            .and_then(|s| s.get_mut(key))
            .and_then(toml_edit::Item::as_value_mut);
        if let Some(value) = value {
            let decor = value.decor_mut();
            let before = decor.suffix().and_then(|s| s.as_str()).unwrap_or("");
            decor.set_suffix(format!("{before}{note}"));
        }
    }
    Ok(settings.to_string())
}

/// What the keys alone do not say, each to follow the value of a section's key: what `prepare`
/// found in the certificate and key, and what the upstream settings come to.
fn notes(prepared: &Prepared) -> Result<Vec<(&'static str, &'static str, String)>, String> {
    let c = &prepared.config;
    let mut notes = match &prepared.acme {
        None => {
            let (subject, _, not_after) = ndes_gateway::tls::describe_certificate(&c.listen.cert)?;
            vec![
                (
                    "listen",
                    "cert",
                    format!("  # {subject}, valid until {not_after}"),
                ),
                ("listen", "key", "  # matches the certificate".to_owned()),
            ]
        }
        Some(acme) => {
            let stored = match &acme.stored {
                Some(_) => {
                    let path = acme.state.certificate_path();
                    let (subject, _, not_after) = ndes_gateway::tls::describe_certificate(&path)?;
                    format!("{subject}, valid until {not_after}, in {}", path.display())
                }
                None => "none stored yet: obtained at start".to_owned(),
            };
            vec![(
                "listen",
                "addr",
                format!("  # certificate by ACME ([listen.acme]): {stored}"),
            )]
        }
    };
    // With several servers, what each one's entry leaves unset is its own; noted for one only.
    let single = match prepared.targets.as_slice() {
        [target] if c.upstream.servers.is_empty() => Some(target),
        _ => None,
    };
    if single.is_some_and(|t| t.tls.is_none()) {
        notes.push((
            "upstream",
            "url",
            "\n# warning: plain http:// upstream on loopback: only for a SCEP server on this host"
                .to_owned(),
        ));
    }
    // Where the keys left unset would stand: after url, ca and server_name.
    let unset_after = if c.upstream.server_name.is_some() {
        "server_name"
    } else if c.upstream.ca.is_some() {
        "ca"
    } else {
        "url"
    };
    let quoted = |text: &str| toml_edit::Value::from(text).to_string();
    if let Some(target) = single {
        if c.upstream.server_name.is_none() {
            let name = quoted(target.server_name.to_str().as_ref());
            let note = format!("\n# server_name = {name} (unset: the host of url)");
            notes.push(("upstream", unset_after, note));
        }
        if c.upstream.host_header.is_none() {
            let host = quoted(target.host_header.to_str().unwrap_or(""));
            let note = format!("\n# host_header = {host} (unset: server_name)");
            notes.push(("upstream", unset_after, note));
        }
    }
    let forward = ForwardHeaders::parse(&c.upstream.forward_headers).map_err(|e| e.to_string())?;
    let reach = forward.effective().join(", ");
    let note = format!("\n# request headers that reach NDES, all others dropped: {reach}");
    notes.push(("upstream", "forward_headers", note));
    for key in ["per_client_rps", "global_rps"] {
        notes.push(("rate_limit", key, "  # 0: off".to_owned()));
    }
    Ok(notes)
}
