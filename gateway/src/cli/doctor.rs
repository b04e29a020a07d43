//! `ndes-gateway doctor`: the NDES guide's validation steps and more, run against the configured
//! NDES and the gateway's own settings, each answered pass, warn or fail with the fix in NDES and
//! IIS terms.

use std::fmt::Write as _;
use std::sync::Arc;

use der::asn1::ObjectIdentifier;
use der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};
use x509_cert::Certificate;

use crate::config::{AcmeConfig, Config};
use crate::ops::acme::state::StateDir;
use crate::ops::certwatch::{ca_and_ra, now_unix, Watched};
use crate::upstream::cluster::Cluster;
use crate::upstream::{Upstream, UpstreamErrorKind};

/// Certificates that expire within this are flagged: time to renew, and to roll the change out.
const EXPIRY_WARNING_SECS: u64 = 30 * 24 * 3600;
/// Intune's stated need for a long URL, and the most IIS can be set to.
const LONG_URLS: [(&str, usize); 2] = [("long_url_40k", 40_000), ("long_url_65k", 65_534)];
const SERVER_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1");
const SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");
const EXT_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Finding {
    /// A stable identifier, for scripts and the JSON output.
    pub check: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to change, in NDES, IIS or gateway terms; empty on a pass.
    pub fix: String,
    /// The NDES server it is about (`host:port`), with several.
    pub server: Option<String>,
}

fn finding(
    check: &'static str,
    verdict: Verdict,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        check,
        verdict,
        detail: detail.into(),
        fix: fix.into(),
        server: None,
    }
}

