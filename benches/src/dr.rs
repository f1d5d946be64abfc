//! The DR cycle through the product's commands, shared by the cycle's test
//! (`tests/dr_cycle.rs`, ext4 and SQLite) and the DR benchmark (`bench-dr`, a
//! raw disk): running the commands and reading their `--json`, comparing
//! copies the way `qemu-img` does, and counting what differs between two
//! copies, the measure reprotect is held to.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The unit a checksum resync compares and ships.
pub const CHUNK: u64 = 64 * 1024;
/// The unit a file system writes.
pub const BLOCK: u64 = 4096;

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(mut c: Command) -> Result<String> {
    let shown = format!("{c:?}");
    let out = c
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command that must succeed with `--json` output; returns it parsed.
/// The document starts at the first line that opens an object (one line or
/// pretty-printed); progress lines may come before it.
pub fn run_json(c: Command) -> Result<Value> {
    let shown = format!("{c:?}");
    let text = run_ok(c)?;
    let start = text
        .match_indices('{')
        .map(|(i, _)| i)
        .find(|&i| i == 0 || text.as_bytes()[i - 1] == b'\n')
        .with_context(|| format!("{shown}: no JSON in {text}"))?;
    serde_json::from_str(&text[start..]).with_context(|| format!("{shown}: {text}"))
}

/// Runs a command that must be refused; returns its stderr and stdout.
pub fn run_refused(mut c: Command) -> Result<String> {
    let shown = format!("{c:?}");
    let out = c
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    if out.status.success() {
        bail!("{shown} must be refused, but succeeded: {text}");
    }
    Ok(text)
}

/// Drops what the page cache holds of a block device: a file system's data
/// reaches the device by bios that bypass the device's own cache, so a
/// buffered read of a mounted (or once mounted) device can be stale.
pub fn uncached(path: &Path) -> Result<()> {
    if path.starts_with("/dev") {
        let mut c = Command::new("blockdev");
        c.arg("--flushbufs").arg(path);
        run_ok(c)?;
    }
    Ok(())
}

/// `qemu-img compare` of two raw images (devices or flat extents).
pub fn identical(a: &Path, b: &Path) -> Result<()> {
    uncached(a)?;
    uncached(b)?;
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .context("cannot run qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "{} and {} differ: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What differs between two copies of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Difference {
    /// 64 KiB chunks (what a checksum resync ships).
    pub chunks: u64,
    /// 4 KiB blocks.
    pub blocks: u64,
}

impl Difference {
    pub fn chunk_bytes(&self) -> u64 {
        self.chunks * CHUNK
    }

    pub fn block_bytes(&self) -> u64 {
        self.blocks * BLOCK
    }
}

/// Counts the chunks and blocks that differ between the first `size` bytes
/// of `a` and `b`.
pub fn differing(a: &Path, b: &Path, size: u64) -> Result<Difference> {
    uncached(a)?;
    uncached(b)?;
    let open = |p: &Path| File::open(p).with_context(|| format!("cannot open {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ca, mut cb) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut d = Difference::default();
    for _ in 0..size / CHUNK {
        fa.read_exact(&mut ca)?;
        fb.read_exact(&mut cb)?;
        if ca != cb {
            d.chunks += 1;
            d.blocks += ca
                .chunks(BLOCK as usize)
                .zip(cb.chunks(BLOCK as usize))
                .filter(|(x, y)| x != y)
                .count() as u64;
        }
    }
    Ok(d)
}

/// A loop device over a file, detached on drop (also on panic).
#[derive(Debug)]
pub struct LoopFile {
    pub path: PathBuf,
}

impl LoopFile {
    /// A new sparse file of `size` bytes at `file`, attached with direct I/O.
    pub fn create(file: &Path, size: u64) -> Result<LoopFile> {
        File::create(file)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("cannot create {}", file.display()))?;
        let mut c = Command::new("losetup");
        c.args(["--find", "--show", "--direct-io=on"]).arg(file);
        let path = PathBuf::from(run_ok(c)?.trim());
        Ok(LoopFile { path })
    }
}

impl Drop for LoopFile {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Writes `count` 4 KiB blocks of random data at random block offsets of
/// `dev` (the same `seed` writes the same blocks), then syncs the device.
pub fn scatter_writes(dev: &Path, size: u64, count: u64, seed: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .with_context(|| format!("cannot open {}", dev.display()))?;
    let blocks = size / BLOCK;
    for i in 0..count {
        let h = blake3::hash(&[seed, i].map(u64::to_le_bytes).concat());
        let at = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8])) % blocks;
        let mut data = Vec::with_capacity(BLOCK as usize);
        let mut x = blake3::Hasher::new();
        x.update(h.as_bytes());
        x.finalize_xof().fill({
            data.resize(BLOCK as usize, 0);
            &mut data
        });
        f.write_all_at(&data, at * BLOCK)?;
    }
    f.sync_all()?;
    Ok(())
}

/// What a cycle on a raw disk measured (see [`raw_cycle`]).
#[derive(Debug, Clone, Copy)]
pub struct CycleFigures {
    /// What differed between the two copies when reprotect began.
    pub reprotect_differing: Difference,
    /// Bytes the agent sent for the reprotect (data after compression).
    pub reprotect_sent: u64,
    /// Bytes the veth carried both ways during the reprotect (data, hashes,
    /// QUIC and TLS).
    pub reprotect_wire: u64,
    /// Hash bytes of the checksum compare, as the agent counted them.
    pub reprotect_hash_bytes: u64,
    /// Bytes of the recovery copy missing from the original disk after the
    /// planned failback (differing 4 KiB blocks).
    pub failback_loss_bytes: u64,
    /// Seconds from the failback's handoff to the original disk writable.
    pub failback_s: f64,
}

fn status_u64(st: &Value, key: &str) -> u64 {
    st["disks"][0][key].as_u64().unwrap_or(0)
}

/// A DR cycle on a raw disk of `size` bytes across two sites: protect from
/// site A, an unplanned failover to site B while both sides go on writing
/// (split brain), reprotect onto the original disk with the original's
/// changes discarded, more writes at B, planned failback. Random 4 KiB
/// writes, so what differs is scattered, the worst case for a resync that
/// ships 64 KiB chunks. Needs root.
pub fn raw_cycle(bins: &crate::site::Binaries, dir: &Path, size: u64) -> Result<CycleFigures> {
    use crate::netns::{SiteName, TwoSites};
    use crate::site::{Placement, ProtectedDisk, Site, SiteOptions, new_disk_id};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    const CATCH_UP: Duration = Duration::from_secs(300);

    let sites = Arc::new(TwoSites::new()?);
    let dev_a = LoopFile::create(&dir.join("disk-a.img"), size)?;
    scatter_writes(&dev_a.path, size, 4000, 1)?;
    let disk = ProtectedDisk {
        id: new_disk_id()?,
        device: dev_a.path.clone(),
    };
    let id = disk.id.to_string();
    let opts = |source| SiteOptions {
        quiet: true,
        placement: Placement::across(&sites, source),
        ..SiteOptions::default()
    };
    let mut forward = Site::start(
        bins.clone(),
        &dir.join("forward"),
        vec![disk.clone()],
        opts(SiteName::A),
    )?;
    forward.start_agent()?;
    forward.wait_caught_up(CATCH_UP)?;
    scatter_writes(&dev_a.path, size, 1000, 2)?;
    forward.wait_caught_up(CATCH_UP)?;
    let store_b = forward.target_store();
    let cmds = Commands {
        bins: bins.clone(),
        id: id.clone(),
    };
    let f = run_json(cmds.failover(&store_b, &dir.join("failover"), "latest"))?;
    let dev_b = LoopFile {
        path: PathBuf::from(f["loop_device"].as_str().context("no loop device")?),
    };
    // Both copies are written after the point: a split brain.
    scatter_writes(&dev_a.path, size, 300, 3)?;
    scatter_writes(&dev_b.path, size, 600, 4)?;
    forward.stop_agent()?;

    let mut reverse = Site::start(
        bins.clone(),
        &dir.join("reverse"),
        vec![ProtectedDisk {
            id: disk.id,
            device: dev_b.path.clone(),
        }],
        opts(SiteName::B),
    )?;
    let store_a = reverse.target_store();
    let promoted = store_b.join(&id).join("generation.rec");
    let old = forward.agent_state_dir().join(format!("{id}.generation"));
    run_json(cmds.reprotect(
        &store_a,
        &dev_a.path,
        &old,
        &promoted,
        &["--discard-changes-of", "seed"],
    ))?;
    reverse.write_agent_config(reverse.relay_addr().context("no relay")?)?;
    run_json(cmds.agent_reprotect(&reverse.agent_config(), &promoted))?;
    let reprotect_differing = differing(&dev_a.path, &dev_b.path, size)?;
    let link0 = sites.link_bytes(SiteName::B)?;
    reverse.start_agent()?;
    let st = reverse.wait_caught_up(CATCH_UP)?;
    let link1 = sites.link_bytes(SiteName::B)?;
    identical(&dev_a.path, &dev_b.path).context("after the reprotect")?;

    scatter_writes(&dev_b.path, size, 500, 5)?;
    reverse.wait_caught_up(CATCH_UP)?;
    reverse.stop_agent()?;
    let t = Instant::now();
    run_json(cmds.handoff(&sites, SiteName::B, &reverse.agent_config())?)?;
    reverse.kill_target()?;
    run_json(cmds.failback(&store_a))?;
    let failback_s = t.elapsed().as_secs_f64();
    let loss = differing(&dev_a.path, &dev_b.path, size)?;
    Ok(CycleFigures {
        reprotect_differing,
        reprotect_sent: status_u64(&st, "bytes_sent"),
        reprotect_wire: (link1.tx - link0.tx) + (link1.rx - link0.rx),
        reprotect_hash_bytes: status_u64(&st, "resync_hash_bytes"),
        failback_loss_bytes: loss.block_bytes(),
        failback_s,
    })
}

/// The cycle's commands for one disk, built as a user types them (every one
/// with `--json`); run them with [`run_json`] or [`run_refused`].
#[derive(Debug, Clone)]
pub struct Commands {
    pub bins: crate::site::Binaries,
    /// The disk id.
    pub id: String,
}

impl Commands {
    fn target(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bins.target());
        c.args(args);
        c
    }

    /// `blockferry-target failover` to `point` (`latest` or an id) into
    /// `out`, attached.
    pub fn failover(&self, store: &Path, out: &Path, point: &str) -> Command {
        let mut c = self.target(&["failover", "--disk", &self.id, "--point", point]);
        c.arg("--store").arg(store).arg("--out").arg(out);
        c.args(["--attach", "--json"]);
        c
    }

    /// `blockferry-target reprotect` of the store's disk onto `seed`, with
    /// `extra` options (`--discard-changes-of seed`, `--dry-run`).
    pub fn reprotect(
        &self,
        store: &Path,
        seed: &Path,
        seed_record: &Path,
        source_record: &Path,
        extra: &[&str],
    ) -> Command {
        let mut c = self.target(&["reprotect", "--disk", &self.id, "--json"]);
        c.arg("--store").arg(store).arg("--seed").arg(seed);
        c.arg("--seed-record").arg(seed_record);
        c.arg("--source-record").arg(source_record);
        c.args(extra);
        c
    }

    /// `blockferry-agent reprotect`: the promoted copy's record installed.
    pub fn agent_reprotect(&self, config: &Path, record: &Path) -> Command {
        let mut c = Command::new(self.bins.agent());
        c.args(["reprotect", "--disk", &self.id, "--json"]);
        c.arg("--config").arg(config).arg("--record").arg(record);
        c
    }

    /// `blockferry-agent handoff`, in `site` (it talks to the other site's
    /// relay over the veth).
    pub fn handoff(
        &self,
        sites: &crate::netns::TwoSites,
        site: crate::netns::SiteName,
        config: &Path,
    ) -> Result<Command> {
        let mut c = sites.command(site, self.bins.agent())?;
        c.args(["handoff", "--disk", &self.id, "--json"]);
        c.arg("--config").arg(config);
        Ok(c)
    }

    /// `blockferry-target failover --planned` of a seed store, in place.
    pub fn failback(&self, store: &Path) -> Command {
        let mut c = self.target(&["failover", "--planned", "--disk", &self.id]);
        c.arg("--store").arg(store);
        c.args(["--point", "latest", "--json"]);
        c
    }
}
