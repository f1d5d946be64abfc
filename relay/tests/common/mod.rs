//! Shared fixtures: a PKI, a recording target on real QUIC, relay configs and
//! an agent-side disk channel.
#![allow(dead_code)] // each test file uses a part

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blockferry_proto::sender::sequenced;
use blockferry_proto::{
    DiskId, DiskSender, Frame, Generation, HashRangeReply, HashRangeRequest, Hello, SenderConfig,
    Seq, build_chunk,
};
use blockferry_transport::pki::{self, InitNames};
use blockferry_transport::sink::{self, Accepted, DiskState, FrameSink, ServeOptions, SinkError};
use blockferry_transport::tls::load_certs;
use blockferry_transport::{
    Connector, DiskChannel, PeerIdentity, RevocationList, TlsIdentity, Tuning, client_config,
    client_endpoint, server_config, server_endpoint,
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub const DISK_A: DiskId = DiskId::from_bytes([0xa1; 16]);
pub const DISK_B: DiskId = DiskId::from_bytes([0xb2; 16]);

pub fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init()
        .ok();
}

/// A target that records every applied frame; `open` answers with what it
/// holds, like a real target restored from its journal. Applying can be held
/// closed to fill the relay's spool.
pub struct RecordingTarget {
    pub applied: Mutex<HashMap<DiskId, Vec<Frame>>>,
    /// `true`: apply proceeds; `false`: apply waits.
    open: watch::Sender<bool>,
    /// Signalled after every apply.
    pub progressed: Notify,
    /// The disk size of every Hello, in order.
    pub hello_sizes: Mutex<Vec<(DiskId, u64)>>,
}

impl RecordingTarget {
    pub fn new() -> Arc<Self> {
        Arc::new(RecordingTarget {
            applied: Mutex::new(HashMap::new()),
            open: watch::channel(true).0,
            progressed: Notify::new(),
            hello_sizes: Mutex::new(Vec::new()),
        })
    }

    pub fn hold(&self) {
        self.open.send_replace(false);
    }

    pub fn release(&self) {
        self.open.send_replace(true);
    }