fn date(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

/// Runs every check. `public_name` is the name devices use; by default the listener
/// certificate's subject CN.
pub async fn run(config: &Config, public_name: Option<&str>) -> Vec<Finding> {
    let mut out = match &config.listen.acme {
        Some(acme) => acme_checks(config, acme, public_name),
        None => listener_checks(config, public_name),
    };
    let targets = match Cluster::targets(&config.upstream) {
        Ok(targets) => targets,
        Err(e) => {
            out.push(finding(
                "upstream_tls",
                Verdict::Fail,
                e.to_string(),
                "fix [upstream] in the config",
            ));
            return out;
        }
    };
    let many = targets.len() > 1;
    let mut sets = Vec::new();
    for (target, server) in targets.into_iter().zip(config.upstream.server_list()) {
        let label = target.authority.to_string();
        let upstream = Arc::new(Upstream::new(target, &config.upstream.for_server(&server)));
        let mut findings = upstream_checks(upstream.clone()).await;
        if many {
            for f in &mut findings {
                f.server = Some(label.clone());
            }
            sets.push((label, ca_cert_set(&upstream).await));
        }
        out.extend(findings);
    }
    if many {
        out.extend(compare_servers(&sets));
    }
    out
}

/// A server's GetCACert certificates as DER, CA and RA apart, sorted.
struct CaSet {
    ca: Vec<Vec<u8>>,
    /// The certificates PKIOperations are encrypted to.
    ra: Vec<Vec<u8>>,
    /// How a PKIOperation names each of them: issuer and serial.
    names: Vec<(crate::scep::Recipient, Vec<u8>)>,
}

/// `None` when the answer could not be read.
async fn ca_cert_set(upstream: &Upstream) -> Option<CaSet> {
    use der::Encode;
    let a = upstream
        .get_all(
            "",
            Some("operation=GetCACert&message=ndes-gateway-doctor"),
            256 * 1024,
        )
        .await
        .ok()
        .filter(|a| a.status == 200)?;
    let certs = crate::scep::parse_ca_certs(&a.body).ok()?;
    let single = certs.len() == 1;
    let mut set = CaSet {
        ca: Vec::new(),
        ra: Vec::new(),
        names: Vec::new(),
    };
    for c in &certs {
        let der = c.to_der().ok()?;
        for name in crate::scep::Recipient::names_of(c) {
            set.names.push((name, der.clone()));
        }
        if single || crate::scep::is_ca(c) {
            set.ca.push(der);
        } else {
            set.ra.push(der);
        }
    }
    // Without RA certificates (a plain SCEP CA) devices encrypt to the CA itself.
    if set.ra.is_empty() {
        set.ra.clone_from(&set.ca);
    }
    set.ca.sort();
    set.ra.sort();
    Some(set)
}

/// One public name should lead to one CA: servers whose CA certificates differ are a warning.
/// RA certificates differ between NDES hosts by design; routing by recipient handles it, unless
/// two different certificates carry the same issuer and serial number.
fn compare_servers(sets: &[(String, Option<CaSet>)]) -> Vec<Finding> {
    let read: Vec<(&String, &CaSet)> = sets
        .iter()
        .filter_map(|(label, set)| set.as_ref().map(|s| (label, s)))
        .collect();
    let Some((first_label, first)) = read.first() else {
        return Vec::new();
    };
    let differ = |same: &dyn Fn(&CaSet) -> bool| {
        read.iter()
            .filter(|(_, s)| !same(s))
            .map(|(l, _)| l.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ca_differ = differ(&|s| s.ca == first.ca);
    let ra_differ = differ(&|s| s.ra == first.ra);
    let mut out = Vec::new();
    out.push(if ca_differ.is_empty() {
        finding(
            "servers_ca",
            Verdict::Pass,
            format!("the {} NDES servers hand out the same CA certificate", read.len()),
            "",
        )
    } else {
        finding(
            "servers_ca",
            Verdict::Warn,
            format!(
                "the CA certificates of {ca_differ} differ from those of {first_label}: devices get a different CA depending on the server"
            ),
            "one public name should lead to one CA: point every NDES server at the same issuing CA, or publish each CA under its own name",
        )
    });
    let clash = read.iter().enumerate().find_map(|(i, (a_label, a))| {
        read[i + 1..].iter().find_map(|(b_label, b)| {
            a.names.iter().find_map(|(name, der)| {
                b.names
                    .iter()
                    .any(|(n, d)| n == name && d != der)
                    .then(|| format!("{a_label} and {b_label}"))
            })
        })
    });
    out.push(match clash {
        Some(pair) => finding(
            "servers_ra",
            Verdict::Warn,
            format!("{pair} hand out different certificates with the same issuer and serial number: a PKIOperation encrypted to one cannot be told from one encrypted to the other, and half of them fail"),
            "give each NDES server RA certificates of its own, issued by the enterprise CA (each then has a serial number of its own)",
        ),
        None if ra_differ.is_empty() => finding(
            "servers_ra",
            Verdict::Pass,
            "the NDES servers share their RA certificates: PKIOperations are balanced",
            "",
        ),
        None => finding(
            "servers_ra",
            Verdict::Pass,
            format!("the RA certificates of {ra_differ} differ from those of {first_label}: each PKIOperation goes to the server holding the RA key it is encrypted to"),
            "",
        ),
    });
    out
}

/// With `[listen.acme]`: the account, the last order and the next renewal as the running
/// gateway last wrote them in `state_dir`, then the stored certificate's own checks.
fn acme_checks(config: &Config, acme: &AcmeConfig, public_name: Option<&str>) -> Vec<Finding> {
    let state = StateDir::new(&acme.state_dir);
    let status = state.status().unwrap_or_default();
    let mut out = vec![match (&status.account, state.has_account()) {
        (Some(url), true) => finding(
            "acme_account",
            Verdict::Pass,
            format!("registered at {}: {url}", acme.directory),
            "",
        ),
        (None, true) => finding(
            "acme_account",
            Verdict::Pass,
            format!("stored for {}", acme.directory),
            "",
        ),
        _ => finding(
            "acme_account",
            Verdict::Warn,
            format!("no account stored in {}", acme.state_dir.display()),
            "start the gateway: it registers one at its first order",
        ),
    }];
    let at = status
        .last_order_at
        .map_or_else(|| "never".to_owned(), date);
    out.push(match status.last_order_result.as_deref() {
        Some("ok") => finding("acme_last_order", Verdict::Pass, format!("succeeded at {at}"), ""),
        Some(result) => finding(
            "acme_last_order",
            Verdict::Fail,
            format!(
                "{result} at {at}: {}",
                status.last_problem.as_deref().unwrap_or("(no problem document)")
            ),
            "see the problem: DNS of the domains, the challenge port reachable from the CA, the EAB key, the CA's rate limits",
        ),
        None => finding("acme_last_order", Verdict::Warn, "no order yet", "start the gateway"),
    });
    if let Some(next) = status.next_renewal_at {
        out.push(finding(
            "acme_next_renewal",
            Verdict::Pass,
            format!("next order at {}", date(next)),
            "",
        ));
    }
    let (cert, key) = (state.certificate_path(), state.key_path());
    if !cert.exists() {
        out.push(finding(
            "listener_key",
            Verdict::Fail,
            format!("no certificate in {} yet", acme.state_dir.display()),
            "start the gateway and see acme_last_order",
        ));
        return out;
    }
    let mut stored = config.clone();
    stored.listen.cert = cert;
    stored.listen.key = key;
    out.extend(listener_checks(
        &stored,
        public_name.or(acme.domains.first().map(String::as_str)),
    ));
    out
}

fn listener_checks(config: &Config, public_name: Option<&str>) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Err(e) = crate::tls::load_certified_key(&config.listen.cert, &config.listen.key) {
        out.push(finding(
            "listener_key",
            Verdict::Fail,
            e.to_string(),
            "give [listen] cert and key of the same pair, PEM",
        ));
        return out;
    }
    out.push(finding(
        "listener_key",
        Verdict::Pass,
        "the key matches the certificate",
        "",
    ));
    let chain: Vec<Certificate> =
        match crate::tls::load_certificates(&config.listen.cert, "listen.cert") {
            Ok(ders) => ders
                .iter()
                .filter_map(|d| Certificate::from_der(d).ok())
                .collect(),
            Err(e) => {
                out.push(finding("listener_chain", Verdict::Fail, e.to_string(), ""));
                return out;
            }
        };
    let Some(leaf) = chain.first() else {
        out.push(finding(
            "listener_chain",
            Verdict::Fail,
            "no readable certificate",
            "",
        ));
        return out;
    };
    let w = Watched::of("listener", leaf);
    out.push(expiry_finding(
        "listener_expiry",
        &w,
        "renew the public certificate and replace [listen] cert and key",
    ));

    let names = dns_names(leaf);
    let cn = common_name(leaf);
    let wanted = public_name.map(str::to_owned).or(cn.clone());
    out.push(match wanted {
        None => finding("listener_name", Verdict::Fail, "no public name: the certificate has no CN and none was given", "give --public-name"),
        Some(name) if names.iter().any(|n| name_matches(n, &name)) => {
            finding("listener_name", Verdict::Pass, format!("{name} is in the subject alternative names"), "")
        }
        Some(name) => finding(
            "listener_name",
            Verdict::Fail,
            format!("{name} is not in the subject alternative names ({})", names.join(", ")),
            "issue the public certificate with the public name (the SCEP URL's host in the Intune profile) as a DNS SAN",
        ),
    });
    out.push(match ext_key_usages(leaf) {
        None => finding(
            "listener_eku",
            Verdict::Warn,
            "no extended key usage: any use allowed",
            "request server authentication (1.3.6.1.5.5.7.3.1) explicitly",
        ),
        Some(ekus) if ekus.contains(&SERVER_AUTH) => {
            finding("listener_eku", Verdict::Pass, "server authentication", "")
        }
        Some(_) => finding(
            "listener_eku",
            Verdict::Fail,
            "the certificate is not for server authentication",
            "issue it from a template with the Server Authentication EKU",
        ),
    });
    let linked = chain
        .windows(2)
        .all(|pair| pair[0].tbs_certificate.issuer == pair[1].tbs_certificate.subject);
    let self_signed = leaf.tbs_certificate.issuer == leaf.tbs_certificate.subject;
    out.push(if !linked {
        finding(
            "listener_chain",
            Verdict::Fail,
            "the certificates in [listen] cert do not form a chain in order",
            "put the server certificate first, then each issuer in turn",
        )
    } else if chain.len() == 1 && !self_signed {
        finding(
            "listener_chain",
            Verdict::Warn,
            format!(
                "no intermediate sent; issued by {}",
                leaf.tbs_certificate.issuer
            ),
            "append the intermediate CA certificates to [listen] cert unless devices hold them",
        )
    } else {
        finding(
            "listener_chain",
            Verdict::Pass,
            format!("{} certificate(s) in order", chain.len()),
            "",
        )
    });
    out
}

fn expiry_finding(check: &'static str, w: &Watched, fix: &str) -> Finding {
    let now = now_unix();
    if w.not_after <= now {
        finding(
            check,
            Verdict::Fail,
            format!("{} expired {}", w.subject, date(w.not_after)),
            fix,
        )
    } else if w.not_after <= now + EXPIRY_WARNING_SECS {
        finding(
            check,
            Verdict::Warn,
            format!("{} expires {}", w.subject, date(w.not_after)),
            fix,
        )
    } else {
        finding(
            check,
            Verdict::Pass,
            format!("{} valid until {}", w.subject, date(w.not_after)),
            "",
        )
    }
}

fn extension<'a>(cert: &'a Certificate, oid: &ObjectIdentifier) -> Option<&'a [u8]> {
    cert.tbs_certificate
        .extensions
        .as_deref()?
        .iter()
        .find(|e| &e.extn_id == oid)
        .map(|e| e.extn_value.as_bytes())
}

