//! `cargo xtask demo`: the main job on a loop device the demo creates and removes;
//! with `--two-sites`, the same job across two network namespaces (site-a holds
//! the source disk and the agent, site-b the relay and the target) joined by a
//! veth pair, so that nothing crosses over 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::scratch::Scratch;
use crate::util::{self, run};

const MIB: u64 = 1 << 20;

pub fn run_demo(tracker_only: bool, two_sites: bool) -> Result<()> {
    util::ensure_packages()?;
    util::ensure_kernel_prereqs()?;
    util::ensure_loop_support()?;
    let bin = util::build_release_binaries()?;
    let mut s = Scratch::new()?;
    if tracker_only {
        return tracker_demo(&mut s, &bin);
    }
    replication_demo(&mut s, &bin, two_sites)
}

/// The main job: protect a 1 GiB ext4 disk, replicate it while files are
/// written, wait for an RPO of zero, and check the replica with qemu-img.
fn replication_demo(s: &mut Scratch, bin: &std::path::Path, two_sites: bool) -> Result<()> {
    use blockferry_benches::netns::{SiteName, TwoSites};
    use blockferry_benches::site::{
        Binaries, Placement, ProtectedDisk, Role, Site, SiteOptions, new_disk_id,
    };
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let dir = s.dir("blockferry-demo")?;
    let dev = s.loop_device(&dir.join("source-disk.img"), 1024 * MIB, true)?;
    run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
    let mnt = dir.join("mnt");
    s.mount(&dev, &mnt)?;
    // Some content before protection, for the initial sync to carry.
    write_files(&mnt, "before", 16, 4 * MIB as usize)?;
    run(&mut Command::new("sync"))?;
    let disk = ProtectedDisk {
        id: new_disk_id()?,
        device: dev.clone().into(),
    };
    eprintln!("source disk {dev} (1 GiB, ext4), disk id {}", disk.id);
    let site_dir = dir.join("site");
    std::fs::create_dir(&site_dir)?;
    // Declared before the site: the namespaces outlive the processes in them.
    let sites = if two_sites {
        let sites = Arc::new(TwoSites::new().context(
            "cannot create the two sites' network namespaces (needs root and iproute2)",
        )?);
        for (site, role) in [
            (SiteName::A, "the source disk and the agent"),
            (SiteName::B, "the relay and the target"),
        ] {
            eprintln!(
                "{site}: network namespace {}, {} on {}: {role}",
                sites.netns(site),
                site.interface(),
                sites.addr(site)
            );
        }
        Some(sites)
    } else {
        None
    };
    let placement = match &sites {
        Some(sites) => Placement::across(sites, SiteName::A),
        None => Placement::Loopback,
    };
    let opts = SiteOptions {
        quiet: true,
        placement,
        ..SiteOptions::default()
    };
    let mut site = Site::start(Binaries::in_dir(bin), &site_dir, vec![disk.clone()], opts)?;
    match &sites {
        Some(_) => eprintln!(
            "target and relay running in site-b, the relay at {} (QUIC, mutual TLS); \
             site-b's files and logs in {}, site-a's in {}",
            site.relay_addr().context("the relay has no address")?,
            site.server_dir().display(),
            site.agent_dir().display()
        ),
        None => eprintln!(
            "target and relay running on 127.0.0.1 (QUIC, mutual TLS); logs in {}",
            site_dir.display()
        ),
    }
    let veth_before = match &sites {
        Some(sites) => Some(sites.link_bytes(SiteName::A)?),
        None => None,
    };
    let t0 = Instant::now();
    site.start_agent()?;
    // The initial sync, with its progress.
    let mut last_pct = -1.0;
    let synced = loop {
        s.check()?;
        if let Some(status) = site.agent_exited() {
            bail!(
                "the agent exited with {status}; see {}",
                site.log_file(Role::Agent).display()
            );
        }
        if let Ok(st) = site.agent_status() {
            let d = &st["disks"][0];
            if d["state"] == "protected" {
                break t0.elapsed();
            }
            let pct = d["sync_percent"].as_f64().unwrap_or(0.0);
            if pct >= last_pct + 10.0 {
                eprintln!("initial sync {pct:.0}%");
                last_pct = pct;
            }
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("the initial sync did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let sync_rate = 1024.0 * MIB as f64 / synced.as_secs_f64() / 1e6;
    eprintln!(
        "initial sync done in {:.1} s ({sync_rate:.0} MB/s)",
        synced.as_secs_f64()
    );

    eprintln!("writing files while replication runs");
    let mut worst_rpo_ms = 0u64;
    for round in 0..8 {
        s.check()?;
        write_files(&mnt, &format!("during-{round}"), 8, MIB as usize)?;
        run(&mut Command::new("sync"))?;
        if let Ok(st) = site.agent_status() {
            let d = &st["disks"][0];
            let rpo = d["rpo_ms"].as_u64().unwrap_or(0);
            worst_rpo_ms = worst_rpo_ms.max(rpo);
            eprintln!(
                "  round {round}: RPO {:.2} s, backlog {} KiB",
                rpo as f64 / 1000.0,
                d["backlog_bytes"].as_u64().unwrap_or(0) / 1024
            );
        }
    }
    s.unmount(&mnt)?;
    eprintln!("file system unmounted; waiting for an RPO of zero");
    let st = site.wait_caught_up(Duration::from_secs(300))?;
    s.check()?;
    let d = &st["disks"][0];
    worst_rpo_ms = worst_rpo_ms.max(d["worst_rpo_ms"].as_u64().unwrap_or(0));
    site.compare(&disk)?;
    eprintln!("qemu-img compare: the replica is identical to {dev}");
    let replica = site.replica(&disk.id);
    let info = crate::util::output(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&replica),
    )?;
    let info: serde_json::Value = serde_json::from_str(&info)?;
    println!();
    println!("blockferry demo summary");
    println!(
        "  initial sync      {sync_rate:.0} MB/s (1 GiB in {:.1} s)",
        synced.as_secs_f64()
    );
    println!(
        "  bytes read        {:.1} MiB",
        d["bytes_read"].as_u64().unwrap_or(0) as f64 / MIB as f64
    );
    println!(
        "  bytes on the wire {:.1} MiB (zstd, zero chunks as markers)",
        d["bytes_sent"].as_u64().unwrap_or(0) as f64 / MIB as f64
    );
    println!("  worst RPO seen    {:.2} s", worst_rpo_ms as f64 / 1000.0);
    println!(
        "  replica           {} ({}), identical to the source",
        replica.display(),
        info["format"].as_str().unwrap_or("?")
    );
    if let (Some(sites), Some(before)) = (&sites, veth_before) {
        let after = sites.link_bytes(SiteName::A)?;
        println!(
            "  sites             agent in {} ({}), relay and target in {} ({})",
            sites.netns(SiteName::A),
            sites.addr(SiteName::A),
            sites.netns(SiteName::B),
            sites.addr(SiteName::B)
        );
        println!(
            "  over the veth     {:.1} MiB site-a -> site-b, {:.1} MiB back (acks)",
            (after.tx - before.tx) as f64 / MIB as f64,
            (after.rx - before.rx) as f64 / MIB as f64
        );
    }
    Ok(())
}

fn write_files(dir: &std::path::Path, prefix: &str, n: usize, len: usize) -> Result<()> {
    // Half-compressible content: random bytes and runs of one value.
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ prefix.len() as u64;
    for i in 0..n {
        let mut data = vec![0u8; len];
        for (j, b) in data.iter_mut().enumerate() {
            if (j / 4096) % 2 == 0 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            } else {
                *b = i as u8;
            }
        }
        std::fs::write(dir.join(format!("{prefix}-{i}")), data)?;
    }
    Ok(())
}

/// Shows the tracker alone: every write to the device, reported as it happens.
fn tracker_demo(s: &mut Scratch, bin: &std::path::Path) -> Result<()> {
    let dir = s.dir("blockferry-demo")?;
    let dev = s.loop_device(&dir.join("disk.img"), 256 * MIB, true)?;
    eprintln!("demo disk: {dev} (256 MiB, loop device over a sparse file)");
    let events = dir.join("extents.jsonl");
    let out = std::fs::File::create(&events)?;
    s.spawn(
        "tracker",
        Command::new(bin.join("blockferry-agent"))
            .args(["track", "--json", "--device", &dev])
            .stdout(out)
            .stderr(Stdio::inherit()),
    )?;
    wait_for_first_line(s, &events, &dev)?;
    s.check()?;
    eprintln!("writing: mkfs.ext4, files, sync");
    run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
    let mnt = dir.join("mnt");
    s.mount(&dev, &mnt)?;
    for i in 0..8u64 {
        std::fs::write(
            mnt.join(format!("file-{i}")),
            vec![i as u8 + 1; (i as usize + 1) * 128 * 1024],
        )?;
    }
    run(&mut Command::new("sync"))?;
    s.unmount(&mnt)?;
    s.check()?;
    let status = s.stop("tracker")?;
    if !status.success() {
        bail!("the tracker exited with {status}");
    }
    summarize(&events)
}

/// The tracker is attached once a marker write shows up in its output.
fn wait_for_first_line(s: &mut Scratch, events: &std::path::Path, dev: &str) -> Result<()> {
    for _ in 0..200 {
        s.check()?;
        if let Some(status) = s.exited("tracker") {
            bail!("the tracker exited with {status} before attaching");
        }
        run(Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={dev}"),
                "bs=4096",
                "count=1",
                "oflag=direct,dsync",
            ])
            .stderr(Stdio::null()))?;
        if std::fs::metadata(events).map(|m| m.len()).unwrap_or(0) > 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("the tracker reported nothing within 20 s")
}

fn summarize(events: &std::path::Path) -> Result<()> {
    let f = std::fs::File::open(events).with_context(|| format!("{}", events.display()))?;
    let (mut n, mut bytes, mut by_op) = (0u64, 0u64, std::collections::BTreeMap::new());
    for line in BufReader::new(f).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        n += 1;
        bytes += v["len"].as_u64().unwrap_or(0);
        *by_op
            .entry(v["op"].as_str().unwrap_or("?").to_owned())
            .or_insert(0u64) += 1;
    }
    eprintln!(
        "tracker reported {n} extents, {:.1} MiB in all",
        bytes as f64 / MIB as f64
    );
    for (op, count) in by_op {
        eprintln!("  {op:>14}: {count}");
    }
    Ok(())
}
