//! Request filtering, IIS-equivalent, at the edge: only what NDES would accept from a SCEP client
//! gets through, and everything else is answered here, never forwarded.
//!
//! The filter reads the request head once and turns it into a [`ScepRequest`] ("parse, don't
//! validate"), or a [`Rejection`] that carries its status, its metric label and the config key an
//! operator would change.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Uri, Version};

use crate::config::LimitsConfig;

/// The two public SCEP paths: NDES's, and the RFC 8894 suffix Windows MDM appends to it.
pub const SCEP_PATH: &str = "/certsrv/mscep/mscep.dll";
pub const PKICLIENT_SUFFIX: &str = "/pkiclient.exe";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScepOperation {
    GetCaCaps,
    GetCaCert,
    GetNextCaCert,
    PkiOperation,
}

impl ScepOperation {
    fn parse(value: &str) -> Option<ScepOperation> {
        const ALL: [(&str, ScepOperation); 4] = [
            ("GetCACaps", ScepOperation::GetCaCaps),
            ("GetCACert", ScepOperation::GetCaCert),
            ("GetNextCACert", ScepOperation::GetNextCaCert),
            ("PKIOperation", ScepOperation::PkiOperation),
        ];
        ALL.iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(value))
            .map(|(_, op)| *op)
    }

    /// The name as RFC 8894 spells it; also the `operation` label in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ScepOperation::GetCaCaps => "GetCACaps",
            ScepOperation::GetCaCert => "GetCACert",
            ScepOperation::GetNextCaCert => "GetNextCACert",
            ScepOperation::PkiOperation => "PKIOperation",
        }
    }
}

/// Which of the two public paths was asked for; the suffix is kept on the way upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScepPath {
    Dll,
    PkiClientExe,
}

/// A request the filter let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScepRequest {
    /// `None` for a GET of the bare path: the seed's validation step (NDES answers 403 once the
    /// Intune policy module is installed).
    pub operation: Option<ScepOperation>,
    pub path: ScepPath,
}

/// Why a request was refused. The label is the metric's `reason`; the key the setting to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    UriTooLong,
    QueryTooLong,
    HeadersTooLarge,
    BodyTooLarge,
    PathNotPublished,
    MethodNotAllowed,
    MissingOperation,
    UnknownOperation,
    AmbiguousOperation,
    AmbiguousFraming,
    BodyNotAllowed,
    UnsupportedMediaType,
    BodyTimeout,
    ScepUnparsable,
    BadRequest,
    TooManyHeaders,
    MissingHost,
    Fragment,
    SendTimeout,
    RequestTimeout,
    ClientCancelled,
}

impl RejectReason {
    pub const ALL: [RejectReason; 21] = [
        RejectReason::UriTooLong,
        RejectReason::QueryTooLong,
        RejectReason::HeadersTooLarge,
        RejectReason::BodyTooLarge,
        RejectReason::PathNotPublished,
        RejectReason::MethodNotAllowed,
        RejectReason::MissingOperation,
        RejectReason::UnknownOperation,
        RejectReason::AmbiguousOperation,
        RejectReason::AmbiguousFraming,
        RejectReason::BodyNotAllowed,
        RejectReason::UnsupportedMediaType,
        RejectReason::BodyTimeout,
        RejectReason::ScepUnparsable,
        RejectReason::BadRequest,
        RejectReason::TooManyHeaders,
        RejectReason::MissingHost,
        RejectReason::Fragment,
        RejectReason::SendTimeout,
        RejectReason::RequestTimeout,
        RejectReason::ClientCancelled,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectReason::UriTooLong => "uri_too_long",
            RejectReason::QueryTooLong => "query_too_long",
            RejectReason::HeadersTooLarge => "headers_too_large",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::PathNotPublished => "path_not_published",
            RejectReason::MethodNotAllowed => "method_not_allowed",
            RejectReason::MissingOperation => "missing_operation",
            RejectReason::UnknownOperation => "unknown_operation",
            RejectReason::AmbiguousOperation => "ambiguous_operation",
            RejectReason::AmbiguousFraming => "ambiguous_framing",
            RejectReason::BodyNotAllowed => "body_not_allowed",
            RejectReason::UnsupportedMediaType => "unsupported_media_type",
            RejectReason::BodyTimeout => "body_timeout",
            RejectReason::ScepUnparsable => "scep_unparsable",
            RejectReason::BadRequest => "bad_request",
            RejectReason::TooManyHeaders => "too_many_headers",
            RejectReason::MissingHost => "missing_host",
            RejectReason::Fragment => "fragment",
            RejectReason::SendTimeout => "send_timeout",
            RejectReason::RequestTimeout => "request_timeout",
            RejectReason::ClientCancelled => "client_cancelled",
        }
    }
}

