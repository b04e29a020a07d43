//! HTTPS to the ACME CA for instant-acme: rustls with the process's ring provider, the anchors of
//! `listen.acme.ca` or else the system's, a deadline and a size bound on every exchange, and the
//! CA's last `Retry-After` kept for the renewal loop to honour.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HOST, RETRY_AFTER};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, Error, HttpClient};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::ConfigError;
use crate::tls;

/// Connect, handshake, request and answer together; an ACME server answers in milliseconds,
/// and a stalled one must not hold the renewal loop.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// A directory, an order or a problem is a few hundred bytes, a certificate chain a few KB.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// The HTTP client instant-acme sends through. Cheap to clone.
#[derive(Clone)]
pub struct AcmeHttp {
    tls: TlsConnector,
    /// When the CA last asked to be left alone (a `Retry-After` on an error answer).
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl AcmeHttp {
    pub fn new(ca: Option<&Path>) -> Result<AcmeHttp, ConfigError> {
        let mut roots = RootCertStore::empty();
        match ca {
            Some(path) => {
                for cert in tls::load_certificates(path, "listen.acme.ca")? {
                    roots.add(cert).map_err(|e| {
                        ConfigError(format!("listen.acme.ca: {}: {e}", path.display()))
                    })?;
                }
            }
            None => {
                // Unreadable files among the system's are skipped: the others still verify.
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(ConfigError(
                        "listen.acme: no system trust anchors found for the ACME directory: install the ca-certificates package or set listen.acme.ca".to_owned(),
                    ));
                }
            }
        }
        let mut config = ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigError(format!("listen.acme: TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(AcmeHttp {
            tls: TlsConnector::from(Arc::new(config)),
            retry_after: Arc::default(),
        })
    }

    /// The CA's last `Retry-After`, taken: each one is honoured once.
    pub fn take_retry_after(&self) -> Option<SystemTime> {
        self.retry_after
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// A plain GET (the directory, renewal information), its body read whole.
    pub async fn get(&self, url: &str) -> Result<Bytes, Error> {
        let req = Request::get(url)
            .body(BodyWrapper::default())
            .map_err(|e| other(format!("{url}: {e}")))?;
        let answer = tokio::time::timeout(EXCHANGE_TIMEOUT, self.exchange(req))
            .await
            .map_err(|_| {
                other(format!(
                    "{url}: no answer within {}s",
                    EXCHANGE_TIMEOUT.as_secs()
                ))
            })??;
        if !answer.status().is_success() {
            return Err(other(format!("{url}: {}", answer.status())));
        }
        let body = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| other(format!("{url}: {e}")))?;
        Ok(body.to_bytes())
    }

    async fn exchange(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Result<Response<Full<Bytes>>, Error> {
        let (mut parts, body) = req.into_parts();
        let uri = parts.uri.clone();
        let (host, port, https) = endpoint(&uri)?;
        // Origin form on the wire, the authority in Host, as a server expects from a client.
        parts.uri = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse::<Uri>()
            .map_err(|e| other(format!("{uri}: {e}")))?;
        if let Some(authority) = uri.authority() {
            let value = http::HeaderValue::from_str(authority.as_str())
                .map_err(|e| other(format!("{uri}: {e}")))?;
            parts.headers.insert(HOST, value);
        }
        let req = Request::from_parts(parts, body);
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| other(format!("{host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let answer = if https {
            let name =
                ServerName::try_from(host.clone()).map_err(|e| other(format!("{host}: {e}")))?;
            let stream = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| other(format!("{host}:{port}: TLS: {e}")))?;
            send(stream, req).await?
        } else {
            send(tcp, req).await?
        };
        if !answer.status().is_success() {
            if let Some(at) = answer.headers().get(RETRY_AFTER).and_then(retry_after) {
                *self.retry_after.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
            }
        }
        Ok(answer)
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, Error>> + Send>> {
        let this = self.clone();
        Box::pin(async move {
            match tokio::time::timeout(EXCHANGE_TIMEOUT, this.exchange(req)).await {
                Ok(answer) => answer.map(BytesResponse::from),
                Err(_) => Err(other(format!(
                    "the ACME server did not answer within {}s",
                    EXCHANGE_TIMEOUT.as_secs()
                ))),
            }
        })
    }
}

/// One request on a new connection, its answer read whole (bounded).
async fn send<S>(io: S, req: Request<BodyWrapper<Bytes>>) -> Result<Response<Full<Bytes>>, Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| other(format!("HTTP: {e}")))?;
    let driver = tokio::spawn(conn);
    let answer = sender.send_request(req).await;
    let result = match answer {
        Ok(answer) => {
            let (parts, body) = answer.into_parts();
            match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
                Ok(body) => Ok(Response::from_parts(parts, Full::new(body.to_bytes()))),
                Err(e) => Err(other(format!("answer body: {e}"))),
            }
        }
        Err(e) => Err(other(format!("HTTP: {e}"))),
    };
    driver.abort();
    result
}

/// Host (without IPv6 brackets), port and whether TLS is spoken.
fn endpoint(uri: &Uri) -> Result<(String, u16, bool), Error> {
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(other(format!("{uri}: not an http(s) URL"))),
    };
    let host = uri
        .host()
        .ok_or_else(|| other(format!("{uri}: no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok((host, port, https))
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(value: &http::HeaderValue) -> Option<SystemTime> {
    let text = value.to_str().ok()?.trim();
    match text.parse::<u64>() {
        Ok(seconds) => SystemTime::now().checked_add(Duration::from_secs(seconds)),
        Err(_) => httpdate::parse_http_date(text).ok(),
    }
}

fn other(message: String) -> Error {
    Error::Other(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::now();
        let later = retry_after(&http::HeaderValue::from_static("120")).unwrap();
        assert!(later >= now + Duration::from_secs(119));
        let date = retry_after(&http::HeaderValue::from_static(
            "Wed, 21 Oct 2015 07:28:00 GMT",
        ));
        assert_eq!(
            date.unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            1_445_412_480
        );
        assert!(retry_after(&http::HeaderValue::from_static("soon")).is_none());
    }

    #[test]
    fn endpoints_take_default_ports_and_bare_addresses() {
        let e = |u: &str| endpoint(&u.parse().unwrap()).ok();
        assert_eq!(
            e("https://acme.test/dir"),
            Some(("acme.test".into(), 443, true))
        );
        assert_eq!(
            e("https://[::1]:14000/dir"),
            Some(("::1".into(), 14000, true))
        );
        assert_eq!(e("ftp://acme.test/dir"), None);
    }
}
