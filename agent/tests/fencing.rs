//! Fencing end to end, as root, with the real programs (agent, relay and
//! target as separate processes over QUIC, a loop device): after the replica
//! is promoted, the old agent's writes never reach it, the agent says
//! `fenced` (once in its log), a restart leaves it fenced, and its other
//! disk keeps replicating.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockferry_benches::site::{Binaries, ProtectedDisk, Site, SiteOptions, new_disk_id};
use blockferry_testkit::devices::{LoopDev, dd_write};
use blockferry_testkit::privileged::require_root;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(120);
/// The line the agent logs (at ERROR) when a disk is fenced.
const FENCED_LINE: &str = "the replica was promoted to generation";

/// The status of one disk, by id.
fn disk_status(site: &Site, disk: &ProtectedDisk) -> serde_json::Value {
    let id = disk.id.to_string();
    site.agent_status()
        .ok()
        .and_then(|st| {
            st["disks"]
                .as_array()
                .and_then(|ds| ds.iter().find(|d| d["id"] == id.as_str()).cloned())
        })
        .unwrap_or_default()
}

fn disk_state(site: &Site, disk: &ProtectedDisk) -> String {
    disk_status(site, disk)["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The agent's log lines at ERROR that report the fence.
fn fence_errors(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("agent.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains(FENCED_LINE))
        .count()
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img")
}

/// Writes to the old source until its status says `fenced` (each write is a
/// frame the relay and the target must refuse); fails after [`WAIT`].
fn write_until_fenced(site: &Site, disk: &ProtectedDisk, dev: &LoopDev) -> u64 {
    let deadline = Instant::now() + WAIT;
    let mut seek = 0;
    while disk_state(site, disk) != "fenced" {
        assert!(
            Instant::now() < deadline,
            "the agent was not fenced within {WAIT:?}; status: {:?}",
            site.agent_status().ok()
        );
        dd_write(dev.path_str(), MIB, seek % 60, 1, &[]);
        seek += 1;
        // Polling an observable condition with a deadline.
        std::thread::sleep(Duration::from_millis(200));
    }
    seek
}

#[test]
#[ignore = "needs root: loop devices, eBPF and the three binaries"]
fn after_promotion_the_old_agent_is_fenced_nothing_reaches_the_promoted_copy_and_its_other_disk_replicates()
 {
    require_root(
        "after_promotion_the_old_agent_is_fenced_nothing_reaches_the_promoted_copy_and_its_other_disk_replicates",
    );
    let dev = LoopDev::new(64 * MIB, true);
    dd_write(dev.path_str(), MIB, 4, 8, &[]);
    let other_dev = LoopDev::new(32 * MIB, true);
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = ProtectedDisk {
        id: new_disk_id().expect("disk id"),
        device: dev.path.clone(),
    };
    let other = ProtectedDisk {
        id: new_disk_id().expect("disk id"),
        device: other_dev.path.clone(),
    };
    let bins = Binaries::of_this_build().expect("binaries");
    let opts = SiteOptions {
        quiet: true,
        ..SiteOptions::default()
    };
    let mut site =
        Site::start(bins, dir.path(), vec![disk.clone(), other.clone()], opts).expect("site");
    site.start_agent().expect("agent");
    site.wait_caught_up(WAIT).expect("initial sync");
    site.compare(&disk)
        .expect("replica identical before the failover");

    // Failover on the target host: the service is stopped, the replica
    // promoted, the service started again.
    site.kill_target().expect("stop the target");
    let store = site.target_store();
    let id = disk.id.to_string();
    let out = Command::new(site.bins.target())
        .args(["promote", "--json", "--store"])
        .arg(&store)
        .args(["--disk", &id])
        .output()
        .expect("run promote");
    assert!(
        out.status.success(),
        "promote failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let promoted: serde_json::Value = serde_json::from_slice(&out.stdout).expect("promote --json");
    assert_eq!(promoted["role"], "source", "{promoted}");
    let at_promote = dir.path().join("at-promote.raw");
    let replica = site.replica(&disk.id);
    let conv = qemu_img(&[
        "convert",
        "-f",
        "vmdk",
        "-O",
        "raw",
        replica.to_str().expect("utf-8 path"),
        at_promote.to_str().expect("utf-8 path"),
    ]);
    assert!(conv.status.success(), "{conv:?}");
    site.start_target().expect("restart the target");

    // The old source keeps writing.
    write_until_fenced(&site, &disk, &dev);
    let st = disk_status(&site, &disk);
    let action = st["action"].as_str().unwrap_or_default();
    assert!(action.contains("reprotect"), "status says what to do: {st}");
    // A few more writes while fenced: none may travel, all stay tracked.
    for i in 0..4 {
        dd_write(dev.path_str(), MIB, 40 + i, 1, &[]);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let st = disk_status(&site, &disk);
        if st["backlog_bytes"].as_u64().unwrap_or(0) >= 4 * MIB {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fenced writes are not tracked: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vmdk",
        at_promote.to_str().expect("utf-8 path"),
        replica.to_str().expect("utf-8 path"),
    ]);
    assert!(
        cmp.status.success(),
        "the promoted copy changed: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    assert_eq!(fence_errors(dir.path()), 1, "the fence is logged once");

    // The agent's other disk keeps replicating.
    dd_write(other_dev.path_str(), MIB, 2, 6, &[]);
    let since = blockferry_benches::site::unix_ms() + 500;
    let deadline = Instant::now() + WAIT;
    loop {
        let fresh = site
            .agent_status()
            .ok()
            .and_then(|st| st["updated_ms"].as_u64())
            .is_some_and(|t| t >= since);
        let st = disk_status(&site, &other);
        if fresh
            && st["state"] == "protected"
            && st["connected"] == true
            && st["backlog_bytes"] == 0
            && st["rpo_ms"] == 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other disk did not catch up: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    site.compare(&other)
        .expect("the other disk's replica is identical");

    // A restart of the agent stays fenced, and still ships nothing.
    site.stop_agent().expect("stop the agent");
    site.start_agent().expect("restart the agent");
    site.wait_agent_ready(WAIT).expect("agent ready");
    assert_eq!(disk_state(&site, &disk), "fenced");
    for i in 0..4 {
        dd_write(dev.path_str(), MIB, 50 + i, 1, &[]);
    }
    // The restarted agent read its fence from its state: whatever it
    // tracks now stays at the source, and the promoted copy is unchanged.
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vmdk",
        at_promote.to_str().expect("utf-8 path"),
        replica.to_str().expect("utf-8 path"),
    ]);
    assert!(
        cmp.status.success(),
        "the promoted copy changed after the agent restarted: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    assert_eq!(disk_state(&site, &disk), "fenced");
    assert_eq!(
        fence_errors(dir.path()),
        1,
        "the restart does not log the fence as new"
    );
}
