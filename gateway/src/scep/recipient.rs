//! Who a PKIOperation is encrypted to: the RecipientInfo of its pkcsPKIEnvelope, which names the
//! RA (or CA) certificate whose key alone can open it (RFC 5652 §6.2.1, RFC 8894 §3.2.2). With
//! several NDES servers, each holding its own RA keys, this is the server that can answer it.
//! The RecipientInfo is outside the encrypted part: nothing is decrypted.

use super::*;

const ID_ENVELOPED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.3");
const SUBJECT_KEY_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");

/// A certificate as a RecipientInfo names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Recipient {
    /// The issuer's Name as DER, and the serial number's INTEGER content octets.
    IssuerSerial { issuer: Vec<u8>, serial: Vec<u8> },
    /// The subjectKeyIdentifier extension's value.
    SubjectKeyId(Vec<u8>),
}

impl Recipient {
    /// The ways `cert` can be named: always by issuer and serial, and by its subjectKeyIdentifier
    /// when it has one.
    pub fn names_of(cert: &Certificate) -> Vec<Recipient> {
        use der::Encode;
        let tbs = &cert.tbs_certificate;
        let mut names = Vec::with_capacity(2);
        if let Ok(issuer) = tbs.issuer.to_der() {
            names.push(Recipient::IssuerSerial {
                issuer,
                serial: tbs.serial_number.as_bytes().to_vec(),
            });
        }
        let ski = tbs
            .extensions
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .find(|e| e.extn_id == SUBJECT_KEY_IDENTIFIER)
            .and_then(|e| OctetStringRef::from_der(e.extn_value.as_bytes()).ok());
        if let Some(ski) = ski {
            names.push(Recipient::SubjectKeyId(ski.as_bytes().to_vec()));
        }
        names
    }
}

const NOT_ENVELOPED: ScepError = ScepError("the pkiMessage carries no CMS EnvelopedData");
const MALFORMED_ENVELOPED: ScepError = ScepError("malformed CMS EnvelopedData");

/// The recipient of a pkiMessage's pkcsPKIEnvelope: the first RecipientInfo, a
/// KeyTransRecipientInfo as SCEP uses (RSA key transport to the RA certificate).
pub fn pki_message_recipient(der: &[u8]) -> Result<Recipient, ScepError> {
    content_info(der, |signed| {
        let envelope = encapsulated_content(signed).map_err(|_| MALFORMED_SIGNED_DATA)?;
        // The envelope is its own encoding inside the OCTET STRING: iOS writes it in BER too.
        match recipient_of_envelope(&envelope) {
            Ok(r) => Ok(r),
            Err(_) => recipient_of_envelope(&ber_to_der(&envelope)?),
        }
    })
}

/// The eContent OCTET STRING's octets of a SignedData's encapContentInfo (RFC 5652 §5.2).
fn encapsulated_content(signed: AnyRef<'_>) -> der::Result<Vec<u8>> {
    const EXPLICIT_0: Tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::N0,
    };
    signed.tag().assert_eq(Tag::Sequence)?;
    let mut r = SliceReader::new(signed.value())?;
    AnyRef::decode(&mut r)?; // version
    AnyRef::decode(&mut r)?; // digestAlgorithms
    let encap = AnyRef::decode(&mut r)?;
    encap.tag().assert_eq(Tag::Sequence)?;
    let mut e = SliceReader::new(encap.value())?;
    ObjectIdentifier::decode(&mut e)?;
    let explicit = AnyRef::decode(&mut e)?;
    explicit.tag().assert_eq(EXPLICIT_0)?;
    let octets = AnyRef::from_der(explicit.value())?;
    octets.tag().assert_eq(Tag::OctetString)?;
    Ok(octets.value().to_vec())
}

fn recipient_of_envelope(envelope: &[u8]) -> Result<Recipient, ScepError> {
    let (content_type, enveloped) = content_info_ref(envelope).map_err(|_| MALFORMED_ENVELOPED)?;
    if content_type != ID_ENVELOPED_DATA {
        return Err(NOT_ENVELOPED);
    }
    first_recipient(enveloped).map_err(|_| MALFORMED_ENVELOPED)?
}

/// The rid of the first RecipientInfo of an EnvelopedData (RFC 5652 §6.1, §6.2.1).
fn first_recipient(enveloped: AnyRef<'_>) -> der::Result<Result<Recipient, ScepError>> {
    const ORIGINATOR_INFO: Tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::N0,
    };
    const SUBJECT_KEY_ID: Tag = Tag::ContextSpecific {
        constructed: false,
        number: TagNumber::N0,
    };
    enveloped.tag().assert_eq(Tag::Sequence)?;
    let mut r = SliceReader::new(enveloped.value())?;
    AnyRef::decode(&mut r)?.tag().assert_eq(Tag::Integer)?; // version
    if r.peek_tag()? == ORIGINATOR_INFO {
        AnyRef::decode(&mut r)?;
    }
    let Some(info) = first_of_set(AnyRef::decode(&mut r)?)? else {
        return Ok(Err(ScepError("the EnvelopedData has no recipient")));
    };
    if info.tag() != Tag::Sequence {
        return Ok(Err(ScepError(
            "the recipient is not a KeyTransRecipientInfo",
        )));
    }
    let mut k = SliceReader::new(info.value())?;
    AnyRef::decode(&mut k)?.tag().assert_eq(Tag::Integer)?; // version
    let rid = AnyRef::decode(&mut k)?;
    Ok(Ok(match rid.tag() {
        Tag::Sequence => {
            let mut ias = SliceReader::new(rid.value())?;
            let issuer = ias.tlv_bytes()?;
            AnyRef::from_der(issuer)?.tag().assert_eq(Tag::Sequence)?;
            let serial = AnyRef::decode(&mut ias)?;
            serial.tag().assert_eq(Tag::Integer)?;
            ias.finish(())?;
            Recipient::IssuerSerial {
                issuer: issuer.to_vec(),
                serial: serial.value().to_vec(),
            }
        }
        SUBJECT_KEY_ID => Recipient::SubjectKeyId(rid.value().to_vec()),
        _ => {
            return Ok(Err(ScepError(
                "the recipient identifier is of no known kind",
            )))
        }
    }))
}
