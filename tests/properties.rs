//! Property tests: the filter's decisions at and around every limit, and the parsers that read
//! what peers send (SCEP messages, PROXY headers, query strings, the config) never panic on any
//! input. A bounded-time stand-in for coverage-guided fuzzing that runs in every test run.

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use ndes_gateway::config::{Config, LimitsConfig};
use ndes_gateway::pipeline::filter::RequestLimits;
use proptest::prelude::*;

fn limits(max_uri: usize, max_query: usize, max_header: usize) -> RequestLimits {
    RequestLimits::from(&LimitsConfig {
        max_uri_bytes: max_uri,
        max_query_bytes: max_query,
        max_header_bytes: max_header,
        ..LimitsConfig::default()
    })
}

const BASE: &str = "/certsrv/mscep/mscep.dll?operation=GetCACaps&message=";

/// DER of a tag, its length and its content.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

/// A pkiMessage's outside (ContentInfo, SignedData, encapContentInfo of id-data) around `inner`
/// as its eContent, with no signer: what the recipient reader walks before the envelope.
fn signed_data_around(inner: &[u8]) -> Vec<u8> {
    const ID_DATA: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01,
    ];
    const ID_SIGNED: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02,
    ];
    let encap = tlv(0x30, &[ID_DATA, &tlv(0xa0, &tlv(0x04, inner))].concat());
    let signed = tlv(
        0x30,
        &[
            &[0x02, 0x01, 0x01][..],
            &tlv(0x31, &[]),
            &encap,
            &tlv(0x31, &[]),
        ]
        .concat(),
    );
    tlv(0x30, &[ID_SIGNED, &tlv(0xa0, &signed)].concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// 414 exactly when the request-target passes the limit, whatever the limit.
    #[test]
    fn uri_limit_is_exact(limit in 100usize..65_534, delta in -2i64..=2) {
        let len = (limit as i64 + delta) as usize;
        let target = format!("{BASE}{}", "A".repeat(len - BASE.len()));
        let uri: Uri = target.parse().unwrap();
        let mut host = HeaderMap::new();
        host.insert("host", HeaderValue::from_static("x"));
        let r = limits(limit, 65_534, 16_384).check(&Method::GET, &uri, Version::HTTP_11, &host);
        prop_assert_eq!(r.is_err(), len > limit);
        if let Err(rej) = r {
            prop_assert_eq!(rej.status.as_u16(), 414);
        }
    }

    /// 431 exactly when the header section passes the limit.
    #[test]
    fn header_limit_is_exact(limit in 256usize..20_000, delta in -2i64..=2) {
        let size = (limit as i64 + delta) as usize;
        let mut h = HeaderMap::new();
        // "x-fill: " + value + "\r\n"
        let value = "v".repeat(size - "x-fill: \r\n".len());
        h.insert("x-fill", HeaderValue::from_str(&value).unwrap());
        let uri: Uri = format!("{BASE}x").parse().unwrap();
        // HTTP/2, which needs no Host field: the one field is the whole section.
        let r = limits(65_534, 65_534, limit).check(&Method::GET, &uri, Version::HTTP_2, &h);
        prop_assert_eq!(r.is_err(), size > limit);
        if let Err(rej) = r {
            prop_assert_eq!(rej.status.as_u16(), 431);
        }
    }

    /// Any query: a decision, never a panic; a pass names a known operation.
    #[test]
    fn any_query_gets_a_decision(query in "[a-zA-Z0-9%&=+/._~-]{0,200}", post in any::<bool>()) {
        if let Ok(uri) = format!("/certsrv/mscep/mscep.dll?{query}").parse::<Uri>() {
            let method = if post { Method::POST } else { Method::GET };
            let r = RequestLimits::from(&LimitsConfig::default()).check(&method, &uri, Version::HTTP_2, &HeaderMap::new());
            if let Ok(scep) = r {
                prop_assert!(scep.operation.is_some() || query.is_empty());
            }
        }
    }

    #[test]
    fn scep_parsers_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = ndes_gateway::scep::parse_pki_message(&bytes);
        let _ = ndes_gateway::scep::parse_ca_certs(&bytes);
        let _ = ndes_gateway::scep::ber_to_der(&bytes);
        let _ = ndes_gateway::scep::pki_message_recipient(&bytes);
    }

    /// Any envelope inside a well-formed SignedData: the recipient reader opens it, in DER and
    /// in BER, and answers without a panic.
    #[test]
    fn the_recipient_reader_takes_any_envelope(envelope in prop::collection::vec(any::<u8>(), 0..2048), enveloped_prefix in any::<bool>()) {
        let mut inner = Vec::new();
        if enveloped_prefix {
            // ContentInfo { id-envelopedData, [0] ...: the rest is whatever came.
            inner.extend_from_slice(&[0x30, 0x80, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03, 0xa0, 0x80]);
        }
        inner.extend_from_slice(&envelope);
        let message = signed_data_around(&inner);
        let _ = ndes_gateway::scep::pki_message_recipient(&message);
    }

    /// Bytes that start like a CMS SEQUENCE go deeper into the parsers.
    #[test]
    fn scep_parsers_take_any_sequence(tail in prop::collection::vec(any::<u8>(), 0..2048), indefinite in any::<bool>()) {
        let mut bytes = if indefinite { vec![0x30, 0x80] } else { vec![0x30, 0x82, (tail.len() >> 8) as u8, tail.len() as u8] };
        bytes.extend_from_slice(&tail);
        let _ = ndes_gateway::scep::parse_pki_message(&bytes);
        let _ = ndes_gateway::scep::ber_to_der(&bytes);
        // The same bytes as a GET message: the sparse base64 read walks them.
        let message = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let _ = ndes_gateway::scep::parse_get_message(&format!("operation=PKIOperation&message={message}"));
    }

    #[test]
    fn get_messages_take_any_text(message in ".{0,512}") {
        let query = format!("operation=PKIOperation&message={message}");
        let _ = ndes_gateway::scep::decode_get_message(&query);
        let _ = ndes_gateway::scep::parse_get_message(&query);
    }

    #[test]
    fn proxy_headers_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600), v1 in any::<bool>()) {
        let mut input = if v1 { b"PROXY ".to_vec() } else { b"\r\n\r\n\x00\r\nQUIT\n".to_vec() };
        input.extend_from_slice(&bytes);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let peer = "127.0.0.1:1".parse().unwrap();
        let _ = rt.block_on(ndes_gateway::pipeline::client_addr::read_proxy_header(&mut input.as_slice(), peer));
    }

    #[test]
    fn the_config_loader_takes_any_text(text in ".{0,400}") {
        let _ = Config::parse(&text);
        let with_sections = format!("[listen]\naddr = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\n[upstream]\nurl = \"https://x/y\"\n{text}");
        let _ = Config::parse(&with_sections);
    }
}

