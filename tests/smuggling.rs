//! Request smuggling: every ambiguous framing is refused before anything reaches NDES, and what
//! is forwarded is framed one way only (the upstream's received requests are checked).

mod common;

use common::*;

const POST: &str = "POST /certsrv/mscep/mscep.dll?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n";
const GET: &str = "GET /certsrv/mscep/mscep.dll?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n";
/// A request hidden in a body, in case something reads the body as the next request.
const HIDDEN: &str = "GET /certsrv/mscep_admin/ HTTP/1.1\r\nHost: x\r\n\r\n";

/// Forms from the usual smuggling probes (CL.TE, TE.CL, TE.TE obfuscations, bad lengths, line
/// ending and folding tricks): each must be refused (400, or the connection closed) with nothing
/// forwarded.
fn refused_forms() -> Vec<(&'static str, String)> {
    let chunked_body = format!("0\r\n\r\n{HIDDEN}");
    vec![
        ("CL.TE", format!("{POST}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}")),
        ("TE.CL", format!("{POST}Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n{chunked_body}")),
        ("TE alone", format!("{POST}Transfer-Encoding: chunked\r\n\r\n{chunked_body}")),
        ("TE upper case", format!("{POST}Transfer-Encoding: CHUNKED\r\n\r\n{chunked_body}")),
        ("TE tab", format!("{POST}Transfer-Encoding:\tchunked\r\n\r\n{chunked_body}")),
        ("TE xchunked", format!("{POST}Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\nabcd")),
        ("TE chunked, identity", format!("{POST}Transfer-Encoding: chunked, identity\r\n\r\n{chunked_body}")),
        ("TE twice", format!("{POST}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n{chunked_body}")),
        ("TE space before colon", format!("{POST}Transfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\nabcd")),
        ("CL space before colon", format!("{POST}Content-Length : 4\r\n\r\nabcd")),
        ("TE obs-fold", format!("{POST}X-Padding: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\nabcd")),
        ("TE folded value", format!("{POST}Transfer-Encoding:\r\n chunked\r\n\r\n{chunked_body}")),
        ("two Content-Lengths", format!("{POST}Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd")),
        ("Content-Length list", format!("{POST}Content-Length: 4, 40\r\n\r\nabcd")),
        ("Content-Length sign", format!("{POST}Content-Length: +4\r\n\r\nabcd")),
        ("Content-Length hex", format!("{POST}Content-Length: 0x4\r\n\r\nabcd")),
        ("Content-Length negative", format!("{POST}Content-Length: -1\r\n\r\nabcd")),
        ("Content-Length huge", format!("{POST}Content-Length: 99999999999999999999\r\n\r\nabcd")),
        ("NUL in a header", format!("{POST}Content-Length: 4\r\nX-A: a\0b\r\n\r\nabcd")),
        ("header name with a space", format!("{POST}Content Length: 4\r\n\r\nabcd")),
        ("GET with TE", format!("{GET}Transfer-Encoding: chunked\r\n\r\n{chunked_body}")),
        ("GET with a body", format!("{GET}Content-Length: {}\r\n\r\n{HIDDEN}", HIDDEN.len())),
        ("HTTP/1.0 with TE", format!("POST /certsrv/mscep/mscep.dll?operation=PKIOperation HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}")),
        ("double space in request line", "POST  /certsrv/mscep/mscep.dll?operation=PKIOperation HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd".to_owned()),
        ("bare CR", "POST /certsrv/mscep/mscep.dll?operation=PKIOperation HTTP/1.1\rHost: x\r\nContent-Length: 4\r\n\r\nabcd".to_owned()),
    ]
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_nothing_reaches_ndes() {
    let s = Setup::new().await;
    for (name, request) in refused_forms() {
        let r = s.raw(request.as_bytes()).await;
        assert!(
            r.status_line.is_empty() || r.status_line.starts_with("HTTP/1.1 400"),
            "{name}: answered {:?}",
            r.status_line
        );
        assert_eq!(s.upstream.count(), 0, "{name}: forwarded");
    }
    // And the gateway still serves.
    assert_eq!(
        s.get(&format!("{SCEP}?operation=GetCACaps"))
            .await
            .status_line,
        "HTTP/1.1 200 OK"
    );
}

#[tokio::test]
async fn what_is_forwarded_is_framed_one_way_only() {
    let s = Setup::new().await;
    // A body that looks like a request is a body: one POST upstream, its bytes intact.
    let req = format!(
        "{POST}Content-Length: {}\r\nConnection: close\r\n\r\n{HIDDEN}",
        HIDDEN.len()
    );
    assert_eq!(s.raw(req.as_bytes()).await.status_line, "HTTP/1.1 200 OK");
    assert_eq!(s.upstream.count(), 1);
    let seen = s.upstream.last();
    assert_eq!(
        (seen.method.as_str(), &seen.body[..]),
        ("POST", HIDDEN.as_bytes())
    );

    // Bare LF line endings are read as HTTP/1.1 allows, and go upstream as one clean request.
    let lf = "POST /certsrv/mscep/mscep.dll?operation=PKIOperation HTTP/1.1\nHost: x\nContent-Length: 4\nConnection: close\n\nabcd";
    assert_eq!(s.raw(lf.as_bytes()).await.status_line, "HTTP/1.1 200 OK");
    assert_eq!(s.upstream.count(), 2);
    assert_eq!(&s.upstream.last().body[..], b"abcd");

    // A pipelined second request is judged on its own: the admin path is never forwarded.
    let pipelined = format!("{GET}Content-Length: 0\r\n\r\nGET /certsrv/mscep_admin/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut tls = tls_connect(s.addr(), s.pki.root()).await;
    tokio::io::AsyncWriteExt::write_all(&mut tls, pipelined.as_bytes())
        .await
        .unwrap();
    let mut both = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut both);
    let _ = tokio::time::timeout(IO_TIMEOUT, read).await;
    let both = String::from_utf8_lossy(&both);
    let statuses: Vec<&str> = both
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .collect();
    assert_eq!(
        statuses,
        ["HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found"],
        "{both}"
    );
    assert_eq!(s.upstream.count(), 3);
    assert!(s
        .upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|r| !r.target.contains("mscep_admin")));
}
