//! The relay binary under a service manager: `READY=1` on `$NOTIFY_SOCKET`
//! once it listens, `STOPPING=1` at SIGTERM (systemd `Type=notify`).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn relay_reports_ready_once_listening_and_stopping_at_sigterm() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let cfg = write_config(
        work.path(),
        &relay_toml(
            &pki,
            &work.path().join("spool"),
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
            1 << 30,
        ),
    );
    let socket = work.path().join("notify");
    let manager = UnixDatagram::bind(&socket).unwrap();
    // A bound on a hung relay, not a synchronisation: every recv below waits
    // for a datagram the relay sends.
    manager
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut relay = Command::new(env!("CARGO_BIN_EXE_blockferry-relay"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start blockferry-relay");
    let mut buf = [0u8; 64];
    let n = manager.recv(&mut buf).expect("READY=1 from the relay");
    assert_eq!(&buf[..n], b"READY=1");
    // The address line is written before READY=1.
    let mut line = String::new();
    BufReader::new(relay.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening quic=127.0.0.1:"), "{line:?}");
    let status = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let n = manager.recv(&mut buf).expect("STOPPING=1 from the relay");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(relay.wait().unwrap().success(), "the relay stops cleanly");
}
