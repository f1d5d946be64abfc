//! A full file system under the spool stops acks (the agent waits), loses
//! nothing, and the relay carries on once the target's acks free space.
//! Needs root for a small tmpfs; creates and removes its own mount.

mod common;

use std::time::Duration;

use blockferry_proto::Seq;
use blockferry_relay::Config;
use blockferry_testkit::devices::Tmpfs;
use blockferry_testkit::privileged::require_root;
use common::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: mounts a tmpfs"]
async fn full_spool_disk_stops_acks_and_recovers_without_loss() {
    require_root("full_spool_disk_stops_acks_and_recovers_without_loss");
    const N: u64 = 40;
    const LEN: usize = 64 << 10;
    init_logs();
    let fs = Tmpfs::mount(1 << 20);
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let target = RecordingTarget::new();
    target.hold();
    let taddr = start_target(&pki, target.clone(), &cancel);
    let spool = fs.path().join("spool");
    let text = relay_toml(
        &pki,
        &spool,
        "127.0.0.1:0".parse().unwrap(),
        taddr,
        64 << 20,
    );
    let relay = blockferry_relay::start(Config::parse(&text, fs.path()).unwrap(), cancel.clone())
        .await
        .unwrap();

    // A small window keeps each spool append small, so some fit before the disk is full.
    let ch = agent_channel(&pki, "host-a", DISK_A, relay.listen_addr, 4, &cancel);
    let pusher = ch.clone();
    let pushed = tokio::spawn(async move {
        let mut last = Seq::ZERO;
        for i in 0..N {
            last = pusher.push_batch(batch(i, LEN)).await.unwrap();
        }
        last
    });
    // About 15 batches fit in 1 MiB; the rest must wait, unacked.
    let mut progress = ch.progress();
    progress.wait_for(|p| p.durable.0 >= 5).await.unwrap();
    let beyond = tokio::time::timeout(Duration::from_secs(2), async {
        progress.wait_for(|p| p.durable.0 >= 20).await.unwrap();
    })
    .await;
    assert!(
        beyond.is_err(),
        "the relay acked more than its disk can hold"
    );
    // The target applies; the spool frees its space; the rest flows.
    target.release();
    let last = pushed.await.unwrap();
    ch.wait_durable(last).await.unwrap();
    target.wait_applied(DISK_A, N as usize).await;
    assert_applied_exactly(&target, DISK_A, N, LEN);
    cancel.cancel();
    relay.stopped().await;
}
