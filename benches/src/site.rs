//! A whole replication set-up on this machine: PKI, target, relay and agent as
//! real processes with ports chosen by the kernel, each with its own
//! configuration in a scratch directory. The demo, the end-to-end tests and the
//! end-to-end benchmarks all drive the product through this one harness.
//!
//! Where the processes run is the [`Placement`]: all on 127.0.0.1 of this host
//! ([`Placement::Loopback`], the default), or across the two sites of a
//! [`TwoSites`] ([`Placement::Across`]): the agent inside the source site's
//! network namespace, the relay and the target inside the other's, listening on
//! that site's veth address, so every byte between agent and relay crosses the
//! veth. Across sites each side keeps its files in its own directory
//! (`DIR/site-a`, `DIR/site-b`): the relay's side issues the certificates with
//! `blockferry-relay pki`, and the agent's side gets a copy of the CA
//! certificate and of its own certificate and key, as an operator would carry
//! them over. Both directions use the same [`TwoSites`]: forward protection
//! runs from `A`, reprotect from `B`.
//!
//! Every process is killed when the [`Site`] is dropped, even on panic, before
//! the namespaces it ran in can go away (the site holds them).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use blockferry_proto::DiskId;
use blockferry_transport::pki;

use crate::netns::{SiteName, TwoSites};

/// Where the three binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Binaries { dir: dir.into() }
    }

    /// The binaries next to the running test executable (`target/<profile>`),
    /// built with cargo first if one is missing.
    pub fn of_this_build() -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the test executable")?;
        // target/<profile>/deps/<test> → target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .context("test executable outside a cargo target directory")?
            .to_owned();
        let b = Binaries { dir };
        if ["blockferry-agent", "blockferry-relay", "blockferry-target"]
            .iter()
            .any(|n| !b.dir.join(n).exists())
        {
            let release = b.dir.ends_with("release");
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "--bins", "-p", "blockferry-agent"])
                .args(["-p", "blockferry-relay", "-p", "blockferry-target"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().context("cannot run cargo build")?;
            if !status.success() {
                bail!("building the binaries failed");
            }
        }
        Ok(b)
    }

    pub fn agent(&self) -> PathBuf {
        self.dir.join("blockferry-agent")
    }

    pub fn relay(&self) -> PathBuf {
        self.dir.join("blockferry-relay")
    }

    pub fn target(&self) -> PathBuf {
        self.dir.join("blockferry-target")
    }
}

/// A disk to protect: its identity and the device path on the source host.
#[derive(Debug, Clone)]
pub struct ProtectedDisk {
    pub id: DiskId,
    pub device: PathBuf,
}

/// Where the processes of a [`Site`] run.
#[derive(Debug, Clone, Default)]
pub enum Placement {
    /// All in this network namespace, on 127.0.0.1, files in one directory.
    #[default]
    Loopback,
    /// The agent in `source`, the relay and the target in the other site.
    Across {
        sites: Arc<TwoSites>,
        source: SiteName,
    },
}

impl Placement {
    /// The agent in `source`, relay and target in the other site of `sites`.
    pub fn across(sites: &Arc<TwoSites>, source: SiteName) -> Placement {
        Placement::Across {
            sites: Arc::clone(sites),
            source,
        }
    }

    /// The site the agent runs in (None on loopback).
    pub fn agent_site(&self) -> Option<SiteName> {
        match self {
            Placement::Loopback => None,
            Placement::Across { source, .. } => Some(*source),
        }
    }

    /// The site the relay and the target run in (None on loopback).
    pub fn server_site(&self) -> Option<SiteName> {
        self.agent_site().map(SiteName::other)
    }

    /// The address relay and target listen on: 127.0.0.1, or the server
    /// site's veth address.
    fn server_ip(&self) -> std::net::IpAddr {
        match self {
            Placement::Loopback => std::net::Ipv4Addr::LOCALHOST.into(),
            Placement::Across { sites, source } => sites.addr(source.other()).into(),
        }
    }

    /// A command for `program` inside `site` (this namespace on loopback).
    fn command(&self, site: Option<SiteName>, program: &Path) -> Result<Command> {
        match (self, site) {
            (Placement::Across { sites, .. }, Some(site)) => sites.command(site, program),
            _ => Ok(Command::new(program)),
        }
    }
}

