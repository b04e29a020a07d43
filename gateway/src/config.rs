//! The configuration file: TOML, parsed once into typed values at start.
//!
//! Every default is a named constant next to the setting that uses it, with the IIS or client
//! behaviour it mirrors. `config/gateway.example.toml` documents every key. Durations are strings
//! in humantime's syntax: "10s", "2m", "500ms".

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// IIS request filtering `maxUrl` and http.sys `MaxFieldLength` as the NDES guide sets them. It is
/// also the hard ceiling of the `http` crate's URI type, so no configuration can go above it.
pub const MAX_URI_BYTES: usize = 65_534;
/// IIS request filtering `maxQueryString` as the NDES guide sets it.
pub const MAX_QUERY_BYTES: usize = 65_534;
/// http.sys `MaxRequestBytes` default is 16 KiB for the request line and headers together; headers
/// alone get the same 16 KiB here so a long SCEP request line never eats the header budget.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// A PKCSReq is 2.5 KB (RSA 2048) to 4 KB (RSA 4096) of DER; 64 KiB leaves room for large
/// chains in a renewal while keeping what one request can make the gateway buffer small.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// A client that has not sent a whole request head by then is slow or hostile (nginx's
/// client_header_timeout is 60 s; SCEP clients send their head at once).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A PKIOperation body is a few KB sent at once; a sender slower than this is not a SCEP client.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection with no request in flight is closed after this long. IIS's own
/// connectionTimeout is 120 s; devices enrol in a few requests and go away.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Enough for a large fleet enrolling at once; each idle TLS connection costs a few KiB.
pub const MAX_CONNECTIONS: usize = 10_000;
/// A Kubernetes Secret update reaches the pod within a minute or so; a few seconds more is fine.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// A PKIOperation can wait tens of seconds on Intune and the CA: long enough for those to finish,
/// short enough for a rolling update (Kubernetes' default grace period is 30 s).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
/// A device needs one connection; a whole office behind one NAT address rarely holds hundreds at
/// once, a client holding thousands is an attack.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 512;
/// A SCEP client sends one request at a time; a few streams leave room for retries and keep what
/// one connection can make the gateway hold small.
pub const MAX_CONCURRENT_STREAMS: u32 = 16;
/// A client that takes no response bytes for this long is not a SCEP client reading its answer:
/// a few KB go out in one flight to anything alive (nginx's send_timeout is 60 s; Apache's 60 s).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// IIS's own limit on header fields is its 16 KiB MaxRequestBytes; hyper's and nginx's parsers stop
/// at 100 fields. No SCEP client sends more than about ten.
pub const MAX_HEADER_COUNT: usize = 100;
/// Head to last byte of the answer: the body timeout, NDES's response timeout and a send window
/// fit inside with room to spare, so this only ends what no other limit caught.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// A CertRep or a GetCACert answer is a few KB (a long CA chain in PKCS#7 some tens); NDES's answer
/// is read whole before the client is written to, so this bounds what each request may hold.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// NDES waits on Intune's challenge validation and on the CA before it answers a PKIOperation;
/// Entra Application Proxy's 85 s default is known to be too short for it.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// Below IIS's 120 s connectionTimeout, so the gateway drops an idle upstream connection before
/// IIS does and never sends a request onto a connection that is being closed.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// As many as may be in flight: a burst that opened them is not followed by closing and reopening
/// connections (each a TLS handshake on NDES) while the load stays; the idle timeout closes them
/// once it has passed.
pub const POOL_MAX_IDLE: usize = 256;
/// Microsoft's sizing guide puts one NDES server at about 300 concurrent requests.
pub const MAX_IN_FLIGHT: usize = 256;
/// PKIOperations one NDES server works on at once. Each holds an IIS worker thread while NDES
/// waits on Intune and the CA; a renewal storm past this waits in the queue rather than piling
/// onto NDES until it times out everyone.
pub const MAX_PKIOPERATIONS_PER_SERVER: usize = 32;
/// PKIOperations waiting for one of those slots, over all servers; past it a request gets 503 at
/// once with Retry-After, and the device comes back later.
pub const PKIOPERATION_QUEUE: usize = 256;
/// GetCACaps and GetCACert answers change only when NDES's certificates do, and clients ask for
/// them before every PKIOperation: a minute's reuse halves the requests NDES sees.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// The admin listener stays on the host unless the operator moves it to the management network.
pub const ADMIN_ADDR: &str = "127.0.0.1:9180";
/// Readiness follows NDES within two probes; GetCACaps costs NDES next to nothing.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Certificates expire in months; an hourly look is plenty and costs NDES nothing.
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// The file as written, before anything is loaded from disk. Serialized, it is every setting in
/// force, defaults included, in the example config's order: what `check` prints.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub scep: ScepConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The file this was read from, which a reload reads again; `None` for a config parsed from
    /// text.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The keys that have no default. The sections' defaults would fill them in unnoticed, so a file
