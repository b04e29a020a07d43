//! One certificate order (RFC 8555, section 7.4): the order placed, each authorization's
//! challenge answered and announced, the order polled until ready, finalized with a CSR for a new
//! key, and the chain fetched. The challenge answers are withdrawn however it ends.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Error, Identifier, NewOrder, Order, OrderStatus,
    RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::config::AcmeChallenge;
use crate::ops::acme::challenge::{tls_alpn_certificate, Http01Answers};
use crate::tls::ListenerCertificate;

/// Validation by a public CA takes seconds; past this the order is given up and retried later.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// Where the challenge answers go.
pub struct Responders<'a> {
    pub challenge: AcmeChallenge,
    pub listener: &'a ListenerCertificate,
    pub http01: &'a Http01Answers,
}

/// A new certificate: the chain as the CA sent it, and its key, both PEM.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

pub async fn order(
    account: &Account,
    domains: &[String],
    responders: &Responders<'_>,
) -> Result<Issued, Error> {
    let identifiers: Vec<Identifier> = domains.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut installed = Installed {
        responders,
        answers: Vec::new(),
    };
    answer_challenges(&mut order, &mut installed).await?;
    let status = order.poll_ready(&POLL).await?;
    if status != OrderStatus::Ready {
        return Err(why_invalid(&mut order).await);
    }
    drop(installed);
    let key = KeyPair::generate().map_err(|e| Error::Other(Box::new(e)))?;
    let mut params =
        CertificateParams::new(domains.to_vec()).map_err(|e| Error::Other(Box::new(e)))?;
    let mut subject = DistinguishedName::new();
    if let Some(first) = domains.first() {
        subject.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = subject;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Error::Other(Box::new(e)))?;
    order.finalize_csr(csr.der()).await?;
    let chain_pem = order.poll_certificate(&POLL).await?;
    Ok(Issued {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}

async fn answer_challenges(order: &mut Order, installed: &mut Installed<'_>) -> Result<(), Error> {
    let kind = match installed.responders.challenge {
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        AcmeChallenge::Http01 => ChallengeType::Http01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            // Validated for this account within the CA's reuse period: nothing to prove.
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => {
                return Err(Error::Other(
                    format!(
                        "the authorization for {} is {other:?}",
                        authorization.identifier()
                    )
                    .into(),
                ))
            }
        }
        let domain = authorization.identifier().to_string();
        let Some(mut challenge) = authorization.challenge(kind.clone()) else {
            return Err(Error::Other(
                format!("the CA offers no {kind:?} challenge for {domain}").into(),
            ));
        };
        let key_authorization = challenge.key_authorization();
        let answer = match kind {
            ChallengeType::TlsAlpn01 => {
                let cert = tls_alpn_certificate(&domain, key_authorization.digest().as_ref())
                    .map_err(|e| Error::Other(e.into()))?;
                installed.responders.listener.set_challenge(&domain, cert);
                Answer::TlsAlpn(domain)
            }
            _ => {
                let token = challenge.token.clone();
                installed
                    .responders
                    .http01
                    .set(&token, key_authorization.as_str());
                Answer::Http(token)
            }
        };
        installed.answers.push(answer);
        challenge.set_ready().await?;
    }
    Ok(())
}

/// The CA's own account of why an order failed: the first challenge error it reports.
async fn why_invalid(order: &mut Order) -> Error {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let Ok(state) = authorization.refresh().await else {
            continue;
        };
        if let Some(problem) = state.challenges.iter().find_map(|c| c.error.clone()) {
            return Error::Api(problem);
        }
    }
    Error::Str("the order became invalid and the CA gave no reason")
}

enum Answer {
    TlsAlpn(String),
    Http(String),
}

/// The challenge answers in place, withdrawn when dropped: on success, on error and on a
/// cancelled order alike.
struct Installed<'a> {
    responders: &'a Responders<'a>,
    answers: Vec<Answer>,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        for answer in &self.answers {
            match answer {
                Answer::TlsAlpn(domain) => self.responders.listener.clear_challenge(domain),
                Answer::Http(token) => self.responders.http01.clear(token),
            }
        }
    }
}
