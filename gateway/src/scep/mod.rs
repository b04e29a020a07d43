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

/// The signed attributes of a pkiMessage that say what it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PkiMessage {
    pub message_type: Option<u32>,
    pub transaction_id: Option<String>,
    pub sender_nonce: Option<Vec<u8>>,
    pub pki_status: Option<u32>,
    pub fail_info: Option<u32>,
}

/// Reads a pkiMessage: CMS SignedData whose first signer carries the SCEP attributes. The
/// enveloped inner content is not opened (the gateway holds no CA or RA key).
pub fn parse_pki_message(der: &[u8]) -> Result<PkiMessage, ScepError> {
    content_info(der, |signed| {
        let infos = signer_infos(signed).map_err(|_| MALFORMED_SIGNED_DATA)?;
        pki_message(infos)
    })
}

const MALFORMED_SIGNED_DATA: ScepError = ScepError("malformed CMS SignedData");

/// The SCEP attributes of the first signer in a SignerInfos SET, read where they lie: decoding
/// SignerInfos into owned values (every attribute value copied, every SET sorted into DER order
/// by re-encoding its elements) cost more than the rest of a POST's handling. Signers and values
/// are taken in the order they are written (the cms decode sorted them first); a later
/// attribute of the same type overrides an earlier one.
fn pki_message(signer_infos: &[u8]) -> Result<PkiMessage, ScepError> {
    let attrs = first_signed_attrs(signer_infos)
        .map_err(|_| MALFORMED_SIGNED_DATA)?
        .ok_or(ScepError("no signer"))?
        .ok_or(ScepError("no signed attributes"))?;
    let mut reader = SliceReader::new(attrs.value()).map_err(|_| MALFORMED_SIGNED_DATA)?;
    let mut msg = PkiMessage::default();
    while !reader.is_finished() {
        let Some((oid, value)) = attribute(&mut reader).map_err(|_| MALFORMED_SIGNED_DATA)? else {
            continue;
        };
        let printable = || {
            value
                .decode_as::<PrintableStringRef<'_>>()
                .map(|s| s.as_str().to_owned())
                .map_err(|_| ScepError("a SCEP attribute is not a PrintableString"))
        };
        let number = || -> Result<u32, ScepError> {
            printable()?
                .trim()
                .parse()
                .map_err(|_| ScepError("a SCEP attribute is not a decimal number"))
        };
        // An OID is compared encoded: decoding one into arcs costs more than the comparisons.
        match oid {
            o if o == MESSAGE_TYPE.as_bytes() => msg.message_type = Some(number()?),
            o if o == PKI_STATUS.as_bytes() => msg.pki_status = Some(number()?),
            o if o == FAIL_INFO.as_bytes() => msg.fail_info = Some(number()?),
            o if o == TRANSACTION_ID.as_bytes() => {
                msg.transaction_id = Some(
                    printable()?
                        .chars()
                        .take(MAX_TRANSACTION_ID_CHARS)
                        .collect(),
                )
            }
            o if o == SENDER_NONCE.as_bytes() => {
                msg.sender_nonce = value
                    .decode_as::<OctetStringRef<'_>>()
                    .ok()
                    .map(|o| o.as_bytes().to_vec())
            }
            _ => {}
        }
    }
    if msg.message_type.is_none() {
        return Err(ScepError("no messageType attribute: not a SCEP pkiMessage"));
    }
    Ok(msg)
}

/// The signedAttrs of the first SignerInfo of a SignerInfos SET (RFC 5652 §5.3): `None` when
/// the SET is empty, `Some(None)` when the signer has no signed attributes. Every SignerInfo must
/// be a whole TLV, and the first one has the fields RFC 5652 gives it, in order.
fn first_signed_attrs(infos: &[u8]) -> der::Result<Option<Option<AnyRef<'_>>>> {
    const SIGNED_ATTRS: Tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::N0,
    };
    const UNSIGNED_ATTRS: Tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::N1,
    };
    let Some(signer) = first_of_set(AnyRef::from_der(infos)?)? else {
        return Ok(None);
    };
    signer.tag().assert_eq(Tag::Sequence)?;
    let mut r = SliceReader::new(signer.value())?;
    AnyRef::decode(&mut r)?.tag().assert_eq(Tag::Integer)?; // version
    AnyRef::decode(&mut r)?; // sid: issuerAndSerialNumber, or [0] subjectKeyIdentifier
    AnyRef::decode(&mut r)?.tag().assert_eq(Tag::Sequence)?; // digestAlgorithm
    let attrs = match r.peek_tag()? {
        SIGNED_ATTRS => Some(AnyRef::decode(&mut r)?),
        _ => None,
    };
    AnyRef::decode(&mut r)?.tag().assert_eq(Tag::Sequence)?; // signatureAlgorithm
    AnyRef::decode(&mut r)?.tag().assert_eq(Tag::OctetString)?; // signature
    if !r.is_finished() {
        AnyRef::decode(&mut r)?.tag().assert_eq(UNSIGNED_ATTRS)?;
    }
    r.finish(Some(attrs))
}

