//! Exports of a store held by a running `serve` (real QUIC on 127.0.0.1
//! port 0, real files), through its control socket: by the library client
//! and by the `blockferry-target export` binary, while a relay keeps sending
//! batches. qemu-img compares the exports with the model at the point.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use blockferry_proto::{Consistency, DiskId, build_chunk};
use blockferry_target::control::{
    ExportRequest, MAX_REQUEST, Reply, decode_reply, request_export, socket_path,
};
use blockferry_target::export::ExportFormat;
use blockferry_target::serve::{ServeConfig, ServeError, start};
use blockferry_target::store::list_points;
use blockferry_target::{DiskStore, StoreOptions};
use blockferry_transport::DiskChannel;
use blockferry_transport::pki::{self, InitNames};
use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 16 << 20;
const BIN: &str = env!("CARGO_BIN_EXE_blockferry-target");

fn config(dir: &Path) -> ServeConfig {
    pki::init(&dir.join("pki"), &InitNames::default()).unwrap();
    ServeConfig::parse(
        r#"
listen = "127.0.0.1:0"
store = "store"
ca = "pki/ca.crt"
cert = "pki/target.crt"
key = "pki/target.key"
checkpoint_mib = 1
loopback_tuning = true
point_every_secs = 0
"#,
        dir,
    )
    .unwrap()
}