/// Settings of a site.
#[derive(Debug, Clone)]
pub struct SiteOptions {
    pub zstd_level: i32,
    pub chunk_size_kib: u32,
    /// `RUST_LOG` of the processes.
    pub log: String,
    /// Where the processes' logs go; `None` inherits stderr.
    pub quiet: bool,
    /// Where the processes run.
    pub placement: Placement,
    /// The relay's cap on what it forwards to the target, bytes per second
    /// (`None`: no cap): slows the last leg so a test can act mid-transfer.
    pub relay_to_target_bytes_per_sec: Option<u64>,
}

impl Default for SiteOptions {
    fn default() -> Self {
        SiteOptions {
            zstd_level: 1,
            chunk_size_kib: 64,
            log: "info".into(),
            quiet: false,
            placement: Placement::Loopback,
            relay_to_target_bytes_per_sec: None,
        }
    }
}

/// The three processes of a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Relay,
    Target,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Relay => "relay",
            Role::Target => "target",
        }
    }
}

/// The running site.
#[derive(Debug)]
pub struct Site {
    pub bins: Binaries,
    pub dir: PathBuf,
    pub disks: Vec<ProtectedDisk>,
    opts: SiteOptions,
    target: Option<Child>,
    relay: Option<Child>,
    agent: Option<Child>,
    agent_started_ms: u64,
    target_addr: Option<SocketAddr>,
    relay_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
}

const AGENT_NAME: &str = "source-host";

impl Site {
    /// Creates the PKI and configurations in `dir` (which must exist) and
    /// starts target and relay; the agent starts with [`Site::start_agent`].
    pub fn start(
        bins: Binaries,
        dir: &Path,
        disks: Vec<ProtectedDisk>,
        opts: SiteOptions,
    ) -> Result<Site> {
        let mut site = Site {
            bins,
            dir: dir.to_owned(),
            disks,
            opts,
            target: None,
            relay: None,
            agent: None,
            agent_started_ms: 0,
            target_addr: None,
            relay_addr: None,
            metrics_addr: None,
        };
        site.issue_certificates()?;
        site.start_target()?;
        site.start_relay()?;
        Ok(site)
    }

    /// Issues the CA and the relay, target and agent certificates on the
    /// relay's side; across sites, copies the CA certificate and the agent's
    /// certificate and key to the agent's side.
    fn issue_certificates(&self) -> Result<()> {
        for d in [self.agent_dir(), self.server_dir()] {
            std::fs::create_dir_all(&d).with_context(|| format!("{}", d.display()))?;
        }
        let pki_dir = self.server_dir().join("pki");
        run(Command::new(self.bins.relay())
            .args(["pki", "init", "--dir"])
            .arg(&pki_dir)
            .stdout(Stdio::null()))?;
        run(Command::new(self.bins.relay())
            .args(["pki", "issue-agent", "--dir"])
            .arg(&pki_dir)
            .args(["--name", AGENT_NAME])
            .stdout(Stdio::null()))?;
        let agent_pki = self.agent_dir().join("pki");
        if agent_pki != pki_dir {
            std::fs::create_dir_all(&agent_pki)?;
            let agent = pki::agent_files(&pki_dir, AGENT_NAME);
            for from in [pki_dir.join(pki::CA_CERT), agent.cert, agent.key] {
                let name = from
                    .file_name()
                    .context("a certificate file without a name")?;
                std::fs::copy(&from, agent_pki.join(name)).with_context(|| {
                    format!("cannot copy {} to {}", from.display(), agent_pki.display())
                })?;
            }
        }
        Ok(())
    }

    /// Where the processes run.
    pub fn placement(&self) -> &Placement {
        &self.opts.placement
    }

    /// The agent's directory: configuration, state, certificates, log.
    pub fn agent_dir(&self) -> PathBuf {
        match self.opts.placement.agent_site() {
            None => self.dir.clone(),
            Some(site) => self.dir.join(site.label()),
        }
    }

    /// The relay's and target's directory: PKI, spool, store, logs.
    pub fn server_dir(&self) -> PathBuf {
        match self.opts.placement.server_site() {
            None => self.dir.clone(),
            Some(site) => self.dir.join(site.label()),
        }
    }

    /// The log of `role` (when the site is quiet).
    pub fn log_file(&self, role: Role) -> PathBuf {
        let dir = match role {
            Role::Agent => self.agent_dir(),
            Role::Relay | Role::Target => self.server_dir(),
        };
        dir.join(format!("{}.log", role.name()))
    }

