//! `blockferry-agent handoff` and `reprotect` end to end, as root, with the
//! real programs (agent, relay and target as separate processes over QUIC, a
//! loop device). Handoff: refused while the service runs or the device is
//! held; otherwise the writes made while the service was down reach the
//! replica, the final point is durable there, the record is demoted and the
//! disk is handed off. Reprotect: a promoted record installed, `run` compares
//! by checksum and ships only what differs.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Output};
use std::time::Duration;

use blockferry_benches::site::{Binaries, ProtectedDisk, Site, SiteOptions, new_disk_id};
use blockferry_proto::{CopyRole, GenerationRecord, Seq};
use blockferry_testkit::devices::{LoopDev, dd_write};
use blockferry_testkit::privileged::require_root;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(120);

fn handoff(site: &Site, disk: &ProtectedDisk) -> Output {
    Command::new(site.bins.agent())
        .arg("handoff")
        .arg("--config")
        .arg(site.agent_config())
        .args(["--disk", &disk.id.to_string(), "--timeout", "120", "--json"])
        .output()
        .expect("run handoff")
}

fn reprotect(site: &Site, disk: &ProtectedDisk, record: &std::path::Path) -> Output {
    Command::new(site.bins.agent())
        .arg("reprotect")
        .arg("--config")
        .arg(site.agent_config())
        .args(["--disk", &disk.id.to_string(), "--json", "--record"])
        .arg(record)
        .output()
        .expect("run reprotect")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[ignore = "needs root: loop devices, eBPF and the three binaries"]
fn a_handoff_ships_to_rpo_zero_with_a_final_point_at_the_replica_and_demotes_the_source() {
    require_root(
        "a_handoff_ships_to_rpo_zero_with_a_final_point_at_the_replica_and_demotes_the_source",
    );
    let dev = LoopDev::new(64 * MIB, true);
    dd_write(dev.path_str(), MIB, 4, 8, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = ProtectedDisk {
        id: new_disk_id().expect("disk id"),
        device: dev.path.clone(),
    };
    let bins = Binaries::of_this_build().expect("binaries");
    let opts = SiteOptions {
        quiet: true,
        ..SiteOptions::default()
    };
    let mut site = Site::start(bins, dir.path(), vec![disk.clone()], opts).expect("site");
    site.start_agent().expect("agent");
    site.wait_caught_up(WAIT).expect("initial sync");

    // The service holds the state: a handoff is refused and changes nothing.
    let out = handoff(&site, &disk);
    assert!(!out.status.success(), "handoff beside the service");
    assert!(stderr(&out).contains("stop it first"), "{}", stderr(&out));

    let stopped = site.stop_agent().expect("stop the agent");
    assert!(stopped.success(), "clean stop: {stopped}");
    // Written while no agent runs: only the pinned tracker saw it.
    dd_write(dev.path_str(), MIB, 20, 6, &["conv=fsync"]);

    // A holder of the device (as a mounted file system is): refused.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev.path)
        .expect("open the device exclusively");
    let out = handoff(&site, &disk);
    assert!(!out.status.success(), "handoff of a device in use");
    assert!(
        stderr(&out).contains("unmount it or stop the workload"),
        "{}",
        stderr(&out)
    );
    drop(holder);

    let out = handoff(&site, &disk);
    assert!(out.status.success(), "handoff failed: {}", stderr(&out));
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).expect("handoff --json");
    for field in [
        "disk",
        "final_seq",
        "generation",
        "lineage",
        "seconds",
        "bytes_shipped",
    ] {
        assert!(!res[field].is_null(), "{field} missing: {res}");
    }
    assert_eq!(res["disk"], disk.id.to_string());
    assert!(
        res["bytes_shipped"].as_u64().unwrap_or(0) >= 6 * MIB / 2,
        "the writes made while the service was down were shipped: {res}"
    );
    // Zero loss: the replica holds every write, including those made while
    // the service was down.
    site.compare(&disk)
        .expect("replica identical after the handoff");

    let rec_path = site
        .agent_state_dir()
        .join(format!("{}.generation", disk.id));
    let rec = GenerationRecord::decode(&std::fs::read(&rec_path).expect("record")).expect("decode");
    assert_eq!(rec.role(), CopyRole::Replica, "demoted: {}", rec.lineage());
    let final_seq = res["final_seq"].as_u64().expect("final_seq");
    assert_eq!(rec.current().seq, Seq(final_seq));

    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(site.agent_state_dir().join("agent-state.json")).expect("state"),
    )
    .expect("state json");
    let entry = &state["disks"][disk.id.to_string()];
    assert_eq!(entry["handed_off"]["final_seq"], final_seq, "{entry}");
    let st = site.agent_status().expect("status");
    assert_eq!(st["disks"][0]["state"], "handed-off", "{st}");
    assert_eq!(st["disks"][0]["role"], "replica", "{st}");

    // Once handed off, a second handoff is refused.
    let out = handoff(&site, &disk);
    assert!(!out.status.success(), "a second handoff");
    assert!(stderr(&out).contains("handed-off"), "{}", stderr(&out));

    // The device is released: it can be opened exclusively again.
    let _again: File = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev.path)
        .expect("the handoff released the device");
}

