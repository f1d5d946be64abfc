//! quinn endpoints with blockferry's tuning (see PERF-NOTES): large datagrams
//! where the path allows them, 8 MiB socket buffers, 16/64/64 MiB windows and
//! segmentation offload on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, TransportConfig, VarInt};
use rustls_pki_types::CertificateDer;

use crate::sockbuf;
use crate::tls::{self, RevocationList, TlsIdentity};

/// Errors creating endpoints.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("quic configuration: {0}")]
    Config(String),
    #[error("cannot bind udp socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Transport tuning. [`Tuning::default`] suits WANs (MTU discovery from 1200
/// bytes); [`Tuning::loopback`] the large datagrams a loopback path allows.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// First datagram size tried; discovery goes up from here.
    pub initial_mtu: u16,
    /// Largest UDP payload accepted and advertised.
    pub max_udp_payload: u16,
    /// Socket receive and send buffer, bytes.
    pub socket_buffer: usize,
    pub stream_receive_window: u32,
    pub connection_receive_window: u32,
    pub send_window: u64,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            initial_mtu: 1200,
            max_udp_payload: 1472,
            socket_buffer: 8 << 20,
            stream_receive_window: 16 << 20,
            connection_receive_window: 64 << 20,
            send_window: 64 << 20,
            // A peer that vanished (SIGKILL, host down) is given up after
            // this long; the sender then reconnects and resumes.
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
        }
    }
}

impl Tuning {
    /// Loopback: 6450-byte datagrams. quinn 0.11 breaks above ~6.5 KB (10 GSO
    /// segments per send must stay under 64 KiB).
    pub fn loopback() -> Self {
        Tuning {
            initial_mtu: 6450,
            max_udp_payload: 6500,
            ..Tuning::default()
        }
    }

    fn transport(&self) -> Result<TransportConfig, EndpointError> {
        let mut t = TransportConfig::default();
        t.initial_mtu(self.initial_mtu)
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.connection_receive_window))
            .send_window(self.send_window)
            .max_idle_timeout(Some(
                self.idle_timeout
                    .try_into()
                    .map_err(|e| EndpointError::Config(format!("idle timeout: {e}")))?,
            ))
            .keep_alive_interval(Some(self.keep_alive))
            .enable_segmentation_offload(true);
        let mut mtud = quinn::MtuDiscoveryConfig::default();
        mtud.upper_bound(self.max_udp_payload.max(self.initial_mtu));
        t.mtu_discovery_config(Some(mtud));
        Ok(t)
    }

    fn endpoint_config(&self, reset_seed: Option<&[u8]>) -> Result<EndpointConfig, EndpointError> {
        let mut ec = match reset_seed {
            // The stateless-reset key derives from the server's private key,
            // so a restarted server (same key) resets the connections its
            // previous life held: peers notice at once, not after the idle timeout.
            Some(seed) => {
                let key = blake3::derive_key("blockferry quic stateless reset v1", seed);
                EndpointConfig::new(Arc::new(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    &key,
                )))
            }
            None => EndpointConfig::default(),
        };
        ec.max_udp_payload_size(self.max_udp_payload.max(self.initial_mtu))
            .map_err(|e| EndpointError::Config(format!("max udp payload: {e}")))?;
        Ok(ec)
    }
}

fn bind(addr: SocketAddr, tuning: &Tuning) -> Result<std::net::UdpSocket, EndpointError> {
    let io = |source| EndpointError::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(io)?;
    for which in [sockbuf::Buffer::Receive, sockbuf::Buffer::Send] {
        match sockbuf::set(&socket, which, tuning.socket_buffer) {
            Ok(true) => {}
            Ok(false) => tracing::debug!(
                ?which,
                "socket buffer capped by net.core sysctls (no CAP_NET_ADMIN)"
            ),
            Err(e) => tracing::warn!(?which, error = %e, "cannot size socket buffer"),
        }
    }
    socket.bind(&addr.into()).map_err(io)?;
    socket.set_nonblocking(true).map_err(io)?;
    Ok(socket.into())
}

/// A server configuration: mutual TLS against `ca`, refusing `revoked`.
pub fn server_config(
    ca: &[CertificateDer<'static>],
    identity: TlsIdentity,
    revoked: RevocationList,
    tuning: &Tuning,
) -> Result<quinn::ServerConfig, EndpointError> {
    let rustls = tls::rustls_server_config(ca, identity, revoked)?;
    let quic = QuicServerConfig::try_from(rustls)
        .map_err(|e| EndpointError::Config(format!("quic server crypto: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(tuning.transport()?));
    Ok(cfg)
}

/// As [`server_config`], admitting relays only (the target): an agent's
/// certificate is refused at the handshake whatever name it carries.
pub fn relay_server_config(
    ca: &[CertificateDer<'static>],
    identity: TlsIdentity,
    revoked: RevocationList,
    tuning: &Tuning,
) -> Result<quinn::ServerConfig, EndpointError> {
    let rustls = tls::rustls_relay_server_config(ca, identity, revoked)?;
    let quic = QuicServerConfig::try_from(rustls)
        .map_err(|e| EndpointError::Config(format!("quic server crypto: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(tuning.transport()?));
    Ok(cfg)
}

/// A client configuration: verifies the server against `ca`, presents `identity`.
pub fn client_config(
    ca: &[CertificateDer<'static>],
    identity: TlsIdentity,
    tuning: &Tuning,
) -> Result<quinn::ClientConfig, EndpointError> {
    let rustls = tls::rustls_client_config(ca, identity)?;
    let quic = QuicClientConfig::try_from(rustls)
        .map_err(|e| EndpointError::Config(format!("quic client crypto: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(tuning.transport()?));
    Ok(cfg)
}

/// A listening endpoint on `addr` (port 0 picks a free port).
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, EndpointError> {
    server_endpoint_with_reset_seed(addr, config, tuning, None)
}

/// Like [`server_endpoint`], with stateless resets keyed by `identity`'s
/// private key so they survive a restart of the process (use it for servers).
pub fn server_endpoint_for(
    addr: SocketAddr,
    config: quinn::ServerConfig,
    tuning: &Tuning,
    identity: &TlsIdentity,
) -> Result<quinn::Endpoint, EndpointError> {
    server_endpoint_with_reset_seed(addr, config, tuning, Some(identity.key.secret_der()))
}

fn server_endpoint_with_reset_seed(
    addr: SocketAddr,
    config: quinn::ServerConfig,
    tuning: &Tuning,
    reset_seed: Option<&[u8]>,
) -> Result<quinn::Endpoint, EndpointError> {
    let socket = bind(addr, tuning)?;
    quinn::Endpoint::new(
        tuning.endpoint_config(reset_seed)?,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| EndpointError::Bind { addr, source })
}

/// A connecting endpoint bound to an ephemeral port of `bind_addr`'s family.
pub fn client_endpoint(
    bind_addr: SocketAddr,
    config: quinn::ClientConfig,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, EndpointError> {
    let socket = bind(bind_addr, tuning)?;
    let mut ep = quinn::Endpoint::new(
        tuning.endpoint_config(None)?,
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| EndpointError::Bind {
        addr: bind_addr,
        source,
    })?;
    ep.set_default_client_config(config);
    Ok(ep)
}

/// The unspecified address of `peer`'s family, port 0: where a client binds.
pub fn any_addr_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}
