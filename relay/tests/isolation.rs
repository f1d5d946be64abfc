//! One tenant cannot read, reset or grow past another: host-b, registered for
//! disk B only, probes the relay while host-a streams disk A. Real QUIC, real
//! certificates, a real spool; host-b speaks raw frames so every refusal is
//! read exactly where it arrives.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use blockferry_proto::{
    ByteRange, DiskId, ErrorCode, Frame, Generation, HashRangeRequest, Hello, Seq,
};
use blockferry_relay::Config;
use blockferry_transport::Tuning;
use blockferry_transport::framed::{FrameReader, FrameWriter};
use common::*;
use tokio_util::sync::CancellationToken;

struct Running {
    _spool: tempfile::TempDir,
    relay: blockferry_relay::RelayHandle,
    target: std::sync::Arc<RecordingTarget>,
    pki: Pki,
    cancel: CancellationToken,
}

const MAX_DISK: u64 = 4 << 30;

async fn start() -> Running {
    init_logs();
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let target = RecordingTarget::new();
    let taddr = start_target(&pki, target.clone(), &cancel);
    let spool = tempfile::tempdir().unwrap();
    let text = relay_toml(
        &pki,
        &spool.path().join("spool"),
        "127.0.0.1:0".parse().unwrap(),
        taddr,
        64 << 20,
    )
    .replace(
        "spool_segment_bytes = 1048576\n",
        &format!("spool_segment_bytes = 1048576\nmax_disk_bytes = {MAX_DISK}\n"),
    );
    let cfg = Config::parse(&text, spool.path()).unwrap();
    assert_eq!(cfg.max_disk_bytes, MAX_DISK);
    let relay = blockferry_relay::start(cfg, cancel.clone()).await.unwrap();
    Running {
        _spool: spool,
        relay,
        target,
        pki,
        cancel,
    }
}

/// A raw QUIC connection to the relay under agent `name`'s certificate.
async fn connect(r: &Running, name: &str) -> quinn::Connection {
    let tuning = Tuning::default();
    let ep = blockferry_testkit::channel::client(&r.pki, r.pki.agent_identity(name), &tuning);
    ep.connect(r.relay.listen_addr, "relay")
        .unwrap()
        .await
        .unwrap()
}

fn hello(agent: &str, disk: DiskId, disk_size: u64) -> Hello {
    Hello {
        agent: agent.into(),
        disk,
        disk_size,
        generation: Generation(1),
        oldest_held: Seq::ZERO,
        next_seq: Seq(1),
    }
}

/// The next frame the relay sends on this stream, or `None` once it ended.
async fn next(reader: &mut FrameReader) -> Option<Frame> {
    tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .expect("the relay answered within 10 s")
        .ok()
        .flatten()
}

/// Opens a stream with `h` and returns the relay's error frame, if it refused.
async fn greet(conn: &quinn::Connection, h: Hello) -> (FrameWriter, FrameReader, Option<Frame>) {
    let (send, recv) = conn.open_bi().await.expect("the connection is still open");
    let mut w = FrameWriter::new(send);
    let mut rd = FrameReader::new(recv);
    w.send(&Frame::Hello(h)).await.unwrap();
    let first = next(&mut rd).await;
    let refusal = match first {
        Some(Frame::Error(e)) => Some(Frame::Error(e)),
        _ => None,
    };
    (w, rd, refusal)
}

fn refused_with(f: &Option<Frame>, code: ErrorCode) -> bool {
    matches!(f, Some(Frame::Error(e)) if e.code == code)
}

/// host-a streams disk A; returns how many batches it pushed.
async fn stream_a(r: &Running, ch: &blockferry_transport::DiskChannel, from: u64, n: u64) {
    let mut last = Seq::ZERO;
    for i in from..from + n {
        last = ch.push_batch(batch(i, 4096)).await.unwrap();
    }
    ch.wait_durable(last).await.unwrap();
    r.target.wait_applied(DISK_A, (from + n) as usize).await;
}