#[test]
#[ignore = "needs root: loop devices, eBPF and the three binaries"]
fn a_reprotected_disk_is_compared_by_checksum_and_only_what_differs_travels() {
    require_root("a_reprotected_disk_is_compared_by_checksum_and_only_what_differs_travels");
    let dev = LoopDev::new(64 * MIB, true);
    dd_write(dev.path_str(), MIB, 0, 64, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = ProtectedDisk {
        id: new_disk_id().expect("disk id"),
        device: dev.path.clone(),
    };
    let bins = Binaries::of_this_build().expect("binaries");
    let opts = SiteOptions {
        quiet: true,
        ..SiteOptions::default()
    };
    let mut site = Site::start(bins, dir.path(), vec![disk.clone()], opts).expect("site");
    site.start_agent().expect("agent");
    site.wait_caught_up(WAIT).expect("initial sync");
    assert!(site.stop_agent().expect("stop").success());
    let out = handoff(&site, &disk);
    assert!(out.status.success(), "handoff failed: {}", stderr(&out));
    let final_seq =
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["final_seq"]
            .as_u64()
            .expect("final_seq");

    // Stand-in for the promoted copy's record (the replica here holds the
    // same data): the handed-off record, promoted at its final point.
    let rec_path = site
        .agent_state_dir()
        .join(format!("{}.generation", disk.id));
    let mut promoted =
        GenerationRecord::decode(&std::fs::read(&rec_path).expect("record")).expect("decode");
    promoted
        .promote(blockferry_proto::GenerationId::from_bytes([0x5a; 16]))
        .expect("promote");
    let promoted_file = dir.path().join("promoted.rec");
    std::fs::write(&promoted_file, promoted.encode()).expect("write the promoted record");

    let out = reprotect(&site, &disk, &promoted_file);
    assert!(out.status.success(), "reprotect failed: {}", stderr(&out));
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reprotect --json");
    for field in [
        "disk",
        "device",
        "size",
        "generation",
        "seq",
        "lineage",
        "phase",
    ] {
        assert!(!res[field].is_null(), "{field} missing: {res}");
    }
    assert_eq!(res["seq"], final_seq, "{res}");
    assert_eq!(res["generation"], promoted.current().number.0, "{res}");
    assert_eq!(res["phase"], "resync", "{res}");
    let out = Command::new(site.bins.agent())
        .arg("status")
        .arg("--config")
        .arg(site.agent_config())
        .arg("--json")
        .output()
        .expect("status");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(st["disks"][0]["state"], "reprotecting", "{st}");
    assert_eq!(st["disks"][0]["role"], "source", "{st}");

    // What changed here since the common point: 2 MiB of 64.
    dd_write(dev.path_str(), MIB, 10, 2, &["conv=fsync"]);
    site.start_agent().expect("agent");
    let st = site.wait_caught_up(WAIT).expect("reprotect resync");
    site.compare(&disk)
        .expect("replica identical after the reprotect");
    let shipped = st["disks"][0]["bytes_read"].as_u64().expect("bytes_read");
    assert!(
        (2 * MIB..=4 * MIB).contains(&shipped),
        "only what differs travels: {shipped} bytes of a 64 MiB disk"
    );
    let rec = GenerationRecord::decode(&std::fs::read(&rec_path).expect("record")).expect("decode");
    assert_eq!(rec.role(), CopyRole::Source);
    assert_eq!(rec.current().id, promoted.current().id, "{}", rec.lineage());
}
