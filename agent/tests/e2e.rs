//! End to end, as root, with the real programs: tracker, agent, relay and target
//! as separate processes over QUIC on 127.0.0.1, replicating loop devices the
//! tests create. The replica is checked with `qemu-img compare`.

use std::path::Path;
use std::time::Duration;

use blockferry_benches::site::{Binaries, ProtectedDisk, Site, SiteOptions, new_disk_id};
use blockferry_testkit::devices::{LoopDev, Mounted, dd_write};
use blockferry_testkit::privileged::{require_root, run};

const MIB: u64 = 1 << 20;
const CATCH_UP: Duration = Duration::from_secs(120);

fn site(dir: &Path, dev: &LoopDev) -> (Site, ProtectedDisk) {
    let disk = ProtectedDisk {
        id: new_disk_id().expect("disk id"),
        device: dev.path.clone(),
    };
    let bins = Binaries::of_this_build().expect("binaries");
    let opts = SiteOptions {
        quiet: std::env::var_os("BLOCKFERRY_E2E_VERBOSE").is_none(),
        ..SiteOptions::default()
    };
    let site = Site::start(bins, dir, vec![disk.clone()], opts).expect("start target and relay");
    (site, disk)
}

/// fio random 4 KiB writes: `mib` MiB in all, O_DIRECT, io_uring.
fn fio_random(dev: &LoopDev, mib: u64, seed: u64) {
    run(
        "fio",
        &[
            "--name=e2e",
            &format!("--filename={}", dev.path_str()),
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=16",
            &format!("--io_size={}M", mib),
            &format!("--randseed={seed}"),
            "--buffer_compress_percentage=50",
            "--refill_buffers",
            "--output-format=terse",
        ],
    );
}

fn status_u64(st: &serde_json::Value, key: &str) -> u64 {
    st["disks"][0][key].as_u64().unwrap_or(0)
}