/// A refusal, answered by the gateway itself with a short text/plain reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: RejectReason,
    pub detail: String,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Rejection {
    fn new(status: StatusCode, reason: RejectReason, detail: String) -> Rejection {
        Rejection {
            status,
            reason,
            detail,
            allow: None,
        }
    }

    fn limit(
        status: StatusCode,
        reason: RejectReason,
        what: &str,
        size: usize,
        limit: usize,
        key: &str,
    ) -> Rejection {
        Rejection::new(
            status,
            reason,
            format!("{what} is {size} bytes, over the limit of {limit} ({key})"),
        )
    }

    /// The body sent to the client: the status, then why, with the config key where one applies.
    pub fn body(&self) -> String {
        format!(
            "{} {}: {}\n",
            self.status.as_str(),
            self.status.canonical_reason().unwrap_or(""),
            self.detail
        )
    }
}

/// The limits as the filter applies them; built once from the config.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_uri_bytes: usize,
    pub max_query_bytes: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub max_header_count: usize,
}

impl From<&LimitsConfig> for RequestLimits {
    fn from(c: &LimitsConfig) -> Self {
        RequestLimits {
            max_uri_bytes: c.max_uri_bytes,
            max_query_bytes: c.max_query_bytes,
            max_header_bytes: c.max_header_bytes,
            max_body_bytes: c.max_body_bytes,
            max_header_count: c.max_header_count,
        }
    }
}

/// What the HTTP/1.1 parser saw on the wire and the parsed request no longer shows: a `#` in the
/// request-target (the URI type cuts the target there) and a Content-Length beside a
/// Transfer-Encoding (the parser drops the length). Found by the edge's own read of the bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WireFacts {
    pub fragment: bool,
    pub length_and_chunked: bool,
}

/// The length of the request-target as the client sent it: the `:path` over HTTP/2; over
/// HTTP/1.1 the origin form, or the whole absolute form when a client sent one.
pub fn request_target_len(uri: &Uri, version: Version) -> usize {
    let pq = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    match (version, uri.scheme(), uri.authority()) {
        (Version::HTTP_2, _, _) => pq,
        (_, Some(scheme), Some(authority)) => {
            scheme.as_str().len() + 3 + authority.as_str().len() + pq
        }
        (_, None, Some(authority)) => authority.as_str().len(),
        _ => pq,
    }
}

/// The header section's size as it would stand on the wire in HTTP/1.1, `name: value\r\n` per
/// field, without the request line (IIS and http.sys count them apart too).
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

impl RequestLimits {
    /// Decides on a request from its head alone, so a refused request is answered before its body
    /// is read. The checks run cheapest and most telling first: sizes, framing, path, method,
    /// operation, body type.
    pub fn check(
        &self,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
    ) -> Result<ScepRequest, Rejection> {
        self.check_wire(method, uri, version, headers, WireFacts::default())
    }

