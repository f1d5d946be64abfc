//! Root tests on the real kernel: tracking pinned in bpffs survives the
//! process that loaded it. Writes made while no tracker is held are reported
//! to the next one; lost pins, a foreign build and a ring overflow while down
//! all say "not continuous" (DESIGN invariant 1).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use blockferry_agent::tracker::{Continuity, ExtentSet, Notice, Tracker};
use blockferry_testkit::devices::{LoopDev, dd_write};
use blockferry_testkit::privileged::require_root;

const MIB: u64 = 1 << 20;

fn one(r: std::ops::Range<u64>) -> ExtentSet {
    let mut s = ExtentSet::new();
    s.insert(r);
    s
}

/// A pin directory of its own inside /sys/fs/bpf, removed (with whatever the
/// tracker pinned in it) on drop, even when the test panics.
struct Pins(PathBuf);

impl Pins {
    fn new(test: &str) -> Pins {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Pins(PathBuf::from(format!(
            "/sys/fs/bpf/bf-test-{test}-{}-{n}",
            std::process::id()
        )))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = Tracker::remove_pins(&self.0) {
            eprintln!("cannot remove the test pins {}: {e}", self.0.display());
        }
    }
}

/// Everything the notices and the dirty set report for the device.
fn dirty_after_poll(t: &mut Tracker, id: blockferry_agent::tracker::DeviceId) -> ExtentSet {
    let notices = t.poll_now().expect("poll");
    for n in &notices {
        assert!(
            !matches!(n, Notice::Resync { .. }),
            "unexpected resync: {n:?}"
        );
    }
    t.dirty(id).cloned().unwrap_or_default()
}

#[test]
#[ignore = "needs root: loop devices, eBPF and bpffs pins"]
fn writes_while_no_agent_runs_reach_the_next_agent() {
    require_root("writes_while_no_agent_runs_reach_the_next_agent");
    let disk = LoopDev::new(16 * MIB, true);
    let pins = Pins::new("gap");
    let dev = disk.path_str();

    // First process: loads and pins, protects, consumes one write, and leaves
    // a second one unread in the ring buffer when it goes away.
    let (mut a, continuity) = Tracker::load_persistent(pins.path()).expect("load and pin");
    assert_eq!(continuity, Continuity::Fresh);
    let id = a.protect(&disk.path).expect("protect");
    assert!(
        !a.continuous(id),
        "a fresh tracker cannot vouch for the past"
    );
    dd_write(dev, 4096, 0, 1, &[]);
    assert_eq!(dirty_after_poll(&mut a, id), one(0..4096));
    dd_write(dev, 4096, 3 * MIB / 4096, 1, &[]);
    // One agent per pinned tracker: a second one, or an uninstall, is refused.
    let second = Tracker::load_persistent(pins.path()).map(|_| ());
    assert!(
        second
            .as_ref()
            .is_err_and(|e| e.to_string().contains("another blockferry agent")),
        "a second agent on the same pins: {second:?}"
    );
    assert!(Tracker::remove_pins(pins.path()).is_err());
    drop(a);

    // No tracker in any process now: these writes only the pinned programs see.
    dd_write(dev, 4096, MIB / 4096, 1, &[]);
    dd_write(dev, 512, (5 * MIB + 512) / 512, 1, &[]);
    dd_write(dev, 65536, 9 * MIB / 65536, 1, &[]);

    let (mut b, continuity) = Tracker::load_persistent(pins.path()).expect("resume");
    assert_eq!(continuity, Continuity::Resumed);
    let id = b.protect(&disk.path).expect("protect again");
    b.forget_inherited().expect("forget inherited filters");
    let got = dirty_after_poll(&mut b, id);
    // The write the first process consumed is not replayed; the one it left
    // unread and those made while nobody ran are all there, and nothing else.
    let want = ExtentSet::from_iter([
        MIB..MIB + 4096,
        3 * MIB..3 * MIB + 4096,
        5 * MIB + 512..5 * MIB + 1024,
        9 * MIB..9 * MIB + 65536,
    ]);
    assert_eq!(got, want, "writes made while no agent ran");
    assert!(b.continuous(id), "pins found, hooks attached, no drops");
    assert_eq!(b.in_flight_bytes(id), 0);

    // And the resumed tracker goes on tracking.
    b.take_dirty(id, u64::MAX);
    dd_write(dev, 4096, 12 * MIB / 4096, 1, &[]);
    assert_eq!(dirty_after_poll(&mut b, id), one(12 * MIB..12 * MIB + 4096));
}

/// Run by `tracking_outlives_the_process_that_pinned_it` in a child process:
/// loads persistently, protects the device and exits without any cleanup.
#[test]
#[ignore = "a helper run in a child process"]
fn pin_child_protects_and_exits() {
    let (Some(dir), Some(dev)) = (
        std::env::var_os("BF_PIN_CHILD_DIR"),
        std::env::var_os("BF_PIN_CHILD_DEV"),
    ) else {
        return;
    };
    let (mut t, _) = Tracker::load_persistent(Path::new(&dir)).expect("child: load and pin");
    t.protect(Path::new(&dev)).expect("child: protect");
    // Gone without dropping anything: what a crash or SIGKILL leaves behind.
    std::process::exit(0);
}

