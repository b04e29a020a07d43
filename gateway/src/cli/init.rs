//! `ndes-gateway init`: from nothing to a checked `gateway.toml`. It asks for the public name,
//! the NDES URL (or several) and how the public certificate comes, looks at NDES itself (the chain
//! it presents, confirmed by the operator before anything is trusted; GetCACaps and GetCACert
//! through that trust), writes the NDES trust and a commented config, and runs `check` and
//! `doctor` on it. Every question has a flag, so it runs unattended in automation as well.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use der::Decode;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};

use crate::config::{Config, UpstreamConfig};
use crate::upstream::{spki_sha256, Upstream, UpstreamTarget};

/// Where an installed gateway reads its config (the systemd unit's and the container's path).
pub const DEFAULT_OUTPUT: &str = "/etc/ndes-gateway/gateway.toml";
/// NDES's SCEP path, what a host name alone is taken to mean.
const NDES_PATH: &str = "/certsrv/mscep/mscep.dll";
/// Beside the config, where the other deploy/ files keep the certificates.
const CA_FILE: &str = "tls/ndes-ca.pem";
const PUBLIC_CERT: &str = "tls/public.pem";
const PUBLIC_KEY: &str = "tls/public.key";
const PUBLIC_CSR: &str = "tls/public.csr";
const ACME_STATE: &str = "acme";
/// Let's Encrypt's production directory: what most operators of a public name use.
const ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// A person who has answered wrongly this many times in a row is better served by the error.
const MAX_ATTEMPTS: usize = 5;
/// Far more NDES servers than any site runs behind one name.
const MAX_SERVERS: usize = 16;
/// What the probes read of NDES's answers: GetCACaps is a few lines, GetCACert a few KB.
const PROBE_LIMIT: usize = 256 * 1024;

/// How the gateway gets the certificate for the public name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertSource {
    /// A certificate and key you already have, as PEM files.
    Pem,
    /// A new key and a CSR to send to your CA (what `certs csr` writes).
    Csr,
    /// ACME (RFC 8555): Let's Encrypt or your own ACME server.
    Acme,
}

/// The answers, each one a flag; what is missing is asked (or, with `--yes`, taken from its
/// default, and an error when it has none).
#[derive(Debug, Clone, clap::Args)]
pub struct InitOptions {
    /// Where to write the config; the NDES CA file and any new key go in tls/ beside it.
    #[arg(long, short, visible_alias = "output", value_name = "FILE", default_value = DEFAULT_OUTPUT)]
    pub config: PathBuf,
    /// Replace an existing config (and the files init writes beside it).
    #[arg(long)]
    pub force: bool,
    /// Ask nothing: take every answer from the flags or its default, and fail on what has none.
    /// Implied when there is no terminal.
    #[arg(long, short)]
    pub yes: bool,
    /// The name devices use, the host of the SCEP URL in the MDM profile.
    #[arg(long, value_name = "NAME")]
    pub public_name: Option<String>,
    /// NDES's SCEP URL, or its host name alone (https://HOST/certsrv/mscep/mscep.dll). Repeat
    /// it for several NDES servers.
    #[arg(long, value_name = "URL")]
    pub ndes_url: Vec<String>,
    /// The name NDES's certificate carries, when the URL uses an address or another name. One
    /// for each --ndes-url, in the same order.
    #[arg(long, value_name = "NAME")]
    pub ndes_server_name: Vec<String>,
    /// Trust NDES when one certificate of the chain it presents has this SHA-256 fingerprint
    /// (hex, colons optional), as read on the NDES server. Repeatable, one per server.
    #[arg(long, value_name = "SHA256")]
    pub trust_fingerprint: Vec<String>,
    /// The CA that issued NDES's certificate, as a PEM file, when NDES does not send it (or to
    /// trust it rather than what NDES sends).
    #[arg(long, value_name = "FILE")]
    pub ndes_ca: Option<PathBuf>,
    /// How the public certificate comes; implied by --cert or --acme-directory.
    #[arg(long, value_enum, value_name = "HOW")]
    pub cert_source: Option<CertSource>,
    /// The public certificate (PEM, chain included), for --cert-source pem.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// A second name for the CSR's subject alternative names (the NDES guide allows the
    /// internal name), for --cert-source csr; "-" for none.
    #[arg(long, value_name = "NAME")]
    pub internal_name: Option<String>,
    /// The ACME directory URL, for --cert-source acme.
    #[arg(long, value_name = "URL")]
    pub acme_directory: Option<String>,
    /// The ACME account's contact e-mail address.
    #[arg(long, value_name = "EMAIL")]
    pub acme_contact: Option<String>,
    /// The public listener's address.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:443")]
    pub listen: SocketAddr,
    /// The admin listener's address (/metrics, /healthz, /readyz), plain HTTP: keep it off
    /// the internet.
    #[arg(long, value_name = "ADDR", default_value = crate::config::ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
}