fn hellos_at_target(r: &Running, disk: DiskId) -> usize {
    r.target
        .hello_sizes
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| *d == disk)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_trees_of_another_agents_disk_or_an_unknown_id_are_refused_and_reset_nothing() {
    let r = start().await;
    let a = agent_channel(&r.pki, "host-a", DISK_A, r.relay.listen_addr, 16, &r.cancel);
    stream_a(&r, &a, 0, 5).await;
    let random = DiskId::from_bytes([0x5c; 16]);

    let conn = connect(&r, "host-b").await;
    for disk in [DISK_A, random] {
        // host-b's own disk stream, carrying a request for someone else's disk.
        let (mut w, mut rd, refusal) = greet(&conn, hello("host-b", DISK_B, 1 << 30)).await;
        assert!(
            refusal.is_none(),
            "host-b may open its own disk: {refusal:?}"
        );
        let req = HashRangeRequest {
            disk,
            generation: Generation(1),
            request_id: 7,
            ranges: vec![ByteRange {
                offset: 0,
                len: 65536,
            }],
        };
        w.send(&Frame::HashRequest(req)).await.unwrap();
        let answer = loop {
            match next(&mut rd).await {
                Some(Frame::HashReply(rep)) => break Some(Frame::HashReply(rep)),
                Some(Frame::Error(e)) => break Some(Frame::Error(e)),
                Some(_) => continue,
                None => break None,
            }
        };
        assert!(
            refused_with(&answer, ErrorCode::NotAuthorized),
            "hash request for {disk} from host-b: {answer:?}"
        );
    }
    assert!(
        conn.close_reason().is_none(),
        "a refused request closed host-b's connection"
    );
    // No forwarder (nor a target stream) for the random id; disk A's stream
    // to the target was never restarted, and host-a never reconnected.
    assert_eq!(hellos_at_target(&r, random), 0);
    stream_a(&r, &a, 5, 5).await;
    assert_eq!(hellos_at_target(&r, DISK_A), 1);
    assert_eq!(a.progress().borrow().reconnects, 0);
    assert_applied_exactly(&r.target, DISK_A, 10, 4096);
    r.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_for_a_disk_the_peer_may_not_write_never_disturb_its_writer() {
    let r = start().await;
    let a = agent_channel(&r.pki, "host-a", DISK_A, r.relay.listen_addr, 16, &r.cancel);
    stream_a(&r, &a, 0, 3).await;
    let conn = connect(&r, "host-b").await;
    for i in 0..50 {
        // Named truthfully or as host-a: both are host-b's certificate.
        let name = if i % 2 == 0 { "host-b" } else { "host-a" };
        let (_w, _rd, refusal) = greet(&conn, hello(name, DISK_A, 1 << 30)).await;
        assert!(
            refused_with(&refusal, ErrorCode::NotAuthorized),
            "hello {i} for disk A from host-b: {refusal:?}"
        );
    }
    assert!(conn.close_reason().is_none());
    stream_a(&r, &a, 3, 3).await;
    assert_eq!(
        a.progress().borrow().reconnects,
        0,
        "host-a's stream restarted"
    );
    assert_eq!(hellos_at_target(&r, DISK_A), 1);
    assert_applied_exactly(&r.target, DISK_A, 6, 4096);
    assert!(
        r.relay
            .metrics
            .refused_connections_total
            .load(Ordering::Relaxed)
            >= 50
    );
    r.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_sizes_past_the_configured_maximum_zero_or_unaligned_are_refused_at_the_hello() {
    let r = start().await;
    let a = agent_channel(&r.pki, "host-a", DISK_A, r.relay.listen_addr, 16, &r.cancel);
    stream_a(&r, &a, 0, 3).await;
    let bytes_in = r.relay.metrics.bytes_in.load(Ordering::Relaxed);
    let conn = connect(&r, "host-b").await;
    for size in [1u64 << 44, MAX_DISK + 512, 1000, 0] {
        let (mut w, mut rd, refusal) = greet(&conn, hello("host-b", DISK_B, size)).await;
        assert!(
            refused_with(&refusal, ErrorCode::DiskSizeMismatch),
            "disk size {size}: {refusal:?}"
        );
        // Whatever follows the refused hello is not read, let alone spooled.
        let b = blockferry_proto::ExtentBatch {
            disk: DISK_B,
            generation: Generation(1),
            seq: Seq(1),
            chunks: batch(0, 4096),
        };
        if w.send(&Frame::Batch(b)).await.is_ok() {
            assert!(next(&mut rd).await.is_none(), "the refused stream went on");
        }
    }
    assert!(conn.close_reason().is_none());
    assert_eq!(r.relay.metrics.bytes_in.load(Ordering::Relaxed), bytes_in);
    assert_eq!(
        hellos_at_target(&r, DISK_B),
        0,
        "a refused disk reached the target"
    );
    assert!(r.target.seqs(DISK_B).is_empty());
    // The largest allowed size is taken.
    let (_w, _rd, refusal) = greet(&conn, hello("host-b", DISK_B, MAX_DISK)).await;
    assert!(refusal.is_none(), "{refusal:?}");
    stream_a(&r, &a, 3, 3).await;
    assert_eq!(a.progress().borrow().reconnects, 0);
    r.cancel.cancel();
}