/// One Attribute (RFC 5652 §5.3) from `r`: its type, as the encoded OID it is compared with,
/// and its first value, if it has one.
fn attribute<'a>(r: &mut SliceReader<'a>) -> der::Result<Option<(&'a [u8], AnyRef<'a>)>> {
    let attr = AnyRef::decode(r)?;
    attr.tag().assert_eq(Tag::Sequence)?;
    let mut fields = SliceReader::new(attr.value())?;
    let oid = AnyRef::decode(&mut fields)?;
    oid.tag().assert_eq(Tag::ObjectIdentifier)?;
    let values = AnyRef::decode(&mut fields)?;
    fields.finish(())?;
    Ok(first_of_set(values)?.map(|first| (oid.value(), first)))
}

/// The first element of a SET, if it has one; the others must be whole TLVs.
fn first_of_set(set: AnyRef<'_>) -> der::Result<Option<AnyRef<'_>>> {
    set.tag().assert_eq(Tag::Set)?;
    let mut r = SliceReader::new(set.value())?;
    if r.is_finished() {
        return Ok(None);
    }
    let first = AnyRef::decode(&mut r)?;
    while !r.is_finished() {
        AnyRef::decode(&mut r)?;
    }
    Ok(Some(first))
}

/// The contentType and the content of a DER ContentInfo (RFC 5652 §3), read where they lie.
fn content_info_ref(input: &[u8]) -> der::Result<(ObjectIdentifier, AnyRef<'_>)> {
    const EXPLICIT_0: Tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::N0,
    };
    let info = AnyRef::from_der(input)?;
    info.tag().assert_eq(Tag::Sequence)?;
    let mut r = SliceReader::new(info.value())?;
    let content_type = ObjectIdentifier::decode(&mut r)?;
    let explicit = AnyRef::decode(&mut r)?;
    r.finish(())?;
    explicit.tag().assert_eq(EXPLICIT_0)?;
    Ok((content_type, AnyRef::from_der(explicit.value())?))
}

