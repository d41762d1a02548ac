//! rustls configurations from PEM files, peer identity, reload, readable TLS errors.
//!
//! This module owns who may talk to whom. Invariants:
//! - the relay **always** requires a client certificate that chains to the configured CA
//!   (there is no way to build a server config without client verification);
//! - the agent always verifies the relay's certificate against the CA *and* the name;
//! - TLS 1.3 only unless an option explicitly allows TLS 1.2;
//! - the ring provider is passed explicitly, never taken from process-global state;
//! - an agent's identity comes from its verified certificate ([`peer_identity`]): one
//!   Common Name (or, without one, one DNS name), normalized by
//!   [`crate::identity::normalize`] and so one safe path component
//!   ([`validate_identity`]) before it is used as a directory name;
//! - a failed reload keeps the previous configuration.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// Longest accepted identity, in bytes.
pub const MAX_IDENTITY_LEN: usize = 128;

/// What went wrong while building a TLS configuration or reading an identity. Every
/// variant names the file involved so an operator can fix it without reading code.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: malformed PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: no certificate found (expected one or more `BEGIN CERTIFICATE` blocks)")]
    NoCertificates { path: PathBuf },
    #[error(
        "{path}: no private key found (expected a `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` \
         or `BEGIN EC PRIVATE KEY` block)"
    )]
    NoKey { path: PathBuf },
    #[error(
        "{path}: the private key is readable by other users (mode {mode:04o}); refusing to \
         use it: `chmod 0640 {path}` (owner root, group of the service) or 0600, and \
         consider it compromised if others could read it"
    )]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("{path}: no certificate revocation list found (expected `BEGIN X509 CRL`)")]
    NoCrl { path: PathBuf },
    #[error("CA file {path}: certificate #{index} is not usable as a trust anchor: {reason}")]
    BadCa {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("certificate {cert} / key {key} rejected: {reason}")]
    CertKey {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot build the TLS verifier: {0}")]
    Verifier(String),
    #[error("TLS setup failed: {0}")]
    Rustls(String),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("cannot parse the peer certificate: {0}")]
    BadPeerCertificate(String),
    #[error("the peer certificate has neither a subject Common Name nor a DNS name")]
    NoIdentity,
    #[error("the peer certificate names more than one identity: {0}")]
    AmbiguousIdentity(String),
    #[error("the peer certificate's name is refused as an identity: {0}")]
    Identity(crate::identity::IdentityError),
    #[error("{identity:?} is not usable as a directory name: {reason}")]
    BadIdentity {
        identity: String,
        reason: &'static str,
    },
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_err(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Reads every certificate in a PEM file (a leaf followed by its intermediates, or a
/// list of CAs). Other PEM blocks (e.g. a key in the same file) are skipped.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem(&read_file(path)?, path)
}

/// [`load_certs`] on bytes already read; `path` only names the file in errors.
pub(crate) fn certs_from_pem(
    data: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file: PKCS#8 (`PRIVATE KEY`), PKCS#1
/// (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`). A key file that users other than
/// its owner and group may read (or write) is refused ([`TlsError::KeyExposed`]): a
/// key anyone on the host could copy no longer proves who the agent is.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    // The mode of the very file read (no window between the check and the read).
    let mut f = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = f
        .metadata()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        return Err(TlsError::KeyExposed {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    key_from_pem(&data, path)
}

/// [`load_key`] on bytes already read; `path` only names the file in errors.
pub(crate) fn key_from_pem(data: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(data).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        e => pem_err(path, e),
    })
}

/// Reads every CRL in a PEM file.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    crls_from_pem(&read_file(path)?, path)
}

/// [`load_crls`] on bytes already read; `path` only names the file in errors.
pub(crate) fn crls_from_pem(
    data: &[u8],
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if crls.is_empty() {
        return Err(TlsError::NoCrl {
            path: path.to_owned(),
        });
    }
    Ok(crls)
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in load_certs(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            index: index + 1,
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions(tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    if tls12 {
        rustls::ALL_VERSIONS
    } else {
        TLS13_ONLY
    }
}

/// The PEM files one side of a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA (or CAs) that the peer's certificate must chain to.
    pub ca: PathBuf,
    /// Our certificate, optionally followed by intermediates.
    pub cert: PathBuf,
    /// Our private key.
    pub key: PathBuf,
}

/// Relay-side options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// Also accept TLS 1.2 (for old middleboxes); TLS 1.3 only when false.
    pub tls12: bool,
    /// PEM CRL files; a client certificate listed in one is refused.
    pub crls: Vec<PathBuf>,
}

/// Agent-side options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// Also offer TLS 1.2; TLS 1.3 only when false.
    pub tls12: bool,
}

/// Relay configuration with defaults (TLS 1.3 only, no CRL).
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let files = TlsFiles {
        ca: ca.to_owned(),
        cert: cert.to_owned(),
        key: key.to_owned(),
    };
    server_config_with(&files, &ServerOptions::default())
}