    /// The same, with what the edge saw of the request on the wire.
    pub fn check_wire(
        &self,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
        wire: WireFacts,
    ) -> Result<ScepRequest, Rejection> {
        if wire.fragment {
            // RFC 9112 §3.2: a request-target has no fragment; NDES and the gateway could read
            // what follows the `#` differently, so it is refused, never cut off and forwarded.
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                RejectReason::Fragment,
                "a request-target carries no fragment ('#')".to_owned(),
            ));
        }
        let target = request_target_len(uri, version);
        if target > self.max_uri_bytes {
            return Err(Rejection::limit(
                StatusCode::URI_TOO_LONG,
                RejectReason::UriTooLong,
                "the request-target",
                target,
                self.max_uri_bytes,
                "limits.max_uri_bytes",
            ));
        }
        let query = uri.query();
        let query_len = query.map_or(0, str::len);
        if query_len > self.max_query_bytes {
            return Err(Rejection::limit(
                StatusCode::URI_TOO_LONG,
                RejectReason::QueryTooLong,
                "the query string",
                query_len,
                self.max_query_bytes,
                "limits.max_query_bytes",
            ));
        }
        if headers.len() > self.max_header_count {
            return Err(Rejection::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                RejectReason::TooManyHeaders,
                format!(
                    "the request has {} header fields, over the limit of {} (limits.max_header_count)",
                    headers.len(),
                    self.max_header_count
                ),
            ));
        }
        let head = header_bytes(headers);
        if head > self.max_header_bytes {
            return Err(Rejection::limit(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                RejectReason::HeadersTooLarge,
                "the request header section",
                head,
                self.max_header_bytes,
                "limits.max_header_bytes",
            ));
        }
        if version == Version::HTTP_11 {
            let hosts = headers.get_all(HOST).iter().count();
            if hosts != 1 {
                // RFC 9112 §3.2: none, or more than one, is a 400.
                return Err(Rejection::new(
                    StatusCode::BAD_REQUEST,
                    RejectReason::MissingHost,
                    format!("an HTTP/1.1 request carries exactly one Host header, not {hosts}"),
                ));
            }
        }
        if wire.length_and_chunked {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                RejectReason::AmbiguousFraming,
                "Content-Length and Transfer-Encoding together: send one of them".to_owned(),
            ));
        }
        let (content_length, chunked) = check_framing(headers)?;

        let path = scep_path(uri.path()).ok_or_else(|| {
            Rejection::new(
                StatusCode::NOT_FOUND,
                RejectReason::PathNotPublished,
                format!("only {SCEP_PATH} and {SCEP_PATH}{PKICLIENT_SUFFIX} are published here"),
            )
        })?;

        if method != Method::GET && method != Method::POST {
            return Err(Rejection {
                allow: Some("GET, POST"),
                ..Rejection::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    RejectReason::MethodNotAllowed,
                    format!("{method} is not a SCEP method; GET for every operation, POST for PKIOperation"),
                )
            });
        }

        let operation = match query {
            None | Some("") if method == Method::GET => None,
            _ => Some(operation_of(query.unwrap_or(""))?),
        };

        if method == Method::POST {
            if operation != Some(ScepOperation::PkiOperation) {
                let name = operation.map_or("", ScepOperation::as_str);
                return Err(Rejection {
                    allow: Some("GET"),
                    ..Rejection::new(
                        StatusCode::METHOD_NOT_ALLOWED,
                        RejectReason::MethodNotAllowed,
                        format!("POST is for PKIOperation only; {name} is sent with GET"),
                    )
                });
            }
            if let Some(len) = content_length {
                if len > self.max_body_bytes as u64 {
                    return Err(Rejection::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        RejectReason::BodyTooLarge,
                        format!(
                            "the body is {len} bytes, over the limit of {} (limits.max_body_bytes)",
                            self.max_body_bytes
                        ),
                    ));
                }
            }
            check_pki_message_type(headers)?;
        } else if chunked || content_length.is_some_and(|l| l > 0) {
            // A GET with a body is a framing trick, not SCEP: nothing upstream would read it.
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                RejectReason::BodyNotAllowed,
                "a GET request carries no body in SCEP".to_owned(),
            ));
        }

        Ok(ScepRequest { operation, path })
    }
}

