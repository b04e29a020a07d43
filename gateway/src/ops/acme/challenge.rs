//! Answering the CA's challenges: tls-alpn-01 with a certificate the public listener hands out to
//! `acme-tls/1` handshakes (RFC 8737), http-01 from a small plain-HTTP listener of its own
//! (RFC 8555, section 8.3) that serves the key authorizations and nothing else.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::tls;

const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";
/// The CA's validation request is one small GET: anything slower is not the CA.
const HTTP01_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A CA validates from a few vantage points at once; past this, port 80 is being flooded, and
/// new connections are closed rather than held.
const HTTP01_MAX_CONNECTIONS: usize = 64;
/// A CA's vantage points each come from an address of their own: a client holding more than
/// this is keeping the CA out, not validating.
const HTTP01_MAX_PER_CLIENT: usize = 4;

/// Open http-01 connections by client address; a slot is given back when its guard drops.
#[derive(Default)]
struct PerClient(Mutex<HashMap<std::net::IpAddr, usize>>);

struct ClientSlot(Arc<PerClient>, std::net::IpAddr);

impl PerClient {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<ClientSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= HTTP01_MAX_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientSlot(self.clone(), ip))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// The self-signed certificate for `domain` carrying the key authorization's SHA-256 in the
/// critical acmeIdentifier extension: what tls-alpn-01 asks the server to present.
pub fn tls_alpn_certificate(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let mut params =
        CertificateParams::new(vec![domain.to_owned()]).map_err(|e| format!("{domain}: {e}"))?;
    params
        .custom_extensions
        .push(CustomExtension::new_acme_identifier(digest));
    let key = KeyPair::generate().map_err(|e| format!("challenge key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("challenge certificate: {e}"))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("challenge key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(cert.der().to_vec())],
        signing,
    )))
}

/// The http-01 answers in force: token to key authorization.
#[derive(Default)]
pub struct Http01Answers(Mutex<HashMap<String, String>>);

impl Http01Answers {
    pub fn set(&self, token: &str, key_authorization: &str) {
        self.lock()
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    pub fn clear(&self, token: &str) {
        self.lock().remove(token);
    }

    fn get(&self, token: &str) -> Option<String> {
        self.lock().get(token).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // A poisoned lock only means a panic elsewhere mid-insert; the map is whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub async fn bind_http01(addr: SocketAddr) -> Result<TcpListener, ConfigError> {
    TcpListener::bind(addr).await.map_err(|e| {
        ConfigError(format!(
            "listen.acme.http01_addr: cannot listen on {addr}: {e}"
        ))
    })
}

/// Serves `GET /.well-known/acme-challenge/TOKEN` until `stop`; 404 for anything else.
pub async fn serve_http01(
    listener: TcpListener,
    answers: Arc<Http01Answers>,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(HTTP01_MAX_CONNECTIONS));
    let per_client = Arc::new(PerClient::default());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => {
                    // Out of descriptors: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(client_slot) = per_client.take(peer.ip()) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let answers = answers.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slots = (slot, client_slot);
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = http01_answer(&answers, &req);
                async move { Ok::<_, Infallible>(answer) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HTTP01_HEADER_TIMEOUT)
                .keep_alive(false);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn http01_answer(answers: &Http01Answers, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let found = (req.method() == Method::GET)
        .then(|| req.uri().path().strip_prefix(HTTP01_PREFIX))
        .flatten()
        .and_then(|token| answers.get(token));
    let (status, body) = match found {
        Some(key_authorization) => (StatusCode::OK, key_authorization),
        None => (StatusCode::NOT_FOUND, String::new()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Whether the server closed `tcp` without a word within a second.
    async fn closed(tcp: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn one_client_holds_a_few_http01_connections_and_no_more() {
        let listener = bind_http01("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answers = Arc::new(Http01Answers::default());
        answers.set("token", "token.thumbprint");
        let stop = CancellationToken::new();
        tokio::spawn(serve_http01(listener, answers, stop.clone()));
        // Idle connections, as a flood holds them: up to the cap they stay open.
        let mut held = Vec::new();
        for _ in 0..HTTP01_MAX_PER_CLIENT {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut over).await,
            "a connection past the cap was kept"
        );
        assert!(
            !closed(&mut held[0]).await,
            "a connection within the cap was closed"
        );
        // One given back, the next is served.
        drop(held.pop());
        let mut served = None;
        for _ in 0..50 {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET /.well-known/acme-challenge/token HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = String::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(2), tcp.read_to_string(&mut answer)).await;
            if !answer.is_empty() {
                served = Some(answer);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let served = served.expect("no connection served after one was given back");
        assert!(served.starts_with("HTTP/1.1 200 OK"), "{served}");
        assert!(served.ends_with("token.thumbprint"), "{served}");
        stop.cancel();
    }
}
