//! The relay binary's log on a pipe: plain text without escape codes by
//! default, one JSON object per line with `--log-format json`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;

/// The relay serving on port 0 with stderr on a pipe; killed on drop.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// The first `n` lines the relay logs at start-up with `extra` arguments.
fn first_log_lines(extra: &[&str], n: usize) -> Vec<Vec<u8>> {
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
    let mut relay = Relay(
        Command::new(env!("CARGO_BIN_EXE_blockferry-relay"))
            .args(extra)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            // What a colour decision by the terminal type alone would take.
            .env("TERM", "xterm-256color")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start blockferry-relay"),
    );
    let mut stderr = BufReader::new(relay.0.stderr.take().unwrap());
    (0..n)
        .map(|_| {
            let mut line = Vec::new();
            stderr.read_until(b'\n', &mut line).unwrap();
            assert!(line.ends_with(b"\n"), "the relay stopped logging: {line:?}");
            line
        })
        .collect()
}

#[test]
fn text_log_on_a_pipe_has_no_escape_codes() {
    let lines = first_log_lines(&[], 2);
    for line in &lines {
        assert!(
            !line.contains(&0x1b),
            "ESC in {:?}",
            String::from_utf8_lossy(line)
        );
    }
    let text = String::from_utf8(lines.concat()).unwrap();
    assert!(text.contains(" INFO "), "{text}");
    assert!(text.contains("relay listening"), "{text}");
}

#[test]
fn json_log_is_one_object_per_line_with_level_target_and_fields() {
    let lines = first_log_lines(&["--log-format", "json"], 2);
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_slice(l).expect("a log line is one JSON object"))
        .collect();
    for e in &events {
        assert!(e["timestamp"].is_string(), "{e}");
        assert_eq!(e["level"], "INFO", "{e}");
        assert!(
            e["target"]
                .as_str()
                .unwrap()
                .starts_with("blockferry_relay"),
            "{e}"
        );
        assert!(e["fields"]["message"].is_string(), "{e}");
    }
    let listening = events
        .iter()
        .find(|e| e["fields"]["message"] == "relay listening")
        .expect("the listening event");
    assert!(
        listening["fields"]["quic"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{listening}"
    );
    assert_eq!(listening["fields"]["target"], "127.0.0.1:9");
}
