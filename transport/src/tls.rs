//! rustls configurations for quinn: TLS 1.3 only, ring provider, and mutual
//! certificate authentication against the installation's CA. The server also
//! refuses certificates on a revocation list (names or serials), at the
//! handshake, before any frame is read.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

/// ALPN of the blockferry protocol; a peer speaking anything else is refused.
pub const ALPN: &[u8] = b"blockferry/1";

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what} in PEM form: {detail}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("invalid CA certificate: {0}")]
    BadCa(String),
    #[error("tls configuration: {0}")]
    Config(String),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer certificate cannot be parsed: {0}")]
    BadPeerCertificate(String),
}

/// This side's certificate chain and private key.
#[derive(Debug)]
pub struct TlsIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Loads a PEM certificate (chain) and PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(TlsIdentity {
            chain: load_certs(cert)?,
            key: load_key(key)?,
        })
    }

    /// From PEM text (tests and in-memory PKIs).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let pem_err = |what, detail: String| TlsError::Pem {
            path: PathBuf::from("<memory>"),
            what,
            detail,
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("certificate", e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_err("certificate", "empty".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| pem_err("private key", e.to_string()))?;
        Ok(TlsIdentity { chain, key })
    }
}

/// The three files every component's configuration names for its TLS set-up:
/// the installation's CA, this side's certificate and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn new(ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        TlsFiles { ca, cert, key }
    }

    /// Resolves relative paths against `base` (the configuration file's
    /// directory), so a configuration means the same from any working directory.
    pub fn anchored(self, base: &Path) -> Self {
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        TlsFiles {
            ca: abs(self.ca),
            cert: abs(self.cert),
            key: abs(self.key),
        }
    }

    /// Reads the trust anchors and this side's identity.
    pub fn load(&self) -> Result<(Vec<CertificateDer<'static>>, TlsIdentity), TlsError> {
        Ok((
            load_certs(&self.ca)?,
            TlsIdentity::load(&self.cert, &self.key)?,
        ))
    }
}

/// Loads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: "private key",
        detail: e.to_string(),
    })
}

/// The trust anchors: the installation's CA certificate(s).
pub fn root_store(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots
            .add(cert.clone())
            .map_err(|e| TlsError::BadCa(e.to_string()))?;
    }
    Ok(roots)
}

/// Certificates refused although signed by the CA: by agent name or by serial.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    names: HashSet<String>,
    /// Serials as big-endian bytes without leading zeros.
    serials: HashSet<Vec<u8>>,
}

impl RevocationList {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.serials.is_empty()
    }

    pub fn revoke_name(&mut self, name: &str) {
        self.names.insert(name.to_string());
    }

    pub fn revoke_serial(&mut self, serial: &[u8]) {
        self.serials.insert(strip_zeros(serial).to_vec());
    }

    /// Parses the list file: one entry a line, `#` comments; an entry is an
    /// agent name or `serial:HEX` (as `openssl x509 -serial` prints it).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut list = RevocationList::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if let Some(hex) = line.strip_prefix("serial:") {
                let bytes = parse_hex(hex.trim()).ok_or_else(|| {
                    format!(
                        "line {}: {line:?} is not a hex serial (write serial:0A1B2C...)",
                        i + 1
                    )
                })?;
                list.revoke_serial(&bytes);
            } else {
                list.revoke_name(line);
            }
        }
        Ok(list)
    }

    /// Whether a certificate with this identity is revoked.
    pub fn is_revoked(&self, id: &PeerIdentity) -> bool {
        self.names.contains(&id.name) || self.serials.contains(strip_zeros(&id.serial))
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|p| {
            let hi = (p[0] as char).to_digit(16)?;
            let lo = (p[1] as char).to_digit(16)?;
            u8::try_from((hi << 4) | lo).ok()
        })
        .collect()
}

/// Who is at the other end of a connection, from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The certificate's common name: the agent (or relay) name.
    pub name: String,
    /// The certificate's serial number, big endian.
    pub serial: Vec<u8>,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl PeerIdentity {
    /// Reads name and serial from a DER certificate; never panics on bad input.
    pub fn from_der(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| TlsError::BadPeerCertificate("no common name".into()))?
            .to_string();
        Ok(PeerIdentity {
            name,
            serial: cert.raw_serial().to_vec(),
        })
    }
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, TlsError> {
    let any = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
    PeerIdentity::from_der(leaf)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Wraps the webpki client verifier with the revocation list.
#[derive(Debug)]
struct RevokingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: RevocationList,
    /// Admit only certificates issued to serve too (relays), never
    /// client-only ones (agents).
    relays_only: bool,
}

