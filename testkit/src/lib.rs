//! Test support shared by the blockferry crates, used only as a dev-dependency.
//!
//! What more than one test file needs lives here once:
//! - [`privileged`]: the root check of the root-only tests, and running a command;
//! - [`devices`]: loop devices, partitions, zram, mounts and tmpfs the test creates itself
//!   and removes on drop, even when the test panics; O_DIRECT helpers;
//! - [`pki`]: a PKI directory with the relay, the target and two agents;
//! - [`sink`]: a target that records every applied frame, served on real QUIC;
//! - [`channel`]: agent-side and relay-side disk channels over real QUIC;
//! - [`data`]: deterministic test data, temp dirs, comparison helpers;
//! - [`qemu`]: qemu-img as the independent oracle (read-only commands).
//!
//! Root-only tests are marked `#[ignore = "needs root: ..."]` and call
//! [`privileged::require_root`] first, so that without root they show as ignored
//! instead of passing, and `cargo xtask ci` runs them as root with `--ignored`.

pub mod channel;
pub mod data;
pub mod devices;
pub mod pki;
pub mod privileged;
pub mod qemu;
pub mod sink;

/// Test logs on demand (`RUST_LOG`); a second call in the same process is a no-op.
pub fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init()
        .ok();
}
