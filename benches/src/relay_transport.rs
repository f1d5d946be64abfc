//! Loopback throughput harness of `cargo xtask bench transport` (run through
//! the `blockferry-bench-transport` binary): an agent-side `DiskChannel`
//! pushes batches of 64 KiB chunks to a real relay (spool fsync on, chunk
//! verification on), which forwards them to a sink that verifies and counts
//! them, all over QUIC on 127.0.0.1 in this process. Throughput counts the
//! bytes of chunk data the sink received, from the first push to the last
//! byte at the sink.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use blockferry_proto::{
    Chunk, DiskId, DiskSender, Frame, Generation, HashRangeReply, HashRangeRequest, Hello,
    SenderConfig, Seq, build_chunk,
};
use blockferry_relay::Config;
use blockferry_transport::pki::{self, InitNames};
use blockferry_transport::sink::{self, Accepted, DiskState, FrameSink, ServeOptions, SinkError};
use blockferry_transport::tls::load_certs;
use blockferry_transport::{
    Connector, DiskChannel, PeerIdentity, RevocationList, TlsIdentity, Tuning, client_config,
    client_endpoint, server_config, server_endpoint,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

fn setup<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("bench setup: {e}")
}

fn transfer<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("bench transfer: {e}")
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub struct BenchReport {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl BenchReport {
    /// Megabytes (10^6) per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// Counts chunk bytes; applies nothing.
struct CountingSink {
    bytes: AtomicU64,
    last: AtomicU64,
    progressed: Notify,
}

impl FrameSink for CountingSink {
    async fn open(&self, _peer: &PeerIdentity, _hello: &Hello) -> Result<DiskState, SinkError> {
        Ok(DiskState {
            generation: Generation(0),
            durable_seq: Seq(self.last.load(Ordering::Relaxed)),
        })
    }

    async fn apply(&self, _disk: DiskId, frames: Vec<Accepted>) -> Result<(), SinkError> {
        let mut n = 0u64;
        let mut last = 0;
        for a in &frames {
            if let Frame::Batch(b) = &a.frame {
                n += b.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
                last = b.seq.0;
            }
        }
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.last.fetch_max(last, Ordering::Relaxed);
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

/// Sends `total` bytes of incompressible 64 KiB chunks, `batch` bytes per
/// frame, with the relay's spool in `dir` (use a real disk: fsync is measured).
pub async fn run(dir: &Path, total: u64, batch: usize) -> Result<BenchReport> {
    const CHUNK: usize = 64 << 10;
    std::fs::create_dir_all(dir).map_err(setup)?;
    let dir = &std::fs::canonicalize(dir).map_err(setup)?;
    let pki_dir = dir.join("pki");
    pki::init(&pki_dir, &InitNames::default()).map_err(setup)?;
    let agent = pki::issue_agent(&pki_dir, "bench-agent").map_err(setup)?;
    let ca = load_certs(&pki_dir.join(pki::CA_CERT)).map_err(setup)?;
    let tuning = Tuning::loopback();
    let cancel = CancellationToken::new();

    let tf = pki::cert_files(&pki_dir, "target");
    let target_id = TlsIdentity::load(&tf.cert, &tf.key).map_err(setup)?;
    let tcfg = server_config(&ca, target_id, RevocationList::default(), &tuning).map_err(setup)?;
    let tep =
        server_endpoint("127.0.0.1:0".parse().map_err(setup)?, tcfg, &tuning).map_err(setup)?;
    let taddr = tep.local_addr().map_err(setup)?;
    let sink = Arc::new(CountingSink {
        bytes: AtomicU64::new(0),
        last: AtomicU64::new(0),
        progressed: Notify::new(),
    });
    tokio::spawn(sink::serve(
        tep,
        sink.clone(),
        ServeOptions::default(),
        cancel.clone(),
    ));

    let disk = DiskId::from_bytes([0x5a; 16]);
    let p = |f: &str| pki_dir.join(f).display().to_string();
    let text = format!(
        r#"listen = "127.0.0.1:0"
spool_dir = "{spool}"
spool_limit_bytes = {limit}
ca = "{ca}"
cert = "{cert}"
key = "{key}"
loopback_tuning = true
[target]
address = "{taddr}"
server_name = "target"
[[agents]]
name = "bench-agent"
disks = ["{disk}"]
"#,
        spool = dir.join("spool").display(),
        limit = 1u64 << 30,
        ca = p("ca.crt"),
        cert = p("relay.crt"),
        key = p("relay.key"),
    );
    let cfg = Config::parse(&text, dir).map_err(setup)?;
    let relay = blockferry_relay::start(cfg, cancel.clone())
        .await
        .context("bench setup: cannot start the relay")?;

    let aid = TlsIdentity::load(&agent.cert, &agent.key).map_err(setup)?;
    let aep = client_endpoint(
        "127.0.0.1:0".parse().map_err(setup)?,
        client_config(&ca, aid, &tuning).map_err(setup)?,
        &tuning,
    )
    .map_err(setup)?;
    let connector = Connector::new(aep, relay.listen_addr, "relay");
    let sender = DiskSender::new(
        SenderConfig {
            max_unacked_frames: 256,
            max_unacked_bytes: 64 << 20,
            retransmit_after: None,
        },
        "bench-agent",
        disk,
        1 << 40,
        Generation(1),
    );
    let ch = DiskChannel::spawn(connector, sender, cancel.clone());

    // A pool of distinct random chunks, reused: hashing and compression are
    // the agent's cost, not the transport's, so they are paid once up front.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let pool: Vec<Chunk> = (0..64)
        .map(|i| {
            let data: Vec<u8> = (0..CHUNK)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            build_chunk(i * CHUNK as u64, &data, None)
        })
        .collect::<Result<_, _>>()
        .map_err(setup)?;
    let per_batch = (batch / CHUNK).max(1);
    let batches = total.div_ceil((per_batch * CHUNK) as u64);
    let expected = batches * (per_batch * CHUNK) as u64;

    let start = Instant::now();
    let mut offset = 0u64;
    let mut k = 0usize;
    let mut last = Seq::ZERO;
    for _ in 0..batches {
        let chunks: Vec<Chunk> = (0..per_batch)
            .map(|_| {
                let mut c = pool[k % pool.len()].clone();
                c.offset = offset;
                offset += CHUNK as u64;
                k += 1;
                c
            })
            .collect();
        last = ch.push_batch(chunks).await.map_err(transfer)?;
    }
    loop {
        let notified = sink.progressed.notified();
        if sink.bytes.load(Ordering::Relaxed) >= expected {
            break;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {
                bail!(
                    "bench transfer stalled: the sink has {} of {expected} bytes",
                    sink.bytes.load(Ordering::Relaxed)
                );
            }
        }
    }
    let elapsed = start.elapsed();
    ch.wait_durable(last).await.map_err(transfer)?;
    cancel.cancel();
    relay.stopped().await;
    Ok(BenchReport {
        bytes: sink.bytes.load(Ordering::Relaxed),
        elapsed,
    })
}
