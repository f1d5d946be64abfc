//! `cargo xtask bench tracker`: what the change tracker costs a writing workload.
//!
//! fio 4 KiB random writes (io_uring, iodepth 32, O_DIRECT) on a loop device this
//! task creates, without the tracker (A) and with `blockferry-agent track --quiet`
//! attached (B), interleaved A/B/A/B in one invocation so drift of the machine
//! hits both alike. Last line: `iops_ratio=… p99_ratio=…` (tracked / untracked,
//! medians of the per-round ratios).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::util::{self, workspace_root};

const DEVICE_BYTES: u64 = 512 << 20;
const ROUNDS: usize = 5;
const RUNTIME_S: u32 = 5;

/// A loop device over a file, detached and removed on drop.
struct LoopDevice {
    dev: String,
    file: PathBuf,
}

impl LoopDevice {
    fn new(file: PathBuf) -> Result<LoopDevice> {
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(DEVICE_BYTES))
            .with_context(|| format!("cannot create {}", file.display()))?;
        let dev = util::output(
            Command::new("losetup")
                .args(["-f", "--show", "--direct-io=on"])
                .arg(&file),
        )?
        .trim()
        .to_owned();
        Ok(LoopDevice { dev, file })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = util::run(Command::new("losetup").args(["-d", &self.dev])) {
            eprintln!("warning: {e:#}");
        }
        if let Err(e) = std::fs::remove_file(&self.file) {
            eprintln!("warning: cannot remove {}: {e}", self.file.display());
        }
    }
}

/// The agent tracking the device; interrupted (and its summary shown) on drop.
struct Tracking(Option<Child>);

impl Tracking {
    fn start(agent: &Path, dev: &str) -> Result<Tracking> {
        let mut child = Command::new(agent)
            .args(["track", "--quiet", "--device", dev])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", agent.display()))?;
        // Wait for the line that says the programs are attached.
        let stderr = child.stderr.take().context("agent stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("tracking ") => break,
                Some(Ok(l)) => eprintln!("agent: {l}"),
                Some(Err(e)) => bail!("reading the agent's stderr: {e}"),
                None => {
                    let status = child.wait()?;
                    bail!(
                        "the agent exited before tracking ({status}); run `cargo xtask build-and-load` to see why"
                    )
                }
            }
        }
        // Keep draining stderr so a loud resync cannot block the agent.
        std::thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .for_each(|l| eprintln!("agent: {l}"))
        });
        Ok(Tracking(Some(child)))
    }

    /// CPU seconds (user + system) the agent has used so far.
    fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.0.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5), in USER_HZ (100 on Linux).
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }

    fn stop(mut self) -> Result<String> {
        let child = self.0.take().context("agent already stopped")?;
        util::run(Command::new("kill").args(["-INT", &child.id().to_string()]))?;
        let out = child.wait_with_output().context("waiting for the agent")?;
        if !out.status.success() {
            bail!("the agent failed: {}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Best effort on an error path: the agent detaches its programs when it dies.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct FioResult {
    iops: f64,
    p99_us: f64,
}

fn fio(dev: &str, rw: &str, runtime: Option<u32>) -> Result<FioResult> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        &format!("--filename={dev}"),
        &format!("--rw={rw}"),
        "--bs=4k",
        "--iodepth=32",
        "--ioengine=io_uring",
        "--direct=1",
        "--numjobs=1",
        "--output-format=json",
    ]);
    if let Some(s) = runtime {
        cmd.args(["--time_based", &format!("--runtime={s}"), "--ramp_time=1"]);
    }
    let json = util::output(&mut cmd)?;
    // fio may print warnings before the JSON object.
    let start = json.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value =
        serde_json::from_str(&json[start..]).context("parsing fio's JSON")?;
    let w = &v["jobs"][0]["write"];
    let iops = w["iops"].as_f64().context("fio JSON: jobs[0].write.iops")?;
    let p99 = w["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .context("fio JSON: jobs[0].write.clat_ns.percentile.99")?;
    Ok(FioResult {
        iops,
        p99_us: p99 / 1000.0,
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

pub fn run() -> Result<()> {
    util::ensure_packages()?;
    util::ensure_kernel_prereqs()?;
    util::ensure_loop_support()?;
    let root = workspace_root();
    util::run(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "blockferry-agent",
        "--bin",
        "blockferry-agent",
    ]))
    .context("building the agent failed")?;
    let agent = util::target_dir().join("release").join("blockferry-agent");

    let dir = util::target_dir().join("bench-tracker");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let disk = LoopDevice::new(dir.join("disk.img"))?;
    // Allocate the whole backing file first, so no run pays for block allocation.
    fio(&disk.dev, "write", None).context("filling the device")?;

    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let r = fio(&disk.dev, "randwrite", Some(RUNTIME_S))?;
        println!(
            "round {round} untracked: iops={:.0} p99={:.1}us",
            r.iops, r.p99_us
        );
        a.push(r);
        let t = Tracking::start(&agent, &disk.dev)?;
        let r = fio(&disk.dev, "randwrite", Some(RUNTIME_S))?;
        let cpu = t.cpu_seconds().unwrap_or(f64::NAN);
        let summary = t.stop()?;
        println!(
            "round {round} tracked:   iops={:.0} p99={:.1}us agent_cpu={cpu:.2}s ({summary})",
            r.iops, r.p99_us
        );
        b.push(r);
    }
    // Each tracked run is compared with the untracked run just before it, and
    // the median of those ratios is reported: the machine's drift (other work on
    // shared cores) moves both runs of a pair, and an outlier pair does not
    // move the median.
    let iops_ratio = median(a.iter().zip(&b).map(|(a, b)| b.iops / a.iops).collect());
    let p99_ratio = median(a.iter().zip(&b).map(|(a, b)| b.p99_us / a.p99_us).collect());
    let med = |v: &[FioResult], f: fn(&FioResult) -> f64| median(v.iter().map(f).collect());
    println!(
        "untracked: median iops={:.0} p99={:.1}us",
        med(&a, |r| r.iops),
        med(&a, |r| r.p99_us)
    );
    println!(
        "tracked:   median iops={:.0} p99={:.1}us",
        med(&b, |r| r.iops),
        med(&b, |r| r.p99_us)
    );
    println!("iops_ratio={iops_ratio:.2} p99_ratio={p99_ratio:.2}");
    Ok(())
}