/// is read a second time into this, which serde refuses with the key's name when one is missing.
/// Only their presence counts: the values are never read.
#[derive(Deserialize)]
#[allow(dead_code)]
struct RequiredKeys {
    listen: RequiredListenKeys,
    upstream: RequiredUpstreamKeys,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct RequiredListenKeys {
    addr: IgnoredAny,
    /// Required unless `[listen.acme]` obtains the certificate; see [`Config::parse`].
    cert: Option<IgnoredAny>,
    key: Option<IgnoredAny>,
    acme: Option<IgnoredAny>,
}

/// `url` is required unless `[[upstream.server]]` entries name the servers; `validate` says so.
#[derive(Deserialize)]
#[allow(dead_code)]
struct RequiredUpstreamKeys {}

/// What to do when the RA certificates NDES hands out have expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExpiredRa {
    /// /readyz fails: devices cannot enrol anyway (NDES answers 500).
    #[default]
    Fail,
    /// Logged and exported only.
    Warn,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScepConfig {
    /// Refuse (400) a PKIOperation whose message is not a readable SCEP pkiMessage. Off by
    /// default: inspection then only logs and counts, and never changes what is forwarded.
    pub strict: bool,
    /// How often GetCACert is fetched from NDES to export the CA and RA certificates' expiry.
    #[serde(with = "humantime_serde")]
    pub cert_check_interval: Duration,
    pub expired_ra: ExpiredRa,
}

impl Default for ScepConfig {
    fn default() -> Self {
        ScepConfig {
            strict: false,
            cert_check_interval: CERT_CHECK_INTERVAL,
            expired_ra: ExpiredRa::Fail,
        }
    }
}

/// Requests per second and burst, per client address and for the whole gateway; 0 turns one off.
/// Off by default: many devices can share one carrier-grade NAT address.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub per_client_rps: f64,
    pub per_client_burst: u32,
    pub global_rps: f64,
    pub global_burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Plain HTTP: /metrics, /healthz, /readyz and nothing else.
    pub addr: SocketAddr,
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            addr: ADMIN_ADDR.parse().expect("a valid constant address"),
            enabled: true,
            probe_interval: PROBE_INTERVAL,
            probe_timeout: PROBE_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    /// PEM: the certificate for the public name first, then the intermediates to send. Empty
    /// (and not printed) when `[listen.acme]` obtains the certificate.
    #[serde(skip_serializing_if = "is_unset")]
    pub cert: PathBuf,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key.
    #[serde(skip_serializing_if = "is_unset")]
    pub key: PathBuf,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub http2: bool,
    pub max_concurrent_streams: u32,
    /// Require a PROXY protocol v1 or v2 header on every connection (behind an L4 load balancer).
    pub proxy_protocol: bool,
    /// CIDRs of proxies whose X-Forwarded-For is believed (an ingress next to the gateway).
    pub trusted_proxies: Vec<String>,
    /// On SIGTERM, how long requests in flight may take to finish before the process exits.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How often the certificate, key and CA files are looked at for a change (SIGHUP reloads at
    /// once).
    #[serde(with = "humantime_serde")]
    pub reload_check_interval: Duration,
    /// Connections one client address (an IPv6 client by its /64) may hold open at once; 0 turns
    /// the cap off.
    pub max_connections_per_client: usize,
    /// A client that accepts no response bytes for this long loses its stream (HTTP/2) or its
    /// connection (HTTP/1.1).
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// The certificate obtained and renewed by ACME instead of `cert` and `key`. Last: a table
    /// is printed after the section's plain keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeConfig>,
}

fn is_unset(path: &Path) -> bool {
    path.as_os_str().is_empty()
}

/// `addr`, `cert` and `key` have no default (see `RequiredKeys`); the values here only stand in
/// for them in a config built in code.
impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            addr: SocketAddr::from(([0, 0, 0, 0], 443)),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            http2: true,
            max_concurrent_streams: MAX_CONCURRENT_STREAMS,
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            drain_timeout: DRAIN_TIMEOUT,
            reload_check_interval: RELOAD_CHECK_INTERVAL,
            max_connections_per_client: MAX_CONNECTIONS_PER_CLIENT,
            send_timeout: SEND_TIMEOUT,
            acme: None,
        }
    }
}

/// The ACME challenge the gateway answers to prove it holds the domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum AcmeChallenge {
    /// On the public listener itself, by ALPN `acme-tls/1` (RFC 8737): a DMZ opens 443 only.
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// Plain HTTP on `http01_addr` (port 80 as the CA sees it).
    #[serde(rename = "http-01")]
    Http01,
}

