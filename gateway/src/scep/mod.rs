//! SCEP awareness: what a PKIOperation carries (messageType, transactionID, senderNonce) and what
//! NDES answered (pkiStatus, failInfo), and the CA and RA certificates of GetCACert. Read with
//! the RustCrypto crates; never changes what is forwarded; bounded in size, so in time.

use std::borrow::Cow;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use cms::cert::CertificateChoices;
use cms::signed_data::SignedData;
use der::asn1::{AnyRef, ObjectIdentifier, OctetStringRef, PrintableStringRef};
use der::{Decode, Reader, SliceReader, Tag, TagNumber, Tagged};
use x509_cert::Certificate;

/// Larger than any SCEP message (a PKCSReq is 2.5 to 4 KB, a CertRep with a chain a few KB): a
/// bigger input is not parsed at all, so hostile input costs bounded time and memory.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const MESSAGE_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.2");
const PKI_STATUS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.3");
const FAIL_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.4");
const SENDER_NONCE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.5");
const TRANSACTION_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.113733.1.9.7");
/// A transactionID longer than this is cut in logs: it is the client's text.
const MAX_TRANSACTION_ID_CHARS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScepError(pub &'static str);

impl std::fmt::Display for ScepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// RFC 8894 Table 3, and what a metric label says for each.
pub fn message_type_name(code: u32) -> &'static str {
    match code {
        3 => "CertRep",
        17 => "RenewalReq",
        19 => "PKCSReq",
        20 => "CertPoll",
        21 => "GetCert",
        22 => "GetCRL",
        _ => "unknown",
    }
}

/// RFC 8894 Table 4.
pub fn pki_status_name(code: u32) -> &'static str {
    match code {
        0 => "SUCCESS",
        2 => "FAILURE",
        3 => "PENDING",
        _ => "unknown",
    }
}

/// RFC 8894 Table 5.
pub fn fail_info_name(code: u32) -> &'static str {
    match code {
        0 => "badAlg",
        1 => "badMessageCheck",
        2 => "badRequest",
        3 => "badTime",
        4 => "badCertId",
        _ => "unknown",
    }
}

mod ber;
mod ca_certs;
mod get;
mod message;
mod recipient;

pub use ber::*;
pub use ca_certs::*;
pub use get::*;
pub use message::*;
pub use recipient::*;

#[cfg(test)]
mod tests {
    use super::*;
    use der::Encode;