/// The SignedData of a CMS ContentInfo, handed to `read`.
fn content_info<T>(
    input: &[u8],
    read: impl FnOnce(AnyRef<'_>) -> Result<T, ScepError>,
) -> Result<T, ScepError> {
    if input.len() > MAX_MESSAGE_BYTES {
        return Err(ScepError("larger than any SCEP message"));
    }
    let converted;
    let (content_type, content) = match content_info_ref(input) {
        Ok(parts) => parts,
        // iOS sends its pkiMessage in BER (indefinite lengths, segmented OCTET STRINGs).
        Err(_) => {
            converted = ber_to_der(input)?;
            content_info_ref(&converted).map_err(|_| ScepError("not a CMS ContentInfo"))?
        }
    };
    if content_type != ID_SIGNED_DATA {
        return Err(ScepError("not CMS SignedData"));
    }
    read(content)
}

fn signed_data(input: &[u8]) -> Result<SignedData, ScepError> {
    content_info(input, |signed| {
        signed
            .decode_as::<SignedData>()
            .map_err(|_| MALFORMED_SIGNED_DATA)
    })
}

/// The signerInfos of a SignedData (RFC 5652 §5.1) as DER, the fields before them skipped
/// unparsed: the SCEP attributes are all there, and parsing the certificates a device sends
/// along cost more than everything else the gateway does for a request.
fn signer_infos(signed: AnyRef<'_>) -> der::Result<&[u8]> {
    signed.tag().assert_eq(Tag::Sequence)?;
    let mut r = SliceReader::new(signed.value())?;
    // version, digestAlgorithms, encapContentInfo
    for _ in 0..3 {
        AnyRef::decode(&mut r)?;
    }
    // certificates [0] and crls [1], when present
    while matches!(r.peek_tag()?, Tag::ContextSpecific { .. }) {
        AnyRef::decode(&mut r)?;
    }
    let infos = r.tlv_bytes()?;
    r.finish(infos)
}

/// How deep BER nesting may go: a pkiMessage nests about ten levels; past this it is hostile.
const MAX_BER_DEPTH: usize = 32;

/// Re-encodes BER as DER where SCEP clients differ: indefinite lengths become definite, and
/// constructed (segmented) OCTET STRINGs become one primitive OCTET STRING. Anything else is
/// copied as it is, so a DER input comes out unchanged. Input size (MAX_MESSAGE_BYTES) and depth
/// (MAX_BER_DEPTH) are bounded, so is the work.
pub fn ber_to_der(input: &[u8]) -> Result<Vec<u8>, ScepError> {
    let mut out = Vec::with_capacity(input.len());
    let used = ber_element(input, 0, &mut out)?;
    if used != input.len() {
        return Err(ScepError("trailing bytes after the message"));
    }
    Ok(out)
}

const BER_ERROR: ScepError = ScepError("malformed BER");

/// Converts one element at the start of `input`; returns how many input bytes it took.
fn ber_element(input: &[u8], depth: usize, out: &mut Vec<u8>) -> Result<usize, ScepError> {
    if depth > MAX_BER_DEPTH {
        return Err(ScepError("BER nested too deep"));
    }
    let first = *input.first().ok_or(BER_ERROR)?;
    let mut pos = 1;
    if first & 0x1f == 0x1f {
        // High tag number: continuation bytes while bit 8 is set.
        loop {
            let b = *input.get(pos).ok_or(BER_ERROR)?;
            pos += 1;
            if b & 0x80 == 0 {
                break;
            }
            if pos > 6 {
                return Err(BER_ERROR);
            }
        }
    }
    let tag = &input[..pos];
    let constructed = first & 0x20 != 0;
    let len_byte = *input.get(pos).ok_or(BER_ERROR)?;
    pos += 1;
    let definite = match len_byte {
        0x80 => None,
        b if b < 0x80 => Some(usize::from(b)),
        b => {
            let n = usize::from(b & 0x7f);
            if n > 4 {
                return Err(BER_ERROR);
            }
            let bytes = input.get(pos..pos + n).ok_or(BER_ERROR)?;
            pos += n;
            Some(
                bytes
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b)),
            )
        }
    };
    if !constructed {
        let len = definite.ok_or(BER_ERROR)?;
        let content = input
            .get(pos..pos.checked_add(len).ok_or(BER_ERROR)?)
            .ok_or(BER_ERROR)?;
        out.extend_from_slice(tag);
        push_len(out, len);
        out.extend_from_slice(content);
        return Ok(pos + len);
    }
    // Constructed: convert the children into a scratch buffer, then write the definite length.
    let mut children = Vec::new();
    let end = match definite {
        Some(len) => {
            let end = pos.checked_add(len).ok_or(BER_ERROR)?;
            let body = input.get(pos..end).ok_or(BER_ERROR)?;
            let mut at = 0;
            while at < body.len() {
                at += ber_element(&body[at..], depth + 1, &mut children)?;
            }
            end
        }
        None => {
            let mut at = pos;
            loop {
                match input.get(at..at + 2) {
                    Some([0, 0]) => break at + 2,
                    Some(_) => at += ber_element(&input[at..], depth + 1, &mut children)?,
                    None => return Err(BER_ERROR),
                }
            }
        }
    };
    if first == 0x24 {
        // A segmented OCTET STRING: DER has it in one piece.
        let joined = octet_segments(&children)?;
        out.push(0x04);
        push_len(out, joined.len());
        out.extend_from_slice(&joined);
    } else {
        out.extend_from_slice(tag);
        push_len(out, children.len());
        out.extend_from_slice(&children);
    }
    Ok(end)
}