/// IIS routes paths case-insensitively, so Windows clients that change the case still work; any
/// other spelling (a trailing slash, dot segments, percent-encoding) is not the SCEP path.
fn scep_path(path: &str) -> Option<ScepPath> {
    let rest = path
        .get(..SCEP_PATH.len())
        .filter(|p| p.eq_ignore_ascii_case(SCEP_PATH))?;
    match &path[rest.len()..] {
        "" => Some(ScepPath::Dll),
        s if s.eq_ignore_ascii_case(PKICLIENT_SUFFIX) => Some(ScepPath::PkiClientExe),
        _ => None,
    }
}

/// The `operation` parameter, by name in any case and at any place (scepclient sends `message`
/// first). The query is only split, never decoded: what goes upstream is the original bytes.
fn operation_of(query: &str) -> Result<ScepOperation, Rejection> {
    let mut found: Option<ScepOperation> = None;
    for pair in crate::scep::query_pairs(query) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key.contains('%') {
            // NDES may decode a name the filter reads as written: `%6Fperation` would be a second
            // operation the filter never saw. No SCEP client encodes a parameter name.
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                RejectReason::AmbiguousOperation,
                "percent-encoded parameter names are not accepted".to_owned(),
            ));
        }
        if !key.eq_ignore_ascii_case("operation") {
            continue;
        }
        let op = ScepOperation::parse(value).ok_or_else(|| {
            let shown: String = value.chars().take(40).collect();
            Rejection::new(
                StatusCode::BAD_REQUEST,
                RejectReason::UnknownOperation,
                format!("unknown SCEP operation {shown:?}; expected GetCACaps, GetCACert, GetNextCACert or PKIOperation"),
            )
        })?;
        if found.is_some_and(|f| f != op) {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                RejectReason::AmbiguousOperation,
                "the operation parameter is given twice with different values".to_owned(),
            ));
        }
        found = Some(op);
    }
    found.ok_or_else(|| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            RejectReason::MissingOperation,
            "no operation parameter in the query string".to_owned(),
        )
    })
}

/// One unambiguous body length, or none, and whether the body comes chunked. Chunked alone is
/// accepted (Java and Go SCEP clients stream bodies that way; the gateway reads the body whole and
/// sends it on with a length). With a Content-Length beside it (which the parser hides, see
/// [`WireFacts`]), with any other coding, or written any other way, it is the classic smuggling
/// vector and refused.
fn check_framing(headers: &HeaderMap) -> Result<(Option<u64>, bool), Rejection> {
    let ambiguous = |detail: &str| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            RejectReason::AmbiguousFraming,
            detail.to_owned(),
        )
    };
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter();
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    if let Some(coding) = codings.next() {
        let chunked = coding
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !chunked || codings.next().is_some() {
            return Err(ambiguous(
                "the only Transfer-Encoding accepted is chunked, once, alone",
            ));
        }
        if lengths.next().is_some() {
            return Err(ambiguous(
                "Content-Length and Transfer-Encoding together: send one of them",
            ));
        }
        return Ok((None, true));
    }
    let Some(first) = lengths.next() else {
        return Ok((None, false));
    };
    let parsed = first
        .to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| ambiguous("invalid Content-Length"))?;
    if lengths.any(|other| other != first) {
        return Err(ambiguous("more than one Content-Length"));
    }
    Ok((Some(parsed), false))
}