    #[test]
    fn get_messages_in_every_spelling_decode_alike() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(600).collect();
        let std = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
        let encoded: String = std
            .bytes()
            .map(|b| match b {
                b'+' => "%2B".to_owned(),
                b'/' => "%2F".to_owned(),
                b'=' => "%3D".to_owned(),
                b => (b as char).to_string(),
            })
            .collect();
        let wrapped: String = std
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("%0A");
        for message in [&std, &url, &encoded, &wrapped] {
            let q = format!("operation=PKIOperation&message={message}");
            assert_eq!(decode_get_message(&q).unwrap(), bytes, "{message}");
        }
    }

    /// DER re-encoded the way iOS sends it: every constructed element with an indefinite length,
    /// and long OCTET STRINGs cut into segments.
    fn der_to_ber(der: &[u8]) -> (Vec<u8>, usize) {
        let (header_len, len) = der_header(der).unwrap();
        let content = &der[header_len..header_len + len];
        let mut out = Vec::new();
        if der[0] & 0x20 != 0 {
            out.push(der[0]);
            out.push(0x80);
            let mut at = 0;
            while at < content.len() {
                let (child, used) = der_to_ber(&content[at..]);
                out.extend_from_slice(&child);
                at += used;
            }
            out.extend_from_slice(&[0, 0]);
        } else if der[0] == 0x04 && content.len() > 100 {
            out.extend_from_slice(&[0x24, 0x80]);
            for piece in content.chunks(100) {
                out.push(0x04);
                push_len(&mut out, piece.len());
                out.extend_from_slice(piece);
            }
            out.extend_from_slice(&[0, 0]);
        } else {
            out.extend_from_slice(&der[..header_len + len]);
        }
        (out, header_len + len)
    }

    #[test]
    fn ber_as_ios_sends_it_reads_like_der() {
        let cert = |name: &str| {
            let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
            Certificate::from_der(made.cert.der()).unwrap()
        };
        let pkcs7 = degenerate_pkcs7(&[cert("a.corp.test"), cert("b.corp.test")]).unwrap();
        let (ber, used) = der_to_ber(&pkcs7);
        assert_eq!(used, pkcs7.len());
        assert_ne!(ber, pkcs7);
        assert_eq!(ber_to_der(&ber).unwrap(), pkcs7);
        assert_eq!(
            ber_to_der(&pkcs7).unwrap(),
            pkcs7,
            "DER goes through unchanged"
        );
        assert_eq!(parse_ca_certs(&ber).unwrap().len(), 2);
        // Cut anywhere, it is refused.
        for cut in [1, 2, 10, ber.len() / 2, ber.len() - 1] {
            assert!(ber_to_der(&ber[..cut]).is_err(), "cut at {cut}");
        }
        // Nesting past the limit is refused without recursing without bound.
        let deep: Vec<u8> = std::iter::repeat([0x30u8, 0x80])
            .take(10_000)
            .flatten()
            .collect();
        assert!(ber_to_der(&deep).is_err());
    }

    #[test]
    fn garbage_truncated_and_oversized_input_is_refused() {
        assert!(parse_pki_message(b"").is_err());
        assert!(parse_pki_message(b"\x30\x80\x00\x00").is_err());
        assert!(parse_pki_message(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_pki_message(&vec![0x30; MAX_MESSAGE_BYTES + 1]).is_err());
        let mut x: u32 = 7;
        for len in [1usize, 10, 100, 1000, 10_000] {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            assert!(parse_pki_message(&junk).is_err());
            assert!(parse_ca_certs(&junk).is_err());
        }
        assert!(decode_get_message("operation=PKIOperation").is_err());
        assert!(decode_get_message("message=***").is_err());
    }

    /// A PKCSReq-shaped pkiMessage: an opaque `envelope` of the given size, the signer's
    /// certificate, one signer with the SCEP attributes.
    fn pki_message_der(envelope: usize) -> Vec<u8> {
        use cms::cert::CertificateChoices;
        use cms::content_info::CmsVersion;
        use cms::signed_data::{
            CertificateSet, EncapsulatedContentInfo, SignerIdentifier, SignerInfo, SignerInfos,
        };
        use der::asn1::{Any, OctetString, PrintableString, SetOfVec};
        use x509_cert::attr::Attribute;
        use x509_cert::ext::pkix::SubjectKeyIdentifier;
        use x509_cert::spki::AlgorithmIdentifierOwned;
        static SIGNER: std::sync::OnceLock<Certificate> = std::sync::OnceLock::new();
        let cert = SIGNER.get_or_init(|| {
            let made =
                rcgen::generate_simple_self_signed(vec!["device.corp.test".to_owned()]).unwrap();
            Certificate::from_der(made.cert.der()).unwrap()
        });
        let alg = |oid: &str| AlgorithmIdentifierOwned {
            oid: ObjectIdentifier::new_unwrap(oid),
            parameters: None,
        };
        let attr = |oid, value: Any| Attribute {
            oid,
            values: SetOfVec::try_from(vec![value]).unwrap(),
        };
        let printable = |s: &str| Any::encode_from(&PrintableString::new(s).unwrap()).unwrap();
        let octets = |b: Vec<u8>| OctetString::new(b).unwrap();
        let signer = SignerInfo {
            version: CmsVersion::V3,
            sid: SignerIdentifier::SubjectKeyIdentifier(SubjectKeyIdentifier(octets(vec![7; 20]))),
            digest_alg: alg("2.16.840.1.101.3.4.2.1"),
            signed_attrs: Some(
                SetOfVec::try_from(vec![
                    attr(MESSAGE_TYPE, printable("19")),
                    attr(TRANSACTION_ID, printable("5F3A0C")),
                    attr(
                        SENDER_NONCE,
                        Any::encode_from(&octets(vec![9; 16])).unwrap(),
                    ),
                ])
                .unwrap(),
            ),
            signature_algorithm: alg("1.2.840.10045.4.3.2"),
            signature: octets(vec![5; 72]),
            unsigned_attrs: None,
        };
        let signed = SignedData {
            version: CmsVersion::V3,
            digest_algorithms: SetOfVec::try_from(vec![alg("2.16.840.1.101.3.4.2.1")]).unwrap(),
            encap_content_info: EncapsulatedContentInfo {
                econtent_type: ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1"),
                econtent: Some(Any::encode_from(&octets(vec![0xab; envelope])).unwrap()),
            },
            certificates: Some(CertificateSet(
                SetOfVec::try_from(vec![CertificateChoices::Certificate(cert.clone())]).unwrap(),
            )),
            crls: None,
            signer_infos: SignerInfos(SetOfVec::try_from(vec![signer]).unwrap()),
        };
        cms::content_info::ContentInfo {
            content_type: ID_SIGNED_DATA,
            content: Any::encode_from(&signed).unwrap(),
        }
        .to_der()
        .unwrap()
    }

    fn get_query(der: &[u8]) -> String {
        let std = base64::engine::general_purpose::STANDARD.encode(der);
        format!("operation=PKIOperation&message={std}")
    }

    /// What reading the whole message gives.
    fn whole(query: &str) -> Result<PkiMessage, ScepError> {
        decode_get_message(query).and_then(|d| parse_pki_message(&d))
    }

    #[test]
    fn a_der_get_message_is_read_from_its_headers_and_its_end() {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE};
        // Envelope sizes that leave every remainder modulo 3, and the benchmark's 62 KiB GET.
        for envelope in [0, 1, 2, 100, 4000, 4001, 4002, 47_000] {
            let der = pki_message_der(envelope);
            let expected = parse_pki_message(&der).unwrap();
            assert_eq!(expected.message_type, Some(19));
            assert_eq!(expected.transaction_id.as_deref(), Some("5F3A0C"));
            assert_eq!(expected.sender_nonce, Some(vec![9; 16]));
            let std = base64::engine::general_purpose::STANDARD.encode(&der);
            let text = base64_text(std.as_bytes());
            let sparse = SparseBase64::new(&text).and_then(|b| b.signer_infos());
            assert!(
                sparse.is_some(),
                "envelope {envelope}: the sparse read gave up"
            );
            let spellings = [
                std.clone(),
                STANDARD_NO_PAD.encode(&der),
                URL_SAFE.encode(&der),
                std.replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D"),
            ];
            for message in spellings {
                let q = format!("operation=PKIOperation&message={message}");
                assert_eq!(parse_get_message(&q), Ok(expected.clone()), "{envelope}");
            }
        }
    }

    #[test]
    fn a_ber_get_message_is_read_whole() {
        let der = pki_message_der(300);
        let (ber, _) = der_to_ber(&der);
        let std = base64::engine::general_purpose::STANDARD.encode(&ber);
        let text = base64_text(std.as_bytes());
        assert!(SparseBase64::new(&text)
            .and_then(|b| b.signer_infos())
            .is_none());
        let q = get_query(&ber);
        assert_eq!(parse_get_message(&q), parse_pki_message(&der));
        assert!(parse_get_message(&q).is_ok());
    }

    proptest::proptest! {
        /// A message damaged anywhere reads as it does whole: the same attributes or the same
        /// error. Half the damage goes to the first 48 bytes, where the headers the sparse read
        /// walks are, and a change of one either way makes a length off by one.
        #[test]
        fn a_damaged_get_message_reads_as_it_does_whole(
            at in proptest::prop_oneof![0usize..48, 0usize..4000],
            delta in proptest::prop_oneof![proptest::strategy::Just(1u8), proptest::strategy::Just(255u8), proptest::prelude::any::<u8>()],
            how in 0u8..4,
            ch in proptest::sample::select(&b"A/+=%- _*"[..]),
        ) {
            static DER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let mut der = DER.get_or_init(|| pki_message_der(1000)).clone();
            let q = match how {
                0 | 1 => {
                    let at = at % der.len();
                    if how == 0 { der[at] = der[at].wrapping_add(delta) } else { der.truncate(at) }
                    get_query(&der)
                }
                _ => {
                    // In the base64 text: one character changed, or the text cut and one added.
                    let mut q = get_query(&der).into_bytes();
                    let at = 31 + at % (q.len() - 31);
                    if how == 2 { q[at] = ch } else { q.truncate(at); q.push(ch) }
                    String::from_utf8(q).unwrap()
                }
            };
            proptest::prop_assert_eq!(parse_get_message(&q), whole(&q));
        }
    }

    /// The signer's attributes as the cms crate decodes them, into owned values with every SET
    /// sorted: the reference the in-place read must agree with wherever it succeeds (the test
    /// messages have one signer and one value per attribute, where the orders are the same).
    fn reference_parse(der: &[u8]) -> Option<PkiMessage> {
        let signed = signed_data(der).ok()?;
        let signer = signed.signer_infos.0.as_slice().first()?;
        let mut msg = PkiMessage::default();
        for attr in signer.signed_attrs.as_ref()?.iter() {
            let Some(value) = attr.values.as_slice().first() else {
                continue;
            };
            let printable = || {
                value
                    .decode_as::<PrintableStringRef<'_>>()
                    .ok()
                    .map(|s| s.as_str().to_owned())
            };
            let number = || printable()?.trim().parse::<u32>().ok();
            match attr.oid {
                MESSAGE_TYPE => msg.message_type = Some(number()?),
                PKI_STATUS => msg.pki_status = Some(number()?),
                FAIL_INFO => msg.fail_info = Some(number()?),
                TRANSACTION_ID => msg.transaction_id = Some(printable()?),
                SENDER_NONCE => {
                    msg.sender_nonce = value
                        .decode_as::<OctetStringRef<'_>>()
                        .ok()
                        .map(|o| o.as_bytes().to_vec())
                }
                _ => {}
            }
        }
        msg.message_type.map(|_| msg)
    }

    proptest::proptest! {
        /// Damage anywhere, and most of it in the signerInfos at the end: wherever the cms
        /// crate still reads the message, the in-place read gives the same attributes.
        #[test]
        fn the_in_place_read_agrees_with_the_cms_crate(
            from_end in proptest::prop_oneof![0usize..400, 0usize..2000],
            delta in proptest::prop_oneof![proptest::strategy::Just(1u8), proptest::strategy::Just(255u8), proptest::prelude::any::<u8>()],
            cut in proptest::prelude::any::<bool>(),
        ) {
            static DER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let mut der = DER.get_or_init(|| pki_message_der(300)).clone();
            let at = der.len() - 1 - from_end % der.len();
            if cut { der.truncate(at) } else { der[at] = der[at].wrapping_add(delta) }
            if let Some(expected) = reference_parse(&der) {
                proptest::prop_assert_eq!(parse_pki_message(&der), Ok(expected));
            }
        }
    }

    #[test]
    fn an_undamaged_message_reads_as_the_cms_crate_reads_it() {
        let der = pki_message_der(300);
        let expected = reference_parse(&der).unwrap();
        assert_eq!(parse_pki_message(&der), Ok(expected));
    }

    #[test]
    fn query_param_finds_the_first_pair_by_name() {
        let q = "operation=PKIOperation&message&MESSAGE=a=b&message=c";
        assert_eq!(query_param(q, "message"), Some("a=b"));
        assert_eq!(query_param(q, "operation"), Some("PKIOperation"));
        assert_eq!(query_param("message=", "message"), Some(""));
        assert_eq!(query_param("messages=x&&=y", "message"), None);
        assert_eq!(query_param("", "message"), None);
    }

    proptest::proptest! {
        #[test]
        fn query_pairs_split_as_str_split_does(query in "[a&=%]{0,40}") {
            let ours: Vec<&str> = query_pairs(&query).collect();
            let std: Vec<&str> = query.split('&').collect();
            proptest::prop_assert_eq!(ours, std);
        }
    }
}