    /// Sequences applied for `disk`, in order of application.
    pub fn seqs(&self, disk: DiskId) -> Vec<u64> {
        self.applied
            .lock()
            .unwrap()
            .get(&disk)
            .map(|v| {
                v.iter()
                    .filter_map(sequenced)
                    .map(|(_, _, s)| s.0)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `disk` has `n` frames applied.
    pub async fn wait_applied(&self, disk: DiskId, n: usize) {
        loop {
            let notified = self.progressed.notified();
            if self.seqs(disk).len() >= n {
                return;
            }
            notified.await;
        }
    }
}

impl FrameSink for RecordingTarget {
    async fn open(&self, _peer: &PeerIdentity, hello: &Hello) -> Result<DiskState, SinkError> {
        self.hello_sizes
            .lock()
            .unwrap()
            .push((hello.disk, hello.disk_size));
        let applied = self.applied.lock().unwrap();
        let last = applied
            .get(&hello.disk)
            .and_then(|v| v.last())
            .and_then(sequenced)
            .map_or((Generation(0), Seq::ZERO), |(_, g, s)| (g, s));
        Ok(DiskState {
            generation: last.0,
            durable_seq: last.1,
        })
    }

    async fn apply(&self, disk: DiskId, frames: Vec<Accepted>) -> Result<(), SinkError> {
        let mut open = self.open.subscribe();
        open.wait_for(|o| *o).await.ok();
        self.applied
            .lock()
            .unwrap()
            .entry(disk)
            .or_default()
            .extend(frames.into_iter().map(|a| a.frame));
        self.progressed.notify_waiters();
        Ok(())
    }

    async fn hash_ranges(
        &self,
        _peer: &PeerIdentity,
        req: HashRangeRequest,
    ) -> Result<HashRangeReply, SinkError> {
        Ok(HashRangeReply {
            disk: req.disk,
            generation: req.generation,
            request_id: req.request_id,
            digests: Vec::new(),
        })
    }
}

/// A PKI directory with relay, target and agents host-a and host-b.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &InitNames::default()).unwrap();
        pki::issue_agent(dir.path(), "host-a").unwrap();
        pki::issue_agent(dir.path(), "host-b").unwrap();
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        load_certs(&self.path().join(pki::CA_CERT)).unwrap()
    }

    pub fn identity(&self, stem: &str) -> TlsIdentity {
        let f = pki::cert_files(self.path(), stem);
        TlsIdentity::load(&f.cert, &f.key).unwrap()
    }
}

/// Starts the recording target on 127.0.0.1:0; returns its address.
pub fn start_target(
    pki: &Pki,
    target: Arc<RecordingTarget>,
    cancel: &CancellationToken,
) -> SocketAddr {
    let tuning = Tuning::default();
    let cfg = server_config(
        &pki.ca(),
        pki.identity("target"),
        RevocationList::default(),
        &tuning,
    )
    .unwrap();
    let ep = server_endpoint("127.0.0.1:0".parse().unwrap(), cfg, &tuning).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(sink::serve(
        ep,
        target,
        ServeOptions::default(),
        cancel.clone(),
    ));
    addr
}

/// relay.toml text: host-a owns DISK_A, host-b owns DISK_B.
pub fn relay_toml(
    pki: &Pki,
    spool: &Path,
    listen: SocketAddr,
    target: SocketAddr,
    spool_limit: u64,
) -> String {
    let p = |f: &str| pki.path().join(f).display().to_string();
    format!(
        r#"listen = "{listen}"
metrics_listen = "127.0.0.1:0"
spool_dir = "{spool}"
spool_limit_bytes = {spool_limit}
spool_segment_bytes = 1048576
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[target]
address = "{target}"
server_name = "target"
[[agents]]
name = "host-a"
disks = ["{a}"]
[[agents]]
name = "host-b"
disks = ["{b}"]
"#,
        spool = spool.display(),
        ca = p("ca.crt"),
        cert = p("relay.crt"),
        key = p("relay.key"),
        a = DISK_A,
        b = DISK_B,
    )
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// An agent-side channel for `disk` as agent `name`, to the relay at `relay`.
pub fn agent_channel(
    pki: &Pki,
    name: &str,
    disk: DiskId,
    relay: SocketAddr,
    window: usize,
    cancel: &CancellationToken,
) -> DiskChannel {
    let tuning = Tuning::default();
    let files = pki::agent_files(pki.path(), name);
    let id = TlsIdentity::load(&files.cert, &files.key).unwrap();
    let ep = client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        client_config(&pki.ca(), id, &tuning).unwrap(),
        &tuning,
    )
    .unwrap();
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

/// The deterministic content of batch `i`.
pub fn block(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (j as u64).wrapping_mul(7).wrapping_add(i * 13) as u8)
        .collect()
}

/// A one-chunk batch for index `i` (seq i+1 on a fresh disk).
pub fn batch(i: u64, len: usize) -> Vec<blockferry_proto::Chunk> {
    vec![build_chunk(i * len as u64, &block(i, len), None).unwrap()]
}

/// Asserts the target holds exactly batches 0..n of `disk`, once, in order, with their data.
pub fn assert_applied_exactly(target: &RecordingTarget, disk: DiskId, n: u64, len: usize) {
    let applied = target.applied.lock().unwrap();
    let frames = applied.get(&disk).map(Vec::as_slice).unwrap_or(&[]);
    let seqs: Vec<u64> = frames
        .iter()
        .filter_map(sequenced)
        .map(|(_, _, s)| s.0)
        .collect();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "applied sequences");
    for (i, f) in frames.iter().enumerate() {
        let Frame::Batch(b) = f else {
            panic!("frame {i} is not a batch")
        };
        let plain = blockferry_proto::verify_chunk(&b.chunks[0]).unwrap();
        assert_eq!(
            plain.to_bytes().as_ref(),
            block(i as u64, len).as_slice(),
            "data of batch {i}"
        );
    }
}
