//! Under the usual umask (022) the relay's spool is still private to its
//! owner: every file 0600, every directory 0700. Its own test binary, since
//! the umask belongs to the whole process.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use blockferry_relay::Config;
use common::*;
use tokio_util::sync::CancellationToken;

/// Every entry under `dir` (and `dir` itself) whose mode lets others in.
fn shared_entries(dir: &Path) -> Vec<(String, u32)> {
    let mut open = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        // A temp file of a durable write may be gone by now.
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            open.push((p.display().to_string(), mode));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                todo.push(e.path());
            }
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spool_file_and_directory_is_private_under_umask_022() {
    init_logs();
    blockferry_durable::set_umask(0o022);
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let target = RecordingTarget::new();
    let taddr = start_target(&pki, target.clone(), &cancel);
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let text = relay_toml(
        &pki,
        &spool,
        "127.0.0.1:0".parse().unwrap(),
        taddr,
        64 << 20,
    );
    let cfg = Config::parse(&text, tmp.path()).unwrap();
    let relay = blockferry_relay::start(cfg, cancel.clone()).await.unwrap();
    let ch = agent_channel(&pki, "host-a", DISK_A, relay.listen_addr, 16, &cancel);
    let mut last = blockferry_proto::Seq::ZERO;
    // Past one 1 MiB segment, so more than one segment is written.
    for i in 0..40 {
        last = ch.push_batch(batch(i, 64 << 10)).await.unwrap();
    }
    ch.wait_durable(last).await.unwrap();
    let mut files = 0;
    let mut todo = vec![spool.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                files += 1;
            }
        }
    }
    assert!(files >= 2, "the spool holds {files} files");
    assert_eq!(shared_entries(&spool), Vec::<(String, u32)>::new());
    cancel.cancel();
    relay.stopped().await;
}