#[cfg(test)]
mod base64_text_tests {
    use super::base64_text;
    use proptest::prelude::*;

    /// The same bytes as percent_encoding's decoder followed by the filter and the mapping.
    fn reference(raw: &str) -> Vec<u8> {
        percent_encoding::percent_decode_str(raw)
            .filter(|b| !b.is_ascii_whitespace())
            .map(|b| match b {
                b'-' => b'+',
                b'_' => b'/',
                other => other,
            })
            .collect()
    }

    proptest! {
        // What a request-target can hold: the memchr path.
        #[test]
        fn matches_percent_encoding(raw in "([A-Za-z0-9+/=_\\-]|%[0-9A-Fa-fg-z%_\\-]{0,2}){0,200}") {
            prop_assert_eq!(base64_text(raw.as_bytes()), reference(&raw));
        }

        // Raw whitespace and control characters: the byte loop.
        #[test]
        fn matches_percent_encoding_with_whitespace(
            raw in "([A-Za-z0-9+/=_\\- \r\n\t\x01]|%[0-9A-Fa-fg-z%]{0,2}){0,200}"
        ) {
            prop_assert_eq!(base64_text(raw.as_bytes()), reference(&raw));
        }
    }

    #[test]
    fn edge_cases() {
        for raw in [
            "",
            "%",
            "%4",
            "%41",
            "%%41",
            "%4g",
            "a%2Bb%2fc",
            "-_%0A%0d",
            "%zz%41%",
            "%2d%5F%2B",
            "%-_",
            "%_1",
            "a%20b%0Ac%09",
            "%25%32%42",
        ] {
            assert_eq!(base64_text(raw.as_bytes()), reference(raw), "{raw:?}");
        }
    }
}