fn dns_names(cert: &Certificate) -> Vec<String> {
    extension(cert, &SUBJECT_ALT_NAME)
        .and_then(|v| SubjectAltName::from_der(v).ok())
        .map(|san| {
            san.0
                .into_iter()
                .filter_map(|n| match n {
                    GeneralName::DnsName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn common_name(cert: &Certificate) -> Option<String> {
    const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    cert.tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|a| a.oid == CN)
        .and_then(|a| {
            a.value
                .decode_as::<der::asn1::Utf8StringRef<'_>>()
                .map(|s| s.as_str().to_owned())
                .or_else(|_| {
                    a.value
                        .decode_as::<der::asn1::PrintableStringRef<'_>>()
                        .map(|s| s.as_str().to_owned())
                })
                .ok()
        })
}

fn ext_key_usages(cert: &Certificate) -> Option<Vec<ObjectIdentifier>> {
    extension(cert, &EXT_KEY_USAGE)
        .and_then(|v| ExtendedKeyUsage::from_der(v).ok())
        .map(|eku| eku.0)
}

fn name_matches(pattern: &str, name: &str) -> bool {
    if let Some(suffix) = pattern.strip_prefix("*.") {
        return name
            .split_once('.')
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(suffix));
    }
    pattern.eq_ignore_ascii_case(name)
}

async fn upstream_checks(upstream: Arc<Upstream>) -> Vec<Finding> {
    let mut out = Vec::new();
    // GetCACaps first: it also proves the TLS connection.
    let caps = upstream
        .get_all(
            "",
            Some("operation=GetCACaps&message=ndes-gateway-doctor"),
            64 * 1024,
        )
        .await;
    let leaf = upstream
        .target
        .seen_leaf
        .lock()
        .ok()
        .and_then(|l| l.clone());
    match &caps {
        Err(e) => {
            let fix = match e.kind {
                UpstreamErrorKind::Connect => "check upstream.url, DNS and the firewall: 443 from the gateway to NDES",
                UpstreamErrorKind::TlsChain => "upstream.ca must hold the CA that issued the NDES server certificate (and the certificate must be valid now)",
                UpstreamErrorKind::TlsName => "set upstream.server_name to a name in the NDES certificate's SAN, or reissue it with the internal name",
                UpstreamErrorKind::PinMismatch => "update upstream.spki_sha256 to the NDES certificate's current key (ndes-gateway certs pin --connect)",
                UpstreamErrorKind::Timeout => "NDES did not answer in time: is IIS running and reachable?",
                UpstreamErrorKind::Protocol | UpstreamErrorKind::Busy | UpstreamErrorKind::Unavailable => "NDES answered in a way the gateway could not read",
                UpstreamErrorKind::ResponseTooLarge => "NDES's answer is over upstream.max_response_bytes: raise it if that answer is right",
            };
            out.push(finding(
                "upstream_tls",
                Verdict::Fail,
                format!("{}: {}", e.kind.label(), e.message),
                fix,
            ));
            return out;
        }
        Ok(_) => {
            let detail = match leaf
                .as_deref()
                .and_then(|d| Watched::from_der("upstream_tls", d))
            {
                Some(w) => format!(
                    "{} verified (chain, name{}), valid until {}",
                    w.subject,
                    if upstream.target.pins > 0 {
                        ", pin"
                    } else {
                        ""
                    },
                    date(w.not_after)
                ),
                None => "reachable (plain HTTP on loopback)".to_owned(),
            };
            out.push(finding("upstream_tls", Verdict::Pass, detail, ""));
        }
    }
    if let Some(w) = leaf
        .as_deref()
        .and_then(|d| Watched::from_der("upstream_tls", d))
    {
        out.push(expiry_finding(
            "upstream_tls_expiry",
            &w,
            "renew the NDES server certificate (IIS binding on 443)",
        ));
    }

    if let Ok(a) = &caps {
        out.push(caps_finding(a.status, &a.body));
    }
    out.extend(ca_cert_findings(&upstream).await);
    out.push(policy_module_finding(&upstream).await);
    for (check, len) in LONG_URLS {
        out.push(long_url_finding(&upstream, check, len).await);
    }
    out
}

fn caps_finding(status: u16, body: &[u8]) -> Finding {
    if status != 200 {
        return finding(
            "getcacaps",
            Verdict::Fail,
            format!("GetCACaps answered {status}"),
            "check the NDES application pool and the mscep.dll handler in IIS",
        );
    }
    let text = String::from_utf8_lossy(body);
    let caps: Vec<&str> = text
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let has = |k: &str| caps.iter().any(|c| c.eq_ignore_ascii_case(k));
    let standard = has("SCEPStandard");
    let missing: Vec<&str> = ["SHA-256", "AES", "POSTPKIOperation"]
        .into_iter()
        .filter(|k| !has(k) && !standard)
        .collect();
    if missing.is_empty() {
        finding(
            "getcacaps",
            Verdict::Pass,
            format!("200: {}", caps.join(", ")),
            "",
        )
    } else {
        finding(
            "getcacaps",
            Verdict::Warn,
            format!("200: {}; missing {}", caps.join(", "), missing.join(", ")),
            "NDES on Windows Server 2016 to 2022 does not advertise AES; clients then fall back to 3DES. Without POSTPKIOperation every request is a long GET",
        )
    }
}

async fn ca_cert_findings(upstream: &Upstream) -> Vec<Finding> {
    let mut out = Vec::new();
    match upstream.get_all("", Some("operation=GetCACert&message=ndes-gateway-doctor"), 256 * 1024).await {
        Err(e) => out.push(finding("getcacert", Verdict::Fail, e.to_string(), "")),
        Ok(a) if a.status != 200 => out.push(finding(
            "getcacert",
            Verdict::Fail,
            format!("GetCACert answered {}", a.status),
            "check the NDES application pool and that the RA certificates exist in the NDES service account's store",
        )),
        Ok(a) => match ca_and_ra(&a.body) {
            Err(e) => out.push(finding(
                "getcacert",
                Verdict::Fail,
                format!("not readable ({}): {e}", a.header(http::header::CONTENT_TYPE)),
                "NDES should answer application/x-x509-ca-ra-cert with the CA and RA certificates",
            )),
            Ok(certs) => {
                let list: Vec<String> = certs.iter().map(|w| format!("{} {} until {}", w.role, w.subject, date(w.not_after))).collect();
                out.push(finding(
                    "getcacert",
                    Verdict::Pass,
                    format!("{}: {}", a.header(http::header::CONTENT_TYPE), list.join("; ")),
                    "",
                ));
                for w in certs.iter().filter(|w| w.role == "ra") {
                    out.push(expiry_finding(
                        "ra_expiry",
                        w,
                        "renew the NDES RA certificates (CEP Encryption, Exchange Enrollment Agent) and restart the NDES application pool",
                    ));
                }
                for w in certs.iter().filter(|w| w.role == "ca") {
                    out.push(expiry_finding("ca_expiry", w, "renew the issuing CA certificate"));
                }
            }
        },
    }
    out
}

async fn policy_module_finding(upstream: &Upstream) -> Finding {
    const CHECK: &str = "policy_module";
    let a = match upstream.get_all("", None, 64 * 1024).await {
        Err(e) => return finding(CHECK, Verdict::Fail, e.to_string(), ""),
        Ok(a) => a,
    };
    // What the bare mscep.dll answers means something only from IIS: another SCEP server
    // (a test CA, micromdm) has no policy module to ask.
    let server = a.header(http::header::SERVER);
    if !server.contains("Microsoft-IIS") {
        return finding(
            CHECK,
            Verdict::Warn,
            format!("{} on the bare SCEP path from a server that is not IIS ({server:?}): the Intune policy module check applies to NDES only", a.status),
            "",
        );
    }
    match a.status {
        403 => finding(CHECK, Verdict::Pass, "403 on the bare mscep.dll: the Intune policy module answers", ""),
        200 => finding(
            CHECK,
            Verdict::Fail,
            "200 with the NDES page on the bare mscep.dll: the Intune Certificate Connector's policy module is not installed",
            "install (or repair) the Intune Certificate Connector on the NDES server, then check again for 403",
        ),
        503 => finding(
            CHECK,
            Verdict::Fail,
            "503: the NDES application pool (SCEP) is stopped",
            "give the NDES service account the rights Log on locally, Log on as a service and Log on as a batch job, then start the SCEP application pool",
        ),
        500 => finding(
            CHECK,
            Verdict::Fail,
            "500 from NDES",
            "grant IIS_IUSRS 'Impersonate a client after authentication', check the NDES service account is not locked or expired, and that the RA certificates are valid",
        ),
        status => finding(CHECK, Verdict::Warn, format!("{status} on the bare mscep.dll; 403 was expected"), "check the IIS site bound to the NDES name"),
    }
}

async fn long_url_finding(upstream: &Upstream, check: &'static str, target: usize) -> Finding {
    let prefix_len = upstream.target.base_path.len() + "?operation=GetCACaps&message=".len();
    let message = "A".repeat(target.saturating_sub(prefix_len).max(1));
    let query = format!("operation=GetCACaps&message={message}");
    let len = prefix_len + message.len();
    match upstream.get_all("", Some(&query), 64 * 1024).await.map(|a| a.status) {
        Ok(200) => finding(check, Verdict::Pass, format!("a {len}-byte request-target gets 200"), ""),
        Ok(status @ (400 | 404 | 414)) => finding(
            check,
            Verdict::Fail,
            format!("a {len}-byte request-target gets {status}: NDES's limits are not raised"),
            "set IIS request filtering Maximum URL length and Maximum query string to 65534 (404.14/404.15), and the http.sys registry values MaxFieldLength and MaxRequestBytes to 65534 under HKLM\\SYSTEM\\CurrentControlSet\\Services\\HTTP\\Parameters, then reboot",
        ),
        Ok(status) => finding(check, Verdict::Warn, format!("a {len}-byte request-target gets {status}"), ""),
        Err(e) => finding(check, Verdict::Fail, e.to_string(), "a proxy or firewall between the gateway and NDES may cut long requests"),
    }
}

pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.verdict == Verdict::Fail)
}

pub fn render_text(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let server = f
            .server
            .as_ref()
            .map_or(String::new(), |s| format!("[{s}] "));
        let _ = writeln!(
            out,
            "{:<4}  {:<20} {server}{}",
            f.verdict.as_str(),
            f.check,
            f.detail
        );
        if !f.fix.is_empty() && f.verdict != Verdict::Pass {
            let _ = writeln!(out, "      {:<20} fix: {}", "", f.fix);
        }
    }
    let count = |v| findings.iter().filter(|f| f.verdict == v).count();
    let _ = writeln!(
        out,
        "{} passed, {} warnings, {} failed",
        count(Verdict::Pass),
        count(Verdict::Warn),
        count(Verdict::Fail)
    );
    out
}

pub fn render_json(findings: &[Finding]) -> String {
    let items: Vec<serde_json::Value> = findings
        .iter()
        .map(|f| {
            serde_json::json!({
                "check": f.check,
                "verdict": f.verdict.as_str(),
                "detail": f.detail,
                "fix": f.fix,
                "server": f.server,
            })
        })
        .collect();
    serde_json::json!({ "ok": !failed(findings), "findings": items }).to_string()
}
