//! The whole DR cycle on two sites, as root, with an ext4 file system holding
//! a SQLite database written throughout: protect → test failover → unplanned
//! failover while the source still writes (its agent fenced) → the workload
//! on site B → reprotect onto the original disk (refused as split brain until
//! the original's changes are named as discarded; then only differing chunks
//! travel) → planned failback (zero loss) → re-enable (nothing but hashes
//! travel). Every stage is checked on the data that arrived: `qemu-img
//! compare`, `e2fsck -fn` after journal replay, SQLite's `integrity_check`
//! and its last committed row.
//!
//! Everything runs through the documented commands of the three binaries:
//! `blockferry-target failover|reprotect`, `blockferry-agent reprotect|handoff`,
//! `blockferry-relay forget`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockferry_benches::dr::{self, CHUNK, run_json, run_ok, run_refused};
use blockferry_benches::netns::{SiteName, TwoSites};
use blockferry_benches::site::{Binaries, Placement, ProtectedDisk, Role, Site, SiteOptions};
use blockferry_testkit::devices::{LoopDev, Mounted};
use blockferry_testkit::privileged::{require_root, run};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 128 * MIB;
const CATCH_UP: Duration = Duration::from_secs(180);

/// A SQLite writer: one `sqlite3` process, each row its own committed
/// transaction; the id of the last row whose commit returned is kept.
struct Workload {
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    child: Child,
}

impl Workload {
    fn start(db: &Path) -> Workload {
        let mut child = Command::new("stdbuf")
            .args(["-oL", "sqlite3"])
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sqlite3 (install the sqlite3 package)");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        writeln!(
            stdin,
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
             CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, at INTEGER, p BLOB);"
        )
        .expect("create the table");
        let mut mode = String::new();
        out.read_line(&mut mode).expect("journal mode");
        let thread = {
            let (stop, last) = (stop.clone(), last.clone());
            std::thread::spawn(move || {
                let mut line = String::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = writeln!(
                        stdin,
                        "INSERT INTO t(at, p) VALUES(strftime('%s','now'), randomblob(3000)); \
                         SELECT max(id) FROM t;"
                    )
                    .and_then(|()| stdin.flush());
                    line.clear();
                    if sent.is_err() || out.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if let Ok(id) = line.trim().parse() {
                        last.store(id, Ordering::Relaxed);
                    }
                }
                drop(stdin);
                let mut rest = String::new();
                let _ = out.read_to_string(&mut rest);
            })
        };
        Workload {
            stop,
            last,
            thread: Some(thread),
            child,
        }
    }

    fn last_committed(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    /// Waits until `n` more rows are committed.
    fn wait_rows(&self, n: u64) {
        let goal = self.last_committed() + n;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.last_committed() < goal {
            assert!(Instant::now() < deadline, "the workload stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops after the row being written; returns the last committed id.
    fn stop(mut self) -> u64 {
        self.finish()
    }

    fn finish(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the workload thread");
        }
        let _ = self.child.wait();
        self.last_committed()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.child.kill();
            self.finish();
        }
    }
}

/// A loop device a command of the product attached; detached on drop.
struct Attached(PathBuf);

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// `fsfreeze -f` until dropped.
struct Frozen(PathBuf);

impl Frozen {
    fn new(mnt: &Path) -> Frozen {
        run("fsfreeze", &["-f", mnt.to_str().expect("utf-8")]);
        Frozen(mnt.to_owned())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).status();
    }
}

