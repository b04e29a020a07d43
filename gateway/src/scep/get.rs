//! A GET PKIOperation's `message` parameter: the query, percent-decoding and base64 at memory
//! speed, and its signerInfos read from the end of the message.

use super::*;

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
pub(super) fn get_message_text(query: &str) -> Result<Cow<'_, [u8]>, ScepError> {
    let raw = query_param(query, "message").ok_or(ScepError("no message parameter"))?;
    if raw.len() > MAX_MESSAGE_BYTES * 2 {
        return Err(ScepError("larger than any SCEP message"));
    }
    Ok(base64_text(raw.as_bytes()))
}

/// Standard base64, padded or not.
pub(super) const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub(super) fn decode_text(text: &[u8]) -> Result<Vec<u8>, ScepError> {
    BASE64
        .decode(text)
        .map_err(|_| ScepError("the message parameter is not base64"))
}

/// Base64 text in the standard alphabet (padding aside), read a stretch at a time: any whole
/// quads of it decode alone to the bytes they give in the whole. Only the last quad can make the
/// whole text undecodable (padding, trailing bits), and every read that reaches the end takes it
/// with the same decoder: `signer_infos` always ends with such a read, so it never answers for
/// text that would not decode whole.
pub(super) struct SparseBase64<'t> {
    text: &'t [u8],
    /// Where the padding starts.
    body: usize,
    /// The decoded length.
    len: usize,
}

impl<'t> SparseBase64<'t> {
    pub(super) fn new(text: &'t [u8]) -> Option<Self> {
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
    pub(super) fn signer_infos(&self) -> Option<Vec<u8>> {
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
pub(super) fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
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
pub(super) fn base64_text(raw: &[u8]) -> Cow<'_, [u8]> {
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
pub(super) const DROP: u16 = 0x100;
pub(super) const STANDARD_TEXT: [u16; 256] = {
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
pub(super) fn percent_escape(raw: &[u8], at: usize) -> Option<u8> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let hi = hex(*raw.get(at)?)?;
    let lo = hex(*raw.get(at + 1)?)?;
    Some(hi << 4 | lo)
}

/// `base64_text` a byte at a time, for input that is not a request-target's.
pub(super) fn base64_text_bytewise(raw: &[u8]) -> Vec<u8> {
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
