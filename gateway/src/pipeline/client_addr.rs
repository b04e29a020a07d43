//! The real client address: from a PROXY protocol header sent by an L4 load balancer, or from
//! X-Forwarded-For when the peer is a trusted proxy (an ingress controller next to the gateway).
//! That address is the one logged, rate-limited and sent upstream.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderMap;
use ipnet::IpNet;
use ppp::v2;
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::config::ConfigError;

/// The longest PROXY header accepted: v1's maximum is 107 bytes, v2's address blocks with a few
/// TLVs fit easily. A load balancer that sends more is misconfigured, a client that does is hostile.
pub const MAX_PROXY_HEADER_BYTES: usize = 1024;

#[derive(Debug)]
pub struct ProxyHeaderError(pub String);

impl std::fmt::Display for ProxyHeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads a PROXY protocol v1 or v2 header from the start of the connection. Returns the source
/// address it carries (the peer's own for a v2 LOCAL command, a health check of the balancer) and
/// the bytes read past the header, which belong to the TLS handshake.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
) -> Result<(SocketAddr, Vec<u8>), ProxyHeaderError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| ProxyHeaderError(format!("reading the PROXY header: {e}")))?;
        if n == 0 {
            return Err(ProxyHeaderError(
                "connection closed before a complete PROXY header".to_owned(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let parsed = HeaderResult::parse(&buf);
        if parsed.is_incomplete() {
            if buf.len() > MAX_PROXY_HEADER_BYTES {
                return Err(ProxyHeaderError(format!(
                    "no complete PROXY header in the first {MAX_PROXY_HEADER_BYTES} bytes"
                )));
            }
            continue;
        }
        let (addr, len) = match parsed {
            HeaderResult::V1(Ok(h)) => {
                let addr = match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        SocketAddr::from((a.source_address, a.source_port))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        SocketAddr::from((a.source_address, a.source_port))
                    }
                    ppp::v1::Addresses::Unknown => peer,
                };
                (addr, h.header.len())
            }
            HeaderResult::V2(Ok(h)) => {
                let addr = match (h.command, &h.addresses) {
                    (v2::Command::Local, _) => peer,
                    (_, v2::Addresses::IPv4(a)) => {
                        SocketAddr::from((a.source_address, a.source_port))
                    }
                    (_, v2::Addresses::IPv6(a)) => {
                        SocketAddr::from((a.source_address, a.source_port))
                    }
                    (_, v2::Addresses::Unspecified) => peer,
                    (_, v2::Addresses::Unix(_)) => {
                        return Err(ProxyHeaderError(
                            "a PROXY v2 header with UNIX addresses".to_owned(),
                        ))
                    }
                };
                (addr, h.len())
            }
            HeaderResult::V1(Err(e)) => {
                return Err(ProxyHeaderError(format!("invalid PROXY header: {e}")))
            }
            HeaderResult::V2(Err(e)) => {
                return Err(ProxyHeaderError(format!("invalid PROXY header: {e}")))
            }
        };
        let rest = buf.get(len..).map(<[u8]>::to_vec).unwrap_or_default();
        return Ok((addr, rest));
    }
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            offset: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.offset < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.offset);
            let start = self.offset;
            buf.put_slice(&self.prefix[start..start + n]);
            self.offset += n;
            if self.offset == self.prefix.len() {
                self.prefix = Vec::new();
                self.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The proxies whose X-Forwarded-For is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn parse(cidrs: &[String]) -> Result<TrustedProxies, ConfigError> {
        crate::config::trusted_proxy_nets(cidrs).map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client address of a request that came from `peer`: when the peer is trusted, the
    /// right-most X-Forwarded-For entry that is not itself a trusted proxy (entries to its left
    /// were written by the client and prove nothing); otherwise the peer.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if self.0.is_empty() || !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        let entries = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for entry in entries.iter().rev() {
            let Some(ip) = parse_forwarded_ip(entry) else {
                // An entry that is not an address ends the trust chain here.
                break;
            };
            client = ip;
            if !self.contains(ip) {
                break;
            }
        }
        client
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 address it maps.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    entry.parse::<SocketAddr>().ok().map(|s| canonical(s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn xff_believed_only_from_trusted_peers() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".to_owned()]).unwrap();
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(
            t.client_ip("10.1.2.3".parse().unwrap(), &xff("6.6.6.6, 203.0.113.7")),
            client
        );
        assert_eq!(
            t.client_ip("10.1.2.3".parse().unwrap(), &xff("203.0.113.7, 10.9.9.9")),
            client
        );
        let outsider: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(t.client_ip(outsider, &xff("203.0.113.7")), outsider);
        assert_eq!(
            t.client_ip("10.1.2.3".parse().unwrap(), &xff("garbage")),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            t.client_ip(
                "::ffff:10.1.2.3".parse().unwrap(),
                &xff("[2001:db8::1]:443")
            ),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[tokio::test]
    async fn proxy_headers_v1_and_v2_and_refusals() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mut v1: &[u8] = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 443\r\n\x16\x03\x01";
        let (addr, rest) = read_proxy_header(&mut v1, peer).await.unwrap();
        assert_eq!(addr, "203.0.113.7:51000".parse().unwrap());
        assert_eq!(rest, b"\x16\x03\x01");

        let mut v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        v2.extend_from_slice(&[198, 51, 100, 9, 192, 0, 2, 1, 0x1f, 0x90, 0x01, 0xbb]);
        let (addr, rest) = read_proxy_header(&mut v2.as_slice(), peer).await.unwrap();
        assert_eq!(addr, "198.51.100.9:8080".parse().unwrap());
        assert!(rest.is_empty());

        for bad in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"PROXY TCP4 nonsense\r\n",
            b"PROXY TCP4 1.2.3.4",
        ] {
            let mut input = bad;
            assert!(
                read_proxy_header(&mut input, peer).await.is_err(),
                "{bad:?}"
            );
        }
        let long = vec![b'P'; 4096];
        assert!(read_proxy_header(&mut long.as_slice(), peer).await.is_err());
    }
}
