//! BER as SCEP clients send it (iOS: indefinite lengths, segmented OCTET STRINGs), re-encoded as
//! DER within bounds of size and depth.

use super::*;

/// How deep BER nesting may go: a pkiMessage nests about ten levels; past this it is hostile.
pub(super) const MAX_BER_DEPTH: usize = 32;

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

pub(super) const BER_ERROR: ScepError = ScepError("malformed BER");

/// Converts one element at the start of `input`; returns how many input bytes it took.
pub(super) fn ber_element(
    input: &[u8],
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<usize, ScepError> {
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
pub(super) fn octet_segments(mut segments: &[u8]) -> Result<Vec<u8>, ScepError> {
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
pub(super) fn der_header(input: &[u8]) -> Option<(usize, usize)> {
    use der::Reader;
    let mut reader = der::SliceReader::new(input).ok()?;
    let header = der::Header::decode(&mut reader).ok()?;
    let header_len = usize::try_from(reader.position()).ok()?;
    Some((header_len, usize::try_from(header.length).ok()?))
}

pub(super) fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    out.push(0x80 | (bytes.len() - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}