/// The contents of the (already DER) primitive OCTET STRINGs in `segments`, end to end.
fn octet_segments(mut segments: &[u8]) -> Result<Vec<u8>, ScepError> {
    let mut joined = Vec::with_capacity(segments.len());
    while !segments.is_empty() {
        if segments[0] != 0x04 {
            return Err(BER_ERROR);
        }
        let (header_len, len) = der_header(segments).ok_or(BER_ERROR)?;
        let content = segments
            .get(header_len..header_len + len)
            .ok_or(BER_ERROR)?;
        joined.extend_from_slice(content);
        segments = &segments[header_len + len..];
    }
    Ok(joined)
}

/// The header length and content length of the DER element at the start of `input`.
fn der_header(input: &[u8]) -> Option<(usize, usize)> {
    use der::Reader;
    let mut reader = der::SliceReader::new(input).ok()?;
    let header = der::Header::decode(&mut reader).ok()?;
    let header_len = usize::try_from(reader.position()).ok()?;
    Some((header_len, usize::try_from(header.length).ok()?))
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    out.push(0x80 | (bytes.len() - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

/// A GET PKIOperation's message, read. Its signerInfos, all the gateway reads, sit at the end,
/// after the enveloped request that is most of the message and that the gateway never opens;
/// when the message is DER, only its headers and its end are decoded from base64. Anything
/// else (BER as iOS sends, bad base64, a malformed structure) is decoded whole and read by
/// `parse_pki_message`, so the answer is always the one the whole message gives.
pub fn parse_get_message(query: &str) -> Result<PkiMessage, ScepError> {
    let text = get_message_text(query)?;
    if let Some(signer_infos) = SparseBase64::new(&text).and_then(|b| b.signer_infos()) {
        return pki_message(&signer_infos);
    }
    parse_pki_message(&decode_text(&text)?)
}

/// The `message` parameter of a GET PKIOperation, decoded: percent-decoding as RFC 3986 says
/// (a `+` stays a `+`), line breaks dropped (sscep wraps at 64 characters), then base64 in the
/// standard or URL-safe alphabet (scepclient 2.1 sends the latter), padded or not.
pub fn decode_get_message(query: &str) -> Result<Vec<u8>, ScepError> {
    decode_text(&get_message_text(query)?)
}

/// The message parameter as standard-alphabet base64 text.
fn get_message_text(query: &str) -> Result<Cow<'_, [u8]>, ScepError> {
    let raw = query_param(query, "message").ok_or(ScepError("no message parameter"))?;
    if raw.len() > MAX_MESSAGE_BYTES * 2 {
        return Err(ScepError("larger than any SCEP message"));
    }
    Ok(base64_text(raw.as_bytes()))
}

/// Standard base64, padded or not.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn decode_text(text: &[u8]) -> Result<Vec<u8>, ScepError> {
    BASE64
        .decode(text)
        .map_err(|_| ScepError("the message parameter is not base64"))
}

/// Base64 text in the standard alphabet (padding aside), read a stretch at a time: any whole
/// quads of it decode alone to the bytes they give in the whole. Only the last quad can make the
/// whole text undecodable (padding, trailing bits), and every read that reaches the end takes it
/// with the same decoder: `signer_infos` always ends with such a read, so it never answers for
/// text that would not decode whole.
struct SparseBase64<'t> {
    text: &'t [u8],
    /// Where the padding starts.
    body: usize,
    /// The decoded length.
    len: usize,
}

impl<'t> SparseBase64<'t> {
    fn new(text: &'t [u8]) -> Option<Self> {
        let pad = text
            .iter()
            .rev()
            .take(2)
            .take_while(|&&b| b == b'=')
            .count();
        let body = text.len() - pad;
        // Written to fold without an early exit, so that it compiles to vector compares.
        let alphabet = text[..body].iter().fold(true, |ok, &b| {
            ok & (b.is_ascii_alphanumeric() | (b == b'+') | (b == b'/'))
        });
        let tail = match body % 4 {
            0 => 0,
            2 => 1,
            3 => 2,
            _ => return None,
        };
        // Padding that does not complete the last quad is left to the decoder: every read
        // that reaches the end takes the padding with it.
        if !alphabet {
            return None;
        }
        Some(Self {
            text,
            body,
            len: body / 4 * 3 + tail,
        })
    }

