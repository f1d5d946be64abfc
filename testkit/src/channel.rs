//! Sending ends over real QUIC: an agent's disk channel to a relay, and a
//! relay's (or an agent's) disk channel to a target.

use std::net::SocketAddr;

use blockferry_proto::{DiskId, DiskSender, Generation, SenderConfig};
use blockferry_transport::{
    Connector, DiskChannel, TlsIdentity, Tuning, client_config, client_endpoint, pki,
};
use tokio_util::sync::CancellationToken;

use crate::pki::Pki;

/// A client endpoint on 127.0.0.1:0 presenting `identity`, trusting the PKI's CA.
pub fn client(pki: &Pki, identity: TlsIdentity, tuning: &Tuning) -> quinn::Endpoint {
    let cfg = client_config(&pki.ca(), identity, tuning).expect("client config");
    client_endpoint("127.0.0.1:0".parse().unwrap(), cfg, tuning).expect("client endpoint")
}

/// An agent-side channel for `disk` as agent `name`, to the relay at `relay`,
/// with at most `window` frames unacknowledged.
pub fn agent_channel(
    pki: &Pki,
    name: &str,
    disk: DiskId,
    relay: SocketAddr,
    window: usize,
    cancel: &CancellationToken,
) -> DiskChannel {
    let tuning = Tuning::default();
    let ep = client(pki, pki.agent_identity(name), &tuning);
    let connector = Connector::new(ep, relay, "relay");
    let sender = DiskSender::new(
        SenderConfig {
            max_unacked_frames: window,
            ..SenderConfig::default()
        },
        name,
        disk,
        1 << 30,
        Generation(1),
    );
    DiskChannel::spawn(connector, sender, cancel.clone())
}

/// A sending channel to a target at `addr` under the identity `who` ("relay",
/// or an agent name issued on the spot) from the PKI directory `dir`, for a disk
/// of `size` bytes.
pub fn relay_channel(
    dir: &std::path::Path,
    who: &str,
    addr: SocketAddr,
    disk: DiskId,
    size: u64,
    cancel: &CancellationToken,
) -> DiskChannel {
    let tuning = Tuning::loopback();
    let ca = blockferry_transport::tls::load_certs(&dir.join(pki::CA_CERT)).unwrap();
    let files = if who == "relay" {
        pki::cert_files(dir, "relay")
    } else {
        pki::issue_agent(dir, who).unwrap()
    };
    let ccfg = client_config(
        &ca,
        TlsIdentity::load(&files.cert, &files.key).unwrap(),
        &tuning,
    )
    .unwrap();
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), ccfg, &tuning).unwrap();
    let connector = Connector::new(ep, addr, "target");
    let sender = DiskSender::new(SenderConfig::default(), who, disk, size, Generation(1));
    DiskChannel::spawn(connector, sender, cancel.clone())
}
