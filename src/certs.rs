//! Throwaway certificates: `soclink certs dev --out DIR`, and an issuer for tests.
//!
//! This module owns certificate *generation* for trying soclink out and for tests —
//! never for production, where the agency's or the center's CA issues certificates.
//! Invariants: private keys are written with mode 0600 and never over an existing file;
//! every leaf carries exactly the extended key usage of its role (relay: serverAuth,
//! agent: clientAuth), so a misused certificate fails the handshake as it would in
//! production.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;

/// Validity of development certificates.
const DEV_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating absorbs small clock differences between the hosts of a demo.
const BACKDATE: Duration = Duration::from_secs(3600);

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// A relay (TLS server): serverAuth.
    Server,
    /// An agent (TLS client): clientAuth.
    Client,
    /// An intermediate CA.
    Ca,
}

/// The key of an issued certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAlg {
    EcdsaP256,
    Ed25519,
    /// An existing PKCS#8 PEM key (e.g. an RSA key made by `openssl genpkey`, since
    /// rcgen with ring cannot generate RSA keys).
    Pkcs8Pem(String),
}

/// Everything that varies between test certificates.
#[derive(Debug, Clone)]
pub struct IssueParams {
    /// Subject Common Name; empty for none.
    pub cn: String,
    /// DNS names or IP addresses (parsed as an IP when possible).
    pub sans: Vec<String>,
    pub kind: CertKind,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub key: KeyAlg,
    /// A second subject Common Name after `cn` (tests of the one-identity rule: a
    /// relay must refuse such a certificate).
    pub second_common_name: Option<String>,
}

impl IssueParams {
    /// Valid from an hour ago for a year, ECDSA P-256.
    pub fn new(cn: &str, sans: &[&str], kind: CertKind) -> IssueParams {
        let now = crate::clock::now();
        IssueParams {
            cn: cn.to_owned(),
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
            kind,
            not_before: now - BACKDATE,
            not_after: now + DEV_VALIDITY,
            key: KeyAlg::EcdsaP256,
            second_common_name: None,
        }
    }
}

/// An issued certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    /// PKCS#8.
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

/// A certificate authority that can issue leaves and intermediates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// This CA's certificate (PEM); for an intermediate, only its own certificate.
    pub cert_pem: String,
    /// This CA's key (PKCS#8 PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn make_key(alg: &KeyAlg) -> anyhow::Result<KeyPair> {
    Ok(match alg {
        KeyAlg::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        KeyAlg::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519)?,
        KeyAlg::Pkcs8Pem(pem) => {
            KeyPair::from_pem(pem).context("cannot use the given PKCS#8 key")?
        }
    })
}