/// Relay configuration: our certificate, and a client certificate required from every
/// peer, verified against `files.ca` (and the CRLs, if any).
pub fn server_config_with(
    files: &TlsFiles,
    opts: &ServerOptions,
) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let mut crls = Vec::new();
    for path in &opts.crls {
        crls.extend(load_crls(path)?);
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .with_crls(crls)
        // Fail closed: a CRL past its nextUpdate no longer says who is revoked.
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(opts.tls12))
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::CertKey {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        })?;
    Ok(Arc::new(config))
}

/// Agent configuration with defaults (TLS 1.3 only).
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let files = TlsFiles {
        ca: ca.to_owned(),
        cert: cert.to_owned(),
        key: key.to_owned(),
    };
    client_config_with(&files, &ClientOptions::default())
}

/// Agent configuration: the relay must present a certificate for the server name we
/// connect to, chaining to `files.ca`; we present our certificate.
pub fn client_config_with(
    files: &TlsFiles,
    opts: &ClientOptions,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(opts.tls12))
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::CertKey {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        })?;
    Ok(Arc::new(config))
}

/// The verified client's identity on a relay connection (after the handshake).
pub fn peer_identity(conn: &rustls::ServerConnection) -> Result<String, TlsError> {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    identity_from_cert(cert)
}