/// `[listen.acme]`: the public certificate obtained and renewed from an ACME CA (RFC 8555).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL.
    pub directory: String,
    /// PEM trust anchors for the directory's TLS certificate (a private ACME server); the
    /// system roots otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// `mailto:` URLs the CA may write to about the account (expiry notices, incidents).
    #[serde(default)]
    pub contact: Vec<String>,
    /// The names in the certificate, the first one its subject.
    pub domains: Vec<String>,
    /// The account key and the certificate, kept across restarts (files 0600, folder 0700).
    pub state_dir: PathBuf,
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// Where the http-01 challenge is answered (port 80 as the CA reaches it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http01_addr: Option<SocketAddr>,
    /// External account binding, as commercial ACME CAs ask: the key id they gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eab_kid: Option<String>,
    /// The file holding the HMAC key they gave, base64url as they print it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eab_hmac_key_file: Option<PathBuf>,
}

impl AcmeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("listen.acme.{key}: {why}")));
        let Ok(uri) = self.directory.parse::<http::Uri>() else {
            return bad("directory", "is not an http(s) URL of an ACME directory");
        };
        // RFC 8555 wants TLS: in clear, anyone on the path could answer for the CA. Plain
        // http:// only to an ACME server on this host.
        let loopback = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<std::net::IpAddr>().ok())
            .is_some_and(|ip| ip.is_loopback())
            || uri.host() == Some("localhost");
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if loopback => {}
            Some("http") => {
                return bad(
                    "directory",
                    "http:// is allowed only to an ACME server on this host (127.0.0.1, ::1); use https://",
                )
            }
            _ => return bad("directory", "is not an http(s) URL of an ACME directory"),
        }
        if self.domains.is_empty() {
            return bad("domains", "names no domain");
        }
        for d in &self.domains {
            if d.starts_with("*.") {
                // A wildcard is validated by dns-01 only (RFC 8555, section 7.1.3), which the
                // gateway does not answer.
                return bad(
                    "domains",
                    &format!("{d:?}: a wildcard needs the dns-01 challenge; name each host"),
                );
            }
            let name = d.as_str();
            if name.is_empty()
                || rustls_pki_types::DnsName::try_from(name).is_err()
                || name.parse::<std::net::IpAddr>().is_ok()
            {
                return bad("domains", &format!("{d:?} is not a DNS name"));
            }
        }
        for c in &self.contact {
            if !c.starts_with("mailto:") {
                return bad("contact", &format!("{c:?} is not a mailto: URL"));
            }
        }
        if is_unset(&self.state_dir) {
            return bad("state_dir", "is empty");
        }
        match (self.challenge, self.http01_addr) {
            (AcmeChallenge::Http01, None) => {
                return bad("http01_addr", "is required with challenge = \"http-01\"")
            }
            (AcmeChallenge::TlsAlpn01, Some(_)) => {
                return bad(
                    "http01_addr",
                    "is for challenge = \"http-01\"; tls-alpn-01 is answered on listen.addr",
                )
            }
            _ => {}
        }
        if self.eab_kid.is_some() != self.eab_hmac_key_file.is_some() {
            return bad(
                "eab_kid",
                "eab_kid and eab_hmac_key_file go together (external account binding)",
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The full SCEP URL of NDES, path included: the one-server form. Several servers are
    /// `[[upstream.server]]` entries instead.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// PEM file of the trust anchors for the NDES certificate; the system roots are never used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The name the NDES certificate must carry, sent as SNI; defaults to the URL's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The Host header sent upstream; defaults to `server_name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_header: Option<String>,
    /// SHA-256 of the NDES certificate's SubjectPublicKeyInfo, base64 (Envoy's format).
    pub spki_sha256: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// Requests sent to one NDES server at once; more wait up to queue_timeout, then get 503.
    pub max_in_flight: usize,
    /// How long a request may wait for a slot (max_in_flight, max_pkioperations_per_server).
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// PKIOperations one server works on at once.
    pub max_pkioperations_per_server: usize,
    /// PKIOperations waiting for a slot, over all servers; past it: 503 with Retry-After.
    pub pkioperation_queue: usize,
    /// GetCACaps and GetCACert answers kept per server; 0 turns the cache off.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// NDES's answer is read whole, up to this many bytes, before the client is written to; a
    /// larger answer is a 502.
    pub max_response_bytes: usize,
    /// Request header names forwarded to NDES beside the fixed allowlist (Content-Type,
    /// User-Agent, Accept; Host, Content-Length and X-Forwarded-* are the gateway's own).
    pub forward_headers: Vec<String>,
    /// Several NDES servers behind the one public name (`[[upstream.server]]`).
    #[serde(rename = "server", skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerConfig>,
}

/// One NDES server of several: where it is and the name its certificate carries. Trust, timeouts
/// and limits are the `[upstream]` ones, shared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_header: Option<String>,
}

impl UpstreamConfig {
    /// Every NDES server, in the order given: the `[[upstream.server]]` entries, or the one
    /// `[upstream] url`.
    pub fn server_list(&self) -> Vec<ServerConfig> {
        if self.servers.is_empty() {
            vec![ServerConfig {
                url: self.url.clone(),
                server_name: self.server_name.clone(),
                host_header: self.host_header.clone(),
            }]
        } else {
            self.servers.clone()
        }
    }