    /// The decoded bytes `start..end`.
    fn bytes(&self, start: usize, end: usize) -> Option<Vec<u8>> {
        if start > end || end > self.len {
            return None;
        }
        let first = start / 3;
        let from = first * 4;
        // A read that reaches into the last quad takes the text to its end, padding included.
        let to = match end.div_ceil(3) * 4 {
            to if to >= self.body => self.text.len(),
            to => to,
        };
        let decoded = BASE64.decode(self.text.get(from..to)?).ok()?;
        decoded
            .get(start - first * 3..end - first * 3)
            .map(<[u8]>::to_vec)
    }

    /// The DER header at `at`: its tag byte, its length and its content's length. The content
    /// must fit in `end`.
    fn header(&self, at: usize, end: usize) -> Option<(u8, usize, usize)> {
        // A tag byte and a length of at most five bytes: der reads no longer ones.
        let bytes = self.bytes(at, end.min(at + 6))?;
        let mut reader = SliceReader::new(&bytes).ok()?;
        let header = der::Header::decode(&mut reader).ok()?;
        let header_len = usize::try_from(reader.position()).ok()?;
        let len = usize::try_from(header.length).ok()?;
        let content_end = at.checked_add(header_len)?.checked_add(len)?;
        (content_end <= end).then_some((*bytes.first()?, header_len, len))
    }

    /// What `content_info` and `signer_infos` read from the whole message, the three fields
    /// before the certificates skipped by their lengths. `None` where they would not read it
    /// the same way: the caller then decodes the whole message.
    fn signer_infos(&self) -> Option<Vec<u8>> {
        if self.len > MAX_MESSAGE_BYTES {
            return None;
        }
        let end = self.len;
        // ContentInfo ::= SEQUENCE { contentType, [0] EXPLICIT content }, nothing after it.
        let (tag, header_len, len) = self.header(0, end)?;
        if tag != 0x30 || header_len + len != end {
            return None;
        }
        let mut at = header_len;
        let (tag, header_len, len) = self.header(at, end)?;
        let oid = self.bytes(at + header_len, at + header_len + len)?;
        if tag != 0x06 || oid != ID_SIGNED_DATA.as_bytes() {
            return None;
        }
        at += header_len + len;
        // [0] EXPLICIT, then the SignedData SEQUENCE, each running to the end.
        for expected in [0xa0, 0x30] {
            let (tag, header_len, len) = self.header(at, end)?;
            if tag != expected || at + header_len + len != end {
                return None;
            }
            at += header_len;
        }
        // version, digestAlgorithms, encapContentInfo: the enveloped request is in the last.
        for _ in 0..3 {
            let (_, header_len, len) = self.header(at, end)?;
            at += header_len + len;
        }
        let rest = self.bytes(at, end)?;
        let mut r = SliceReader::new(&rest).ok()?;
        while matches!(r.peek_tag().ok()?, Tag::ContextSpecific { .. }) {
            AnyRef::decode(&mut r).ok()?;
        }
        let infos = r.tlv_bytes().ok()?;
        r.finish(infos).ok().map(<[u8]>::to_vec)
    }
}

