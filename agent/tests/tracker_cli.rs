//! The diagnostic commands on the real kernel: `track --json` prints exactly the
//! documented lines, `probe` attaches every hook and detaches.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use blockferry_testkit::devices::{LoopDev, dd_write};
use blockferry_testkit::privileged::{require_root, run};

const AGENT: &str = env!("CARGO_BIN_EXE_blockferry-agent");

/// Kills the agent if the test fails before stopping it.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs root: loop devices and eBPF"]
fn track_json_prints_the_documented_lines() {
    require_root("track_json_prints_the_documented_lines");
    let disk = LoopDev::new(8 << 20, true);
    let dev = disk.path_str();
    let mut agent = Agent(
        Command::new(AGENT)
            .args(["track", "--json", "--device", dev])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent"),
    );
    let stderr = agent.0.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    // The agent says when its programs are attached; writes before that are not its.
    loop {
        let line = lines
            .next()
            .expect("agent exited before tracking")
            .expect("read stderr");
        if line.starts_with("tracking ") {
            break;
        }
    }
    dd_write(dev, 4096, 256, 1, &[]);
    run("blkdiscard", &["-o", "2097152", "-l", "65536", dev]);
    run("kill", &["-TERM", &agent.0.id().to_string()]);
    let status = agent.0.wait().expect("wait");
    assert!(status.success(), "agent exit status {status}");
    let mut out = String::new();
    agent
        .0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    assert_eq!(
        out,
        format!(
            "{{\"device\":\"{dev}\",\"offset\":1048576,\"len\":4096,\"op\":\"write\"}}\n\
             {{\"device\":\"{dev}\",\"offset\":2097152,\"len\":65536,\"op\":\"discard\"}}\n"
        )
    );
}

#[test]
#[ignore = "needs root: loop devices and eBPF"]
fn probe_attaches_every_hook_and_resolves_the_enums() {
    require_root("probe_attaches_every_hook_and_resolves_the_enums");
    let out = Command::new(AGENT)
        .arg("probe")
        .output()
        .expect("run probe");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    for hook in ["block_bio_queue", "block_rq_complete", "block_bio_complete"] {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("tp_btf/{hook}")) && l.contains("attached")),
            "{hook} not attached:\n{text}"
        );
    }
    // The write op is 1 on every kernel since 4.10; a wrong relocation shows here.
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["REQ_OP_WRITE", "1"]),
        "{text}"
    );
    assert!(text.contains("programs detached"));
}