    /// The `[upstream]` settings with `server`'s own in place of the one-server keys.
    pub fn for_server(&self, server: &ServerConfig) -> UpstreamConfig {
        UpstreamConfig {
            url: server.url.clone(),
            server_name: server.server_name.clone(),
            host_header: server.host_header.clone(),
            servers: Vec::new(),
            ..self.clone()
        }
    }

    /// What the log says NDES is: the URL, or the URLs.
    pub fn describe(&self) -> String {
        self.server_list()
            .iter()
            .map(|s| s.url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `url` has no default (see `RequiredKeys`); the empty one only stands in for it in a config
/// built in code.
impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: String::new(),
            ca: None,
            server_name: None,
            host_header: None,
            spki_sha256: Vec::new(),
            connect_timeout: CONNECT_TIMEOUT,
            response_timeout: RESPONSE_TIMEOUT,
            pool_idle_timeout: POOL_IDLE_TIMEOUT,
            pool_max_idle: POOL_MAX_IDLE,
            max_in_flight: MAX_IN_FLIGHT,
            queue_timeout: CONNECT_TIMEOUT,
            max_pkioperations_per_server: MAX_PKIOPERATIONS_PER_SERVER,
            pkioperation_queue: PKIOPERATION_QUEUE,
            cache_ttl: CACHE_TTL,
            max_response_bytes: MAX_RESPONSE_BYTES,
            forward_headers: Vec::new(),
            servers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_uri_bytes: usize,
    pub max_query_bytes: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Header fields in one request, over HTTP/1.1 and HTTP/2 alike.
    pub max_header_count: usize,
    /// One request, from its head to the last byte of its answer.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_uri_bytes: MAX_URI_BYTES,
            max_query_bytes: MAX_QUERY_BYTES,
            max_header_bytes: MAX_HEADER_BYTES,
            max_body_bytes: MAX_BODY_BYTES,
            header_timeout: HEADER_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
            max_header_count: MAX_HEADER_COUNT,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, `ndes_gateway=debug,hyper=info`... RUST_LOG wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// A configuration problem, said so that an operator can fix it: which file, which key, what.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// toml's error shows the line and what was expected there; for a duration it also says how to
/// write one, since `10` or `"10"` look right to anyone who has not read the example.
fn toml_error(e: toml::de::Error) -> ConfigError {
    let hint = if e.message().ends_with("expected a duration") {
        "write a duration as a string with its unit: \"10s\", \"2m\", \"500ms\"\n"
    } else {
        ""
    };
    ConfigError(format!("{e}{hint}"))
}

impl Config {
    /// Reads and parses the file. Relative certificate paths are taken relative to the file's
    /// folder, so a config and its certificates can move together.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        let mut config =
            Config::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        if let Some(base) = path.parent() {
            config.resolve_paths(base);
        }
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(toml_error)?;
        let required = toml::from_str::<RequiredKeys>(text).map_err(toml_error)?;
        let l = &required.listen;
        match (&l.acme, &l.cert, &l.key) {
            (None, None, _) => return Err(ConfigError(
                "listen: missing field `cert` (or a [listen.acme] section to obtain it)".into(),
            )),
            (None, _, None) => return Err(ConfigError(
                "listen: missing field `key` (or a [listen.acme] section to obtain it)".into(),
            )),
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => return Err(ConfigError(
                "listen.cert, listen.key: left out with [listen.acme], which obtains the certificate; give one or the other".into(),
            )),
            _ => {}
        }
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            // An unset path (cert and key with [listen.acme]) stays unset.
            if p.is_relative() && !is_unset(p) {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.listen.cert);
        fix(&mut self.listen.key);
        if let Some(ca) = self.upstream.ca.as_mut() {
            fix(ca);
        }
        if let Some(acme) = self.listen.acme.as_mut() {
            fix(&mut acme.state_dir);
            acme.ca
                .iter_mut()
                .chain(acme.eab_hmac_key_file.iter_mut())
                .for_each(fix);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        if l.max_uri_bytes == 0 || l.max_uri_bytes > MAX_URI_BYTES {
            return bad(
                "limits.max_uri_bytes",
                format!(
                    "{} is out of range: 1 to {MAX_URI_BYTES} (IIS maxUrl for NDES is 65534)",
                    l.max_uri_bytes
                ),
            );
        }
        if l.max_query_bytes == 0 || l.max_query_bytes > MAX_QUERY_BYTES {
            return bad(
                "limits.max_query_bytes",
                format!(
                    "{} is out of range: 1 to {MAX_QUERY_BYTES}",
                    l.max_query_bytes
                ),
            );
        }
        if l.max_header_bytes < 256 || l.max_header_bytes > 1024 * 1024 {
            return bad(
                "limits.max_header_bytes",
                format!("{} is out of range: 256 to 1048576", l.max_header_bytes),
            );
        }
        if l.max_body_bytes > 16 * 1024 * 1024 {
            return bad(
                "limits.max_body_bytes",
                format!("{} is over 16 MiB", l.max_body_bytes),
            );
        }
        // Far past any sensible value, and far from where adding them to a clock overflows.
        const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
        // Every duration, and whether zero means something (leave at once, never keep).
        for (key, d, zero_allowed) in [
            ("limits.header_timeout", l.header_timeout, false),
            ("limits.body_timeout", l.body_timeout, false),
            ("limits.request_timeout", l.request_timeout, false),
            ("listen.send_timeout", self.listen.send_timeout, false),
            (
                "listen.handshake_timeout",
                self.listen.handshake_timeout,
                false,
            ),
            ("listen.idle_timeout", self.listen.idle_timeout, false),
            ("listen.drain_timeout", self.listen.drain_timeout, true),
            (
                "listen.reload_check_interval",
                self.listen.reload_check_interval,
                false,
            ),
            (
                "upstream.connect_timeout",
                self.upstream.connect_timeout,
                false,
            ),
            (
                "upstream.response_timeout",
                self.upstream.response_timeout,
                false,
            ),
            (
                "upstream.pool_idle_timeout",
                self.upstream.pool_idle_timeout,
                true,
            ),
            ("upstream.queue_timeout", self.upstream.queue_timeout, false),
            ("upstream.cache_ttl", self.upstream.cache_ttl, true),
            ("admin.probe_interval", self.admin.probe_interval, false),
            ("admin.probe_timeout", self.admin.probe_timeout, false),
            (
                "scep.cert_check_interval",
                self.scep.cert_check_interval,
                false,
            ),
        ] {
            if d.is_zero() && !zero_allowed {
                return bad(key, "must be more than zero".to_owned());
            }
            if d > MAX_DURATION {
                return bad(key, "is over 30 days".to_owned());
            }
        }
        // The request's own deadline is a backstop: everything a request may wait for fits in
        // it, so it never cuts short what the other timeouts allow.
        let u = &self.upstream;
        let needed = l.body_timeout + u.queue_timeout + u.connect_timeout + u.response_timeout;
        if l.request_timeout < needed {
            return bad(
                "limits.request_timeout",
                format!(
                    "{} is shorter than limits.body_timeout + upstream.queue_timeout + upstream.connect_timeout + upstream.response_timeout = {}; raise it",
                    humantime::format_duration(l.request_timeout),
                    humantime::format_duration(needed)
                ),
            );
        }
        let r = &self.rate_limit;
        for (key, rps) in [
            ("rate_limit.per_client_rps", r.per_client_rps),
            ("rate_limit.global_rps", r.global_rps),
        ] {
            if !rps.is_finite() || (rps != 0.0 && !(0.000_001..=1_000_000.0).contains(&rps)) {
                return bad(
                    key,
                    format!("{rps} is out of range: 0 (off), or 0.000001 to 1000000"),
                );
            }
        }
        trusted_proxy_nets(&self.listen.trusted_proxies)?;
        if let Some(acme) = &self.listen.acme {
            acme.validate()?;
        }
        if l.max_header_count == 0 || l.max_header_count > 10_000 {
            return bad(
                "limits.max_header_count",
                format!("{} is out of range: 1 to 10000", l.max_header_count),
            );
        }
        let m = self.upstream.max_response_bytes;
        if !(1024..=64 * 1024 * 1024).contains(&m) {
            return bad(
                "upstream.max_response_bytes",
                format!("{m} is out of range: 1024 to 67108864"),
            );
        }
        for name in &self.upstream.forward_headers {
            forward_header_name(name)?;
        }
        // Far above what one process can serve, and far below what a semaphore can count.
        if !(1..=1_000_000).contains(&self.upstream.max_in_flight) {
            return bad(
                "upstream.max_in_flight",
                format!(
                    "{} is out of range: 1 to 1000000",
                    self.upstream.max_in_flight
                ),
            );
        }
        for (key, n) in [
            (
                "upstream.max_pkioperations_per_server",
                self.upstream.max_pkioperations_per_server,
            ),
            (
                "upstream.pkioperation_queue",
                self.upstream.pkioperation_queue,
            ),
        ] {
            if !(1..=1_000_000).contains(&n) {
                return bad(key, format!("{n} is out of range: 1 to 1000000"));
            }
        }
        self.validate_servers()?;
        if !(1..=10_000_000).contains(&self.listen.max_connections) {
            return bad(
                "listen.max_connections",
                format!(
                    "{} is out of range: 1 to 10000000",
                    self.listen.max_connections
                ),
            );
        }
        if self.listen.max_concurrent_streams == 0 {
            return bad(
                "listen.max_concurrent_streams",
                "must be at least 1".to_owned(),
            );
        }
        Ok(())
    }
}

impl Config {
    /// One server by `url`, or several by `[[upstream.server]]`, never both; each server once.
    fn validate_servers(&self) -> Result<(), ConfigError> {
        let u = &self.upstream;
        if u.servers.is_empty() {
            if u.url.is_empty() {
                return Err(ConfigError(
                    "upstream: missing field `url` (NDES's SCEP URL, e.g. https://ndes01.corp.contoso.com/certsrv/mscep/mscep.dll), or [[upstream.server]] entries for several NDES servers".to_owned(),
                ));
            }
            return Ok(());
        }
        if !u.url.is_empty() {
            return Err(ConfigError(
                "upstream.url and [[upstream.server]] are both set: give one NDES server by upstream.url, or several as [[upstream.server]] entries, not both".to_owned(),
            ));
        }
        let shared_name = [
            ("server_name", u.server_name.is_some()),
            ("host_header", u.host_header.is_some()),
        ]
        .into_iter()
        .find_map(|(key, set)| set.then_some(key));
        if let Some(key) = shared_name {
            return Err(ConfigError(format!(
                "upstream.{key}: with [[upstream.server]] entries, set {key} on each entry that needs it"
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in u.servers.iter().enumerate() {
            if s.url.is_empty() {
                return Err(ConfigError(format!(
                    "upstream.server[{i}]: missing field `url`"
                )));
            }
            if !seen.insert(s.url.trim_end_matches('/').to_ascii_lowercase()) {
                return Err(ConfigError(format!(
                    "upstream.server[{i}]: {} is listed twice",
                    s.url
                )));
            }
        }
        Ok(())
    }
}

/// Names `upstream.forward_headers` may not add: the gateway's own (it sets them), the hop-by-hop
/// set, and those known to make IIS do something else than answer SCEP: `Range` (MS15-034,
/// CVE-2015-1635, remote code execution in http.sys), `X-Original-URL` and `X-Rewrite-URL` (IIS
/// URL Rewrite may route on them, to /certsrv/mscep_admin/ for one).
pub const NEVER_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "range",
    "x-original-url",
    "x-rewrite-url",
];

/// A name `upstream.forward_headers` may add: a valid header name, none of [`NEVER_FORWARDED`].
pub fn forward_header_name(name: &str) -> Result<http::HeaderName, ConfigError> {
    let parsed = http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
        ConfigError(format!(
            "upstream.forward_headers: {name:?} is not a header name"
        ))
    })?;
    if NEVER_FORWARDED.contains(&parsed.as_str()) {
        return Err(ConfigError(format!(
            "upstream.forward_headers: {name:?} is never forwarded: the gateway sets it, it belongs to one hop, or it makes IIS do something else than answer SCEP"
        )));
    }
    Ok(parsed)
}

/// `listen.trusted_proxies` as networks: CIDRs, or single addresses.
pub fn trusted_proxy_nets(cidrs: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    cidrs
        .iter()
        .map(|c| {
            c.parse::<ipnet::IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ConfigError(format!(
                        "listen.trusted_proxies: {c:?} is not a CIDR (e.g. 10.0.0.0/8)"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const EXAMPLE: &str = include_str!("../../config/gateway.example.toml");

    const MINIMAL: &str = r#"
        [listen]
        addr = "127.0.0.1:8443"
        cert = "gw.pem"
        key = "gw.key"
        [upstream]
        url = "https://ndes.corp.test/certsrv/mscep/mscep.dll"
        ca = "root.pem"
    "#;

    #[test]
    fn defaults_mirror_the_ndes_guide() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.limits.max_uri_bytes, 65_534);
        assert_eq!(c.limits.max_query_bytes, 65_534);
        assert_eq!(c.limits.max_header_bytes, 16_384);
        assert_eq!(c.limits.max_body_bytes, 65_536);
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(120));
    }

    #[test]
    fn durations_are_strings() {
        let text = MINIMAL.replace("[upstream]", "[upstream]\nresponse_timeout = \"3m\"");
        let text = format!("{text}\n[limits]\nrequest_timeout = \"10m\"\n");
        assert_eq!(
            Config::parse(&text).unwrap().upstream.response_timeout,
            Duration::from_secs(180)
        );
        let text = MINIMAL.replace("[upstream]", "[upstream]\nresponse_timeout = \"soon\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("response_timeout")
                && err.contains("expected a duration")
                && err.contains("\"10s\""),
            "{err}"
        );
    }

    #[test]
    fn keys_without_a_default_are_named_when_missing() {
        for key in ["addr", "cert", "key", "url"] {
            let text: String = MINIMAL
                .lines()
                .filter(|line| !line.trim_start().starts_with(&format!("{key} = ")))
                .map(|line| format!("{line}\n"))
                .collect();
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(&format!("missing field `{key}`")), "{err}");
        }
    }

    #[test]
    fn several_servers_are_entries_and_never_beside_url() {
        let servers = MINIMAL.replace(
            "url = \"https://ndes.corp.test/certsrv/mscep/mscep.dll\"",
            "[[upstream.server]]\nurl = \"https://ndes01.corp.test/certsrv/mscep/mscep.dll\"\n[[upstream.server]]\nurl = \"https://ndes02.corp.test/certsrv/mscep/mscep.dll\"\nserver_name = \"ndes02.corp.test\"",
        );
        // `ca` follows the entries in MINIMAL: put it back under [upstream].
        let servers = servers
            .replace("        ca = \"root.pem\"\n", "")
            .replace("[upstream]", "[upstream]\nca = \"root.pem\"");
        let c = Config::parse(&servers).unwrap();
        let list = c.upstream.server_list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].server_name.as_deref(), Some("ndes02.corp.test"));
        assert_eq!(c.upstream.for_server(&list[0]).ca, c.upstream.ca);

        let both = servers.replace(
            "[upstream]\n",
            "[upstream]\nurl = \"https://ndes.corp.test/certsrv/mscep/mscep.dll\"\n",
        );
        let err = Config::parse(&both).unwrap_err().to_string();
        assert!(
            err.contains("upstream.url and [[upstream.server]] are both set"),
            "{err}"
        );

        let shared_name = servers.replace("[upstream]\n", "[upstream]\nserver_name = \"x\"\n");
        let err = Config::parse(&shared_name).unwrap_err().to_string();
        assert!(
            err.starts_with("upstream.server_name: with [[upstream.server]]"),
            "{err}"
        );

        let twice = servers.replace("ndes02.corp.test/certsrv", "ndes01.corp.test/certsrv");
        let err = Config::parse(&twice).unwrap_err().to_string();
        assert!(
            err.contains("upstream.server[1]") && err.contains("listed twice"),
            "{err}"
        );

        let no_url = servers.replace(
            "url = \"https://ndes01.corp.test/certsrv/mscep/mscep.dll\"",
            "",
        );
        let err = Config::parse(&no_url).unwrap_err().to_string();
        assert!(err.contains("missing field `url`"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = MINIMAL.replace("[upstream]", "[upstream]\nurll = \"x\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn the_example_config_parses_and_says_the_defaults() {
        let example = Config::parse(EXAMPLE).unwrap();
        let defaults = Config::parse(MINIMAL).unwrap();
        assert_eq!(
            format!("{:?}", example.limits),
            format!("{:?}", defaults.limits)
        );
        assert_eq!(example.listen.idle_timeout, defaults.listen.idle_timeout);
        assert_eq!(
            example.upstream.response_timeout,
            defaults.upstream.response_timeout
        );
        assert_eq!(
            example.upstream.pool_idle_timeout,
            defaults.upstream.pool_idle_timeout
        );
    }

    #[test]
    fn the_request_deadline_leaves_room_for_the_others() {
        let text = MINIMAL.replace("[upstream]", "[upstream]\nresponse_timeout = \"300s\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("limits.request_timeout"), "{err}");
        let text = format!("{text}\n[limits]\nrequest_timeout = \"340s\"\n");
        assert!(Config::parse(&text).is_ok());
        let text = MINIMAL.replace(
            "[upstream]",
            "[upstream]\nresponse_timeout = \"100000000s\"",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("over 30 days"), "{err}");
    }

    #[test]
    fn counts_a_semaphore_cannot_hold_are_refused() {
        let text = MINIMAL.replace(
            "[upstream]",
            "[upstream]\nmax_in_flight = 9223372036854775807",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("upstream.max_in_flight"), "{err}");
        let text = MINIMAL.replace(
            "[upstream]",
            "max_connections = 9223372036854775807\n[upstream]",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("listen.max_connections"), "{err}");
    }

    #[test]
    fn uri_limit_cannot_pass_the_uri_ceiling() {
        let text = format!("{MINIMAL}\n[limits]\nmax_uri_bytes = 65535\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("limits.max_uri_bytes"), "{err}");
    }

    /// `check` prints the config serialized, so each key it can print must be in the example,
    /// set or in a `# key = value` line, and each key the example names must be one it prints.
    #[test]
    fn the_example_config_names_every_key_check_prints() {
        let set: toml::Table = EXAMPLE.parse().unwrap();
        let mut named = keys_of(&set);
        // The example with its `# key = value` lines taken in: optional keys then have a value.
        let mut section = String::new();
        let mut all_set = String::new();
        for line in EXAMPLE.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = format!("{name}.");
            }
            let commented_key = line
                .strip_prefix("# ")
                .and_then(|l| l.split_once(" = "))
                .map(|(key, _)| key)
                .filter(|key| {
                    !key.is_empty()
                        && key
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                });
            match commented_key {
                Some(key) if named.insert(format!("{section}{key}")) => {
                    all_set.push_str(&line[2..])
                }
                _ => all_set.push_str(line),
            }
            all_set.push('\n');
        }
        let config = Config::parse(&all_set)
            .unwrap_or_else(|e| panic!("the example with its commented keys set: {e}"));
        let printed = keys_of(&toml::Table::try_from(&config).unwrap());
        let unnamed: Vec<_> = printed.difference(&named).collect();
        assert!(
            unnamed.is_empty(),
            "printed, not in the example: {unnamed:?}"
        );
        let unprinted: Vec<_> = named.difference(&printed).collect();
        assert!(
            unprinted.is_empty(),
            "in the example, never printed: {unprinted:?}"
        );
    }

    /// `section.key` of every value in `table`.
    fn keys_of(table: &toml::Table) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for (name, value) in table {
            match value {
                toml::Value::Table(section) => {
                    keys.extend(keys_of(section).into_iter().map(|k| format!("{name}.{k}")))
                }
                _ => {
                    keys.insert(name.clone());
                }
            }
        }
        keys
    }

    /// The example's `[listen.acme]` block, its optional keys set too (http01_addr aside: it
    /// goes with http-01 only), in place of cert and key.
    fn example_acme_text() -> String {
        let acme: String = EXAMPLE
            .lines()
            .filter_map(|line| line.strip_prefix("#   "))
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .filter(|line| {
                line.starts_with('[') || (line.contains(" = ") && !line.starts_with("http01_addr"))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let without_certificate = MINIMAL
            .replace("cert = \"gw.pem\"", "")
            .replace("key = \"gw.key\"", "");
        format!("{without_certificate}\n{acme}")
    }

    #[test]
    fn the_example_acme_section_parses_and_prints_back() {
        let text = example_acme_text();
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let acme = config.listen.acme.as_ref().unwrap();
        assert_eq!(acme.challenge, AcmeChallenge::TlsAlpn01);
        assert_eq!(acme.domains, ["scep.contoso.com"]);
        assert!(acme.eab_kid.is_some() && acme.eab_hmac_key_file.is_some());
        let printed = toml::to_string(&config).unwrap();
        assert!(!printed.contains("cert = "), "{printed}");
        let again = Config::parse(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(format!("{again:?}"), format!("{config:?}"));
    }

    #[test]
    fn acme_and_a_certificate_are_one_or_the_other() {
        let acme = "[listen.acme]\ndirectory = \"https://acme.test/dir\"\ndomains = [\"scep.acme.test\"]\nstate_dir = \"acme\"\n";
        let err = Config::parse(&format!("{MINIMAL}\n{acme}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("left out with [listen.acme]"), "{err}");
        let without = MINIMAL.replace("cert = \"gw.pem\"", "");
        let err = Config::parse(&without).unwrap_err().to_string();
        assert!(err.contains("missing field `cert`"), "{err}");
        let alone = without.replace("key = \"gw.key\"", "");
        assert!(Config::parse(&format!("{alone}\n{acme}")).is_ok());
        // In clear only to an ACME server on this host.
        let clear = acme.replace("https://acme.test", "http://acme.test");
        let err = Config::parse(&format!("{alone}\n{clear}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listen.acme.directory: http:// is allowed only"),
            "{err}"
        );
        let local = acme.replace("https://acme.test", "http://127.0.0.1:14000");
        assert!(Config::parse(&format!("{alone}\n{local}")).is_ok());
        for (extra, key) in [
            ("challenge = \"http-01\"", "listen.acme.http01_addr"),
            ("http01_addr = \"0.0.0.0:80\"", "listen.acme.http01_addr"),
            ("eab_kid = \"kid\"", "listen.acme.eab_kid"),
            ("contact = [\"pki@contoso.com\"]", "listen.acme.contact"),
        ] {
            let err = Config::parse(&format!("{alone}\n{acme}{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(key), "{extra}: {err}");
        }
        let wild = acme.replace("scep.acme.test", "*.acme.test");
        let err = Config::parse(&format!("{alone}\n{wild}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dns-01"), "{err}");
        let bad = acme.replace("scep.acme.test", "not a name");
        let err = Config::parse(&format!("{alone}\n{bad}"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("listen.acme.domains"), "{err}");
    }

    #[test]
    fn the_printed_config_reads_back_as_the_same_settings() {
        let text = MINIMAL.replace(
            "[upstream]",
            "[upstream]\nserver_name = \"ndes01.corp.test\"\nconnect_timeout = \"1s 500ms\"",
        );
        let text =
            format!("{text}\n[rate_limit]\nper_client_rps = 2.5\n[log]\nformat = \"json\"\n");
        let config = Config::parse(&text).unwrap();
        let printed = toml::to_string(&config).unwrap();
        assert!(
            printed.contains("connect_timeout = \"1s 500ms\""),
            "{printed}"
        );
        let again = Config::parse(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(format!("{again:?}"), format!("{config:?}"));
    }
}