/// Sends one random batch of 64 KiB chunks, applying it to `model`.
async fn push_random(
    ch: &DiskChannel,
    rng: &mut StdRng,
    model: &mut [u8],
) -> blockferry_proto::Seq {
    let mut chunks = Vec::new();
    for _ in 0..rng.gen_range(1..4) {
        let off = rng.gen_range(0..SIZE / 65536) * 65536;
        let data = random_data(rng, 65536);
        model[off as usize..off as usize + 65536].copy_from_slice(&data);
        chunks.push(build_chunk(off, &data, Some(1)).unwrap());
    }
    ch.push_batch(chunks).await.unwrap()
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Batches, a barrier (the point, whose model is returned), more batches;
/// all durable.
async fn fill(ch: &DiskChannel, rng: &mut StdRng, model: &mut [u8]) -> Vec<u8> {
    for _ in 0..12 {
        push_random(ch, rng, model).await;
    }
    ch.push_barrier(Consistency::CrashConsistent, now_ns())
        .await
        .unwrap();
    let at_point = model.to_vec();
    let mut last = blockferry_proto::Seq::ZERO;
    for _ in 0..8 {
        last = push_random(ch, rng, model).await;
    }
    ch.wait_durable(last).await.unwrap();
    at_point
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_through_the_control_socket_of_a_running_serve_equal_the_model() {
    if !have_qemu_img() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cancel = CancellationToken::new();
    let handle = start(config(dir), cancel.clone()).await.unwrap();
    let disk = DiskId::from_bytes([5; 16]);
    let ch = Arc::new(relay_channel(
        &dir.join("pki"),
        "relay",
        handle.listen_addr,
        disk,
        SIZE,
        &cancel,
    ));
    let mut rng = StdRng::seed_from_u64(0x50c);
    let mut model = vec![0u8; SIZE as usize];
    let at_point = fill(&ch, &mut rng, &mut model).await;
    let store = dir.join("store");
    let points = list_points(&store, &disk.to_string()).unwrap();
    assert_eq!(points.len(), 1);
    let point = points[0].id;
    let model_raw = dir.join("model-at-point.raw");
    std::fs::write(&model_raw, &at_point).unwrap();

    // The relay keeps sending while the exports run.
    let stop = CancellationToken::new();
    let pusher = tokio::spawn({
        let (ch, stop) = (ch.clone(), stop.clone());
        async move {
            let mut last = None;
            for _ in 0..300 {
                if stop.is_cancelled() {
                    break;
                }
                last = Some(push_random(&ch, &mut rng, &mut model).await);
            }
            if let Some(seq) = last {
                ch.wait_durable(seq).await.unwrap();
            }
            model
        }
    });

    // The library client.
    assert_eq!(handle.control_socket, socket_path(&store));
    let out = dir.join("p.vmdk");
    let req = ExportRequest {
        disk: disk.to_string(),
        point,
        format: ExportFormat::VmdkSparse,
        out: out.clone(),
        parent: None,
        force: false,
    };
    let socket = handle.control_socket.clone();
    let (files, seen) = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let files = request_export(&socket, &req, &mut |d, t| seen.push((d, t))).unwrap();
        (files, seen)
    })
    .await
    .unwrap();
    assert_eq!(files, vec![out.clone()]);
    assert_eq!(seen.last(), Some(&(SIZE, SIZE)), "progress {seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");

    // The binary, with a relative --out taken from its own directory.
    let cli = tokio::process::Command::new(BIN)
        .arg("export")
        .arg("--store")
        .arg(&store)
        .args(["--disk", &disk.to_string(), "--point", &point.to_string()])
        .args(["--format", "vmdk-flat", "--out", "cli.vmdk"])
        .current_dir(dir)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(cli.status.success(), "export failed: {stderr}");
    let listed: Vec<String> = String::from_utf8(cli.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let want: Vec<String> = ["cli.vmdk", "cli-flat.vmdk"]
        .iter()
        .map(|n| dir.join(n).display().to_string())
        .collect();
    assert_eq!(listed, want, "{stderr}");
    assert!(
        stderr.contains("asking the service"),
        "the store was not served: {stderr}"
    );

    stop.cancel();
    let model = pusher.await.unwrap();
    assert!(qemu_same(&model_raw, &out), "socket export differs");
    assert!(
        qemu_same(&model_raw, &dir.join("cli.vmdk")),
        "CLI export differs"
    );
    // Replication went on: the replica holds every batch sent meanwhile.
    let replica_dir = store.join(disk.to_string());
    assert_eq!(first_diff(&replica_bytes(&replica_dir), &model), None);

    cancel.cancel();
    handle.serve.await.unwrap();
    assert!(
        !handle.control_socket.exists(),
        "control socket left after shutdown"
    );
}

/// Sends `line` on a fresh connection; returns every line of the answer.
fn ask(socket: &Path, line: &[u8]) -> Vec<Reply> {
    let mut c = std::os::unix::net::UnixStream::connect(socket).unwrap();
    c.write_all(line).unwrap();
    // An empty request is one that ends without a line.
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = Vec::new();
    // Reading to the end also shows that the service closed the connection.
    c.read_to_end(&mut all).unwrap();
    all.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| decode_reply(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_control_request_gets_an_error_and_serve_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(dir);
    // A socket file left by a service that died: nobody answers on it.
    std::fs::create_dir_all(dir.join("store")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(socket_path(&dir.join("store"))).unwrap());
    let cancel = CancellationToken::new();
    let handle = start(cfg.clone(), cancel.clone()).await.unwrap();
    let socket = handle.control_socket.clone();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // A second service of the same store is refused.
    let second = start(cfg, cancel.child_token()).await;
    assert!(
        matches!(second, Err(ServeError::ControlBusy { .. })),
        "{second:?}"
    );

    let disk = DiskId::from_bytes([6; 16]);
    let ch = relay_channel(
        &dir.join("pki"),
        "relay",
        handle.listen_addr,
        disk,
        SIZE,
        &cancel,
    );
    let mut rng = StdRng::seed_from_u64(0xbad);
    let mut model = vec![0u8; SIZE as usize];
    let at_point = fill(&ch, &mut rng, &mut model).await;
    let point = list_points(&dir.join("store"), &disk.to_string()).unwrap()[0].id;

    let export = |disk: &str, point: u64, out: &str| {
        format!(
            r#"{{"export":{{"disk":"{disk}","point":{point},"format":"raw","out":"{out}","parent":null}}}}"#
        )
        .into_bytes()
    };
    let out = dir.join("p.raw");
    let out_s = out.display().to_string();
    let other_disk = DiskId::from_bytes([9; 16]).to_string();
    let mut too_long = vec![b' '; MAX_REQUEST + 10];
    too_long.push(b'\n');
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"hello\n".to_vec(), "bad request"),
        (b"\xff\xfe\x00\n".to_vec(), "bad request"),
        (b"{\"export\":{\"disk\":\"x\"}}\n".to_vec(), "bad request"),
        (too_long, "longer than"),
        (export(&disk.to_string(), point, "p.raw"), "not absolute"),
        (
            export(&disk.to_string(), point + 7, &out_s),
            "no recovery point",
        ),
        (export(&other_disk, 1, &out_s), "no replica of disk"),
        (export("../etc", 1, &out_s), "no replica of disk"),
        (Vec::new(), "bad request"),
    ];
    for (line, want) in cases {
        let s = socket.clone();
        let replies = tokio::task::spawn_blocking(move || ask(&s, &line))
            .await
            .unwrap();
        match replies.as_slice() {
            [Reply::Error(msg)] => assert!(msg.contains(want), "{msg:?}, wanted {want:?}"),
            other => panic!("wanted one error mentioning {want:?}, got {other:?}"),
        }
    }
    assert!(!out.exists());

    // Still serving: the relay's batches are applied, and a good request works.
    let seq = push_random(&ch, &mut rng, &mut model).await;
    ch.wait_durable(seq).await.unwrap();
    let s = socket.clone();
    let line = export(&disk.to_string(), point, &out_s);
    let replies = tokio::task::spawn_blocking(move || ask(&s, &line))
        .await
        .unwrap();
    assert_eq!(
        replies.last(),
        Some(&Reply::Done {
            files: vec![out.clone()]
        })
    );
    assert_eq!(first_diff(&std::fs::read(&out).unwrap(), &at_point), None);
    let replica_dir = dir.join("store").join(disk.to_string());
    assert_eq!(first_diff(&replica_bytes(&replica_dir), &model), None);

    cancel.cancel();
    handle.serve.await.unwrap();
    assert!(!socket.exists(), "control socket left after shutdown");
}

