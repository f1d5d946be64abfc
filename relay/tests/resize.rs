//! A protected disk that grows: the relay accepts the larger size, forwards it
//! to the target in a new Hello before any chunk past the old end, and refuses
//! a disk that shrank.

mod common;

use std::time::Duration;

use blockferry_proto::chunk::build_chunk;
use blockferry_proto::{Frame, Seq};
use blockferry_relay::Config;
use common::*;
use tokio_util::sync::CancellationToken;

const GIB: u64 = 1 << 30;
const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grown_disk_reaches_the_target_at_its_new_size_and_a_shrink_is_refused() {
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
    );
    let cfg = Config::parse(&text, spool.path()).unwrap();
    let relay = blockferry_relay::start(cfg, cancel.clone()).await.unwrap();
    // The agent's channel announces 1 GiB.
    let ch = agent_channel(&pki, "host-a", DISK_A, relay.listen_addr, 16, &cancel);
    let mut last = Seq::ZERO;
    for i in 0..4 {
        last = ch.push_batch(batch(i, 4096)).await.unwrap();
    }
    ch.wait_durable(last).await.unwrap();
    tokio::time::timeout(LIMIT, target.wait_applied(DISK_A, 4))
        .await
        .unwrap();

    ch.resize(2 * GIB).unwrap();
    let past = GIB + 8192;
    let data = block(99, 4096);
    let seq = ch
        .push_batch(vec![build_chunk(past, &data, None).unwrap()])
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, ch.wait_durable(seq))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(LIMIT, target.wait_applied(DISK_A, 5))
        .await
        .unwrap();
    {
        let applied = target.applied.lock().unwrap();
        let Some(Frame::Batch(b)) = applied[&DISK_A].last() else {
            panic!("the last frame applied is the batch past the old end");
        };
        assert_eq!(b.seq, seq);
        assert_eq!(b.chunks[0].offset, past);
    }
    let sizes: Vec<u64> = target
        .hello_sizes
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| *d == DISK_A)
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(
        sizes.last(),
        Some(&(2 * GIB)),
        "the target heard the new size before the batch past the old end: {sizes:?}"
    );
    assert_eq!(
        sizes.first(),
        Some(&GIB),
        "the first hello had the old size"
    );

    ch.resize(GIB).unwrap();
    let mut progress = ch.progress();
    let refused = tokio::time::timeout(
        LIMIT,
        progress.wait_for(|p| {
            p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("shrank"))
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .last_error
    .clone()
    .unwrap_or_default();
    assert!(
        refused.contains("grow the disk back"),
        "the refusal says what to do: {refused}"
    );
    assert_eq!(
        target.seqs(DISK_A).len(),
        5,
        "nothing more reached the target"
    );
    cancel.cancel();
}