    pub fn target_store(&self) -> PathBuf {
        self.server_dir().join("target-store")
    }

    /// The replica VMDK of `disk` at the target.
    pub fn replica(&self, disk: &DiskId) -> PathBuf {
        self.target_store()
            .join(disk.to_string())
            .join("replica.vmdk")
    }

    /// The raw extent of the replica of `disk` (a vmfs replica's `-flat.vmdk`).
    pub fn replica_flat(&self, disk: &DiskId) -> PathBuf {
        self.target_store()
            .join(disk.to_string())
            .join("replica-flat.vmdk")
    }

    /// The agent's tracker pins in bpffs: one directory per site, so sites can
    /// run side by side; removed when the site is dropped.
    pub fn pin_dir(&self) -> PathBuf {
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // bpffs refuses names with dots.
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        PathBuf::from("/sys/fs/bpf").join(format!("blockferry-site{name}"))
    }

    pub fn agent_state_dir(&self) -> PathBuf {
        self.agent_dir().join("agent-state")
    }

    /// A listen address on the servers' side with a port the kernel picks.
    fn any_port(&self) -> String {
        SocketAddr::new(self.opts.placement.server_ip(), 0).to_string()
    }

    /// Loopback's large datagrams only where every hop is loopback; across
    /// sites the veth has an Ethernet MTU, as a WAN link would.
    fn loopback_tuning(&self) -> bool {
        matches!(self.opts.placement, Placement::Loopback)
    }

    fn config_target(&self) -> Result<PathBuf> {
        let listen = self
            .target_addr
            .map_or_else(|| self.any_port(), |a| a.to_string());
        let text = format!(
            r#"listen = "{listen}"
store = "target-store"
ca = "pki/ca.crt"
cert = "pki/target.crt"
key = "pki/target.key"
loopback_tuning = {}
"#,
            self.loopback_tuning()
        );
        let p = self.server_dir().join("target.toml");
        std::fs::write(&p, text)?;
        Ok(p)
    }

    fn config_relay(&self) -> Result<PathBuf> {
        let target = self.target_addr.context("the target is not started")?;
        let listen = self
            .relay_addr
            .map_or_else(|| self.any_port(), |a| a.to_string());
        let metrics = self
            .metrics_addr
            .map_or_else(|| self.any_port(), |a| a.to_string());
        let disks: Vec<String> = self.disks.iter().map(|d| format!("\"{}\"", d.id)).collect();
        let text = format!(
            r#"listen = "{listen}"
metrics_listen = "{metrics}"
spool_dir = "relay-spool"
ca = "pki/ca.crt"
cert = "pki/relay.crt"
key = "pki/relay.key"
loopback_tuning = {}

[target]
address = "{target}"
server_name = "target"
bandwidth_limit_bytes_per_sec = {}

[[agents]]
name = "{AGENT_NAME}"
disks = [{}]
"#,
            self.loopback_tuning(),
            self.opts.relay_to_target_bytes_per_sec.unwrap_or(0),
            disks.join(", ")
        );
        let p = self.server_dir().join("relay.toml");
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// The agent's configuration (written on every start, so a test may point
    /// it elsewhere with [`Site::write_agent_config`] first).
    pub fn agent_config(&self) -> PathBuf {
        self.agent_dir().join("agent.toml")
    }

    /// Writes the agent configuration for relay address `relay`.
    pub fn write_agent_config(&self, relay: SocketAddr) -> Result<()> {
        let mut text = format!(
            r#"state_dir = "agent-state"
tracker_pin_dir = "{}"
[relay]
address = "{relay}"
server_name = "relay"
ca = "pki/ca.crt"
cert = "pki/agent-{AGENT_NAME}.crt"
key = "pki/agent-{AGENT_NAME}.key"
[replication]
chunk_size_kib = {}
zstd_level = {}
rpo_alert_seconds = 30
"#,
            self.pin_dir().display(),
            self.opts.chunk_size_kib,
            self.opts.zstd_level
        );
        for d in &self.disks {
            text.push_str(&format!(
                "[[disk]]\nid = \"{}\"\npath = \"{}\"\n",
                d.id,
                d.device.display()
            ));
        }
        std::fs::write(self.agent_config(), text)?;
        Ok(())
    }

    /// Starts `role`'s `program` in its site and directory.
    fn spawn(&self, role: Role, program: &Path, args: &[&str]) -> Result<(Child, ChildStdout)> {
        let (site, dir) = match role {
            Role::Agent => (self.opts.placement.agent_site(), self.agent_dir()),
            Role::Relay | Role::Target => (self.opts.placement.server_site(), self.server_dir()),
        };
        let log = self.log_file(role);
        let stderr = if self.opts.quiet {
            Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)?,
            )
        } else {
            Stdio::inherit()
        };
        let mut child = self
            .opts
            .placement
            .command(site, program)?
            .args(args)
            .current_dir(&dir)
            .env("RUST_LOG", &self.opts.log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let out = child.stdout.take().context("no stdout")?;
        Ok((child, out))
    }

