//! A development PKI for the demo and the tests: a root CA, an NDES server certificate for the
//! internal name and a gateway certificate for the public name, as PEM files in one folder.
//! Never for production: the keys are written unencrypted.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The internal NDES name of the dev PKI, as on a corporate network.
pub const NDES_NAME: &str = "ndes.corp.test";
/// The public name devices use.
pub const PUBLIC_NAME: &str = "scep.example.test";

#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub ndes_cert: PathBuf,
    pub ndes_key: PathBuf,
    pub gateway_cert: PathBuf,
    pub gateway_key: PathBuf,
}

/// A CA that can issue server certificates; tests make a second one to play a foreign CA.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl DevCa {
    pub fn new(common_name: &str) -> Result<DevCa, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server certificate (serverAuth EKU) with the first name as subject CN and every name as
    /// a SAN; names that parse as IP addresses become IP SANs. Returns (chain PEM, key PEM).
    pub fn issue_server(&self, names: &[&str]) -> Result<(String, String), rcgen::Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

impl DevCa {
    /// An RA certificate as NDES has them (not a CA, not for TLS), valid in the past when
    /// `expired`: what an NDES whose RA certificates lapsed hands out in GetCACert.
    pub fn issue_ra(&self, common_name: &str, expired: bool) -> Result<String, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate()?;
        Ok(params.signed_by(&key, &self.issuer)?.pem())
    }
}

/// Writes a fresh dev PKI into `dir` (created if missing).
pub fn generate(dir: &Path) -> Result<DevPki, String> {
    generate_with_ca(dir).map(|(pki, _)| pki)
}

/// The same, keeping the root CA in memory to issue more certificates (its key is never written).
pub fn generate_with_ca(dir: &Path) -> Result<(DevPki, DevCa), String> {
    let err = |e: rcgen::Error| format!("generating the dev PKI: {e}");
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca = DevCa::new("ndes-gateway dev root CA").map_err(err)?;
    let (ndes_pem, ndes_key) = ca.issue_server(&[NDES_NAME, "127.0.0.1"]).map_err(err)?;
    let (gw_pem, gw_key) = ca
        .issue_server(&[PUBLIC_NAME, "localhost", "127.0.0.1"])
        .map_err(err)?;
    let pki = DevPki {
        dir: dir.to_path_buf(),
        root: dir.join("root.pem"),
        ndes_cert: dir.join("ndes.pem"),
        ndes_key: dir.join("ndes.key"),
        gateway_cert: dir.join("gateway.pem"),
        gateway_key: dir.join("gateway.key"),
    };
    let write = |path: &Path, text: &str| {
        fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(&pki.root, &ca.pem)?;
    write(&pki.ndes_cert, &ndes_pem)?;
    write(&pki.ndes_key, &ndes_key)?;
    write(&pki.gateway_cert, &gw_pem)?;
    write(&pki.gateway_key, &gw_key)?;
    Ok((pki, ca))
}
