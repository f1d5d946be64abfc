//! The target keeps disks apart on the one connection the relay shares among
//! them, and admits relays by their certificate's role: `serve` over real
//! QUIC with the PKI of `pki init`.

mod common;

use std::path::Path;
use std::sync::Arc;

use blockferry_proto::{DiskId, DiskSender, Generation, SenderConfig, Seq, build_chunk};
use blockferry_target::serve::{ServeConfig, TargetHandle, start};
use blockferry_transport::pki::{self, CertFiles, InitNames};
use blockferry_transport::{
    Connector, DiskChannel, TlsIdentity, Tuning, client_config, client_endpoint,
};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 4 << 20;
const MAX_DISK: u64 = 64 << 20;

async fn serve(dir: &Path, cancel: &CancellationToken) -> TargetHandle {
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
max_disk_bytes = {MAX_DISK}
"#
        ),
        dir,
    )
    .unwrap();
    assert_eq!(cfg.max_disk_bytes, MAX_DISK);
    start(cfg, cancel.clone()).await.unwrap()
}

/// A connector to the target presenting `files`, shared by every channel on it.
fn connector(dir: &Path, files: &CertFiles, addr: std::net::SocketAddr) -> Arc<Connector> {
    let tuning = Tuning::loopback();
    let ca = blockferry_transport::tls::load_certs(&dir.join("pki").join(pki::CA_CERT)).unwrap();
    let ccfg = client_config(
        &ca,
        TlsIdentity::load(&files.cert, &files.key).unwrap(),
        &tuning,
    )
    .unwrap();
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), ccfg, &tuning).unwrap();
    Connector::new(ep, addr, "target")
}

fn channel(c: &Arc<Connector>, disk: DiskId, size: u64, cancel: &CancellationToken) -> DiskChannel {
    let sender = DiskSender::new(SenderConfig::default(), "relay", disk, size, Generation(1));
    DiskChannel::spawn(c.clone(), sender, cancel.clone())
}

async fn write(ch: &DiskChannel, i: u64) -> Seq {
    let data = vec![i as u8 + 1; 65536];
    let seq = ch
        .push_batch(vec![build_chunk(i * 65536, &data, None).unwrap()])
        .await
        .unwrap();
    ch.wait_durable(seq).await.unwrap();
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_refused_by_the_target_leaves_the_shared_connection_and_other_disks_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cancel = CancellationToken::new();
    let handle = serve(dir, &cancel).await;
    let relay = connector(
        dir,
        &pki::cert_files(&dir.join("pki"), "relay"),
        handle.listen_addr,
    );
    let a = DiskId::from_bytes([0xa1; 16]);
    let ch_a = channel(&relay, a, SIZE, &cancel);
    write(&ch_a, 0).await;
    let conn = relay.connection().await.unwrap();

    // Disk B on the same connection, larger than the target takes.
    let b = DiskId::from_bytes([0xb2; 16]);
    let ch_b = channel(&relay, b, MAX_DISK + 512, &cancel);
    let mut pb = ch_b.progress();
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        pb.wait_for(|p| {
            p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("DiskSizeMismatch") && e.contains("max_disk_bytes"))
        }),
    )
    .await
    .expect("the target refused the oversized disk within 10 s")
    .unwrap()
    .clone();
    assert_eq!(refused.durable, Seq::ZERO);
    // Refused again on its retries; meanwhile A goes on, on the same connection.
    pb.wait_for(|p| p.reconnects >= 2).await.unwrap();
    for i in 1..5 {
        write(&ch_a, i).await;
    }
    assert!(
        conn.close_reason().is_none(),
        "the shared connection closed"
    );
    let now = relay.connection().await.unwrap();
    assert_eq!(
        now.stable_id(),
        conn.stable_id(),
        "the relay had to reconnect"
    );
    assert_eq!(
        ch_a.progress().borrow().reconnects,
        0,
        "disk A's stream restarted"
    );
    assert!(
        !dir.join("store").join(b.to_string()).exists(),
        "a replica was created for a refused disk"
    );
    cancel.cancel();
    handle.serve.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_named_relay_is_refused_and_never_disturbs_the_relays_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cancel = CancellationToken::new();
    let handle = serve(dir, &cancel).await;
    let relay = connector(
        dir,
        &pki::cert_files(&dir.join("pki"), "relay"),
        handle.listen_addr,
    );
    let a = DiskId::from_bytes([0xa1; 16]);
    let ch_a = channel(&relay, a, SIZE, &cancel);
    write(&ch_a, 0).await;

    // Issued by the installation's CA, named like the relay: an agent's.
    let forged = pki::issue_agent(&dir.join("pki"), "relay").unwrap();
    let mallory = connector(dir, &forged, handle.listen_addr);
    let hello = blockferry_proto::Hello {
        agent: "relay".into(),
        disk: a,
        disk_size: SIZE,
        generation: Generation(1),
        oldest_held: Seq::ZERO,
        next_seq: Seq(1),
    };
    for i in 0..50 {
        // The handshake completes on the client's side before the server's
        // verdict arrives: whatever gets through, the hello is not answered.
        let answer = match mallory.connection().await {
            Err(_) => None,
            Ok(conn) => match conn.open_bi().await {
                Err(_) => None,
                Ok((send, recv)) => {
                    let mut w = blockferry_transport::framed::FrameWriter::new(send);
                    let mut r = blockferry_transport::framed::FrameReader::new(recv);
                    match w.send(&blockferry_proto::Frame::Hello(hello.clone())).await {
                        Err(_) => None,
                        Ok(_) => r.next().await.ok().flatten(),
                    }
                }
            },
        };
        assert!(
            answer.is_none(),
            "attempt {i}: the target answered {answer:?}"
        );
    }
    for i in 1..4 {
        write(&ch_a, i).await;
    }
    assert_eq!(
        ch_a.progress().borrow().reconnects,
        0,
        "the relay's stream restarted"
    );
    cancel.cancel();
    handle.serve.await.unwrap();
}
