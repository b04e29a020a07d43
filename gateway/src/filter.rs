//! Request filtering, IIS-equivalent, at the edge: only what NDES would accept from a SCEP client
//! gets through, and everything else is answered here, never forwarded.
//!
//! The filter reads the request head once and turns it into a [`ScepRequest`] ("parse, don't
//! validate"), or a [`Rejection`] that carries its status, its metric label and the config key an
//! operator would change.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
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
}

impl RejectReason {
    pub const ALL: [RejectReason; 15] = [
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
}

impl From<&LimitsConfig> for RequestLimits {
    fn from(c: &LimitsConfig) -> Self {
        RequestLimits {
            max_uri_bytes: c.max_uri_bytes,
            max_query_bytes: c.max_query_bytes,
            max_header_bytes: c.max_header_bytes,
            max_body_bytes: c.max_body_bytes,
        }
    }
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
        let content_length = check_framing(headers)?;

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
        } else if content_length.is_some_and(|l| l > 0) {
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

/// One unambiguous body length, or none. A Transfer-Encoding is refused outright: NDES (IIS) takes
/// no chunked uploads by default and every SCEP client sends a Content-Length, and hyper, which
/// lets Transfer-Encoding win over a Content-Length as RFC 9112 says, hides the Content-Length
/// from us: refusing both is the only way to refuse the pair, the classic smuggling vector.
fn check_framing(headers: &HeaderMap) -> Result<Option<u64>, Rejection> {
    let ambiguous = |detail: &str| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            RejectReason::AmbiguousFraming,
            detail.to_owned(),
        )
    };
    if headers.contains_key(TRANSFER_ENCODING) {
        return Err(ambiguous(
            "Transfer-Encoding is not accepted: send the body with a Content-Length, as NDES requires",
        ));
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return Ok(None);
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
    Ok(Some(parsed))
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
    use http::HeaderValue;

    fn limits() -> RequestLimits {
        RequestLimits::from(&LimitsConfig::default())
    }

    fn check(method: Method, target: &str) -> Result<ScepRequest, Rejection> {
        let uri: Uri = target.parse().unwrap();
        limits().check(&method, &uri, Version::HTTP_11, &HeaderMap::new())
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
            let mut h = HeaderMap::new();
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
        assert_eq!(run(&[("content-length", "65536")]), 200);
        assert_eq!(run(&[("content-length", "65537")]), 413);
        assert_eq!(run(&[("content-type", "text/html")]), 415);
        assert_eq!(
            run(&[("content-type", "Application/X-PKI-Message; charset=x")]),
            200
        );
    }
}
