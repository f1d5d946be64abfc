//! SIGKILL the real relay binary mid-stream and restart it: no batch the relay
//! acked is lost, and the target applies nothing twice.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use blockferry_proto::Seq;
use common::*;
use tokio_util::sync::CancellationToken;

/// The relay process; killed on drop so a failing test leaves nothing behind.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
}

impl RelayProcess {
    fn spawn(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_blockferry-relay"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start blockferry-relay");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("quic="))
            .unwrap_or_else(|| panic!("relay did not report its address: {line:?}"))
            .parse()
            .unwrap();
        RelayProcess { child, addr }
    }

    fn kill(mut self) {
        // Child::kill is SIGKILL on Unix: no shutdown code runs.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acked_batch_and_applies_nothing_twice() {
    const N: u64 = 120;
    const LEN: usize = 64 << 10;
    init_logs();
    let pki = Pki::new();
    let cancel = CancellationToken::new();
    let target = RecordingTarget::new();
    let taddr = start_target(&pki, target.clone(), &cancel);
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let cfg = write_config(
        work.path(),
        &relay_toml(
            &pki,
            &spool,
            "127.0.0.1:0".parse().unwrap(),
            taddr,
            64 << 20,
        ),
    );
    let relay = RelayProcess::spawn(&cfg);
    let addr = relay.addr;

    let ch = agent_channel(&pki, "host-a", DISK_A, addr, 8, &cancel);
    let pusher = ch.clone();
    let pushed = tokio::spawn(async move {
        let mut last = Seq::ZERO;
        for i in 0..N {
            last = pusher.push_batch(batch(i, LEN)).await.unwrap();
        }
        last
    });
    let mut progress = ch.progress();
    let acked_at_kill = progress
        .wait_for(|p| p.durable.0 >= 30)
        .await
        .unwrap()
        .durable;
    relay.kill();

    // Same port again (it was chosen by the kernel on the first start), so
    // the agent's reconnects find the new process.
    write_config(
        work.path(),
        &relay_toml(&pki, &spool, addr, taddr, 64 << 20),
    );
    let relay = RelayProcess::spawn(&cfg);
    assert_eq!(relay.addr, addr);

    let last = pushed.await.unwrap();
    assert_eq!(last, Seq(N));
    ch.wait_durable(last).await.unwrap();
    target.wait_applied(DISK_A, N as usize).await;
    let applied = target.seqs(DISK_A);
    assert!(
        applied.contains(&acked_at_kill.0),
        "acked batch {acked_at_kill} lost"
    );
    assert_applied_exactly(&target, DISK_A, N, LEN);
    assert!(
        ch.progress().borrow().reconnects >= 1,
        "the agent never reconnected"
    );
    drop(relay);
    cancel.cancel();
}