/// The identity a certificate names, normalized ([`crate::identity::normalize`]).
///
/// Which name counts: the subject Common Name when there is one, and then the DNS
/// subject alternative names play no part (they are how the agent's host is reached,
/// not who it is; a relay certificate lists several). A certificate with more than one
/// Common Name is refused: `CN=agency-soc-relay,CN=A12345-web01` would be one agent to
/// one reader and another agent to the next. Without a Common Name, the certificate must
/// carry exactly one DNS name, which is the identity.
pub fn identity_from_cert(der: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    let cns = cert
        .subject()
        .iter_common_name()
        .map(|attr| {
            attr.as_str()
                .map(str::to_owned)
                .map_err(|e| TlsError::BadPeerCertificate(format!("Common Name: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let raw = match cns.as_slice() {
        [cn] => cn.clone(),
        [] => {
            let san = cert
                .subject_alternative_name()
                .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
            let dns: Vec<String> = san
                .map(|san| {
                    san.value
                        .general_names
                        .iter()
                        .filter_map(|n| match n {
                            x509_parser::extensions::GeneralName::DNSName(d) => {
                                Some((*d).to_owned())
                            }
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            match dns.as_slice() {
                [] => return Err(TlsError::NoIdentity),
                [one] => one.clone(),
                many => {
                    return Err(TlsError::AmbiguousIdentity(format!(
                        "no Common Name and {} DNS names ({}): which one is the agent?",
                        many.len(),
                        many.join(", ")
                    )));
                }
            }
        }
        many => {
            return Err(TlsError::AmbiguousIdentity(format!(
                "{} Common Names ({}): a certificate names one agent",
                many.len(),
                many.iter()
                    .map(|c| format!("{c:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    };
    // The raw name first, so an unsafe one is reported as the certificate spells it.
    validate_identity(&raw)?;
    crate::identity::normalize(&raw).map_err(TlsError::Identity)
}

/// Checks that an identity is safe as ONE directory name in the relay store.
///
/// Rule: 1 to [`MAX_IDENTITY_LEN`] bytes of UTF-8; not `.` or `..`; does not start with
/// `.` (hidden, or a relative path) or `-` (read as an option by shell tools); no `/`,
/// `\`, NUL or other control characters; no leading or trailing whitespace. Anything
/// else (including non-ASCII names such as Chinese agency names) is accepted.
pub fn validate_identity(id: &str) -> Result<(), TlsError> {
    let reason = if id.is_empty() {
        Some("empty")
    } else if id.len() > MAX_IDENTITY_LEN {
        Some("longer than 128 bytes")
    } else if id == "." || id == ".." {
        Some("`.` and `..` are not directory names")
    } else if id.starts_with('.') {
        Some("starts with `.`")
    } else if id.starts_with('-') {
        Some("starts with `-`")
    } else if id.contains(['/', '\\']) {
        Some("contains a path separator")
    } else if id.chars().any(char::is_control) {
        Some("contains NUL or a control character")
    } else if id.trim() != id {
        Some("has leading or trailing whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TlsError::BadIdentity {
            identity: id.chars().take(MAX_IDENTITY_LEN).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

fn read_lock<T: Clone>(lock: &RwLock<T>) -> T {
    // A poisoned lock only means a writer panicked mid-assignment of an `Arc`, which
    // cannot leave a torn value; keep serving it.
    lock.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write_lock<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(|p| p.into_inner()) = value;
}

/// A relay configuration that can be re-read from its files (on SIGHUP) while
/// connections keep using the configuration they started with.
#[derive(Debug, Clone)]
pub struct ReloadableServerConfig {
    files: TlsFiles,
    opts: ServerOptions,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ReloadableServerConfig {
    /// Loads the files once; fails if they are not usable.
    pub fn new(files: TlsFiles, opts: ServerOptions) -> Result<Self, TlsError> {
        let config = server_config_with(&files, &opts)?;
        Ok(Self {
            files,
            opts,
            current: Arc::new(RwLock::new(config)),
        })
    }

    /// The configuration for the next accepted connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        read_lock(&self.current)
    }

    /// Re-reads the files. On error the previous configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config_with(&self.files, &self.opts)?;
        write_lock(&self.current, config);
        Ok(())
    }
}

/// An agent configuration that can be re-read from its files.
#[derive(Debug, Clone)]
pub struct ReloadableClientConfig {
    files: TlsFiles,
    opts: ClientOptions,
    current: Arc<RwLock<Arc<ClientConfig>>>,
}

impl ReloadableClientConfig {
    pub fn new(files: TlsFiles, opts: ClientOptions) -> Result<Self, TlsError> {
        let config = client_config_with(&files, &opts)?;
        Ok(Self {
            files,
            opts,
            current: Arc::new(RwLock::new(config)),
        })
    }

    /// The configuration for the next connection attempt.
    pub fn current(&self) -> Arc<ClientConfig> {
        read_lock(&self.current)
    }

    /// Re-reads the files. On error the previous configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = client_config_with(&self.files, &self.opts)?;
        write_lock(&self.current, config);
        Ok(())
    }
}

/// Turns a TLS I/O error (as tokio-rustls returns it) into a sentence an operator can
/// act on; other I/O errors are described as they are.
pub fn explain(err: &io::Error) -> String {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(e) => explain_rustls(e),
        None if err.kind() == io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection unexpectedly (during the TLS handshake this \
             usually means it refused our certificate or TLS version; check its log)"
                .to_owned()
        }
        None => err.to_string(),
    }
}

/// Like [`explain`], for a `rustls::Error`.
pub fn explain_rustls(err: &rustls::Error) -> String {
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(c) => explain_cert(c),
        E::NoCertificatesPresented => {
            "the client presented no certificate; every agent needs a client certificate \
             issued by the relay's CA"
                .to_owned()
        }
        E::AlertReceived(a) => explain_alert(*a),
        E::PeerIncompatible(p) => format!(
            "no common TLS version or algorithm with the peer ({p:?}); soclink uses TLS 1.3 \
             unless tls12 is enabled on both sides"
        ),
        other => format!("TLS error: {other}"),
    }
}

fn explain_cert(c: &CertificateError) -> String {
    match c {
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "the relay's certificate is not valid for name {} (it is valid for: {}); connect \
             with a name the certificate lists or reissue it",
            expected.to_str(),
            presented.join(", ")
        ),
        CertificateError::NotValidForName => {
            "the relay's certificate is not valid for the name we connected to".to_owned()
        }
        CertificateError::UnknownIssuer => {
            "certificate signed by an unknown CA: the peer's certificate does not chain to \
             the CA file configured here"
                .to_owned()
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the peer's certificate expired; reissue it".to_owned()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the peer's certificate is not valid yet (check both clocks)".to_owned()
        }
        CertificateError::Revoked => {
            "the peer's certificate has been revoked (listed in a CRL)".to_owned()
        }
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => {
            "the CRL configured here has expired (past its nextUpdate), so no client can be \
             checked: install a fresh CRL and reload"
                .to_owned()
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "the peer's certificate is not issued for this use (wrong extended key usage: \
             agents need clientAuth, relays serverAuth)"
                .to_owned()
        }
        CertificateError::BadSignature => "the peer's certificate has a bad signature: it is \
             signed by a different CA than the one configured here (perhaps one with the same \
             name)"
            .to_owned(),
        other => format!("the peer's certificate was rejected: {other:?}"),
    }
}

fn explain_alert(a: AlertDescription) -> String {
    let what = match a {
        AlertDescription::UnknownCA => {
            "our certificate is signed by a CA the peer does not trust (client certificate \
             signed by an unknown CA)"
        }
        AlertDescription::CertificateExpired => "our certificate expired according to the peer",
        AlertDescription::CertificateRevoked => "our certificate has been revoked",
        AlertDescription::CertificateRequired => {
            "the peer requires a client certificate and we sent none"
        }
        AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
            "the peer rejected our certificate (wrong key usage, not yet valid, or malformed)"
        }
        AlertDescription::ProtocolVersion => {
            "no common TLS version: the peer does not accept the TLS versions we offer \
             (soclink uses TLS 1.3 unless tls12 is enabled)"
        }
        AlertDescription::HandshakeFailure => "no common TLS version or cipher with the peer",
        AlertDescription::DecryptError => {
            "the peer could not verify our certificate's signature: it is signed by a \
             different CA than the one the peer trusts (perhaps one with the same name)"
        }
        _ => "",
    };
    if what.is_empty() {
        format!("the peer aborted the TLS connection with alert {a:?}")
    } else {
        format!("the peer refused the connection: {what}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_rule() {
        for ok in ["agent-01", "host1.agency.gov.tw", "臺北市政府-web01", "a b"] {
            validate_identity(ok).unwrap();
        }
        let long = "a".repeat(129);
        for bad in [
            "", ".", "..", ".hidden", "-rf", "a/b", "a\\b", "a\0b", "a\nb", " a", &long,
        ] {
            assert!(validate_identity(bad).is_err(), "{bad:?}");
        }
        validate_identity(&"a".repeat(128)).unwrap();
    }
}