/// An EnvelopedData naming its recipient by `rid`, inside a pkiMessage's outside.
fn enveloped_to(rid: &[u8]) -> Vec<u8> {
    const ID_ENVELOPED: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03,
    ];
    let algorithm = tlv(0x30, &[0x06, 0x01, 0x2a]);
    let ktri = tlv(
        0x30,
        &[&[0x02, 0x01, 0x00][..], rid, &algorithm, &tlv(0x04, b"key")].concat(),
    );
    let enveloped = tlv(
        0x30,
        &[
            &[0x02, 0x01, 0x00][..],
            &tlv(0x31, &ktri),
            &tlv(0x30, &algorithm),
        ]
        .concat(),
    );
    signed_data_around(&tlv(0x30, &[ID_ENVELOPED, &tlv(0xa0, &enveloped)].concat()))
}

#[test]
fn the_recipient_is_read_by_issuer_and_serial_and_by_key_identifier() {
    use ndes_gateway::scep::{pki_message_recipient, Recipient};
    let issuer = tlv(
        0x30,
        &tlv(
            0x31,
            &tlv(
                0x30,
                &[0x06, 0x03, 0x55, 0x04, 0x03, 0x13, 0x02, b'R', b'A'],
            ),
        ),
    );
    let by_serial = tlv(0x30, &[&issuer[..], &[0x02, 0x02, 0x01, 0x23]].concat());
    assert_eq!(
        pki_message_recipient(&enveloped_to(&by_serial)),
        Ok(Recipient::IssuerSerial {
            issuer: issuer.clone(),
            serial: vec![0x01, 0x23]
        })
    );
    let by_key = tlv(0x80, &[7; 20]);
    assert_eq!(
        pki_message_recipient(&enveloped_to(&by_key)),
        Ok(Recipient::SubjectKeyId(vec![7; 20]))
    );
    // A key agreement recipient ([1]) is not SCEP's: no recipient, never a guess.
    assert!(pki_message_recipient(&enveloped_to(&tlv(0xa1, &[]))).is_err());
}
