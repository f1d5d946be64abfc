//! A target that records every applied frame, served on real QUIC.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use blockferry_proto::sender::sequenced;
use blockferry_proto::{DiskId, Frame, Generation, HashRangeReply, HashRangeRequest, Hello, Seq};
use blockferry_transport::sink::{self, Accepted, DiskState, FrameSink, ServeOptions, SinkError};
use blockferry_transport::{PeerIdentity, RevocationList, Tuning, server_config, server_endpoint};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::data::block;
use crate::pki::Pki;

/// A target that records every applied frame; `open` answers with what it
/// holds, like a real target restored from its journal. Applying can be held
/// closed to fill the sender's queue or the relay's spool.
#[derive(Debug)]
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

/// Serves `target` as the PKI identity `stem` ("target" or "relay") on
/// 127.0.0.1:0 with `tuning`; returns its address. Stops with `cancel`.
pub fn serve_recording(
    pki: &Pki,
    stem: &str,
    target: Arc<RecordingTarget>,
    tuning: &Tuning,
    cancel: &CancellationToken,
) -> SocketAddr {
    let cfg = server_config(
        &pki.ca(),
        pki.identity(stem),
        RevocationList::default(),
        tuning,
    )
    .expect("server config");
    let ep = server_endpoint("127.0.0.1:0".parse().unwrap(), cfg, tuning).expect("server endpoint");
    let addr = ep.local_addr().expect("local address");
    tokio::spawn(sink::serve(
        ep,
        target,
        ServeOptions::default(),
        cancel.clone(),
    ));
    addr
}

/// Starts the recording target as "target" on 127.0.0.1:0 with the default
/// tuning; returns its address.
pub fn start_target(
    pki: &Pki,
    target: Arc<RecordingTarget>,
    cancel: &CancellationToken,
) -> SocketAddr {
    serve_recording(pki, "target", target, &Tuning::default(), cancel)
}

/// Asserts the target holds exactly batches 0..n of `disk` (as made by
/// [`crate::data::batch`]), once, in order, with their data.
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
