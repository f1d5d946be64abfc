//! `cargo xtask demo`: the main job on a loop device the demo creates and removes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::scratch::Scratch;
use crate::util::{self, run};

const MIB: u64 = 1 << 20;

pub fn run_demo() -> Result<()> {
    util::ensure_packages()?;
    util::ensure_kernel_prereqs()?;
    util::ensure_loop_support()?;
    let bin = util::build_release_binaries()?;
    let mut s = Scratch::new()?;
    tracker_demo(&mut s, &bin)
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
