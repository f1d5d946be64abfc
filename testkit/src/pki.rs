//! A PKI directory for tests of mutual TLS over real QUIC.

use std::path::Path;

use blockferry_transport::TlsIdentity;
use blockferry_transport::pki::{self, InitNames};
use blockferry_transport::tls::load_certs;

/// A PKI directory: the CA, the relay and the target (and, from [`Pki::new`],
/// the agents host-a and host-b), removed on drop.
#[derive(Debug)]
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// CA, relay, target and agents host-a and host-b.
    pub fn new() -> Self {
        let p = Pki::bare();
        pki::issue_agent(p.path(), "host-a").expect("issue host-a");
        pki::issue_agent(p.path(), "host-b").expect("issue host-b");
        p
    }

    /// CA, relay and target only: the test issues its agents itself.
    pub fn bare() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        pki::init(dir.path(), &InitNames::default()).expect("pki init");
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        load_certs(&self.path().join(pki::CA_CERT)).expect("load the CA certificate")
    }

    /// The identity of `stem` ("relay", "target", "agent-host-a", ...).
    pub fn identity(&self, stem: &str) -> TlsIdentity {
        let f = pki::cert_files(self.path(), stem);
        TlsIdentity::load(&f.cert, &f.key).expect("load identity")
    }

    /// The identity of agent `name`.
    pub fn agent_identity(&self, name: &str) -> TlsIdentity {
        let f = pki::agent_files(self.path(), name);
        TlsIdentity::load(&f.cert, &f.key).expect("load agent identity")
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