fn cmd(bin: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args(args);
    c
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn ok(c: Command) -> String {
    run_ok(c).unwrap_or_else(|e| panic!("{e:#}"))
}

fn json(c: Command) -> Value {
    run_json(c).unwrap_or_else(|e| panic!("{e:#}"))
}

fn refused(c: Command) -> String {
    run_refused(c).unwrap_or_else(|e| panic!("{e:#}"))
}

fn identical(a: &Path, b: &Path) -> Result<(), String> {
    dr::identical(a, b).map_err(|e| format!("{e:#}"))
}

fn differing(a: &Path, b: &Path) -> (u64, u64) {
    let d = dr::differing(a, b, DISK_SIZE).unwrap_or_else(|e| panic!("{e:#}"));
    (d.chunks, d.blocks)
}

fn logs(site: &Site) -> String {
    let mut out = String::new();
    for role in [Role::Agent, Role::Relay, Role::Target] {
        if let Ok(text) = std::fs::read_to_string(site.log_file(role)) {
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- {} ---\n", role.name()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

fn caught_up(site: &mut Site) -> Value {
    site.wait_caught_up(CATCH_UP)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(site)))
}

/// Polls the agent's status until `pred` holds for the disk.
fn wait_disk(site: &Site, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        if let Ok(st) = site.agent_status()
            && let Some(d) = st["disks"].as_array().and_then(|a| a.first())
            && pred(d)
        {
            return d.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never reported {what}: {:?}\n{}",
            site.agent_status().ok(),
            logs(site)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A recovery point of the quiesced file system at `mnt`: frozen, the
/// replica catches up, a point is cut after everything the agent shipped,
/// thawed. Points are labelled `not-consistent` (write ordering across a cut
/// is not proved yet), so a point cut in the middle of writes need not hold
/// a consistent database; one cut while the file system is frozen does.
fn quiesced_point(site: &mut Site, mnt: &Path, bins: &Binaries, store: &Path, id: &str) -> String {
    let _frozen = Frozen::new(mnt);
    let st = caught_up(site);
    let shipped = st["disks"][0]["durable_seq"].as_u64().expect("durable seq");
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let listing = json(cmd(
            &bins.target(),
            &["points", "--store", p(store), "--disk", id, "--json"],
        ));
        let point = listing["points"].as_array().and_then(|ps| {
            ps.iter()
                .rev()
                .find(|pt| pt["seq"].as_u64() >= Some(shipped) && pt["incomplete"] == false)
        });
        if let Some(pt) = point {
            return pt["id"].as_u64().expect("point id").to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no point after #{shipped}: {listing}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The integrity check and the last row of the database at `db`.
fn check_db(db: &Path) -> u64 {
    let out = run(
        "sqlite3",
        &[p(db), "PRAGMA integrity_check; SELECT max(id) FROM t;"],
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("ok"), "integrity_check of {db:?}: {out}");
    lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rows in {db:?}: {out}"))
}

/// `e2fsck -fn`: clean (after a mount replayed the journal).
fn fsck_clean(dev: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn"])
        .arg(dev)
        .output()
        .expect("e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn {} found problems: {}",
        dev.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn mount(dev: &Path, dir: &Path) -> Mounted {
    std::fs::create_dir_all(dir).expect("mount point");
    Mounted::new(&["-t", "ext4", p(dev)], dir)
}

fn store_state(store: &Path, disk: &str) -> Value {
    let bytes = std::fs::read(store.join(disk).join("state.json")).expect("state.json");
    serde_json::from_slice(&bytes).expect("state json")
}

#[test]
#[ignore = "needs root: network namespaces, loop devices, mounts, eBPF and the three binaries"]
fn the_whole_dr_cycle_on_two_sites_loses_no_committed_row_and_moves_only_what_differs() {
    require_root(
        "the_whole_dr_cycle_on_two_sites_loses_no_committed_row_and_moves_only_what_differs",
    );
    let started = Instant::now();
    let stage = |name: &str| eprintln!("[{:6.1}s] {name}", started.elapsed().as_secs_f64());
    let sites = Arc::new(TwoSites::new().unwrap_or_else(|e| panic!("{e:#}")));
    let bins = Binaries::of_this_build().expect("binaries");
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let quiet = std::env::var_os("BLOCKFERRY_E2E_VERBOSE").is_none();

    // --- protect: ext4 + SQLite on the original disk in site-a ---
    stage("protect");
    let dev_a = LoopDev::new(DISK_SIZE, true);
    run("mkfs.ext4", &["-q", "-F", dev_a.path_str()]);
    let mnt_a = w.join("mnt-a");
    let mut a_fs = Some(mount(&dev_a.path, &mnt_a));
    let mut writer_a = Some(Workload::start(&mnt_a.join("app.db")));
    let disk = ProtectedDisk {
        id: blockferry_benches::site::new_disk_id().expect("id"),
        device: dev_a.path.clone(),
    };
    let id = disk.id.to_string();
    let cmds = dr::Commands {
        bins: bins.clone(),
        id: id.clone(),
    };
    let opts = |source| SiteOptions {
        quiet,
        placement: Placement::across(&sites, source),
        ..SiteOptions::default()
    };
    let mut forward = Site::start(
        bins.clone(),
        &w.join("forward"),
        vec![disk.clone()],
        opts(SiteName::A),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let store_b = forward.target_store();
    forward.start_agent().expect("agent");
    wait_disk(&forward, "protected", |d| d["state"] == "protected");
    writer_a.as_ref().expect("writer").wait_rows(200);

    // --- test failover while replication goes on ---
    stage("test failover");
    let tf = w.join("test-failover");
    let tested = quiesced_point(&mut forward, &mnt_a, &bins, &store_b, &id);
    let before = wait_disk(&forward, "a replica", |d| {
        d["replica_seq"].as_u64() > Some(0)
    });
    let t = json(cmd(
        &bins.target(),
        &[
            "failover",
            "--test",
            "--store",
            p(&store_b),
            "--disk",
            &id,
            "--point",
            &tested,
            "--out",
            p(&tf),
            "--attach",
            "--json",
        ],
    ));
    let tdev = PathBuf::from(t["loop_device"].as_str().expect("loop device"));
    let _tdev_guard = Attached(tdev.clone());
    let exported = w.join("tested-point.raw");
    let point = t["point"].as_u64().expect("point id").to_string();
    ok(cmd(
        &bins.target(),
        &[
            "export",
            "--store",
            p(&store_b),
            "--disk",
            &id,
            "--point",
            &point,
            "--format",
            "raw",
            "--out",
            p(&exported),
        ],
    ));
    identical(&exported, &tdev).expect("the test failover disk is its point");
    std::fs::remove_file(&exported).expect("rm export");
    {
        let m = mount(&tdev, &w.join("mnt-test"));
        check_db(&m.path().join("app.db"));
    }
    fsck_clean(&tdev);
    json(cmd(
        &bins.target(),
        &[
            "failover",
            "--cleanup",
            "--store",
            p(&store_b),
            "--disk",
            &id,
            "--json",
        ],
    ));
    let seq0 = before["replica_seq"].as_u64().unwrap_or(0);
    wait_disk(&forward, "replication going on past the test", |d| {
        d["replica_seq"].as_u64() > Some(seq0) && d["state"] == "protected"
    });

    // --- unplanned failover while the source still writes ---
    stage("unplanned failover");
    writer_a.as_ref().expect("writer").wait_rows(100);
    let fo = w.join("failover");
    // The point: one of the quiesced file system, chosen while the
    // source goes on writing after it.
    let chosen = quiesced_point(&mut forward, &mnt_a, &bins, &store_b, &id);
    writer_a.as_ref().expect("writer").wait_rows(50);
    let f = json(cmds.failover(&store_b, &fo, &chosen));
    let dev_b = PathBuf::from(f["loop_device"].as_str().expect("loop device"));
    let _dev_b_guard = Attached(dev_b.clone());
    let promoted_id = f["generation_id"]
        .as_str()
        .expect("generation id")
        .to_owned();
    let fenced = wait_disk(&forward, "fenced", |d| d["state"] == "fenced");
    assert!(
        fenced.to_string().contains("reprotect") || fenced.to_string().contains("Fail back"),
        "the fenced status says what to do: {fenced}"
    );
    // Fencing: the old agent restarted, its disk written: nothing reaches
    // the promoted copy.
    let held = store_state(&store_b, &id)["applied_seq"].clone();
    forward.stop_agent().expect("stop the old agent");
    forward.start_agent().expect("restart the old agent");
    writer_a.as_ref().expect("writer").wait_rows(100);
    wait_disk(&forward, "fenced after a restart", |d| {
        d["state"] == "fenced"
    });
    assert_eq!(
        store_state(&store_b, &id)["applied_seq"],
        held,
        "the promoted copy took nothing of the fenced source"
    );
    // Site A goes down with writes made after the chosen point.
    let last_a = writer_a.take().expect("writer").stop();
    drop(a_fs.take());
    forward.stop_agent().expect("stop the old agent");

    // --- the workload goes on on site B ---
    stage("workload on site B");
    let mnt_b = w.join("mnt-b");
    let b_fs = mount(&dev_b, &mnt_b);
    let first_b = check_db(&mnt_b.join("app.db"));
    assert!(first_b <= last_a, "site B starts from a point of site A");
    let writer_b = Workload::start(&mnt_b.join("app.db"));
    writer_b.wait_rows(100);
    json(cmd(
        &bins.target(),
        &[
            "failover",
            "--commit",
            "--store",
            p(&store_b),
            "--disk",
            &id,
            "--json",
        ],
    ));

    // --- reprotect onto the original disk ---
    stage("reprotect");
    let reverse_disk = ProtectedDisk {
        id: disk.id,
        device: dev_b.clone(),
    };
    let mut reverse = Site::start(
        bins.clone(),
        &w.join("reverse"),
        vec![reverse_disk],
        opts(SiteName::B),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let store_a = reverse.target_store();
    // The promoted copy's record travels to site A as a file.
    let promoted_record = w.join("promoted.generation");
    std::fs::copy(store_b.join(&id).join("generation.rec"), &promoted_record).expect("copy");
    let old_source_record = forward.agent_state_dir().join(format!("{id}.generation"));
    let reprotect = |extra: &[&str]| {
        cmds.reprotect(
            &store_a,
            &dev_a.path,
            &old_source_record,
            &promoted_record,
            extra,
        )
    };
    let split = refused(reprotect(&[]));
    assert!(
        split.contains("split brain") && split.contains("--discard-changes-of"),
        "reprotect reports the divergence and what to do: {split}"
    );
    assert!(
        split.contains(&promoted_id[..8]),
        "both histories are shown (the promoted generation {promoted_id}): {split}"
    );
    let dry = json(reprotect(&["--discard-changes-of", "seed", "--dry-run"]));
    assert_eq!(dry["mode"], "checksum-compare", "{dry}");
    assert!(
        !store_a.join(&id).exists(),
        "a dry run changes nothing: {dry}"
    );
    json(reprotect(&["--discard-changes-of", "seed"]));
    reverse
        .write_agent_config(reverse.relay_addr().expect("relay"))
        .expect("agent config");
    json(cmds.agent_reprotect(
        &reverse.agent_config(),
        &store_b.join(&id).join("generation.rec"),
    ));
    let (chunks, blocks) = {
        let _frozen = Frozen::new(&mnt_b);
        let diff = differing(&dev_a.path, &dev_b);
        let link0 = sites.link_bytes(SiteName::B).expect("counters");
        reverse.start_agent().expect("reverse agent");
        let st = caught_up(&mut reverse);
        identical(&dev_a.path, &dev_b).unwrap_or_else(|e| {
            panic!(
                "reprotect made the original disk the copy: {e}\n{}",
                logs(&reverse)
            )
        });
        let link1 = sites.link_bytes(SiteName::B).expect("counters");
        let sent = st["disks"][0]["bytes_sent"].as_u64().unwrap_or(0);
        let wire = (link1.tx - link0.tx) + (link1.rx - link0.rx);
        let differ = diff.0 * CHUNK;
        // Hash traffic: a 32-byte hash per 64 KiB chunk, and the levels above.
        let hashes = DISK_SIZE / CHUNK * 32 * 2;
        eprintln!(
            "reprotect: {} chunks ({} KiB) and {} 4 KiB blocks differ; agent sent {sent} bytes, the veth carried {wire} bytes; \
             reprotect_bytes_ratio={:.3}",
            diff.0,
            differ / 1024,
            diff.1,
            sent as f64 / differ.max(1) as f64
        );
        assert!(diff.0 > 0, "the copies differed before the reprotect");
        assert!(
            sent as f64 <= 1.1 * differ as f64,
            "reprotect sent {sent} bytes for {differ} differing bytes"
        );
        assert!(
            (wire as f64) <= 1.1 * differ as f64 + hashes as f64 + 4.0 * MIB as f64,
            "the veth carried {wire} bytes for {differ} differing bytes and {hashes} of hashes: not the whole disk"
        );
        diff
    };
    eprintln!("reprotect: {chunks} chunks / {blocks} blocks differed");
    writer_b.wait_rows(100);

    // --- planned failback to the original disk ---
    stage("planned failback");
    let last_b = writer_b.stop();
    drop(b_fs);
    caught_up(&mut reverse);
    reverse.stop_agent().expect("stop the reverse agent");
    // In site B: the handoff talks to the relay of site A over the veth.
    let h = json(
        cmds.handoff(&sites, SiteName::B, &reverse.agent_config())
            .expect("site-b"),
    );
    eprintln!("handoff: {h}");
    reverse.kill_target().expect("stop the target of site A");
    let back = json(cmds.failback(&store_a));
    eprintln!("failback: {back}");
    identical(&dev_a.path, &dev_b).expect("the original disk holds what site B wrote");
    let a_fs = mount(&dev_a.path, &mnt_a);
    let last_on_a = check_db(&mnt_a.join("app.db"));
    assert_eq!(
        last_on_a, last_b,
        "the last row committed on site B is on site A: zero loss"
    );

    // --- re-enable: forward again, the recovery copy as the seed ---
    stage("re-enable");
    drop(a_fs);
    fsck_clean(&dev_a.path);
    let seed_b = fo.join(format!("{id}.vmdk"));
    let seed_b_flat = fo.join(format!("{id}-flat.vmdk"));
    run("losetup", &["-d", p(&dev_b)]);
    forward.kill_relay().expect("stop the relay of site B");
    json(cmd(
        &bins.relay(),
        &[
            "forget",
            "--config",
            p(&forward.server_dir().join("relay.toml")),
            "--disk",
            &id,
            "--json",
        ],
    ));
    forward.start_relay().expect("relay");
    forward.kill_target().expect("stop the target of site B");
    let failback_record = w.join("failback.generation");
    std::fs::copy(store_a.join(&id).join("generation.rec"), &failback_record).expect("copy");
    let r = json(cmds.reprotect(
        &store_b,
        &seed_b,
        &reverse.agent_state_dir().join(format!("{id}.generation")),
        &failback_record,
        &[],
    ));
    assert!(
        r["retired"].is_string(),
        "the old promoted replica is kept aside: {r}"
    );
    forward.start_target().expect("target");
    json(cmds.agent_reprotect(
        &forward.agent_config(),
        &store_a.join(&id).join("generation.rec"),
    ));
    // The copies differ only by what mounting the original disk on site A
    // wrote (the superblock, the journal): that, and hashes, is all that moves.
    let (chunks_a, _) = differing(&dev_a.path, &seed_b_flat);
    let link0 = sites.link_bytes(SiteName::A).expect("counters");
    forward.start_agent().expect("agent");
    let st = caught_up(&mut forward);
    let link1 = sites.link_bytes(SiteName::A).expect("counters");
    let sent = st["disks"][0]["bytes_sent"].as_u64().unwrap_or(0);
    let wire = (link1.tx - link0.tx) + (link1.rx - link0.rx);
    let differ = chunks_a * CHUNK;
    eprintln!(
        "re-enable: {chunks_a} chunks differ; agent sent {sent} bytes, the veth carried {wire} bytes"
    );
    assert!(
        sent as f64 <= 1.1 * differ as f64 + 64.0 * 1024.0,
        "re-enable sent {sent} bytes for {differ} differing bytes"
    );
    assert!(
        wire < DISK_SIZE / 16,
        "re-enable moved {wire} bytes: hashes and what differs, not the disk"
    );
    identical(&dev_a.path, &seed_b_flat).expect("re-enable made the recovery copy the replica");
    // Forward replication goes on: new writes on site A reach site B.
    let a_fs = mount(&dev_a.path, &mnt_a);
    let writer = Workload::start(&mnt_a.join("app.db"));
    writer.wait_rows(100);
    let last = writer.stop();
    drop(a_fs);
    caught_up(&mut forward);
    identical(&dev_a.path, &seed_b_flat).expect("forward replication resumed into the seed");
    assert!(last > last_b);
    stage("done");
}

/// Bytes of the relay's spool segments on disk.
fn spool_bytes(site: &Site) -> u64 {
    std::fs::read_dir(site.server_dir().join("relay-spool"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Polls `cond` (an observable state of the processes) with a deadline.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + CATCH_UP;
    while !cond() {
        assert!(Instant::now() < deadline, "never reached: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root: network namespaces, loop devices, eBPF and the three binaries"]
fn reprotect_and_failback_finish_after_each_process_is_killed_mid_transfer() {
    require_root("reprotect_and_failback_finish_after_each_process_is_killed_mid_transfer");
    const SIZE: u64 = 256 * MIB;
    let sites = Arc::new(TwoSites::new().unwrap_or_else(|e| panic!("{e:#}")));
    let bins = Binaries::of_this_build().expect("binaries");
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let quiet = std::env::var_os("BLOCKFERRY_E2E_VERBOSE").is_none();
    let dev_a = dr::LoopFile::create(&w.join("a.img"), SIZE).expect("disk a");
    dr::scatter_writes(&dev_a.path, SIZE, 2000, 1).expect("writes");
    let disk = ProtectedDisk {
        id: blockferry_benches::site::new_disk_id().expect("id"),
        device: dev_a.path.clone(),
    };
    let id = disk.id.to_string();
    let cmds = dr::Commands {
        bins: bins.clone(),
        id: id.clone(),
    };
    // The last leg is slow (8 MB/s), so each transfer lasts seconds and a
    // process can be killed in its middle.
    let opts = |source| SiteOptions {
        quiet,
        placement: Placement::across(&sites, source),
        relay_to_target_bytes_per_sec: Some(8_000_000),
        ..SiteOptions::default()
    };
    let mut forward = Site::start(
        bins.clone(),
        &w.join("fwd"),
        vec![disk.clone()],
        opts(SiteName::A),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    forward.start_agent().expect("agent");
    caught_up(&mut forward);
    let store_b = forward.target_store();
    let fo = w.join("failover");
    let f = json(cmds.failover(&store_b, &fo, "latest"));
    let dev_b = dr::LoopFile {
        path: PathBuf::from(f["loop_device"].as_str().expect("loop device")),
    };
    dr::scatter_writes(&dev_a.path, SIZE, 100, 2).expect("writes on a");
    // 40 MiB of new data at site B: what the reprotect must carry back.
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", p(&dev_b.path)),
            "bs=1M",
            "count=40",
            "seek=100",
            "oflag=direct",
            "status=none",
        ],
    );
    forward.stop_agent().expect("stop");

    let mut reverse = Site::start(
        bins.clone(),
        &w.join("rev"),
        vec![ProtectedDisk {
            id: disk.id,
            device: dev_b.path.clone(),
        }],
        opts(SiteName::B),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let store_a = reverse.target_store();
    let promoted = store_b.join(&id).join("generation.rec");
    let old = forward.agent_state_dir().join(format!("{id}.generation"));
    json(cmds.reprotect(
        &store_a,
        &dev_a.path,
        &old,
        &promoted,
        &["--discard-changes-of", "seed"],
    ));
    reverse
        .write_agent_config(reverse.relay_addr().expect("relay"))
        .expect("config");
    json(cmds.agent_reprotect(&reverse.agent_config(), &promoted));
    reverse.start_agent().expect("agent");
    let mid = |site: &Site| {
        site.agent_status().ok().is_some_and(|st| {
            let d = &st["disks"][0];
            d["bytes_sent"].as_u64() > Some(4 * MIB)
                && d["replica_seq"].as_u64() < d["durable_seq"].as_u64()
        })
    };
    wait_for("the reprotect under way", || mid(&reverse));
    reverse.kill_agent().expect("SIGKILL the agent");
    reverse.start_agent().expect("agent again");
    wait_for("the relay holding what the target has not", || {
        spool_bytes(&reverse) > 4 * MIB
    });
    reverse.kill_relay().expect("SIGKILL the relay");
    reverse.start_relay().expect("relay again");
    wait_for("the reprotect under way again", || {
        spool_bytes(&reverse) > 2 * MIB
    });
    reverse.kill_target().expect("SIGKILL the target");
    reverse.start_target().expect("target again");
    caught_up(&mut reverse);
    identical(&dev_a.path, &dev_b.path)
        .unwrap_or_else(|e| panic!("nothing lost by the crashes: {e}\n{}", logs(&reverse)));

    // Failback: the handoff killed in the middle, then run again.
    reverse.stop_agent().expect("stop");
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", p(&dev_b.path)),
            "bs=1M",
            "count=32",
            "seek=160",
            "oflag=direct",
            "status=none",
        ],
    );
    let handoff = || {
        cmds.handoff(&sites, SiteName::B, &reverse.agent_config())
            .expect("site-b")
    };
    let mut first = handoff()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("handoff");
    wait_for("the handoff shipping", || spool_bytes(&reverse) > 4 * MIB);
    first.kill().expect("SIGKILL the handoff");
    first.wait().expect("reap");
    let h = json(handoff());
    eprintln!("handoff after a crash: {h}");
    reverse.kill_target().expect("stop the target");
    json(cmds.failback(&store_a));
    identical(&dev_a.path, &dev_b.path).expect("failback lost nothing");
}
