//! `serve` over real QUIC on 127.0.0.1 (port 0) with mutual TLS: batches and
//! barriers sent by a relay identity land in the replica and become points;
//! checksum-resync digests match the data; a non-relay identity is refused.

mod common;

use blockferry_proto::hashtree::{Comparer, ComparerLimits, HashTree, TreeShape};
use blockferry_proto::{Consistency, DiskId, Generation, build_chunk};
use blockferry_target::serve::{ServeConfig, start};
use blockferry_target::store::list_points;
use blockferry_transport::pki::{self, InitNames};
use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 4 << 20;

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_barriers_over_quic_land_in_the_replica_and_points() {
    over_quic(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_barriers_over_quic_land_in_a_thin_replica_and_points() {
    over_quic(true).await;
}

async fn over_quic(thin: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki::init(&dir.join("pki"), &InitNames::default()).unwrap();
    let cfg = ServeConfig::parse(
        &format!(
            r#"
listen = "127.0.0.1:0"
store = "store"
ca = "pki/ca.crt"
cert = "pki/target.crt"
key = "pki/target.key"
checkpoint_mib = 4
loopback_tuning = true
point_every_secs = 0
thin_replicas = {thin}
"#
        ),
        dir,
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let handle = start(cfg, cancel.clone()).await.unwrap();
    let disk = DiskId::from_bytes([7; 16]);
    let ch = relay_channel(
        &dir.join("pki"),
        "relay",
        handle.listen_addr,
        disk,
        SIZE,
        &cancel,
    );

    let mut rng = StdRng::seed_from_u64(21);
    let mut model = vec![0u8; SIZE as usize];
    let mut snapshots = Vec::new();
    let mut last = blockferry_proto::Seq::ZERO;
    for i in 0..30u64 {
        let mut chunks = Vec::new();
        for _ in 0..rng.gen_range(1..4) {
            let off = rng.gen_range(0..SIZE / 65536) * 65536;
            let data = random_data(&mut rng, 65536);
            model[off as usize..off as usize + 65536].copy_from_slice(&data);
            chunks.push(build_chunk(off, &data, Some(1)).unwrap());
        }
        last = ch.push_batch(chunks).await.unwrap();
        if i % 7 == 6 {
            last = ch
                .push_barrier(Consistency::CrashConsistent, now_ns() + i)
                .await
                .unwrap();
            snapshots.push(model.clone());
        }
    }
    ch.wait_durable(last).await.unwrap();

    let replica_dir = dir.join("store").join(disk.to_string());
    if !thin {
        // The thin replica's tables reach the file at checkpoints; it is
        // compared after shutdown below.
        assert_eq!(first_diff(&replica_bytes(&replica_dir), &model), None);
    }
    let points = list_points(&dir.join("store"), &disk.to_string()).unwrap();
    assert_eq!(points.len(), snapshots.len());
    assert!(
        points
            .iter()
            .all(|p| p.label == blockferry_target::Consistency::CrashConsistent)
    );

    // Checksum resync against the target: identical data, no differences;
    // one changed chunk locally, exactly that chunk differs.
    let shape = TreeShape::new(65536, blockferry_proto::hashtree::DEFAULT_FANOUT).unwrap();
    let mut local = model.clone();
    local[3 * 65536 + 10] ^= 1;
    let one_chunk: Vec<std::ops::Range<u64>> = std::iter::once(3..4).collect();
    for (data, expect) in [(&model, vec![]), (&local, one_chunk)] {
        let tree = HashTree::from_bytes(shape, data).unwrap();
        let mut cmp = Comparer::new(tree, SIZE, disk, Generation(1), ComparerLimits::default());
        while !cmp.is_done() {
            let Some(req) = cmp.poll_request() else { break };
            let reply = ch.hash_ranges(req).await.unwrap();
            cmp.handle_reply(&reply).unwrap();
        }
        assert_eq!(cmp.differing_chunks(), expect);
    }
    cancel.cancel();
    handle.serve.await.unwrap();
    if have_qemu_img() {
        let raw = dir.join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        let replica = replica_dir.join("replica.vmdk");
        assert!(qemu_same(&raw, &replica));
        let create_type = if thin { "monolithicSparse" } else { "vmfs" };
        assert_eq!(
            qemu_info(&replica)[0]["format-specific"]["data"]["create-type"],
            create_type
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_is_not_a_configured_peer_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki::init(&dir.join("pki"), &InitNames::default()).unwrap();
    let cfg = ServeConfig::parse(
        r#"
listen = "127.0.0.1:0"
store = "store"
ca = "pki/ca.crt"
cert = "pki/target.crt"
key = "pki/target.key"
checkpoint_mib = 4
"#,
        dir,
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let handle = start(cfg, cancel.clone()).await.unwrap();
    let disk = DiskId::from_bytes([8; 16]);
    let ch = relay_channel(
        &dir.join("pki"),
        "host-a",
        handle.listen_addr,
        disk,
        SIZE,
        &cancel,
    );
    let data = vec![9u8; 65536];
    let seq = ch
        .push_batch(vec![build_chunk(0, &data, None).unwrap()])
        .await
        .unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), ch.wait_durable(seq)).await;
    assert!(
        !matches!(r, Ok(Ok(()))),
        "an agent identity got an ack from the target"
    );
    assert!(
        !dir.join("store").join(disk.to_string()).exists(),
        "a replica was created"
    );
    cancel.cancel();
    handle.serve.await.unwrap();
}