#[test]
fn the_cli_says_what_to_do_when_the_store_is_locked_and_no_service_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let mut s = DiskStore::create(&root, DISK, 1 << 20, now_ms(), StoreOptions::default()).unwrap();
    let p = s
        .create_point(blockferry_target::Consistency::NotConsistent, now_ms())
        .unwrap();
    // This process holds the store; no service, no socket.
    let out = std::process::Command::new(BIN)
        .arg("export")
        .arg("--store")
        .arg(&root)
        .args(["--disk", DISK, "--point", &p.id.to_string()])
        .args(["--format", "raw", "--out"])
        .arg(tmp.path().join("p.raw"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("locked by another process"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "no control socket answers at {}",
            socket_path(&root).display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("start `blockferry-target serve`"),
        "{stderr}"
    );
    assert!(!tmp.path().join("p.raw").exists());
    s.close().unwrap();
}

/// Runs the binary to completion, asserting success; returns its stdout as JSON.
async fn cli_json(args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "blockferry-target {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_failover_through_a_running_serve_equals_the_point_shows_in_points_and_cleans_up() {
    if !have_qemu_img() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cancel = CancellationToken::new();
    let handle = start(config(dir), cancel.clone()).await.unwrap();
    let disk = DiskId::from_bytes([6; 16]);
    let ch = Arc::new(relay_channel(
        &dir.join("pki"),
        "relay",
        handle.listen_addr,
        disk,
        SIZE,
        &cancel,
    ));
    let mut rng = StdRng::seed_from_u64(0x7f);
    let mut model = vec![0u8; SIZE as usize];
    let at_point = fill(&ch, &mut rng, &mut model).await;
    let model_raw = dir.join("model-at-point.raw");
    std::fs::write(&model_raw, &at_point).unwrap();
    let store = dir.join("store");
    let (store_s, disk_s) = (store.to_str().unwrap(), disk.to_string());
    let out = dir.join("tf");

    // The relay keeps sending while the test failover is made.
    let stop = CancellationToken::new();
    let pusher = tokio::spawn({
        let (ch, stop) = (ch.clone(), stop.clone());
        async move {
            let mut sent = 0u32;
            let mut last = None;
            while !stop.is_cancelled() || sent < 5 {
                last = Some(push_random(&ch, &mut rng, &mut model).await);
                sent += 1;
            }
            if let Some(seq) = last {
                ch.wait_durable(seq).await.unwrap();
            }
        }
    });
    let rec = cli_json(&[
        "failover",
        "--test",
        "--store",
        store_s,
        "--disk",
        &disk_s,
        "--point",
        "latest-consistent",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ])
    .await;
    stop.cancel();
    pusher.await.unwrap();
    assert_eq!(rec["state"], "running");
    let descriptor = Path::new(rec["descriptor"].as_str().unwrap()).to_path_buf();
    assert!(
        qemu_same(&model_raw, &descriptor),
        "the test failover differs from the point"
    );

    let listing = cli_json(&["points", "--store", store_s, "--disk", &disk_s, "--json"]).await;
    let points = &listing["points"];
    let tested: Vec<_> = points
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["test_failover"].is_null())
        .collect();
    assert_eq!(tested.len(), 1);
    assert_eq!(tested[0]["id"], rec["point"]);
    assert_eq!(tested[0]["test_failover"]["state"], "running");
    assert_eq!(listing["state"], "test-failover");

    let done = cli_json(&[
        "failover",
        "--cleanup",
        "--store",
        store_s,
        "--disk",
        &disk_s,
        "--json",
    ])
    .await;
    assert_eq!(done["state"], "cleaned-up");
    assert!(!out.exists(), "cleanup left {}", out.display());
    let listing = cli_json(&["points", "--store", store_s, "--disk", &disk_s, "--json"]).await;
    let points = &listing["points"];
    assert!(
        points
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["test_failover"]["state"] == "cleaned-up")
    );
    assert_eq!(listing["state"], "protected");
    cancel.cancel();
    handle.serve.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_through_a_running_serve_starts_a_new_generation_once_and_stays_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cancel = CancellationToken::new();
    let handle = start(config(dir), cancel.clone()).await.unwrap();
    let disk = DiskId::from_bytes([7; 16]);
    let ch = relay_channel(
        &dir.join("pki"),
        "relay",
        handle.listen_addr,
        disk,
        SIZE,
        &cancel,
    );
    let mut rng = StdRng::seed_from_u64(0x70);
    let mut model = vec![0u8; SIZE as usize];
    fill(&ch, &mut rng, &mut model).await;
    let store = dir.join("store");
    let (store_s, disk_s) = (store.to_str().unwrap(), disk.to_string());

    let promoted = cli_json(&["promote", "--store", store_s, "--disk", &disk_s, "--json"]).await;
    assert_eq!(promoted["disk"], disk_s);
    assert_eq!(promoted["role"], "source");
    let generation = promoted["generation"].as_u64().unwrap();
    assert!(generation >= 2, "promotion kept generation {generation}");

    // A second promotion is refused: the copy is already the source.
    let again = tokio::process::Command::new(BIN)
        .args(["promote", "--store", store_s, "--disk", &disk_s])
        .output()
        .await
        .unwrap();
    assert!(!again.status.success(), "a second promotion succeeded");

    cancel.cancel();
    handle.serve.await.unwrap();
    let s = DiskStore::open(&store, &disk_s, StoreOptions::default()).unwrap();
    assert!(s.is_promoted(), "the promotion did not reach the store");
    assert_eq!(s.generation_record().current().number.0, generation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_through_a_running_serve_is_the_point_promotes_at_it_and_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cancel = CancellationToken::new();
    let handle = start(config(dir), cancel.clone()).await.unwrap();
    let disk = DiskId::from_bytes([8; 16]);
    let ch = relay_channel(
        &dir.join("pki"),
        "relay",
        handle.listen_addr,
        disk,
        SIZE,
        &cancel,
    );
    let mut rng = StdRng::seed_from_u64(0xf0);
    let mut model = vec![0u8; SIZE as usize];
    // Batches after the point: the failover goes back to it.
    let at_point = fill(&ch, &mut rng, &mut model).await;
    let store = dir.join("store");
    let (store_s, disk_s) = (store.to_str().unwrap(), disk.to_string());
    let out = dir.join("failed-over");

    let fo = cli_json(&[
        "failover",
        "--store",
        store_s,
        "--disk",
        &disk_s,
        "--point",
        "latest",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ])
    .await;
    assert_eq!(fo["state"], "failed-over");
    let flat = std::fs::read(fo["flat"].as_str().unwrap()).unwrap();
    assert_eq!(
        first_diff(&flat, &at_point),
        None,
        "the failed-over disk differs from the point"
    );
    let seq = fo["seq"].as_u64().unwrap();
    let generation = fo["generation"].as_u64().unwrap();

    let done = cli_json(&[
        "failover", "--commit", "--store", store_s, "--disk", &disk_s, "--json",
    ])
    .await;
    assert_eq!(done["state"], "committed");
    let listing = cli_json(&["points", "--store", store_s, "--disk", &disk_s, "--json"]).await;
    assert_eq!(listing["state"], "committed");
    assert_eq!(listing["role"], "source");

    cancel.cancel();
    handle.serve.await.unwrap();
    let s = DiskStore::open(&store, &disk_s, StoreOptions::default()).unwrap();
    assert!(s.is_promoted(), "the promotion did not reach the store");
    let r = s.generation_record();
    assert_eq!(r.current().seq.0, seq, "promoted at the point");
    assert_eq!(r.current().number.0, generation);
    assert!(
        s.applied_seq() > seq,
        "the replica held batches after the point"
    );
}