fn logs(site: &Site) -> String {
    let mut out = String::new();
    for name in ["agent", "relay", "target"] {
        if let Ok(text) = std::fs::read_to_string(site.dir.join(format!("{name}.log"))) {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {name}.log (last lines) ---\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

fn caught_up(site: &mut Site) -> serde_json::Value {
    match site.wait_caught_up(CATCH_UP) {
        Ok(st) => st,
        Err(e) => panic!("{e:#}\n{}", logs(site)),
    }
}

fn identical(site: &Site, disk: &ProtectedDisk) {
    if let Err(e) = site.compare(disk) {
        if std::env::var_os("BLOCKFERRY_E2E_KEEP").is_some() {
            let keep = std::env::temp_dir().join("blockferry-e2e-failed");
            let _ = std::fs::remove_dir_all(&keep);
            run(
                "cp",
                &[
                    "-a",
                    site.dir.to_str().unwrap_or("."),
                    keep.to_str().unwrap_or("."),
                ],
            );
            run(
                "cp",
                &[
                    disk.device.to_str().unwrap_or("."),
                    keep.join("device.img").to_str().unwrap_or("."),
                ],
            );
        }
        panic!("{e:#}\n{}", logs(site));
    }
}

#[test]
#[ignore = "needs root: loop devices, eBPF and the three binaries"]
fn replica_is_identical_after_initial_sync_and_continuous_writes() {
    require_root("replica_is_identical_after_initial_sync_and_continuous_writes");
    let dev = LoopDev::new(128 * MIB, true);
    // Data before protection: the initial sync must carry it.
    dd_write(dev.path_str(), MIB, 8, 24, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut site, disk) = site(dir.path(), &dev);
    site.start_agent().expect("agent");
    // Writes while the initial sync runs and after it.
    fio_random(&dev, 8, 1);
    caught_up(&mut site);
    identical(&site, &disk);

    // A file system on top, written through the page cache.
    run("mkfs.ext4", &["-q", "-F", dev.path_str()]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mountpoint");
    let unmount = Mounted::new(&[dev.path_str()], &mnt);
    for i in 0..20u8 {
        std::fs::write(
            mnt.join(format!("f{i}")),
            vec![i; 300_000 + usize::from(i) * 4096],
        )
        .expect("write file");
    }
    run("sync", &[]);
    fio_random(&dev, 4, 2);
    drop(unmount);
    let st = caught_up(&mut site);
    identical(&site, &disk);
    assert!(
        status_u64(&st, "bytes_read") >= 128 * MIB,
        "the initial sync read the whole disk: {st}"
    );
}

#[test]
#[ignore = "needs root: loop devices, eBPF and the three binaries"]
fn agent_killed_mid_replication_converges_without_full_copy() {
    require_root("agent_killed_mid_replication_converges_without_full_copy");
    let size = 256 * MIB;
    let dev = LoopDev::new(size, true);
    // Incompressible content everywhere: a full copy would cost the whole size.
    dd_write(dev.path_str(), 4 * MIB, 0, size / (4 * MIB), &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut site, disk) = site(dir.path(), &dev);
    site.start_agent().expect("agent");
    caught_up(&mut site);

    // 200 random 64 KiB chunks change, and the agent dies right after.
    let changed = 200u64;
    for i in 0..changed {
        let chunk = (i * 7919 + 13) % (size / (64 * 1024));
        dd_write(dev.path_str(), 64 * 1024, chunk, 1, &[]);
    }
    site.kill_agent().expect("SIGKILL agent");
    // Writes while no agent runs are invisible to any tracker: only the
    // checksum resync can find them.
    dd_write(dev.path_str(), 64 * 1024, 5, 3, &[]);

    site.start_agent().expect("restart agent");
    let st = caught_up(&mut site);
    identical(&site, &disk);
    let read = status_u64(&st, "bytes_read");
    let hash = status_u64(&st, "resync_hash_bytes");
    let unacked_bound = (changed + 3) * 64 * 1024;
    assert!(
        st["disks"][0]["last_resync"].is_u64(),
        "an unclean restart resyncs by checksum: {st}"
    );
    assert!(
        read <= unacked_bound * 11 / 10,
        "after the restart the agent read {read} bytes, more than 1.1 x the {unacked_bound} bytes that changed (hash traffic {hash}): {st}"
    );
}

#[test]
#[ignore = "needs root: loop devices, eBPF and the three binaries"]
fn clean_restart_needs_no_resync_and_keeps_writes_made_while_down() {
    require_root("clean_restart_needs_no_resync_and_keeps_writes_made_while_down");
    let size = 64 * MIB;
    let dev = LoopDev::new(size, true);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut site, disk) = site(dir.path(), &dev);
    site.start_agent().expect("agent");
    caught_up(&mut site);
    let status = site.stop_agent().expect("clean stop");
    assert!(status.success(), "the agent stopped with {status}");
    // The kernel keeps tracking while no agent runs.
    dd_write(dev.path_str(), 4096, 1000, 3, &[]);
    dd_write(dev.path_str(), 4096, 9000, 1, &[]);
    site.start_agent().expect("restart");
    let st = caught_up(&mut site);
    identical(&site, &disk);
    assert!(
        st["disks"][0]["last_resync"].is_null(),
        "a clean restart needs no resync: {st}"
    );
    assert!(
        status_u64(&st, "bytes_read") <= 4 * 64 * 1024,
        "only the chunks written while the agent was down were read: {st}"
    );
}

#[test]
#[ignore = "needs root: loop devices, eBPF and the three binaries"]
fn relay_and_target_killed_mid_replication_lose_nothing() {
    require_root("relay_and_target_killed_mid_replication_lose_nothing");
    let size = 128 * MIB;
    let dev = LoopDev::new(size, true);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut site, disk) = site(dir.path(), &dev);
    site.start_agent().expect("agent");
    caught_up(&mut site);
    let before = site.agent_status().expect("status");
    let sent_before = status_u64(&before, "bytes_read");

    dd_write(dev.path_str(), MIB, 10, 16, &[]);
    site.kill_relay().expect("SIGKILL relay");
    dd_write(dev.path_str(), MIB, 40, 8, &[]);
    site.start_relay().expect("restart relay");
    dd_write(dev.path_str(), MIB, 60, 8, &[]);
    site.kill_target().expect("SIGKILL target");
    dd_write(dev.path_str(), MIB, 80, 8, &[]);
    site.start_target().expect("restart target");
    let st = caught_up(&mut site);
    identical(&site, &disk);
    let shipped = status_u64(&st, "bytes_read") - sent_before;
    assert!(
        shipped < size / 2,
        "no full copy: {shipped} bytes shipped after the first sync for 40 MiB written: {st}"
    );
}

#[test]
#[ignore = "needs root: loop devices, eBPF and the three binaries"]
fn bad_relay_address_is_reported_and_replication_catches_up_once_fixed() {
    require_root("bad_relay_address_is_reported_and_replication_catches_up_once_fixed");
    let dev = LoopDev::new(64 * MIB, true);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut site, disk) = site(dir.path(), &dev);
    site.start_agent().expect("agent");
    caught_up(&mut site);
    site.stop_agent().expect("clean stop");

    // A relay address where nothing listens: a port of an unbound UDP socket.
    let nowhere = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port");
    site.write_agent_config(nowhere).expect("config");
    site.start_agent().expect("agent with a bad address");
    site.wait_agent_ready(CATCH_UP).expect("agent tracking");
    dd_write(dev.path_str(), MIB, 3, 4, &[]);
    let deadline = std::time::Instant::now() + CATCH_UP;
    let reported = loop {
        let st = site.agent_status().ok();
        let err = st
            .as_ref()
            .and_then(|s| s["disks"][0]["last_error"].as_str().map(str::to_owned));
        if let Some(e) = err {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection error reported\n{}",
            logs(&site)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        reported.contains(&nowhere.to_string()),
        "the error names the address: {reported}"
    );
    let st = site.agent_status().expect("status");
    assert!(
        status_u64(&st, "backlog_bytes") > 0,
        "the writes are still tracked: {st}"
    );
    site.stop_agent().expect("clean stop");

    let relay = site.relay_addr().expect("relay address");
    site.write_agent_config(relay).expect("config");
    site.start_agent().expect("agent fixed");
    let st = caught_up(&mut site);
    identical(&site, &disk);
    assert!(
        status_u64(&st, "bytes_read") < 32 * MIB,
        "caught up without a full copy: {st}"
    );
}

#[test]
#[ignore = "needs root: loop devices, eBPF and the three binaries"]
fn grown_disk_keeps_replicating_at_its_new_size() {
    require_root("grown_disk_keeps_replicating_at_its_new_size");
    let old = 64 * MIB;
    let new = 96 * MIB;
    let dev = LoopDev::new(old, true);
    dd_write(dev.path_str(), MIB, 2, 4, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut site, disk) = site(dir.path(), &dev);
    site.start_agent().expect("agent");
    let before = caught_up(&mut site);
    identical(&site, &disk);
    let read_before = status_u64(&before, "bytes_read");

    run(
        "truncate",
        &[
            "-s",
            &new.to_string(),
            dev.backing().to_str().expect("utf-8"),
        ],
    );
    run("losetup", &["-c", dev.path_str()]);
    // Into the grown range (one write straddling the old end) and the old one.
    dd_write(dev.path_str(), MIB, old / MIB - 1, 2, &[]);
    dd_write(dev.path_str(), MIB, 80, 8, &[]);
    dd_write(dev.path_str(), 4096, 7, 2, &[]);

    // Caught up counts only once the agent has seen the new size.
    let deadline = std::time::Instant::now() + CATCH_UP;
    while status_u64(&site.agent_status().unwrap_or_default(), "size") != new {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not notice the new size\n{}",
            logs(&site)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = caught_up(&mut site);
    identical(&site, &disk);
    let info = run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            site.replica(&disk.id).to_str().expect("utf-8"),
        ],
    );
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info json");
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(new),
        "the replica has the new size: {info}\n{}",
        logs(&site)
    );
    assert!(
        st["disks"][0]["last_resync"].is_null(),
        "a grown disk needs no checksum resync: {st}"
    );
    let grown_read = status_u64(&st, "bytes_read") - read_before;
    assert!(
        grown_read < new / 2,
        "only the added range and the new writes are read after a grow, not the disk: {grown_read} bytes"
    );

    // Grown again while no agent runs: the restarted agent finds the new size.
    let newer = 128 * MIB;
    let status = site.stop_agent().expect("clean stop");
    assert!(status.success(), "the agent stopped with {status}");
    run(
        "truncate",
        &[
            "-s",
            &newer.to_string(),
            dev.backing().to_str().expect("utf-8"),
        ],
    );
    run("losetup", &["-c", dev.path_str()]);
    dd_write(dev.path_str(), MIB, 100, 4, &[]);
    site.start_agent().expect("restart");
    let st = caught_up(&mut site);
    identical(&site, &disk);
    // The kernel saw the geometry change, so the restart may compare by
    // checksum; either way only the grown range is read whole.
    assert!(
        status_u64(&st, "bytes_read") < newer / 2,
        "no full copy after growing while down: {st}"
    );
    let info = run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            site.replica(&disk.id).to_str().expect("utf-8"),
        ],
    );
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info json");
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(newer),
        "the replica grew while the agent was down: {info}\n{}",
        logs(&site)
    );
}
