//! The network shell shared by agent, relay and target: QUIC (quinn) with TLS 1.3
//! and mutual certificate authentication, the PKI, and proto frames over streams.
//!
//! - [`pki`]: the CA and the certificates of relay, target and agents.
//! - [`tls`] and [`endpoint`]: rustls configurations and tuned quinn endpoints.
//! - [`framed`]: frames over quinn streams, with limits.
//! - [`sink`]: the receiving endpoint (relay from agents, target from relay).
//! - [`client`]: the sending side (agent to relay, relay to target).
//! - [`log`]: how every service logs.
//! - [`notify`]: readiness for systemd (`Type=notify`).

pub mod client;
pub mod endpoint;
pub mod framed;
pub mod log;
pub mod notify;
pub mod pki;
pub mod sink;
mod sockbuf;
pub mod tls;

pub use client::{ChannelError, Connector, DiskChannel, Progress};
pub use endpoint::{
    Tuning, client_config, client_endpoint, server_config, server_endpoint, server_endpoint_for,
};
pub use sink::{Accepted, DiskState, FrameSink, ServeOptions, SinkError};
pub use tls::{PeerIdentity, RevocationList, TlsIdentity, peer_identity};