    /// Starts (or restarts) the target; it keeps its address across restarts.
    pub fn start_target(&mut self) -> Result<()> {
        let cfg = self.config_target()?;
        let (child, out) = self.spawn(
            Role::Target,
            &self.bins.target(),
            &["serve", "--config", path_str(&cfg)?],
        )?;
        self.target = Some(child);
        let line = first_line(out, "listening", &mut self.target)?;
        self.target_addr = Some(parse_addr(&line, "quic=")?);
        Ok(())
    }

    /// Starts (or restarts) the relay; it keeps its addresses across restarts.
    pub fn start_relay(&mut self) -> Result<()> {
        let cfg = self.config_relay()?;
        let (child, out) = self.spawn(
            Role::Relay,
            &self.bins.relay(),
            &["serve", "--config", path_str(&cfg)?],
        )?;
        self.relay = Some(child);
        let line = first_line(out, "listening", &mut self.relay)?;
        self.relay_addr = Some(parse_addr(&line, "quic=")?);
        self.metrics_addr = parse_addr(&line, "metrics=").ok();
        Ok(())
    }

    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay_addr
    }

    pub fn target_addr(&self) -> Option<SocketAddr> {
        self.target_addr
    }

    /// Starts the agent against the relay.
    pub fn start_agent(&mut self) -> Result<()> {
        let relay = self.relay_addr.context("the relay is not started")?;
        if !self.agent_config().exists() {
            self.write_agent_config(relay)?;
        }
        let cfg = self.agent_config();
        let (child, out) = self.spawn(
            Role::Agent,
            &self.bins.agent(),
            &["run", "--config", path_str(&cfg)?],
        )?;
        // The agent prints nothing on stdout; keep the pipe from closing.
        std::mem::forget(out);
        self.agent = Some(child);
        self.agent_started_ms = unix_ms();
        Ok(())
    }

    /// Waits until the agent started by [`Site::start_agent`] tracks its disks
    /// (its first status snapshot comes after every disk is protected).
    pub fn wait_agent_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.agent_exited() {
                bail!("the agent exited with {status}");
            }
            if let Ok(st) = self.agent_status()
                && st["updated_ms"].as_u64().unwrap_or(0) >= self.agent_started_ms
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent wrote no status within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the process gets no chance to save anything.
    pub fn kill_agent(&mut self) -> Result<()> {
        kill(self.agent.take(), "-KILL")
    }

    pub fn kill_relay(&mut self) -> Result<()> {
        kill(self.relay.take(), "-KILL")
    }

    pub fn kill_target(&mut self) -> Result<()> {
        kill(self.target.take(), "-KILL")
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop_agent(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.agent.take().context("the agent is not running")?;
        signal(&child, "-TERM")?;
        Ok(child.wait()?)
    }

    /// Has the agent exited (and with what)?
    pub fn agent_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.agent
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Process ids of the running parties, by name (`agent`, `relay`,
    /// `target`): benchmarks read their CPU time from `/proc/<pid>/stat`.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        [
            ("agent", &self.agent),
            ("relay", &self.relay),
            ("target", &self.target),
        ]
        .into_iter()
        .filter_map(|(name, c)| c.as_ref().map(|c| (name, c.id())))
        .collect()
    }

    /// The agent's status snapshot (its status file).
    pub fn agent_status(&self) -> Result<serde_json::Value> {
        let p = self.agent_state_dir().join("status.json");
        let bytes = std::fs::read(&p).with_context(|| format!("{}", p.display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Waits until every disk is replicating with nothing left to ship, an RPO
    /// of zero, and everything the relay holds durable at the replica too, as
    /// the agent reports it; fails after `timeout`.
    pub fn wait_caught_up(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        // Only a snapshot taken after the wait began (with margin for the
        // tracker's ring buffer to be drained) describes the writes before it.
        let since = unix_ms() + 500;
        let mut last = serde_json::Value::Null;
        loop {
            if let Some(status) = self.agent_exited() {
                bail!("the agent exited with {status}; last status: {last}");
            }
            if let Ok(st) = self.agent_status() {
                let fresh = st["updated_ms"].as_u64().unwrap_or(0) >= since;
                let disks = st["disks"].as_array().cloned().unwrap_or_default();
                let done = fresh
                    && !disks.is_empty()
                    && disks.iter().all(|d| {
                        d["state"] == "protected"
                            && d["connected"] == true
                            && d["backlog_bytes"] == 0
                            && d["rpo_ms"] == 0
                            && d["replica_seq"].as_u64() >= d["durable_seq"].as_u64()
                    });
                if done {
                    // The agent's RPO runs until the replica has the write
                    // durable, but it ages tracked writes only: the initial
                    // sync's and a resync's chunks count as shipped once the
                    // relay has them durable. The replica is whole when it
                    // holds every sequence the relay acknowledged.
                    return Ok(st);
                }
                last = st;
            }
            if Instant::now() > deadline {
                bail!("the agent did not catch up within {timeout:?}; last status: {last}");
            }
            // Polling an observable condition with a deadline, not a sleep
            // standing in for synchronisation.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `qemu-img compare -f raw -F vmdk DEVICE REPLICA`: Ok when identical.
    pub fn compare(&self, disk: &ProtectedDisk) -> Result<()> {
        self.qemu_compare(disk, "vmdk", &self.replica(&disk.id))
    }

    /// `qemu-img compare -f raw -F raw DEVICE REPLICA-flat.vmdk`: the replica's
    /// raw extent, byte for byte, without the VMDK descriptor in between.
    pub fn compare_flat(&self, disk: &ProtectedDisk) -> Result<()> {
        self.qemu_compare(disk, "raw", &self.replica_flat(&disk.id))
    }

    fn qemu_compare(&self, disk: &ProtectedDisk, format: &str, replica: &Path) -> Result<()> {
        // Read-only: qemu-img compare opens both images without writing.
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", format])
            .arg(&disk.device)
            .arg(replica)
            .output()
            .context("cannot run qemu-img (install qemu-utils)")?;
        if !out.status.success() {
            bail!(
                "replica {} of {} differs from {}: {}{}",
                replica.display(),
                disk.id,
                disk.device.display(),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let children = [self.agent.take(), self.relay.take(), self.target.take()];
        for mut c in children.into_iter().flatten() {
            if let Err(e) = c.kill() {
                eprintln!("cannot kill {}: {e}", c.id());
            }
            if let Err(e) = c.wait() {
                eprintln!("cannot reap {}: {e}", c.id());
            }
        }
        // The kernel programs outlive the agent by design: detach them.
        if self.pin_dir().exists() {
            let out = Command::new(self.bins.agent())
                .args(["untrack", "--all", "--pin-dir"])
                .arg(self.pin_dir())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cannot remove the tracker pins {}: {}",
                    self.pin_dir().display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("cannot run blockferry-agent untrack: {e}"),
            }
        }
    }
}

fn kill(child: Option<Child>, sig: &str) -> Result<()> {
    let mut c = child.context("the process is not running")?;
    signal(&c, sig)?;
    c.wait()?;
    Ok(())
}

fn signal(child: &Child, sig: &str) -> Result<()> {
    run(Command::new("kill").args([sig, &child.id().to_string()]))
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Reads stdout until a line containing `marker`; then keeps draining stdout
/// in a thread so the process never blocks on a full pipe.
fn first_line(out: ChildStdout, marker: &str, child: &mut Option<Child>) -> Result<String> {
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            let status = child.as_mut().and_then(|c| c.wait().ok());
            bail!("the process exited ({status:?}) before printing `{marker}`");
        }
        if line.contains(marker) {
            break;
        }
    }
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    Ok(line.trim().to_owned())
}

fn parse_addr(line: &str, key: &str) -> Result<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .with_context(|| format!("no `{key}` in `{line}`"))?
        .parse()
        .with_context(|| format!("bad address after `{key}` in `{line}`"))
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh random disk id.
pub fn new_disk_id() -> Result<DiskId> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(DiskId::from_bytes(b))
}