/// The `&`-separated pairs of a query, as `str::split('&')` gives them, found with memchr: a
/// SCEP query may be 64 KB long.
pub fn query_pairs(query: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(query);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr(b'&', r.as_bytes()) {
            Some(at) => {
                rest = Some(&r[at + 1..]);
                Some(&r[..at])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// The raw value of the first `name=value` pair of `query` whose name is `name` (ASCII case
/// ignored).
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query_pairs(query)
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
}

/// Percent-decoding (a `%` not followed by two hex digits stays as it is, as `percent_encoding`
/// leaves it), whitespace dropped and the URL-safe alphabet mapped onto the standard one: a GET
/// message is up to 64 KB, so this runs at memory speed where it can. In a request-target no byte
/// is whitespace or a control character until decoded, and then only `%`, `-` and `_` need work:
/// memchr finds them and the runs between are copied whole, and when there are none (standard
/// base64 sent raw, as iOS does) the text is the input itself. Any other input takes the byte
/// loop, which gives the same result.
fn base64_text(raw: &[u8]) -> Cow<'_, [u8]> {
    // Written to fold without an early exit, so that it compiles to vector compares.
    let has_low = raw.iter().fold(false, |low, &b| low | (b <= b' '));
    if has_low {
        return Cow::Owned(base64_text_bytewise(raw));
    }
    let mut specials = memchr::memchr3_iter(b'%', b'-', b'_', raw).peekable();
    if specials.peek().is_none() {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut run = 0;
    for at in specials {
        if at < run {
            continue;
        }
        out.extend_from_slice(&raw[run..at]);
        run = at + 1;
        match raw[at] {
            b'-' => out.push(b'+'),
            b'_' => out.push(b'/'),
            _ => match percent_escape(raw, at + 1) {
                Some(decoded) => {
                    run = at + 3;
                    let mapped = STANDARD_TEXT[usize::from(decoded)];
                    if mapped & DROP == 0 {
                        out.push(mapped as u8);
                    }
                }
                None => out.push(b'%'),
            },
        }
    }
    out.extend_from_slice(&raw[run..]);
    Cow::Owned(out)
}

/// What each byte of base64 text becomes: its standard-alphabet byte in the low 8 bits, or DROP
/// if it is left out.
const DROP: u16 = 0x100;
const STANDARD_TEXT: [u16; 256] = {
    let mut map = [0u16; 256];
    let mut b = 0;
    while b < 256 {
        map[b] = match b as u8 {
            b'-' => b'+' as u16,
            b'_' => b'/' as u16,
            c if c.is_ascii_whitespace() => DROP,
            c => c as u16,
        };
        b += 1;
    }
    map
};

/// The byte that the two hex digits at `raw[at..at + 2]` stand for, if they are hex digits.
fn percent_escape(raw: &[u8], at: usize) -> Option<u8> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let hi = hex(*raw.get(at)?)?;
    let lo = hex(*raw.get(at + 1)?)?;
    Some(hi << 4 | lo)
}

/// `base64_text` a byte at a time, for input that is not a request-target's.
fn base64_text_bytewise(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        i += 1;
        let mut b = b;
        if b == b'%' {
            if let Some(decoded) = percent_escape(raw, i) {
                b = decoded;
                i += 2;
            }
        }
        let mapped = STANDARD_TEXT[usize::from(b)];
        if mapped & DROP == 0 {
            out.push(mapped as u8);
        }
    }
    out
}

/// The certificates of a GetCACert answer: one DER certificate (x-x509-ca-cert), or a degenerate
/// certs-only SignedData with the CA and the RA certificates (x-x509-ca-ra-cert).
pub fn parse_ca_certs(body: &[u8]) -> Result<Vec<Certificate>, ScepError> {
    if let Ok(cert) = Certificate::from_der(body) {
        return Ok(vec![cert]);
    }
    let signed = signed_data(body)?;
    let certs: Vec<Certificate> = signed
        .certificates
        .map(|set| {
            set.0
                .into_vec()
                .into_iter()
                .filter_map(|c| match c {
                    CertificateChoices::Certificate(c) => Some(c),
                    CertificateChoices::Other(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if certs.is_empty() {
        return Err(ScepError("no certificate in the GetCACert answer"));
    }
    Ok(certs)
}

/// A CA certificate (basicConstraints cA), as opposed to an RA certificate.
pub fn is_ca(cert: &Certificate) -> bool {
    const BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
    cert.tbs_certificate
        .extensions
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .filter(|e| e.extn_id == BASIC_CONSTRAINTS)
        .filter_map(|e| {
            x509_cert::ext::pkix::BasicConstraints::from_der(e.extn_value.as_bytes()).ok()
        })
        .any(|bc| bc.ca)
}

/// notAfter as seconds since the Unix epoch.
pub fn not_after_unix(cert: &Certificate) -> u64 {
    cert.tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs()
}

/// The DER of a degenerate certs-only SignedData holding `certs`: what NDES sends for GetCACert
/// when it has RA certificates. Tests and the stand-ins use it; a production build has no use for it.
#[cfg(any(test, feature = "dev"))]
pub fn degenerate_pkcs7(certs: &[Certificate]) -> Result<Vec<u8>, der::Error> {
    use cms::content_info::{CmsVersion, ContentInfo};
    use cms::signed_data::{CertificateSet, EncapsulatedContentInfo, SignerInfos};
    use der::asn1::SetOfVec;
    use der::Encode;
    const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
    let mut set = SetOfVec::new();
    for c in certs {
        set.insert(CertificateChoices::Certificate(c.clone()))?;
    }
    let signed = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::new(),
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: None,
        },
        certificates: Some(CertificateSet(set)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::new()),
    };
    ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: der::Any::encode_from(&signed)?,
    }
    .to_der()
}

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
