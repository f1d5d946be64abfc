//! Relay fixtures: relay configs for the two agents of the testkit PKI; the
//! PKI, the recording target and the agent channel come from the testkit.
#![allow(dead_code)] // each test file uses a part
#![allow(unused_imports)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blockferry_proto::DiskId;
pub use blockferry_testkit::channel::agent_channel;
pub use blockferry_testkit::data::{batch, block};
pub use blockferry_testkit::init_logs;
pub use blockferry_testkit::pki::Pki;
pub use blockferry_testkit::sink::{RecordingTarget, assert_applied_exactly, start_target};

pub const DISK_A: DiskId = DiskId::from_bytes([0xa1; 16]);
pub const DISK_B: DiskId = DiskId::from_bytes([0xb2; 16]);

/// relay.toml text: host-a owns DISK_A, host-b owns DISK_B.
pub fn relay_toml(
    pki: &Pki,
    spool: &Path,
    listen: SocketAddr,
    target: SocketAddr,
    spool_limit: u64,
) -> String {
    let p = |f: &str| pki.path().join(f).display().to_string();
    format!(
        r#"listen = "{listen}"
metrics_listen = "127.0.0.1:0"
spool_dir = "{spool}"
spool_limit_bytes = {spool_limit}
spool_segment_bytes = 1048576
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[target]
address = "{target}"
server_name = "target"
[[agents]]
name = "host-a"
disks = ["{a}"]
[[agents]]
name = "host-b"
disks = ["{b}"]
"#,
        spool = spool.display(),
        ca = p("ca.crt"),
        cert = p("relay.crt"),
        key = p("relay.key"),
        a = DISK_A,
        b = DISK_B,
    )
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}