fn params_for(p: &IssueParams) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(p.sans.clone())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    // An empty `cn` leaves the subject without a Common Name (tests of the SAN fallback).
    if !p.cn.is_empty() {
        params
            .distinguished_name
            .push(DnType::CommonName, p.cn.as_str());
    }
    // rcgen keeps one value per attribute type: a second CN needs CN's OID (2.5.4.3)
    // as a "custom" type.
    if let Some(cn) = &p.second_common_name {
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 3]), cn.as_str());
    }
    // Random serials: rcgen's default derives the serial from the public key, so two
    // certificates for one key (a renewal) would collide, which CRLs cannot tell apart.
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.not_before = p.not_before.into();
    params.not_after = p.not_after.into();
    params.use_authority_key_identifier_extension = true;
    match p.kind {
        CertKind::Server => {
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        CertKind::Client => {
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        CertKind::Ca => {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        }
    }
    Ok(params)
}

impl Ca {
    /// A self-signed root CA, ECDSA P-256, valid from an hour ago for a year.
    pub fn new(cn: &str) -> anyhow::Result<Ca> {
        Ca::new_with(&IssueParams::new(cn, &[], CertKind::Ca))
    }

    /// A self-signed root CA with the given validity and key (`kind` is ignored).
    pub fn new_with(p: &IssueParams) -> anyhow::Result<Ca> {
        let params = params_for(&IssueParams {
            kind: CertKind::Ca,
            ..p.clone()
        })?;
        let key = make_key(&p.key)?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Issues a leaf (or, with [`CertKind::Ca`], an intermediate's certificate).
    pub fn issue(&self, p: &IssueParams) -> anyhow::Result<Issued> {
        let params = params_for(p)?;
        let key = make_key(&p.key)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        })
    }

    /// An intermediate CA signed by this one; leaves it issues need the chain
    /// `leaf.cert_pem + intermediate.cert_pem`.
    pub fn intermediate(&self, cn: &str) -> anyhow::Result<Ca> {
        let p = IssueParams::new(cn, &[], CertKind::Ca);
        let params = params_for(&p)?;
        let key = make_key(&p.key)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }
}

impl Ca {
    /// A CRL (PEM) signed by this CA revoking `certs`, valid from an hour ago for 30
    /// days.
    pub fn revoke(&self, certs: &[&CertificateDer<'_>]) -> anyhow::Result<String> {
        let now = crate::clock::now();
        self.revoke_until(certs, now + Duration::from_secs(30 * 24 * 3600))
    }

    /// Like [`Ca::revoke`] with the CRL's nextUpdate at `next_update` (in the past for
    /// an expired CRL).
    pub fn revoke_until(
        &self,
        certs: &[&CertificateDer<'_>],
        next_update: SystemTime,
    ) -> anyhow::Result<String> {
        let mut revoked = Vec::new();
        let now = crate::clock::now();
        let this_update = (now - BACKDATE).min(next_update - Duration::from_secs(3600));
        for der in certs {
            let (_, cert) =
                x509_parser::parse_x509_certificate(der).context("cannot parse certificate")?;
            revoked.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(cert.tbs_certificate.raw_serial()),
                revocation_time: (now - BACKDATE).into(),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: this_update.into(),
            next_update: next_update.into(),
            crl_number: rcgen::SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// Paths written by [`write_dev_certs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCerts {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub relay: PathBuf,
    pub relay_key: PathBuf,
    pub agent: PathBuf,
    pub agent_key: PathBuf,
}

/// Writes a throwaway CA, a relay certificate (CN `localhost`; SANs `localhost`,
/// `127.0.0.1`, `::1`) and an agent certificate (CN `agent_name`, clientAuth) into
/// `out`, which is created if needed. Refuses to overwrite any existing file, so an
/// existing CA key is never lost.
pub fn write_dev_certs(out: &Path, agent_name: &str) -> anyhow::Result<DevCerts> {
    crate::tls::validate_identity(agent_name)
        .context("the agent name becomes the agent's identity")?;
    let paths = DevCerts {
        ca: out.join("ca.pem"),
        ca_key: out.join("ca-key.pem"),
        relay: out.join("relay.pem"),
        relay_key: out.join("relay-key.pem"),
        agent: out.join("agent.pem"),
        agent_key: out.join("agent-key.pem"),
    };
    let all = [
        &paths.ca,
        &paths.ca_key,
        &paths.relay,
        &paths.relay_key,
        &paths.agent,
        &paths.agent_key,
    ];
    for p in all {
        if p.exists() {
            bail!(
                "{} already exists; not overwriting it (choose an empty --out directory)",
                p.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

    let ca = Ca::new("soclink development CA")?;
    let relay = ca.issue(&IssueParams::new(
        "localhost",
        &["localhost", "127.0.0.1", "::1"],
        CertKind::Server,
    ))?;
    let agent = ca.issue(&IssueParams::new(agent_name, &[], CertKind::Client))?;

    write_new(&paths.ca_key, &ca.key_pem, 0o600)?;
    write_new(&paths.ca, &ca.cert_pem, 0o644)?;
    write_new(&paths.relay_key, &relay.key_pem, 0o600)?;
    write_new(&paths.relay, &relay.cert_pem, 0o644)?;
    write_new(&paths.agent_key, &agent.key_pem, 0o600)?;
    write_new(&paths.agent, &agent.cert_pem, 0o644)?;
    Ok(paths)
}

/// Creates `path` (failing if it exists) with `mode` from the start, so a key is never
/// readable by others even for an instant.
fn write_new(path: &Path, content: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(content.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn parse(pem_path: &Path) -> Vec<u8> {
        crate::tls::load_certs(pem_path).unwrap().remove(0).to_vec()
    }

    #[test]
    fn dev_certs_have_the_promised_names_and_usages() {
        let dir = tempfile::tempdir().unwrap();
        let dev = write_dev_certs(dir.path(), "host-7").unwrap();

        let der = parse(&dev.relay);
        let (_, relay) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<String> = relay
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => format!("{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            sans,
            [
                "localhost",
                "[127, 0, 0, 1]",
                "[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]"
            ]
        );
        let eku = relay.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);

        let der = parse(&dev.agent);
        let (_, agent) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            agent
                .subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "host-7"
        );
        let eku = agent.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);

        let der = parse(&dev.ca);
        let (_, ca) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(ca.is_ca());
    }

    #[test]
    fn unsafe_agent_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_dev_certs(dir.path(), "../x").is_err());
        assert!(!dir.path().join("ca-key.pem").exists());
    }
}