/// scepclient posts application/octet-stream, the RFC says application/x-pki-message, sscep
/// sends no type at all: those three, and nothing else.
fn check_pki_message_type(headers: &HeaderMap) -> Result<(), Rejection> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if essence.eq_ignore_ascii_case("application/x-pki-message")
        || essence.eq_ignore_ascii_case("application/octet-stream")
    {
        return Ok(());
    }
    Err(Rejection::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        RejectReason::UnsupportedMediaType,
        "a PKIOperation body is application/x-pki-message or application/octet-stream".to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn limits() -> RequestLimits {
        RequestLimits::from(&LimitsConfig::default())
    }

    fn check(method: Method, target: &str) -> Result<ScepRequest, Rejection> {
        let uri: Uri = target.parse().unwrap();
        limits().check(&method, &uri, Version::HTTP_11, &host())
    }

    fn host() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("scep.example.test"));
        h
    }

    fn status(r: Result<ScepRequest, Rejection>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(rej) => rej.status.as_u16(),
        }
    }

    #[test]
    fn operation_in_any_case_and_any_order() {
        let r = check(
            Method::GET,
            "/certsrv/mscep/mscep.dll?message=abc&OPERATION=getcacaps",
        )
        .unwrap();
        assert_eq!(r.operation, Some(ScepOperation::GetCaCaps));
        let r = check(
            Method::GET,
            "/CertSrv/MSCEP/mscep.dll/PKIClient.exe?operation=PKIOperation&message=a+b/c",
        )
        .unwrap();
        assert_eq!(
            (r.operation, r.path),
            (Some(ScepOperation::PkiOperation), ScepPath::PkiClientExe)
        );
    }

    #[test]
    fn bare_path_goes_through_for_the_403_check() {
        assert_eq!(
            check(Method::GET, "/certsrv/mscep/mscep.dll")
                .unwrap()
                .operation,
            None
        );
    }

    #[test]
    fn other_paths_are_not_published() {
        for p in [
            "/",
            "/certsrv/mscep_admin/",
            "/certsrv/mscep/mscep.dll/",
            "/certsrv/mscep/mscep.dll/../mscep_admin/",
            "/certsrv/mscep/%6Dscep.dll",
            "/CertificateRegistrationSvc",
            "/certsrv/mscep/mscep.dllx",
        ] {
            assert_eq!(status(check(Method::GET, p)), 404, "{p}");
        }
    }

    #[test]
    fn methods_and_operations() {
        assert_eq!(
            status(check(Method::GET, "/certsrv/mscep/mscep.dll?operation=Foo")),
            400
        );
        assert_eq!(
            status(check(Method::GET, "/certsrv/mscep/mscep.dll?message=x")),
            400
        );
        assert_eq!(
            status(check(
                Method::GET,
                "/certsrv/mscep/mscep.dll?operation=GetCACaps&operation=PKIOperation"
            )),
            400
        );
        assert_eq!(
            status(check(
                Method::GET,
                "/certsrv/mscep/mscep.dll?operation=GetCACaps&%6Fperation=GetCRL"
            )),
            400
        );
        let put = check(Method::PUT, "/certsrv/mscep/mscep.dll?operation=GetCACaps").unwrap_err();
        assert_eq!((put.status.as_u16(), put.allow), (405, Some("GET, POST")));
        let post = check(Method::POST, "/certsrv/mscep/mscep.dll?operation=GetCACert").unwrap_err();
        assert_eq!((post.status.as_u16(), post.allow), (405, Some("GET")));
        assert_eq!(
            status(check(
                Method::POST,
                "/certsrv/mscep/mscep.dll?operation=PKIOperation"
            )),
            200
        );
    }

    #[test]
    fn limits_at_the_edge_and_one_past() {
        let base = "/certsrv/mscep/mscep.dll?operation=PKIOperation&message=";
        let at = format!("{base}{}", "A".repeat(65_534 - base.len()));
        assert_eq!(status(check(Method::GET, &at)), 200);
        let mut l = limits();
        l.max_uri_bytes = 100;
        l.max_query_bytes = 50;
        let uri: Uri = format!(
            "/certsrv/mscep/mscep.dll?operation=GetCACaps&message={}",
            "a".repeat(40)
        )
        .parse()
        .unwrap();
        let rej = l
            .check(&Method::GET, &uri, Version::HTTP_11, &HeaderMap::new())
            .unwrap_err();
        assert_eq!(
            (rej.status.as_u16(), rej.reason),
            (414, RejectReason::QueryTooLong)
        );
        assert!(
            rej.body().contains("limits.max_query_bytes"),
            "{}",
            rej.body()
        );
    }

    #[test]
    fn host_fragment_and_header_count() {
        let uri: Uri = "/certsrv/mscep/mscep.dll?operation=GetCACaps"
            .parse()
            .unwrap();
        let l = limits();
        let none = l.check(&Method::GET, &uri, Version::HTTP_11, &HeaderMap::new());
        assert_eq!(none.unwrap_err().reason, RejectReason::MissingHost);
        let mut two = host();
        two.append(HOST, HeaderValue::from_static("other.test"));
        let two = l.check(&Method::GET, &uri, Version::HTTP_11, &two);
        assert_eq!(two.unwrap_err().reason, RejectReason::MissingHost);
        // HTTP/1.0 and HTTP/2 (:authority) need no Host header.
        assert!(l
            .check(&Method::GET, &uri, Version::HTTP_10, &HeaderMap::new())
            .is_ok());
        assert!(l
            .check(&Method::GET, &uri, Version::HTTP_2, &HeaderMap::new())
            .is_ok());
        let wire = WireFacts {
            fragment: true,
            length_and_chunked: false,
        };
        let frag = l.check_wire(&Method::GET, &uri, Version::HTTP_11, &host(), wire);
        assert_eq!(frag.unwrap_err().status, StatusCode::BAD_REQUEST);
        let mut h = host();
        for i in 0..99 {
            h.insert(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        assert!(l.check(&Method::GET, &uri, Version::HTTP_2, &h).is_ok());
        h.insert("x-one-more", HeaderValue::from_static("1"));
        let over = l
            .check(&Method::GET, &uri, Version::HTTP_2, &h)
            .unwrap_err();
        assert_eq!(
            (over.status.as_u16(), over.reason),
            (431, RejectReason::TooManyHeaders)
        );
        assert!(
            over.body().contains("limits.max_header_count"),
            "{}",
            over.body()
        );
    }

    #[test]
    fn headers_counted_as_on_the_wire() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("12345"));
        assert_eq!(header_bytes(&h), "x-a: 12345\r\n".len());
    }

    #[test]
    fn framing_and_body_types() {
        let uri: Uri = "/certsrv/mscep/mscep.dll?operation=PKIOperation"
            .parse()
            .unwrap();
        let run = |pairs: &[(&'static str, &'static str)]| {
            let mut h = host();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            status(limits().check(&Method::POST, &uri, Version::HTTP_11, &h))
        };
        assert_eq!(
            run(&[("content-length", "10"), ("transfer-encoding", "chunked")]),
            400
        );
        assert_eq!(
            run(&[("content-length", "10"), ("content-length", "11")]),
            400
        );
        assert_eq!(run(&[("content-length", "+10")]), 400);
        assert_eq!(run(&[("transfer-encoding", "chunked")]), 200);
        assert_eq!(run(&[("transfer-encoding", "Chunked ")]), 200);
        assert_eq!(run(&[("transfer-encoding", "chunked, identity")]), 400);
        assert_eq!(run(&[("transfer-encoding", "gzip")]), 400);
        assert_eq!(
            run(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ]),
            400
        );
        assert_eq!(run(&[("content-length", "65536")]), 200);
        assert_eq!(run(&[("content-length", "65537")]), 413);
        assert_eq!(run(&[("content-type", "text/html")]), 415);
        assert_eq!(
            run(&[("content-type", "Application/X-PKI-Message; charset=x")]),
            200
        );
    }
}