/// Whether a certificate was issued to serve as well as to connect: it
/// carries the server-auth extended key usage, as the relay's and the
/// target's do (`pki init`) and an agent's (`pki issue-agent`, client only)
/// does not. Whatever name an agent certificate carries, it is not a relay's.
pub fn may_serve(der: &[u8]) -> Result<bool, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    let eku = cert
        .extended_key_usage()
        .map_err(|e| TlsError::BadPeerCertificate(e.to_string()))?;
    Ok(eku.is_some_and(|e| e.value.server_auth))
}

impl ClientCertVerifier for RevokingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.relays_only
            && !may_serve(end_entity)
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?
        {
            let name = PeerIdentity::from_der(end_entity).map_or_else(|_| "?".into(), |p| p.name);
            tracing::warn!(peer = %name, "refused a client certificate that is not a relay's (issued to connect only)");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose,
            ));
        }
        if !self.revoked.is_empty() {
            let id = PeerIdentity::from_der(end_entity)
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            if self.revoked.is_revoked(&id) {
                tracing::warn!(peer = %id.name, "refused a revoked client certificate");
                return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// rustls server side: TLS 1.3, client certificates required, verified against
/// `ca` and checked against `revoked`.
pub fn rustls_server_config(
    ca: &[CertificateDer<'static>],
    identity: TlsIdentity,
    revoked: RevocationList,
) -> Result<rustls::ServerConfig, TlsError> {
    build_server_config(ca, identity, revoked, false)
}

/// As [`rustls_server_config`], admitting relays only: a client certificate
/// must carry the server-auth usage ([`may_serve`]), so an agent's
/// certificate is refused at the handshake whatever its name.
pub fn rustls_relay_server_config(
    ca: &[CertificateDer<'static>],
    identity: TlsIdentity,
    revoked: RevocationList,
) -> Result<rustls::ServerConfig, TlsError> {
    build_server_config(ca, identity, revoked, true)
}

fn build_server_config(
    ca: &[CertificateDer<'static>],
    identity: TlsIdentity,
    revoked: RevocationList,
    relays_only: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(root_store(ca)?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(RevokingVerifier {
        inner,
        revoked,
        relays_only,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config(format!("server certificate or key: {e}")))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// rustls client side: TLS 1.3, the server verified against `ca` (its name is
/// given per connection), and this side's certificate presented.
pub fn rustls_client_config(
    ca: &[CertificateDer<'static>],
    identity: TlsIdentity,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(root_store(ca)?);
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config(format!("client certificate or key: {e}")))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_resolve_relative_paths_against_the_config_directory() {
        let files = TlsFiles {
            ca: "pki/ca.crt".into(),
            cert: "/etc/blockferry/pki/relay.crt".into(),
            key: "relay.key".into(),
        }
        .anchored(Path::new("/etc/blockferry"));
        assert_eq!(files.ca, Path::new("/etc/blockferry/pki/ca.crt"));
        assert_eq!(files.cert, Path::new("/etc/blockferry/pki/relay.crt"));
        assert_eq!(files.key, Path::new("/etc/blockferry/relay.key"));
    }

    #[test]
    fn tls_files_that_do_not_exist_name_the_missing_file() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.crt".into(),
            cert: "/nonexistent/c.crt".into(),
            key: "/nonexistent/c.key".into(),
        };
        let e = files.load().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.crt"), "{e}");
    }

    #[test]
    fn revocation_list_parses_names_and_serials() {
        let list = RevocationList::parse("# lost laptop\nhost-b\nserial:00:0A:ff\n\n").unwrap();
        let b = PeerIdentity {
            name: "host-b".into(),
            serial: vec![1],
        };
        let by_serial = PeerIdentity {
            name: "host-c".into(),
            serial: vec![0x0a, 0xff],
        };
        let fine = PeerIdentity {
            name: "host-a".into(),
            serial: vec![2],
        };
        assert!(list.is_revoked(&b));
        assert!(list.is_revoked(&by_serial));
        assert!(!list.is_revoked(&fine));
        assert!(RevocationList::parse("serial:xyz").is_err());
    }

    #[test]
    fn peer_identity_from_garbage_is_an_error() {
        assert!(PeerIdentity::from_der(&[0x30, 0x03, 0x02, 0x01]).is_err());
        assert!(PeerIdentity::from_der(&[]).is_err());
    }
}
