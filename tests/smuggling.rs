//! Request smuggling: every ambiguous framing is refused before anything reaches NDES, and what
//! is forwarded is framed one way only (the upstream's received requests are checked).

mod common;

use common::*;

const POST: &str = "POST /certsrv/mscep/mscep.dll?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n";
const GET: &str = "GET /certsrv/mscep/mscep.dll?operation=GetCACaps HTTP/1.1\r\nHost: x\r\n";
/// A refusal by closing the connection must come well before the IO timeout (and before the
/// gateway's 10 s header timeout, which would close a connection it merely waits on).
const PROMPT: std::time::Duration = std::time::Duration::from_secs(5);
/// A request hidden in a body, in case something reads the body as the next request.
const HIDDEN: &str = "GET /certsrv/mscep_admin/ HTTP/1.1\r\nHost: x\r\n\r\n";

/// Forms from the usual smuggling probes (CL.TE, TE.CL, TE.TE obfuscations, bad lengths, line
/// ending and folding tricks): each must be refused promptly (400, or the connection closed by the
/// gateway well before the client gives up) with nothing forwarded. `Transfer-Encoding: chunked`
/// alone, however it is spelled, is a valid framing: see `chunked_uploads_are_forwarded_with_a_length`.
fn refused_forms() -> Vec<(&'static str, String)> {
    let chunked_body = format!("0\r\n\r\n{HIDDEN}");
    vec![
        ("CL.TE", format!("{POST}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}")),
        ("TE.CL", format!("{POST}Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n{chunked_body}")),
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
        let r = raw_request_ending(s.addr(), s.pki.root(), request.as_bytes(), IO_TIMEOUT).await;
        let status = &r.response.status_line;
        if status.is_empty() {
            // No answer at all is a refusal only if the gateway closed the connection, and did so
            // at once: a read that merely ran out of time (or a close by a timeout) is not one.
            assert_eq!(
                r.end,
                ReadEnd::Closed,
                "{name}: no answer and not closed: {r:?}"
            );
            assert!(
                r.elapsed < PROMPT,
                "{name}: closed only after {:?}",
                r.elapsed
            );
        } else {
            assert!(
                status.starts_with("HTTP/1.1 400"),
                "{name}: answered {status:?}"
            );
        }
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

/// `Transfer-Encoding: chunked` alone (RFC 9112: the coding name is case-insensitive, and the
/// whitespace after the colon may be a tab) is read within `limits.max_body_bytes` and goes
/// upstream with a Content-Length, never chunked (IIS does not take chunked by default).
#[tokio::test]
async fn chunked_uploads_are_forwarded_with_a_length() {
    let s = Setup::new().await;
    let forms = [
        ("TE alone", "Transfer-Encoding: chunked"),
        ("TE upper case", "Transfer-Encoding: CHUNKED"),
        ("TE tab", "Transfer-Encoding:\tchunked"),
    ];
    for (i, (name, te)) in forms.into_iter().enumerate() {
        let req = format!("{POST}{te}\r\nConnection: close\r\n\r\n4\r\nabcd\r\n0\r\n\r\n");
        let r = s.raw(req.as_bytes()).await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{name}: {}", r.text());
        assert_eq!(s.upstream.count(), i + 1, "{name}: not forwarded once");
        let seen = s.upstream.last();
        assert_eq!(seen.method, "POST", "{name}");
        assert_eq!(&seen.body[..], b"abcd", "{name}: body");
        assert_eq!(
            seen.headers.get("content-length").map(|v| v.as_bytes()),
            Some(&b"4"[..]),
            "{name}: content-length upstream"
        );
        assert!(
            seen.headers.get("transfer-encoding").is_none(),
            "{name}: forwarded chunked: {:?}",
            seen.headers
        );
    }

    // One byte over limits.max_body_bytes (65536 by default), in chunks: 413, nothing forwarded.
    let body: Vec<u8> = (0..65_537usize).map(|i| b'a' + (i % 26) as u8).collect();
    let mut req =
        format!("{POST}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").into_bytes();
    for part in body.chunks(10_000) {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = s.raw(&req).await;
    assert_eq!(
        r.status_line,
        "HTTP/1.1 413 Payload Too Large",
        "{}",
        r.text()
    );
    assert_eq!(
        s.upstream.count(),
        forms.len(),
        "an over-limit chunked body was forwarded"
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
