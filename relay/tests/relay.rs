//! The relay in process, over real QUIC on 127.0.0.1 with real certificates
//! and a real fsynced spool.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use blockferry_relay::Config;
use common::*;
use tokio_util::sync::CancellationToken;

struct Running {
    _spool: tempfile::TempDir,
    relay: blockferry_relay::RelayHandle,
    target: std::sync::Arc<RecordingTarget>,
    pki: Pki,
    cancel: CancellationToken,
}

async fn start(spool_limit: u64) -> Running {
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
        spool_limit,
    );
    let cfg = Config::parse(&text, spool.path()).unwrap();
    let relay = blockferry_relay::start(cfg, cancel.clone()).await.unwrap();
    Running {
        _spool: spool,
        relay,
        target,
        pki,
        cancel,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_flow_agent_to_target_once_and_in_order() {
    let r = start(64 << 20).await;
    let ch = agent_channel(&r.pki, "host-a", DISK_A, r.relay.listen_addr, 16, &r.cancel);
    let mut last = blockferry_proto::Seq::ZERO;
    for i in 0..50 {
        last = ch.push_batch(batch(i, 32 << 10)).await.unwrap();
    }
    ch.wait_durable(last).await.unwrap();
    r.target.wait_applied(DISK_A, 50).await;
    assert_applied_exactly(&r.target, DISK_A, 50, 32 << 10);
    assert!(r.relay.metrics.bytes_in.load(Ordering::Relaxed) > 50 * (32 << 10));
    r.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_writing_another_agents_disk_is_refused_and_nothing_is_spooled() {
    let r = start(64 << 20).await;
    // host-a's certificate, host-b's disk.
    let ch = agent_channel(&r.pki, "host-a", DISK_B, r.relay.listen_addr, 4, &r.cancel);
    let push = ch.clone();
    tokio::spawn(async move { push.push_batch(batch(0, 4096)).await });
    let mut progress = ch.progress();
    let refused = progress
        .wait_for(|p| {
            p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("NotAuthorized") || e.contains("may not write"))
        })
        .await
        .unwrap()
        .clone();
    assert_eq!(refused.durable, blockferry_proto::Seq::ZERO);
    assert_eq!(r.relay.metrics.bytes_in.load(Ordering::Relaxed), 0);
    assert!(
        r.relay
            .metrics
            .refused_connections_total
            .load(Ordering::Relaxed)
            >= 1
    );
    assert!(r.target.seqs(DISK_B).is_empty());
    r.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_blocks_the_agent_and_loses_nothing() {
    const LEN: usize = 64 << 10;
    // Room for about three batches.
    let r = start(200 << 10).await;
    r.target.hold();
    let ch = agent_channel(&r.pki, "host-a", DISK_A, r.relay.listen_addr, 4, &r.cancel);
    let pusher = ch.clone();
    let pushed = tokio::spawn(async move {
        let mut last = blockferry_proto::Seq::ZERO;
        for i in 0..40 {
            last = pusher.push_batch(batch(i, LEN)).await.unwrap();
        }
        last
    });
    // The relay acks what fits in its spool, then stops acking: the agent's
    // window fills and its pushes wait.
    let mut progress = ch.progress();
    progress.wait_for(|p| p.durable.0 >= 1).await.unwrap();
    let blocked = tokio::time::timeout(Duration::from_millis(500), async {
        progress.wait_for(|p| p.durable.0 >= 10).await.unwrap();
    })
    .await;
    assert!(blocked.is_err(), "the relay acked beyond its spool limit");
    assert!(!pushed.is_finished(), "the agent was not held back");
    let spooled = r.relay.metrics.spool_bytes.load(Ordering::Relaxed);
    assert!(
        spooled <= (200 << 10) + LEN as u64 + 1024,
        "spool holds {spooled} bytes"
    );
    // Space frees as the target applies: everything arrives, once, in order.
    r.target.release();
    let last = pushed.await.unwrap();
    ch.wait_durable(last).await.unwrap();
    r.target.wait_applied(DISK_A, 40).await;
    assert_applied_exactly(&r.target, DISK_A, 40, LEN);
    r.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_traffic() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = start(64 << 20).await;
    let ch = agent_channel(&r.pki, "host-a", DISK_A, r.relay.listen_addr, 4, &r.cancel);
    let s = ch.push_batch(batch(0, 4096)).await.unwrap();
    ch.wait_durable(s).await.unwrap();
    let mut sock = tokio::net::TcpStream::connect(r.relay.metrics_addr.unwrap())
        .await
        .unwrap();
    sock.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    sock.read_to_string(&mut text).await.unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("blockferry_relay_bytes_in_total "))
        .unwrap();
    let v: u64 = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(v >= 4096, "{line}");
    assert!(
        text.contains("blockferry_relay_agent_connections 1"),
        "{text}"
    );
    r.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frame_closes_the_connection_and_nothing_is_spooled() {
    use blockferry_transport::{Tuning, client_config, client_endpoint};
    let r = start(64 << 20).await;
    let tuning = Tuning::default();
    let ep = client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        client_config(&r.pki.ca(), r.pki.identity("agent-host-a"), &tuning).unwrap(),
        &tuning,
    )
    .unwrap();
    let conn = ep
        .connect(r.relay.listen_addr, "relay")
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // A valid hello would come first; garbage with the right magic instead.
    send.write_all(b"BF\x01\x03\x00\x00\x00\x05\xff\xff\xff\xff\xff")
        .await
        .unwrap();
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let code = blockferry_proto::ErrorCode::Protocol.as_u16();
            assert_eq!(c.error_code, quinn::VarInt::from_u32(code.into()));
        }
        other => panic!("closed for another reason: {other}"),
    }
    assert_eq!(r.relay.metrics.bytes_in.load(Ordering::Relaxed), 0);
    assert_eq!(r.relay.metrics.spool_bytes.load(Ordering::Relaxed), 0);
    assert!(r.target.seqs(DISK_A).is_empty());
    r.cancel.cancel();
}
