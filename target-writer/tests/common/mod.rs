//! Helpers shared by the store tests: random batches, an in-memory model of
//! the disk, and qemu-img as the independent oracle (read-only commands only).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use blockferry_target::{ApplyBatch, Chunk};
use rand::Rng;

pub const DISK: &str = "disk-a";

/// qemu-img is needed; in CI its absence is a failure, elsewhere a skip.
pub fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-img is required in CI"
        );
        eprintln!("skipping: qemu-img not installed");
    }
    ok
}

/// `qemu-img compare` of a raw model against a VMDK: true when identical.
pub fn qemu_same(raw: &Path, vmdk: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "vmdk"])
        .arg(raw)
        .arg(vmdk)
        .output()
        .expect("run qemu-img compare");
    if !out.status.success() {
        eprintln!(
            "qemu-img compare: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

pub fn qemu_info(vmdk: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "--backing-chain"])
        .arg(vmdk)
        .output()
        .expect("run qemu-img info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img info json")
}

/// Data that is sometimes compressible, sometimes random, sometimes zero.
pub fn random_data(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    match rng.gen_range(0..4) {
        0 => vec![0u8; len],
        1 => {
            let b: u8 = rng.r#gen();
            (0..len).map(|i| b.wrapping_add((i / 512) as u8)).collect()
        }
        _ => (0..len).map(|_| rng.r#gen()).collect(),
    }
}

/// A batch of 1..=6 chunks at random 512-aligned places (they may overlap).
pub fn random_batch(rng: &mut impl Rng, seq: u64, size: u64) -> ApplyBatch {
    let n = rng.gen_range(1..=6);
    let mut chunks = Vec::new();
    for _ in 0..n {
        let len = rng.gen_range(1..=256u64) * 512;
        let offset = rng.gen_range(0..=(size - len) / 512) * 512;
        let data = random_data(rng, len as usize);
        let c = if data.iter().all(|b| *b == 0) && rng.gen_bool(0.7) {
            blockferry_target::batch::zero_chunk(offset, len as u32)
        } else if rng.gen_bool(0.5) {
            blockferry_target::batch::zstd_chunk(offset, &data, 1).expect("zstd")
        } else {
            blockferry_target::batch::raw_chunk(offset, data)
        };
        chunks.push(c);
    }
    ApplyBatch {
        disk: DISK.into(),
        generation: 1,
        seq,
        chunks,
    }
}

/// The plain data of a chunk (what the replica must hold afterwards).
pub fn plain(c: &Chunk) -> Vec<u8> {
    match c.encoding {
        blockferry_target::Encoding::Raw => c.payload.to_vec(),
        blockferry_target::Encoding::Zero => vec![0u8; c.len as usize],
        blockferry_target::Encoding::Zstd => {
            zstd::bulk::decompress(&c.payload, c.len as usize).expect("zstd")
        }
    }
}

pub fn model_apply(model: &mut [u8], b: &ApplyBatch) {
    for c in &b.chunks {
        let o = c.offset as usize;
        model[o..o + c.len as usize].copy_from_slice(&plain(c));
    }
}

/// The disk after batches with seq <= `seq` (batches are in seq order, from 1).
pub fn model_at(batches: &[ApplyBatch], size: u64, seq: u64) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    for b in batches.iter().take_while(|b| b.seq <= seq) {
        model_apply(&mut m, b);
    }
    m
}

pub fn now_ms() -> u64 {
    1_800_000_000_000
}

/// Reads the replica's flat extent.
pub fn replica_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("replica-flat.vmdk")).expect("read flat extent")
}

/// Index of the first differing byte, for readable failures.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// A temp dir on tmpfs when there is one: for tests whose crashes are
/// injected (not real), where thousands of real fsyncs would only cost time.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    // Containers often give /dev/shm only 64 MiB: use it only when roomy.
    let avail_kib = Command::new("df")
        .args(["-k", "--output=avail"])
        .arg(shm)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    if avail_kib >= 512 << 10
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("temp dir")
}

/// A sending channel to a `serve` at `addr` under the identity `who`
/// ("relay", or an agent name issued on the spot), for a disk of `size` bytes.
pub fn relay_channel(
    dir: &Path,
    who: &str,
    addr: std::net::SocketAddr,
    disk: blockferry_proto::DiskId,
    size: u64,
    cancel: &tokio_util::sync::CancellationToken,
) -> blockferry_transport::DiskChannel {
    use blockferry_proto::{DiskSender, Generation, SenderConfig};
    use blockferry_transport::endpoint::{Tuning, client_config, client_endpoint};
    use blockferry_transport::pki;
    use blockferry_transport::tls::load_certs;
    use blockferry_transport::{Connector, DiskChannel, TlsIdentity};
    let tuning = Tuning::loopback();
    let ca = load_certs(&dir.join(pki::CA_CERT)).unwrap();
    let files = if who == "relay" {
        pki::cert_files(dir, "relay")
    } else {
        pki::issue_agent(dir, who).unwrap()
    };
    let ccfg = client_config(
        &ca,
        TlsIdentity::load(&files.cert, &files.key).unwrap(),
        &tuning,
    )
    .unwrap();
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), ccfg, &tuning).unwrap();
    let connector = Connector::new(ep, addr, "target");
    let sender = DiskSender::new(SenderConfig::default(), who, disk, size, Generation(1));
    DiskChannel::spawn(connector, sender, cancel.clone())
}
