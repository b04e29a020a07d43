//! Reading a pkiMessage (RFC 8894): the SCEP attributes of its first signer, read where they
//! lie in the CMS SignedData.

use super::*;

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

pub(super) const MALFORMED_SIGNED_DATA: ScepError = ScepError("malformed CMS SignedData");

/// The SCEP attributes of the first signer in a SignerInfos SET, read where they lie: decoding
/// SignerInfos into owned values (every attribute value copied, every SET sorted into DER order
/// by re-encoding its elements) cost more than the rest of a POST's handling. Signers and values
/// are taken in the order they are written (the cms decode sorted them first); a later
/// attribute of the same type overrides an earlier one.
pub(super) fn pki_message(signer_infos: &[u8]) -> Result<PkiMessage, ScepError> {
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
pub(super) fn first_signed_attrs(infos: &[u8]) -> der::Result<Option<Option<AnyRef<'_>>>> {
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
pub(super) fn attribute<'a>(
    r: &mut SliceReader<'a>,
) -> der::Result<Option<(&'a [u8], AnyRef<'a>)>> {
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
pub(super) fn first_of_set(set: AnyRef<'_>) -> der::Result<Option<AnyRef<'_>>> {
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
pub(super) fn content_info_ref(input: &[u8]) -> der::Result<(ObjectIdentifier, AnyRef<'_>)> {
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
pub(super) fn content_info<T>(
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

pub(super) fn signed_data(input: &[u8]) -> Result<SignedData, ScepError> {
    content_info(input, |signed| {
        signed
            .decode_as::<SignedData>()
            .map_err(|_| MALFORMED_SIGNED_DATA)
    })
}

/// The signerInfos of a SignedData (RFC 5652 §5.1) as DER, the fields before them skipped
/// unparsed: the SCEP attributes are all there, and parsing the certificates a device sends
/// along cost more than everything else the gateway does for a request.
pub(super) fn signer_infos(signed: AnyRef<'_>) -> der::Result<&[u8]> {
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