#[test]
#[ignore = "needs root: loop devices, eBPF and bpffs pins"]
fn tracking_outlives_the_process_that_pinned_it() {
    require_root("tracking_outlives_the_process_that_pinned_it");
    let disk = LoopDev::new(8 * MIB, true);
    let pins = Pins::new("child");
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "pin_child_protects_and_exits",
            "--ignored",
            "--test-threads=1",
        ])
        .env("BF_PIN_CHILD_DIR", pins.path())
        .env("BF_PIN_CHILD_DEV", &disk.path)
        .output()
        .expect("run the child");
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        pins.path().join("bf_events").exists(),
        "the child pinned nothing"
    );

    // The process that attached the programs is gone.
    dd_write(disk.path_str(), 4096, 2 * MIB / 4096, 2, &[]);

    let (mut t, continuity) = Tracker::load_persistent(pins.path()).expect("resume");
    assert_eq!(continuity, Continuity::Resumed);
    let id = t.protect(&disk.path).expect("protect");
    assert_eq!(dirty_after_poll(&mut t, id), one(2 * MIB..2 * MIB + 8192));
    assert!(t.continuous(id));
}

#[test]
#[ignore = "needs root: loop devices, eBPF and bpffs pins"]
fn removed_pins_mean_tracking_was_not_continuous() {
    require_root("removed_pins_mean_tracking_was_not_continuous");
    let disk = LoopDev::new(8 * MIB, true);
    let pins = Pins::new("removed");
    let (mut a, _) = Tracker::load_persistent(pins.path()).expect("load and pin");
    a.protect(&disk.path).expect("protect");
    drop(a);

    // What uninstall (and a reboot, which empties bpffs) does.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blockferry-agent"))
        .args(["untrack", "--all", "--pin-dir"])
        .arg(pins.path())
        .output()
        .expect("run blockferry-agent untrack");
    assert!(
        out.status.success(),
        "untrack --all failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.path().exists(), "untrack --all left the pins");
    // Unseen by anyone now: the programs detached with their pins.
    dd_write(disk.path_str(), 4096, MIB / 4096, 1, &[]);

    let (mut b, continuity) = Tracker::load_persistent(pins.path()).expect("load again");
    assert_eq!(continuity, Continuity::Fresh);
    let id = b.protect(&disk.path).expect("protect");
    b.poll_now().expect("poll");
    assert!(
        !b.continuous(id),
        "tracking restarted: the device needs a resync"
    );
}

#[test]
#[ignore = "needs root: loop devices, eBPF and bpffs pins"]
fn pins_of_another_build_are_replaced_and_not_continuous() {
    require_root("pins_of_another_build_are_replaced_and_not_continuous");
    let disk = LoopDev::new(8 * MIB, true);
    let pins = Pins::new("foreign");
    let (mut a, _) = Tracker::load_persistent(pins.path()).expect("load and pin");
    a.protect(&disk.path).expect("protect");
    drop(a);

    // Stamp the pins as another build's.
    let map = aya::maps::MapData::from_pin(pins.path().join("bf_build"))
        .and_then(aya::maps::Map::from_map_data)
        .expect("open the pinned build stamp");
    let mut stamp: aya::maps::Array<_, u64> =
        aya::maps::Array::try_from(map).expect("build stamp is an array");
    stamp.set(0, 42, 0).expect("restamp");
    drop(stamp);

    let (mut b, continuity) = Tracker::load_persistent(pins.path()).expect("replace");
    match &continuity {
        Continuity::Replaced { reason } => {
            assert!(reason.contains("another build"), "reason: {reason}")
        }
        other => panic!("expected the pins to be replaced, got {other:?}"),
    }
    let id = b.protect(&disk.path).expect("protect");
    b.poll_now().expect("poll");
    assert!(!b.continuous(id));
    drop(b);

    // The replacement is a good set: the next start resumes it.
    let (_c, continuity) = Tracker::load_persistent(pins.path()).expect("resume");
    assert_eq!(continuity, Continuity::Resumed);
}

#[test]
#[ignore = "needs root: loop devices, eBPF and bpffs pins"]
fn ring_overflow_while_no_agent_runs_is_a_resync() {
    require_root("ring_overflow_while_no_agent_runs_is_a_resync");
    let disk = LoopDev::new(8 * MIB, true);
    let pins = Pins::new("overflow");
    // One page of ring: about a hundred records, two per write.
    let (mut a, _) =
        Tracker::load_persistent_with_ring_bytes(pins.path(), 4096).expect("load and pin");
    a.protect(&disk.path).expect("protect");
    drop(a);

    dd_write(disk.path_str(), 4096, 0, 1000, &[]);

    let (mut b, continuity) = Tracker::load_persistent(pins.path()).expect("resume");
    assert_eq!(continuity, Continuity::Resumed);
    let id = b.protect(&disk.path).expect("protect");
    let notices = b.poll_now().expect("poll");
    assert!(
        notices.iter().any(
            |n| matches!(n, Notice::Resync { device, dropped } if *device == id && *dropped > 0)
        ),
        "no resync notice for events lost while down: {notices:?}"
    );
    assert!(!b.continuous(id));
    assert!(b.needs_resync(id));
    assert_eq!(
        b.dirty(id).cloned().unwrap_or_default(),
        one(0..disk.size),
        "the whole device is dirty"
    );
    drop(b);

    // The drops were reported once: the next process does not see them again.
    let (mut c, _) = Tracker::load_persistent(pins.path()).expect("resume again");
    let id = c.protect(&disk.path).expect("protect");
    let notices = c.poll_now().expect("poll");
    assert!(
        !notices.iter().any(|n| matches!(n, Notice::Resync { .. })),
        "drops already reported came back: {notices:?}"
    );
    assert!(c.continuous(id));
}
