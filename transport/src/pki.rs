//! The blockferry PKI: one CA per installation signs the relay, the target and
//! every agent. An agent's identity is its name, carried as the certificate's
//! common name and DNS subject alternative name; the relay checks it against the
//! disks registered to that name.
//!
//! Layout of a PKI directory:
//!
//! ```text
//! ca.crt ca.key                 the CA (keep ca.key offline once agents are issued)
//! relay.crt relay.key           server for agents, client of the target
//! target.crt target.key         server for the relay
//! agent-NAME.crt agent-NAME.key one pair per protected host
//! ```
//!
//! Key files are created with mode 0600 and every file is written to a temp
//! file, fsynced and renamed, so a crash never leaves half a key behind.

use std::fs;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// File names inside a PKI directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// Longest agent name accepted (a DNS label-ish host name).
pub const MAX_NAME_LEN: usize = 253;

/// Errors of the PKI operations.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Durable(#[from] blockferry_durable::DurableError),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} already exists: refusing to overwrite a PKI; choose another directory or remove it first"
    )]
    AlreadyExists { path: PathBuf },
    #[error("invalid name {name:?}: use 1-{MAX_NAME_LEN} characters of a-z, A-Z, 0-9, '-' and '.'")]
    InvalidName { name: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What a certificate is used for; decides its extended key usages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts connections only (the target).
    Server,
    /// Connects only (an agent).
    Client,
    /// Both: the relay serves agents and connects to the target.
    ServerAndClient,
}

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Validity window of an issued certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (clock skew between hosts) for `days`.
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
}

/// Default lifetime of leaf certificates.
pub const LEAF_DAYS: i64 = 825;
/// Default lifetime of the CA.
pub const CA_DAYS: i64 = 3650;

/// A CA held in memory: its certificate and the key that signs.
#[derive(Debug)]
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

fn ca_params(common_name: &str, validity: Validity) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "blockferry");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    // Positive and non-zero leading byte: a DER INTEGER serial must be positive.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// A new self-signed CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = ca_params(common_name, Validity::days_from_now(CA_DAYS))?;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate()?;
        let cert = params.clone().self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            params,
            key,
        })
    }

    /// Loads the CA of a PKI directory (needs `ca.key`).
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = read_text(&cert_path)?;
        let key_pem = read_text(&key_path)?;
        let key = KeyPair::from_pem(&key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)?;
        Ok(Ca {
            params,
            key,
            cert_pem,
        })
    }

    /// The CA certificate, PEM encoded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM encoded.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a certificate for `name` (common name and DNS SAN).
    pub fn issue(
        &self,
        name: &str,
        role: Role,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        check_name(name)?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "blockferry");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Role::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        // rcgen signs with an issuer `Certificate`; rebuilding it from the stored
        // parameters and the same key yields the same subject and key identifier.
        let issuer = self.params.clone().self_signed(&self.key)?;
        let cert = params.signed_by(&key, &issuer, &self.key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Names of the server certificates made by [`init`].
#[derive(Debug, Clone)]
pub struct InitNames {
    /// Name agents use to verify the relay (`server_name` in their config).
    pub relay: String,
    /// Name the relay uses to verify the target.
    pub target: String,
}

impl Default for InitNames {
    fn default() -> Self {
        InitNames {
            relay: "relay".into(),
            target: "target".into(),
        }
    }
}

/// Paths of a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Files written by [`init`].
#[derive(Debug, Clone)]
pub struct InitFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub relay: CertFiles,
    pub target: CertFiles,
}

/// Paths of the pair named `stem` in `dir`.
pub fn cert_files(dir: &Path, stem: &str) -> CertFiles {
    CertFiles {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    }
}

/// Paths of the agent `name`'s pair in `dir`.
pub fn agent_files(dir: &Path, name: &str) -> CertFiles {
    cert_files(dir, &format!("agent-{name}"))
}

/// Creates a CA and the relay and target certificates in `dir` (created if
/// missing). Refuses to overwrite an existing CA.
pub fn init(dir: &Path, names: &InitNames) -> Result<InitFiles, PkiError> {
    blockferry_durable::create_dir_all(dir)?;
    let ca_cert = dir.join(CA_CERT);
    let ca_key = dir.join(CA_KEY);
    for p in [&ca_cert, &ca_key] {
        if p.exists() {
            return Err(PkiError::AlreadyExists { path: p.clone() });
        }
    }
    let ca = Ca::generate("blockferry CA")?;
    let relay = ca.issue(
        &names.relay,
        Role::ServerAndClient,
        Validity::days_from_now(LEAF_DAYS),
    )?;
    let target = ca.issue(
        &names.target,
        Role::Server,
        Validity::days_from_now(LEAF_DAYS),
    )?;
    let relay_files = cert_files(dir, "relay");
    let target_files = cert_files(dir, "target");
    // The CA key is written first: a crash in between leaves a CA that can
    // re-issue, never certificates whose CA key was lost.
    write_file(&ca_key, ca.key_pem().as_bytes(), 0o600)?;
    write_file(&ca_cert, ca.cert_pem().as_bytes(), 0o644)?;
    write_pair(&relay_files, &relay)?;
    write_pair(&target_files, &target)?;
    Ok(InitFiles {
        ca_cert,
        ca_key,
        relay: relay_files,
        target: target_files,
    })
}

/// Issues the certificate of agent `name` with the CA in `dir`.
pub fn issue_agent(dir: &Path, name: &str) -> Result<CertFiles, PkiError> {
    issue_agent_with(dir, name, Validity::days_from_now(LEAF_DAYS))
}

/// Like [`issue_agent`] with an explicit validity (tests issue expired ones).
pub fn issue_agent_with(dir: &Path, name: &str, validity: Validity) -> Result<CertFiles, PkiError> {
    check_name(name)?;
    let ca = Ca::load(dir)?;
    let issued = ca.issue(name, Role::Client, validity)?;
    let files = agent_files(dir, name);
    write_pair(&files, &issued)?;
    Ok(files)
}

/// Writes a certificate and key to `files` (key mode 0600).
pub fn write_pair(files: &CertFiles, issued: &IssuedCert) -> Result<(), PkiError> {
    write_file(&files.key, issued.key_pem.as_bytes(), 0o600)?;
    write_file(&files.cert, issued.cert_pem.as_bytes(), 0o644)?;
    Ok(())
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidName {
            name: name.chars().take(64).collect(),
        })
    }
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// The file appears whole or not at all, with `mode` from its first byte on.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    Ok(blockferry_durable::replace_file(path, data, Some(mode))?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn init_then_issue_agent_writes_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), &InitNames::default()).unwrap();
        let agent = issue_agent(dir.path(), "host-a").unwrap();
        for key in [
            &files.ca_key,
            &files.relay.key,
            &files.target.key,
            &agent.key,
        ] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(
            fs::read_to_string(&agent.cert)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
    }

    #[test]
    fn init_refuses_to_overwrite_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &InitNames::default()).unwrap();
        let err = init(dir.path(), &InitNames::default()).unwrap_err();
        assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err}");
    }

    #[test]
    fn bad_agent_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &InitNames::default()).unwrap();
        for bad in ["", "a/b", "-x", "x y", "../etc"] {
            assert!(issue_agent(dir.path(), bad).is_err(), "{bad:?}");
        }
    }
}
