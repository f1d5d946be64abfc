//! The network shell shared by agent, relay and target: QUIC (quinn) with TLS 1.3
//! and mutual certificate authentication, the PKI, and proto frames over streams.

pub mod endpoint;
pub mod pki;
mod sockbuf;
pub mod tls;

pub use endpoint::{Tuning, client_config, client_endpoint, server_config, server_endpoint};
pub use tls::{PeerIdentity, RevocationList, TlsIdentity, peer_identity};
