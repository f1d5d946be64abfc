//! Under the usual umask (022) everything the target creates is private to
//! its owner: the store (replicas, journal, segments, state, generation
//! records) 0600 files in 0700 directories, and exports 0600. Its own test
//! binary, since the umask belongs to the whole process.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use blockferry_proto::{Consistency, DiskId, build_chunk};
use blockferry_target::serve::{ServeConfig, start};
use blockferry_target::store::list_points;
use blockferry_transport::pki::{self, InitNames};
use common::*;
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 4 << 20;

/// Every entry under `dir` (and `dir` itself) whose mode lets others in,
/// and how many files were looked at.
fn shared_entries(dir: &Path) -> (Vec<(String, u32)>, usize) {
    let mut open = Vec::new();
    let mut files = 0;
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
        } else {
            files += 1;
        }
    }
    (open, files)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_and_export_file_is_private_under_umask_022() {
    blockferry_durable::set_umask(0o022);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki::init(&dir.join("pki"), &InitNames::default()).unwrap();
    // A store directory made earlier, under the usual umask.
    std::fs::create_dir(dir.join("store")).unwrap();
    assert_eq!(mode(&dir.join("store")), 0o755);
    let cfg = ServeConfig::parse(
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
    let mut last = blockferry_proto::Seq::ZERO;
    for i in 0..24u64 {
        let data = vec![i as u8 + 1; 256 << 10];
        last = ch
            .push_batch(vec![
                build_chunk((i % 16) * (256 << 10), &data, None).unwrap(),
            ])
            .await
            .unwrap();
        if i % 6 == 5 {
            last = ch
                .push_barrier(Consistency::CrashConsistent, 1_000_000 + i)
                .await
                .unwrap();
        }
    }
    ch.wait_durable(last).await.unwrap();
    cancel.cancel();
    handle.serve.await.unwrap();

    // Exports by the command line, started under the usual umask.
    blockferry_durable::set_umask(0o022);
    let points = list_points(&dir.join("store"), &disk.to_string()).unwrap();
    let point = points.last().unwrap().id;
    let out_dir = dir.join("exports");
    std::fs::create_dir(&out_dir).unwrap();
    for (name, format) in [
        ("p.raw", "raw"),
        ("p-sparse.vmdk", "vmdk-sparse"),
        ("p.vmdk", "vmdk-flat"),
    ] {
        let cli = std::process::Command::new(env!("CARGO_BIN_EXE_blockferry-target"))
            .arg("export")
            .arg("--store")
            .arg(dir.join("store"))
            .args(["--disk", &disk.to_string(), "--point", &point.to_string()])
            .args(["--format", format, "--out"])
            .arg(out_dir.join(name))
            .output()
            .unwrap();
        assert!(
            cli.status.success(),
            "{}",
            String::from_utf8_lossy(&cli.stderr)
        );
    }
    let (open, files) = shared_entries(&out_dir);
    assert_eq!(files, 4);
    // The directory is the user's own; the exports in it are private.
    assert_eq!(open, vec![(out_dir.display().to_string(), 0o755)]);

    let (open, files) = shared_entries(&dir.join("store"));
    assert!(files >= 4, "the store holds {files} files");
    assert_eq!(open, Vec::<(String, u32)>::new());
}