/// One NDES server as confirmed: its URL, the name its certificate is checked for when that is
/// not the URL's host, the chain it presented and what is trusted of it.
struct Ndes {
    url: String,
    server_name: Option<String>,
    /// The trust anchors its chain is verified against.
    anchors: Vec<CertificateDer<'static>>,
    /// The SPKI pin of the certificate it presented, and that certificate's subject.
    pin: (String, String),
    /// The fingerprint the operator confirmed, for the config's comment.
    confirmed: String,
}

/// What the config's [listen] says about the public certificate.
enum PublicCert {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    Csr {
        cert: PathBuf,
        key: PathBuf,
        csr: PathBuf,
        key_pem: String,
        csr_pem: String,
    },
    Acme {
        directory: String,
        contact: Option<String>,
        state_dir: PathBuf,
    },
}

/// Asks, or takes the flag's value, or the default; see [`InitOptions`].
struct Asker {
    interactive: bool,
}

impl Asker {
    /// An answer checked by `check`: the flag's value when given (asked again when it is wrong
    /// and there is someone to ask), else the operator's answer, else the default.
    fn text<T>(
        &self,
        flag: &str,
        prompt: &str,
        given: Option<&str>,
        default: Option<&str>,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, String> {
        if let Some(given) = given {
            match check(given) {
                Ok(value) => return Ok(value),
                Err(e) if !self.interactive => return Err(format!("{flag}: {e}")),
                Err(e) => eprintln!("{flag}: {e}"),
            }
        } else if !self.interactive {
            return match default {
                Some(d) => check(d).map_err(|e| format!("{flag}: {e}")),
                None => Err(format!(
                    "{flag} is needed ({prompt}); without --yes it is asked"
                )),
            };
        }
        for _ in 0..MAX_ATTEMPTS {
            let mut input = dialoguer::Input::<String>::new()
                .with_prompt(prompt)
                .allow_empty(default.is_some());
            if let Some(d) = default {
                input = input.default(d.to_owned());
            }
            let answer = input.interact_text().map_err(prompt_failed)?;
            match check(answer.trim()) {
                Ok(value) => return Ok(value),
                Err(e) => eprintln!("  {e}"),
            }
        }
        Err(format!(
            "{flag}: no usable answer after {MAX_ATTEMPTS} tries"
        ))
    }

    fn confirm(&self, prompt: &str) -> Result<bool, String> {
        dialoguer::Confirm::new()
            .with_prompt(prompt)
            .default(false)
            .interact()
            .map_err(prompt_failed)
    }

    fn choose(&self, prompt: &str, items: &[&str]) -> Result<usize, String> {
        dialoguer::Select::new()
            .with_prompt(prompt)
            .items(items)
            .default(0)
            .interact()
            .map_err(prompt_failed)
    }
}

fn prompt_failed(e: dialoguer::Error) -> String {
    format!("cannot ask: {e}")
}

/// Runs `init` to the end: the questions, NDES, the files, `check` and `doctor`. Blocking: the
/// questions wait on a person, the network steps run on `runtime`.
pub fn run(opts: &InitOptions, runtime: &tokio::runtime::Runtime) -> Result<(), String> {
    let asker = Asker {
        interactive: !opts.yes && std::io::stdin().is_terminal() && std::io::stderr().is_terminal(),
    };
    let output = absolute(&opts.config)?;
    let dir = output
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    // Before any question: an answer given for nothing is a waste of the operator's time.
    refuse_to_overwrite(&output, opts.force)?;
    refuse_to_overwrite(&dir.join(CA_FILE), opts.force)?;

    let public_name = asker.text(
        "--public-name",
        "Public name devices use (the host of the SCEP URL in the MDM profile)",
        opts.public_name.as_deref(),
        None,
        dns_name,
    )?;
    let servers = ask_ndes(opts, &asker, runtime)?;
    let public = ask_public_cert(opts, &asker, &dir, &public_name)?;
    let text = config_text(opts, &public_name, &servers, &public);

    // Everything is known and checked: only now is anything written, the config last, each
    // file whole or not at all.
    refuse_to_overwrite(&output, opts.force)?;
    refuse_to_overwrite(&dir.join(CA_FILE), opts.force)?;
    let anchors = all_anchors(&servers);
    write_atomically(&dir.join(CA_FILE), &pem_of(&anchors))?;
    println!(
        "wrote {} (the NDES trust anchors)",
        dir.join(CA_FILE).display()
    );
    if let PublicCert::Csr {
        key,
        csr,
        key_pem,
        csr_pem,
        ..
    } = &public
    {
        write_atomically(key, key_pem)?;
        write_atomically(csr, csr_pem)?;
        println!("wrote {} and {}", key.display(), csr.display());
    }
    write_atomically(&output, &text)?;
    println!("wrote {}", output.display());

    let checked = check_written(&output, &public);
    let doctor_ok = match &checked {
        Ok(Some(config)) => {
            println!("\n== doctor");
            let findings = runtime.block_on(super::doctor::run(config, Some(&public_name)));
            print!("{}", super::doctor::render_text(&findings));
            // By ACME the public certificate comes at the first start: its absence now is the
            // plan, not a problem.
            let acme = matches!(public, PublicCert::Acme { .. });
            let awaited = |f: &super::doctor::Finding| acme && f.check.starts_with("listener");
            if acme {
                println!("(the public certificate comes from the ACME server when the gateway first starts)");
            }
            !findings
                .iter()
                .any(|f| f.verdict == super::doctor::Verdict::Fail && !awaited(f))
        }
        _ => true,
    };
    println!("\n{}", next_steps(&output, &public, &public_name));
    match checked {
        Err(e) => Err(e),
        Ok(_) if !doctor_ok => Err("doctor found problems: see its fixes above".to_owned()),
        Ok(_) => Ok(()),
    }
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn refuse_to_overwrite(output: &Path, force: bool) -> Result<(), String> {
    if output.exists() && !force {
        return Err(format!(
            "{} already exists: nothing written (--force replaces it)",
            output.display()
        ));
    }
    Ok(())
}

fn dns_name(answer: &str) -> Result<String, String> {
    match ServerName::try_from(answer) {
        Ok(ServerName::DnsName(_)) if answer.contains('.') => Ok(answer.to_ascii_lowercase()),
        _ => Err(format!(
            "{answer:?} is not a DNS name such as scep.contoso.com"
        )),
    }
}

/// The NDES servers, each looked at, confirmed and asked GetCACaps and GetCACert. A wrong
/// answer (no NDES there, a name its certificate lacks, a chain not confirmed) is said, and
/// asked again when someone is there.
fn ask_ndes(
    opts: &InitOptions,
    asker: &Asker,
    runtime: &tokio::runtime::Runtime,
) -> Result<Vec<Ndes>, String> {
    let ca_file = match &opts.ndes_ca {
        Some(path) => Some(read_certificates(path)?),
        None => None,
    };
    let mut servers = Vec::new();
    for (index, url) in opts.ndes_url.iter().enumerate() {
        servers.push(one_ndes(opts, asker, runtime, index, Some(url), &ca_file)?);
    }
    if servers.is_empty() {
        servers.push(one_ndes(opts, asker, runtime, 0, None, &ca_file)?);
        while asker.interactive && servers.len() < MAX_SERVERS {
            let more = asker.text(
                "--ndes-url",
                "Another NDES server (URL or host; empty: no more)",
                None,
                Some(""),
                |a| Ok(a.to_owned()),
            )?;
            if more.is_empty() {
                break;
            }
            let index = servers.len();
            servers.push(one_ndes(
                opts,
                asker,
                runtime,
                index,
                Some(&more),
                &ca_file,
            )?);
        }
    }
    Ok(servers)
}

/// The `index`th NDES server, asked again after a wrong answer while someone is there.
fn one_ndes(
    opts: &InitOptions,
    asker: &Asker,
    runtime: &tokio::runtime::Runtime,
    index: usize,
    given_url: Option<&str>,
    ca_file: &Option<Vec<CertificateDer<'static>>>,
) -> Result<Ndes, String> {
    let mut given_url = given_url.map(str::to_owned);
    let mut given_name = opts.ndes_server_name.get(index).cloned();
    let mut last_error = String::new();
    for _ in 0..MAX_ATTEMPTS {
        let url = asker.text(
            "--ndes-url",
            "NDES URL, or its host name alone",
            given_url.take().as_deref(),
            None,
            ndes_url,
        )?;
        let attempt = look_at_ndes(
            opts,
            asker,
            runtime,
            index,
            &url,
            given_name.take(),
            ca_file,
        );
        match attempt {
            Ok(ndes) => return Ok(ndes),
            Err(e) if !asker.interactive => return Err(e),
            Err(e) => {
                eprintln!("{e}\nAgain:");
                last_error = e;
            }
        }
    }
    Err(last_error)
}

/// NDES's URL from an answer: a host alone means NDES's own path over https.
fn ndes_url(answer: &str) -> Result<(String, String, u16), String> {
    let url = if answer.contains("://") {
        answer.to_owned()
    } else {
        format!("https://{answer}{NDES_PATH}")
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{answer:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url}: NDES is published over https://"));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let url = match uri.path() {
        "" | "/" => format!("{}{NDES_PATH}", url.trim_end_matches('/')),
        _ => url,
    };
    if uri.query().is_some() {
        return Err(format!("{url}: give the SCEP path without a query"));
    }
    Ok((url, host, uri.port_u16().unwrap_or(443)))
}

/// One NDES answer followed through: connect, show the chain, check the name, have the chain
/// confirmed, then GetCACaps and GetCACert through the trust as `serve` will hold it.
fn look_at_ndes(
    opts: &InitOptions,
    asker: &Asker,
    runtime: &tokio::runtime::Runtime,
    index: usize,
    (url, host, port): &(String, String, u16),
    given_name: Option<String>,
    ca_file: &Option<Vec<CertificateDer<'static>>>,
) -> Result<Ndes, String> {
    let name = given_name.clone().unwrap_or_else(|| host.clone());
    let addr = format!("{}:{port}", bracketed(host));
    println!("\nconnecting to {addr} (TLS name {name})...");
    let chain = runtime
        .block_on(super::certs::chain_of_server(&addr, &name))
        .map_err(|e| format!("NDES at {url} cannot be reached: {e}"))?;
    println!("{}", describe_chain(url, &chain));
    let leaf = chain.first().ok_or("NDES sent no certificate")?;
    let server_name = match name_in_certificate(leaf, &name) {
        Ok(()) => given_name,
        Err(e) => Some(
            asker
                .text(
                    "--ndes-server-name",
                    "A name NDES's certificate carries (its DNS SAN)",
                    None,
                    None,
                    |answer| name_in_certificate(leaf, answer).map(|()| answer.to_owned()),
                )
                .map_err(|asked| format!("{e}; {asked}"))?,
        ),
    };
    let confirmed = confirm_trust(opts, asker, index, &chain, ca_file.is_some())?;
    let anchors = match ca_file {
        Some(anchors) => anchors.clone(),
        None => presented_anchor(leaf, &chain, asker)?,
    };
    let pin = (
        spki_sha256(leaf).ok_or("NDES's certificate has no readable public key")?,
        subject_of(leaf),
    );
    let ndes = Ndes {
        url: url.clone(),
        server_name,
        anchors,
        pin,
        confirmed,
    };
    runtime.block_on(probe(&ndes))?;
    Ok(ndes)
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The top of the chain NDES sent when it sent more than its own certificate (IIS sends the
/// chain, root included) or a self-signed one; otherwise its issuer must be given.
fn presented_anchor(
    leaf: &CertificateDer<'static>,
    chain: &[CertificateDer<'static>],
    asker: &Asker,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let top = chain.last().unwrap_or(leaf);
    if chain.len() > 1 || self_signed(top) {
        return Ok(vec![top.clone()]);
    }
    let issuer = x509(leaf)
        .map(|c| c.tbs_certificate.issuer.to_string())
        .unwrap_or_default();
    asker.text(
        "--ndes-ca",
        &format!("NDES sends only its own certificate; the PEM file of its issuer ({issuer})"),
        None,
        None,
        |answer| read_certificates(Path::new(answer)),
    )
}

/// Trust on first use, never silent: a fingerprint given must be one of the chain's, and a
/// person asked must say yes. A CA file the operator gave is trust already stated.
fn confirm_trust(
    opts: &InitOptions,
    asker: &Asker,
    index: usize,
    chain: &[CertificateDer<'static>],
    ca_given: bool,
) -> Result<String, String> {
    let prints: Vec<String> = chain.iter().map(|c| fingerprint(c)).collect();
    let wanted = opts
        .trust_fingerprint
        .get(index)
        .or(if opts.trust_fingerprint.len() == 1 {
            opts.trust_fingerprint.first()
        } else {
            None
        });
    if let Some(wanted) = wanted {
        let normal = normal_fingerprint(wanted);
        match prints.iter().find(|p| normal_fingerprint(p) == normal) {
            Some(p) if normal.len() == 64 => {
                println!("trusted: the fingerprint given matches {p}");
                return Ok(p.clone());
            }
            _ => {
                let e = format!(
                    "--trust-fingerprint {wanted} matches no certificate NDES presents: not trusted"
                );
                if !asker.interactive {
                    return Err(format!("{e}; nothing written"));
                }
                eprintln!("{e}");
            }
        }
    }
    if ca_given && !asker.interactive {
        println!("trusted: chains to the --ndes-ca file (checked below)");
        return Ok(String::new());
    }
    if !asker.interactive {
        return Err(
            "NDES's chain is not confirmed: compare the fingerprints above with the certificate on the NDES server, then give --trust-fingerprint SHA256 (or --ndes-ca FILE); nothing written".to_owned(),
        );
    }
    let yes = asker.confirm(
        "Trust this chain? Compare the SHA-256 fingerprints with those on the NDES server first",
    )?;
    if !yes {
        return Err("NDES's chain not trusted: nothing written".to_owned());
    }
    Ok(prints.last().cloned().unwrap_or_default())
}

/// GetCACaps and GetCACert through the trust just confirmed: the chain, the name and the pin
/// checked as `serve` will check them.
async fn probe(ndes: &Ndes) -> Result<(), String> {
    let ca = std::env::temp_dir().join(format!(
        "ndes-gateway-init-{}-{}.pem",
        std::process::id(),
        ndes.pin.0.get(..8).unwrap_or("").replace(['/', '+'], "_")
    ));
    std::fs::write(&ca, pem_of(&ndes.anchors)).map_err(|e| format!("{}: {e}", ca.display()))?;
    let config = UpstreamConfig {
        url: ndes.url.clone(),
        ca: Some(ca.clone()),
        server_name: ndes.server_name.clone(),
        spki_sha256: vec![ndes.pin.0.clone()],
        ..UpstreamConfig::default()
    };
    let result = async {
        let target = UpstreamTarget::from_config(&config).map_err(|e| e.to_string())?;
        let upstream = Upstream::new(target, &config);
        let caps = upstream
            .get_all(
                "",
                Some("operation=GetCACaps&message=ndes-gateway-init"),
                PROBE_LIMIT,
            )
            .await
            .map_err(|e| format!("GetCACaps through the confirmed trust failed: {e}"))?;
        let caps_text = String::from_utf8_lossy(&caps.body);
        let caps_line: Vec<&str> = caps_text.split_whitespace().collect();
        println!("GetCACaps: {} {}", caps.status, caps_line.join(", "));
        let ca_cert = upstream
            .get_all(
                "",
                Some("operation=GetCACert&message=ndes-gateway-init"),
                PROBE_LIMIT,
            )
            .await
            .map_err(|e| format!("GetCACert failed: {e}"))?;
        if caps.status != 200 || ca_cert.status != 200 {
            return Err(format!(
                "NDES answered GetCACaps {} and GetCACert {}: is this the SCEP URL?",
                caps.status, ca_cert.status
            ));
        }
        let certs = crate::ops::certwatch::ca_and_ra(&ca_cert.body)
            .map_err(|e| format!("GetCACert's answer is not readable: {e}"))?;
        println!("GetCACert: {} certificate(s)", certs.len());
        for w in certs {
            println!(
                "  {:<3} {} (until {})",
                w.role,
                w.subject,
                date(w.not_after)
            );
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&ca);
    result
}

fn ask_public_cert(
    opts: &InitOptions,
    asker: &Asker,
    dir: &Path,
    public_name: &str,
) -> Result<PublicCert, String> {
    let source = match (opts.cert_source, &opts.cert, &opts.acme_directory) {
        (Some(s), _, _) => s,
        (None, Some(_), _) => CertSource::Pem,
        (None, None, Some(_)) => CertSource::Acme,
        (None, None, None) if asker.interactive => {
            let items = [
                "a certificate and key I have (PEM files)",
                "a new key and a CSR to send to my CA",
                "ACME (Let's Encrypt or an ACME server of my own)",
            ];
            [CertSource::Pem, CertSource::Csr, CertSource::Acme]
                [asker.choose("The public certificate", &items)?.min(2)]
        }
        (None, None, None) => {
            return Err(
                "--cert-source is needed (pem with --cert and --key, csr, or acme)".to_owned(),
            )
        }
    };
    match source {
        CertSource::Pem => public_files(opts, asker, dir, public_name),
        CertSource::Csr => public_csr(opts, asker, dir, public_name),
        CertSource::Acme => {
            let directory = asker.text(
                "--acme-directory",
                "ACME directory URL",
                opts.acme_directory.as_deref(),
                Some(ACME_DIRECTORY),
                |a| match a.parse::<http::Uri>() {
                    Ok(u) if u.scheme_str() == Some("https") => Ok(a.to_owned()),
                    _ => Err(format!("{a:?} is not an https:// URL")),
                },
            )?;
            let contact = asker.text(
                "--acme-contact",
                "Contact e-mail for the ACME account (empty: none)",
                opts.acme_contact.as_deref(),
                Some(""),
                |a| match a {
                    "" => Ok(None),
                    a if a.contains('@') && !a.contains(char::is_whitespace) => {
                        Ok(Some(a.trim_start_matches("mailto:").to_owned()))
                    }
                    a => Err(format!("{a:?} is not an e-mail address")),
                },
            )?;
            Ok(PublicCert::Acme {
                directory,
                contact,
                state_dir: dir.join(ACME_STATE),
            })
        }
    }
}

fn public_files(
    opts: &InitOptions,
    asker: &Asker,
    dir: &Path,
    public_name: &str,
) -> Result<PublicCert, String> {
    let default_cert = dir.join(PUBLIC_CERT).display().to_string();
    let cert = asker.text(
        "--cert",
        "Public certificate, PEM, chain included",
        opts.cert.as_deref().map(|p| p.to_str().unwrap_or("")),
        Some(&default_cert),
        |answer| {
            let path = absolute(Path::new(answer))?;
            let chain = read_certificates(&path)?;
            let leaf = chain.first().ok_or("no certificate")?;
            name_in_certificate(leaf, public_name)?;
            Ok(path)
        },
    )?;
    let default_key = dir.join(PUBLIC_KEY).display().to_string();
    let key = asker.text(
        "--key",
        "Its private key, PEM",
        opts.key.as_deref().map(|p| p.to_str().unwrap_or("")),
        Some(&default_key),
        |answer| {
            let path = absolute(Path::new(answer))?;
            crate::tls::load_certified_key(&cert, &path).map_err(|e| e.to_string())?;
            Ok(path)
        },
    )?;
    Ok(PublicCert::Files { cert, key })
}

fn public_csr(
    opts: &InitOptions,
    asker: &Asker,
    dir: &Path,
    public_name: &str,
) -> Result<PublicCert, String> {
    let internal = asker.text(
        "--internal-name",
        "A second name for the certificate, such as NDES's internal name (empty: none)",
        opts.internal_name.as_deref(),
        Some(""),
        |a| match a {
            "" | "-" => Ok(None),
            a => dns_name(a).map(Some),
        },
    )?;
    let (key, csr) = (dir.join(PUBLIC_KEY), dir.join(PUBLIC_CSR));
    for path in [&key, &csr] {
        refuse_to_overwrite(path, opts.force)?;
    }
    let (key_pem, csr_pem) = super::certs::csr(public_name, internal.as_deref())?;
    Ok(PublicCert::Csr {
        cert: dir.join(PUBLIC_CERT),
        key,
        csr,
        key_pem,
        csr_pem,
    })
}

/// The config, with only what differs from the defaults and a comment on where each value
/// came from.
fn config_text(
    opts: &InitOptions,
    public_name: &str,
    servers: &[Ndes],
    public: &PublicCert,
) -> String {
    let q = |text: &str| toml_edit::Value::from(text).to_string();
    let path = |p: &Path| q(&p.display().to_string());
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let mut t = format!(
        "# ndes-gateway, written by `ndes-gateway init` on {now}.\n\
         # Only what differs from the defaults is set. Every key, its default and why:\n\
         # config/gateway.example.toml; `ndes-gateway check --config FILE` prints every setting\n\
         # in force. Devices use https://{public_name}{NDES_PATH}\n\n[listen]\naddr = {}\n",
        q(&opts.listen.to_string())
    );
    match public {
        PublicCert::Files { cert, key } => {
            let what = crate::tls::describe_certificate(cert)
                .map(|(subject, _, until)| format!("  # {subject}, valid until {until}"))
                .unwrap_or_default();
            let _ = writeln!(t, "cert = {}{what}\nkey = {}", path(cert), path(key));
        }
        PublicCert::Csr { cert, key, csr, .. } => {
            let _ = writeln!(
                t,
                "# The CA's answer to {}, chain included, goes here:\ncert = {}\nkey = {}",
                csr.display(),
                path(cert),
                path(key)
            );
        }
        PublicCert::Acme {
            directory,
            contact,
            state_dir,
        } => {
            let contacts: Vec<String> = contact.iter().map(|c| q(&format!("mailto:{c}"))).collect();
            let _ = writeln!(
                t,
                "\n# The certificate for {public_name} comes by ACME; the account key and the\n\
                 # certificates are kept in state_dir.\n[listen.acme]\ndirectory = {}\n\
                 contact = [{}]\ndomains = [{}]\nstate_dir = {}\nchallenge = \"tls-alpn-01\"",
                q(directory),
                contacts.join(", "),
                q(public_name),
                path(state_dir)
            );
        }
    }
    t.push_str("\n[upstream]\n");
    if let [one] = servers {
        let _ = writeln!(t, "url = {}", q(&one.url));
        if let Some(name) = &one.server_name {
            let _ = writeln!(t, "server_name = {}", q(name));
        }
    }
    let mut confirmed: Vec<&str> = servers
        .iter()
        .map(|s| s.confirmed.as_str())
        .filter(|c| !c.is_empty())
        .collect();
    confirmed.dedup();
    if confirmed.is_empty() {
        t.push_str("# The only trust anchors for NDES: its issuer, from the CA file given.\n");
    } else {
        t.push_str("# The only trust anchors for NDES: what it presented, confirmed by SHA-256\n");
        for c in confirmed {
            let _ = writeln!(t, "#   {c}");
        }
    }
    let _ = writeln!(t, "ca = {}", q(CA_FILE));
    t.push_str(
        "# NDES's key: a new NDES key needs its pin here first (ndes-gateway certs pin --connect).\nspki_sha256 = [\n",
    );
    let mut pins: Vec<&(String, String)> = servers.iter().map(|s| &s.pin).collect();
    pins.dedup_by(|a, b| a.0 == b.0);
    for (pin, subject) in pins {
        let _ = writeln!(t, "  {},  # {subject}", q(pin));
    }
    t.push_str("]\n");
    if servers.len() > 1 {
        for s in servers {
            let _ = write!(t, "\n[[upstream.server]]\nurl = {}\n", q(&s.url));
            if let Some(name) = &s.server_name {
                let _ = writeln!(t, "server_name = {}", q(name));
            }
        }
    }
    let admin = opts.admin_addr.to_string();
    if admin != crate::config::ADMIN_ADDR {
        let _ = write!(
            t,
            "\n# /metrics, /healthz, /readyz: plain HTTP, for the management network only.\n\
             [admin]\naddr = {}\n",
            q(&admin)
        );
    }
    t.push_str(
        "\n# Left at their defaults: [limits] (65534-byte URLs, as the NDES guide sets IIS),\n\
         # [rate_limit] (off), [log], and what the example config says of the rest.\n",
    );
    t
}

/// `check` on the file as written: it must read back and its certificates load. `None` when
/// the certificate is still to come from a CA the CSR goes to. (By ACME it comes at the first
/// start, and `check` passes without it.)
fn check_written(output: &Path, public: &PublicCert) -> Result<Option<Config>, String> {
    println!("\n== check");
    let config = Config::load(output).map_err(|e| e.to_string())?;
    match (crate::prepare(&config), public) {
        (Ok(_), _) => {
            println!("{}: OK", output.display());
            Ok(Some(config))
        }
        (Err(_), PublicCert::Csr { cert, .. }) if !cert.exists() => {
            println!(
                "{}: complete but for the certificate: {} is to come from the CA",
                output.display(),
                cert.display()
            );
            Ok(None)
        }
        (Err(e), _) => Err(format!("{}: {e}", output.display())),
    }
}

fn next_steps(output: &Path, public: &PublicCert, public_name: &str) -> String {
    let config = output.display();
    let mut t = String::from("Next:\n");
    if let PublicCert::Csr { cert, csr, .. } = public {
        let _ = writeln!(
            t,
            "  send {} to your CA (a certificate for {public_name} with server authentication),\n  \
             save its answer, chain included, as {}, then: ndes-gateway check --config {config}",
            csr.display(),
            cert.display()
        );
    }
    let _ = write!(
        t,
        "  on a VM with systemd (deploy/systemd/):  systemctl enable --now ndes-gateway\n  \
         by hand:                                 ndes-gateway serve --config {config}\n  \
         on Kubernetes (deploy/kubernetes/): put {config} in deploy/kubernetes/base/gateway.toml, then\n    \
         kubectl apply -k deploy/kubernetes/edge"
    );
    t
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    crate::tls::load_certificates(path, "certificate file").map_err(|e| e.to_string())
}

fn x509(der: &[u8]) -> Option<x509_cert::Certificate> {
    x509_cert::Certificate::from_der(der).ok()
}

fn subject_of(der: &[u8]) -> String {
    x509(der)
        .map(|c| c.tbs_certificate.subject.to_string())
        .unwrap_or_else(|| "(unreadable certificate)".to_owned())
}

fn self_signed(der: &[u8]) -> bool {
    x509(der).is_some_and(|c| c.tbs_certificate.subject == c.tbs_certificate.issuer)
}

/// The certificate's SHA-256 fingerprint as certutil and openssl show it: hex, colon-separated.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// A fingerprint as typed or pasted: colons, spaces and case do not count.
fn normal_fingerprint(text: &str) -> String {
    text.chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-'))
        .flat_map(char::to_lowercase)
        .collect()
}

fn name_in_certificate(leaf: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    let server_name = ServerName::try_from(name)
        .map_err(|_| format!("{name:?} is not a DNS name or an IP address"))?;
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)
        .map_err(|e| format!("the certificate is not readable: {e}"))?;
    rustls::client::verify_server_name(&parsed, &server_name).map_err(|_| {
        format!(
            "the certificate of {} does not carry the name {name}",
            subject_of(leaf)
        )
    })
}

fn date(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

fn describe_chain(url: &str, chain: &[CertificateDer<'_>]) -> String {
    let mut t = format!("NDES at {url} presents {} certificate(s):\n", chain.len());
    for (i, der) in chain.iter().enumerate() {
        let Some(c) = x509(der) else {
            let _ = writeln!(t, "  [{}] (unreadable certificate)", i + 1);
            continue;
        };
        let tbs = &c.tbs_certificate;
        let _ = writeln!(
            t,
            "  [{}] {}\n      issued by {}\n      valid until {}\n      SHA-256 {}\n      key pin {}",
            i + 1,
            tbs.subject,
            tbs.issuer,
            tbs.validity.not_after,
            fingerprint(der),
            spki_sha256(der).unwrap_or_default()
        );
    }
    t
}

fn all_anchors(servers: &[Ndes]) -> Vec<CertificateDer<'static>> {
    let mut anchors: Vec<CertificateDer<'static>> = Vec::new();
    for a in servers.iter().flat_map(|s| &s.anchors) {
        if !anchors.contains(a) {
            anchors.push(a.clone());
        }
    }
    anchors
}

fn pem_of(certs: &[CertificateDer<'_>]) -> String {
    use der::EncodePem;
    let mut t = String::new();
    for c in certs {
        let Some(pem) = x509(c).and_then(|x| x.to_pem(der::pem::LineEnding::LF).ok()) else {
            continue;
        };
        let _ = write!(t, "# {}\n{pem}", subject_of(c));
    }
    t
}

/// Writes `text` to a new file in the same folder, then renames it over `path`: a reader (or a
/// crash) sees the old file or the new one, never half of one. Mode 0640, as deploy/README.md
/// has them: the gateway reads them through its group (a key included), nobody else does.
fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let dir = path
        .parent()
        .ok_or_else(|| format!("{}: no folder", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.init-{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o640);
    }
    let written = options.open(&temp).and_then(|mut f| {
        f.write_all(text.as_bytes())?;
        f.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&temp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(err(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_alone_means_ndes_over_https() {
        let (url, host, port) = ndes_url("ndes01.corp.contoso.com").unwrap();
        assert_eq!(
            url,
            "https://ndes01.corp.contoso.com/certsrv/mscep/mscep.dll"
        );
        assert_eq!((host.as_str(), port), ("ndes01.corp.contoso.com", 443));
        let (url, _, port) = ndes_url("https://10.0.0.5:8443/").unwrap();
        assert_eq!(url, "https://10.0.0.5:8443/certsrv/mscep/mscep.dll");
        assert_eq!(port, 8443);
        assert!(ndes_url("http://ndes01/certsrv/mscep/mscep.dll").is_err());
    }

    #[test]
    fn fingerprints_compare_whatever_their_spelling() {
        assert_eq!(normal_fingerprint("AB:cd:01"), normal_fingerprint("abcd01"));
        assert_eq!(fingerprint(b"x").len(), 32 * 3 - 1);
    }

    fn ndes(url: &str, pin: &str) -> Ndes {
        Ndes {
            url: url.to_owned(),
            server_name: None,
            anchors: Vec::new(),
            pin: (pin.to_owned(), "CN=ndes".to_owned()),
            confirmed: "AA:BB".to_owned(),
        }
    }

    fn options() -> InitOptions {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            o: InitOptions,
        }
        Wrap::parse_from(["init"]).o
    }

    #[test]
    fn several_ndes_servers_are_upstream_server_entries() {
        let servers = [
            ndes("https://ndes01.corp.test/certsrv/mscep/mscep.dll", "pin1"),
            ndes("https://ndes02.corp.test/certsrv/mscep/mscep.dll", "pin2"),
        ];
        let public = PublicCert::Acme {
            directory: ACME_DIRECTORY.to_owned(),
            contact: Some("pki@contoso.com".to_owned()),
            state_dir: PathBuf::from("/etc/ndes-gateway/acme"),
        };
        let text = config_text(&options(), "scep.contoso.com", &servers, &public);
        let doc: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        let upstream = doc["upstream"].as_table().unwrap();
        assert!(!upstream.contains_key("url"), "{text}");
        let entries = upstream["server"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[1]["url"].as_str(),
            Some("https://ndes02.corp.test/certsrv/mscep/mscep.dll")
        );
        assert_eq!(upstream["spki_sha256"].as_array().unwrap().len(), 2);
        let acme = doc["listen"]["acme"].as_table().unwrap();
        assert_eq!(acme["contact"][0].as_str(), Some("mailto:pki@contoso.com"));
        assert_eq!(acme["domains"][0].as_str(), Some("scep.contoso.com"));
        assert!(!doc["listen"].as_table().unwrap().contains_key("cert"));
    }

    #[test]
    fn one_ndes_server_is_the_upstream_url() {
        let servers = [ndes(
            "https://ndes01.corp.test/certsrv/mscep/mscep.dll",
            "pin1",
        )];
        let public = PublicCert::Files {
            cert: PathBuf::from("/etc/ndes-gateway/tls/public.pem"),
            key: PathBuf::from("/etc/ndes-gateway/tls/public.key"),
        };
        let text = config_text(&options(), "scep.contoso.com", &servers, &public);
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.upstream.url, servers[0].url);
        assert_eq!(config.upstream.spki_sha256, ["pin1"]);
        assert_eq!(config.listen.addr.to_string(), "0.0.0.0:443");
    }
}
