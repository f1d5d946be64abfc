//! Two sites on one machine: two network namespaces, `bf-site-a-<n>` and
//! `bf-site-b-<n>`, joined by a veth pair that holds the two host addresses of
//! a private /30, each with its own loopback up. The DR cycle's tests and demo
//! run each site's processes inside that site's namespace, so the only way from
//! one site to the other is the veth: a process that listens or connects on
//! 127.0.0.1 stays within its own site.
//!
//! Only the network is split. Both sites share this host's mount namespace, so
//! bpffs pins, loop devices and each site's directory stay where the harness
//! put them. That is why a process enters its site with `setns(CLONE_NEWNET)`
//! before `exec` and not through `ip netns exec`, which remounts /sys and with
//! it hides /sys/fs/bpf, where the agent pins its tracker.
//!
//! Parallel runs do not collide: a run claims a number `n` by locking
//! `/run/blockferry-two-sites/<n>.lock`, and `n` names both namespaces and
//! picks the /30. The kernel drops the lock when the run dies, however it dies,
//! so the next run to claim `n` removes what that run left behind. A run that
//! ends normally removes its lock file while it still holds the lock; a run
//! that locked the file just before it went away sees that the name no longer
//! leads to the file it locked, and tries another number.
//!
//! [`TwoSites`] is a guard: dropping it kills every process still inside either
//! namespace and deletes both namespaces (the veth pair goes with them), also
//! when a test panics.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// One of the two sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SiteName {
    /// The original (production) site.
    A,
    /// The recovery site.
    B,
}

impl SiteName {
    pub fn other(self) -> SiteName {
        match self {
            SiteName::A => SiteName::B,
            SiteName::B => SiteName::A,
        }
    }

    /// `site-a` or `site-b`: the name a person reads, and the site's directory.
    pub fn label(self) -> &'static str {
        match self {
            SiteName::A => "site-a",
            SiteName::B => "site-b",
        }
    }

    /// The site's end of the veth pair, named after where it leads.
    pub fn interface(self) -> &'static str {
        match self {
            SiteName::A => "to-site-b",
            SiteName::B => "to-site-a",
        }
    }
}

impl std::fmt::Display for SiteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// How many runs can hold two sites at once: the /30s of 10.250.0.0/16.
const SLOTS: u16 = 1 << 14;
/// Where runs claim their number.
const LOCK_DIR: &str = "/run/blockferry-two-sites";
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The addresses of slot `n`: the two host addresses of the /30 at
/// 10.250.0.0 + 4n (site-a the first, site-b the second).
pub fn slot_addrs(n: u16) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + 4 * u32::from(n % SLOTS);
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// The namespace of `site` in slot `n`: `bf-site-a-002a`.
pub fn netns_name(site: SiteName, n: u16) -> String {
    format!("bf-{}-{n:04x}", site.label())
}

/// A veth interface's byte counters, as its own side counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkBytes {
    pub rx: u64,
    pub tx: u64,
}

/// One socket of a namespace, as `ss` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketEntry {
    /// `udp` or `tcp`.
    pub proto: String,
    pub state: String,
    pub local: String,
    pub peer: String,
}

impl SocketEntry {
    /// Does either end use a loopback address (127.0.0.0/8 or ::1)?
    pub fn uses_loopback(&self) -> bool {
        [&self.local, &self.peer]
            .into_iter()
            .any(|a| host_of(a).is_some_and(|ip| ip.is_loopback()))
    }
}

/// The host part of `ss`'s `ADDR:PORT`, `[ADDR]:PORT` or `ADDR%IF:PORT`; None for `*`.
fn host_of(addr: &str) -> Option<IpAddr> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.split('%').next().unwrap_or(host);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Parses `ss -H -a -n -t -u` output (Netid State Recv-Q Send-Q Local Peer ...).
pub fn parse_ss(text: &str) -> Vec<SocketEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6).then(|| SocketEntry {
                proto: f[0].to_owned(),
                state: f[1].to_owned(),
                local: f[4].to_owned(),
                peer: f[5].to_owned(),
            })
        })
        .collect()
}

/// Parses the byte counters out of `ip -j -s link show dev IF`.
pub fn parse_link_bytes(json: &str) -> Result<LinkBytes> {
    let v: serde_json::Value = serde_json::from_str(json).context("ip -j printed no JSON")?;
    let stats = &v[0]["stats64"];
    let get = |dir: &str| {
        stats[dir]["bytes"]
            .as_u64()
            .with_context(|| format!("no stats64.{dir}.bytes in {v}"))
    };
    Ok(LinkBytes {
        rx: get("rx")?,
        tx: get("tx")?,
    })
}

/// Two network namespaces joined by a veth pair; see the module doc.
#[derive(Debug)]
pub struct TwoSites {
    slot: u16,
    // Held for the guard's lifetime: it is the claim on `slot`.
    lock: Option<File>,
}

impl TwoSites {
    /// Creates both namespaces, the veth pair with its /30 and both loopbacks,
    /// in a slot no other run holds. Needs root (CAP_NET_ADMIN and
    /// CAP_SYS_ADMIN) and iproute2.
    pub fn new() -> Result<TwoSites> {
        std::fs::create_dir_all(LOCK_DIR)
            .with_context(|| format!("cannot create {LOCK_DIR} (run as root)"))?;
        for _ in 0..64 {
            if let Some(sites) = TwoSites::claim(random_slot()?)? {
                return Ok(sites);
            }
        }
        bail!(
            "no free slot for two sites after 64 tries: too many runs at once, or stale locks in {LOCK_DIR}"
        )
    }

    /// Builds the sites of slot `n` unless another live run holds it.
    fn claim(n: u16) -> Result<Option<TwoSites>> {
        use std::os::unix::fs::MetadataExt;
        let path = lock_path(n);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        // The run that held it may have removed the file between our open and
        // our lock: then the lock guards nothing, and the slot is its next
        // claimer's.
        let locked = lock
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        match std::fs::metadata(&path) {
            Ok(now) if (now.dev(), now.ino()) == (locked.dev(), locked.ino()) => {}
            _ => return Ok(None),
        }
        let sites = TwoSites {
            slot: n,
            lock: Some(lock),
        };
        // A run that died in this slot may have left its namespaces, and
        // processes in them.
        for site in [SiteName::A, SiteName::B] {
            if sites.netns_path(site).exists() {
                sites.remove(site);
            }
        }
        // On failure `sites` drops and removes whatever was made.
        sites.build()?;
        Ok(Some(sites))
    }

    fn build(&self) -> Result<()> {
        let (a, b) = (self.netns(SiteName::A), self.netns(SiteName::B));
        ip(&["netns", "add", &a])?;
        ip(&["netns", "add", &b])?;
        // Each end is created inside its namespace: the host's interface names
        // are never touched, so parallel runs can reuse the same names.
        ip(&[
            "link",
            "add",
            SiteName::A.interface(),
            "netns",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            SiteName::B.interface(),
            "netns",
            &b,
        ])?;
        for site in [SiteName::A, SiteName::B] {
            let ns = self.netns(site);
            let cidr = format!("{}/30", self.addr(site));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", site.interface()])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "set", site.interface(), "up"])?;
        }
        Ok(())
    }

    /// The slot this run holds (names and addresses derive from it).
    pub fn slot(&self) -> u16 {
        self.slot
    }

    /// The name of `site`'s namespace, for `ip -n NAME` / `ip netns exec NAME`.
    pub fn netns(&self, site: SiteName) -> String {
        netns_name(site, self.slot)
    }

    fn netns_path(&self, site: SiteName) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns(site))
    }

    /// `site`'s address on the veth: what the other site reaches it at.
    pub fn addr(&self, site: SiteName) -> Ipv4Addr {
        let (a, b) = slot_addrs(self.slot);
        match site {
            SiteName::A => a,
            SiteName::B => b,
        }
    }

    /// `addr(site)` with port 0: a listen address that makes the kernel pick the port.
    pub fn any_port(&self, site: SiteName) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.addr(site)), 0)
    }

    /// A command that runs `program` inside `site`'s network namespace (and
    /// nowhere else: the namespace is entered in the child, before exec).
    pub fn command(&self, site: SiteName, program: impl AsRef<OsStr>) -> Result<Command> {
        let ns = self.open_netns(site)?;
        let mut cmd = Command::new(program);
        // SAFETY: the hook runs in the forked child before exec, where only
        // async-signal-safe calls are allowed: `enter` makes one setns(2)
        // system call on a descriptor opened here, and neither allocates nor
        // takes a lock. The descriptor is close-on-exec, so the program does
        // not inherit it.
        unsafe {
            cmd.pre_exec(move || enter(&ns));
        }
        Ok(cmd)
    }

    /// Runs `f` on a thread of this process that has entered `site`'s network
    /// namespace: sockets it opens belong to that site. Other threads stay
    /// where they are (a network namespace is per thread).
    pub fn run_in<T: Send>(&self, site: SiteName, f: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = self.open_netns(site)?;
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                enter(&ns).with_context(|| format!("cannot enter {}", self.netns(site)))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn open_netns(&self, site: SiteName) -> Result<File> {
        let p = self.netns_path(site);
        File::open(&p).with_context(|| format!("cannot open {}", p.display()))
    }

    /// The sockets of `site` (TCP and UDP, every state), from `ss` run inside it.
    pub fn sockets(&self, site: SiteName) -> Result<Vec<SocketEntry>> {
        let out = self
            .command(site, "ss")?
            .args(["-H", "-a", "-n", "-t", "-u"])
            .output()
            .context("cannot run ss (install iproute2)")?;
        if !out.status.success() {
            bail!(
                "ss in {} failed: {}",
                self.netns(site),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(parse_ss(&String::from_utf8_lossy(&out.stdout)))
    }

    /// The byte counters of `site`'s end of the veth.
    pub fn link_bytes(&self, site: SiteName) -> Result<LinkBytes> {
        let ns = self.netns(site);
        let out = Command::new("ip")
            .args([
                "-n",
                &ns,
                "-j",
                "-s",
                "link",
                "show",
                "dev",
                site.interface(),
            ])
            .output()
            .context("cannot run ip (install iproute2)")?;
        if !out.status.success() {
            bail!(
                "ip -n {ns} link show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse_link_bytes(&String::from_utf8_lossy(&out.stdout))
    }

    /// Process ids inside `site`'s namespace.
    pub fn pids(&self, site: SiteName) -> Result<Vec<u32>> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.netns(site)])
            .output()
            .context("cannot run ip (install iproute2)")?;
        if !out.status.success() {
            bail!(
                "ip netns pids {} failed: {}",
                self.netns(site),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Kills what runs in `site`'s namespace, then deletes the namespace.
    /// Reports and goes on: it runs from `Drop`.
    fn remove(&self, site: SiteName) {
        let ns = self.netns(site);
        // Only this run's processes (or a dead run's, in its own slot) can be
        // in a namespace named after the slot this run locked.
        match self.pids(site) {
            Ok(pids) => {
                for pid in pids {
                    match Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .output()
                    {
                        Ok(o) if o.status.success() => {}
                        // Gone between the listing and the kill.
                        Ok(_) => {}
                        Err(e) => eprintln!("cannot kill {pid} in {ns}: {e}"),
                    }
                }
            }
            Err(e) => eprintln!("{e:#}"),
        }
        match Command::new("ip").args(["netns", "del", &ns]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "ip netns del {ns}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("cannot run ip netns del {ns}: {e}"),
        }
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        for site in [SiteName::A, SiteName::B] {
            if self.netns_path(site).exists() {
                self.remove(site);
            }
        }
        // Removed while still locked (see the module doc); the lock goes
        // with the descriptor right after.
        if self.lock.is_some()
            && let Err(e) = std::fs::remove_file(lock_path(self.slot))
        {
            eprintln!("cannot remove {}: {e}", lock_path(self.slot).display());
        }
    }
}

fn lock_path(n: u16) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("{n:04x}.lock"))
}

/// setns(2) into the network namespace `ns`; async-signal-safe (see
/// [`TwoSites::command`]).
fn enter(ns: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns reads no memory of ours; `ns` is an open descriptor for
    // the duration of the call (borrowed), and a bad one is an error, not UB.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn random_slot() -> Result<u16> {
    let mut b = [0u8; 2];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    Ok(u16::from_le_bytes(b) % SLOTS)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    impl TwoSites {
        /// Releases the slot and leaves namespaces and processes behind, as a
        /// run killed with SIGKILL does.
        fn die(mut self) {
            let lock = self.lock.take();
            std::mem::forget(self);
            drop(lock);
        }
    }

    #[test]
    #[ignore = "needs root: network namespaces and a veth pair"]
    fn a_run_that_died_is_cleaned_up_by_the_next_to_claim_its_slot() {
        blockferry_testkit::privileged::require_root(
            "a_run_that_died_is_cleaned_up_by_the_next_to_claim_its_slot",
        );
        let dead = TwoSites::new().expect("two sites");
        let n = dead.slot();
        let mut left_behind = dead
            .command(SiteName::B, "sleep")
            .expect("command")
            .arg("600")
            .spawn()
            .expect("start sleep in site-b");
        dead.die();
        assert!(
            Path::new(NETNS_DIR)
                .join(netns_name(SiteName::B, n))
                .exists(),
            "the dead run left its namespace"
        );
        let next = TwoSites::claim(n)
            .expect("claim")
            .expect("a dead run's slot is free");
        use std::os::unix::process::ExitStatusExt;
        let status = left_behind.wait().expect("wait");
        assert_eq!(
            status.signal(),
            Some(9),
            "the dead run's process was killed: {status}"
        );
        assert!(
            next.pids(SiteName::B).expect("pids").is_empty(),
            "site-b starts empty"
        );
        let addrs = ip_addrs(&next, SiteName::B);
        assert!(
            addrs.contains(&format!("{}/30", next.addr(SiteName::B))),
            "site-b has its address again: {addrs}"
        );
        assert!(
            TwoSites::claim(n).expect("claim").is_none(),
            "a live run's slot cannot be claimed"
        );
        drop(next);
        assert!(
            !lock_path(n).exists(),
            "a run that ends removes its lock file"
        );
    }

    fn ip_addrs(sites: &TwoSites, site: SiteName) -> String {
        blockferry_testkit::privileged::run("ip", &["-n", &sites.netns(site), "-o", "addr", "show"])
    }

    #[test]
    fn every_slot_has_its_own_30_with_two_host_addresses() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..SLOTS {
            let (a, b) = slot_addrs(n);
            let (ua, ub) = (u32::from(a), u32::from(b));
            // Host addresses of a /30: neither the network (…00) nor the broadcast (…11).
            assert_eq!(ua & 3, 1, "{a}");
            assert_eq!(ub & 3, 2, "{b}");
            assert_eq!(ua >> 2, ub >> 2, "{a} and {b} share one /30");
            assert!(a.is_private() && b.is_private(), "{a} {b}");
            assert!(seen.insert(ua >> 2), "slot {n} reuses a /30");
        }
    }

    #[test]
    fn namespace_names_are_short_and_say_the_site() {
        for n in [0, 1, SLOTS - 1] {
            let a = netns_name(SiteName::A, n);
            let b = netns_name(SiteName::B, n);
            assert!(a.starts_with("bf-site-a-") && b.starts_with("bf-site-b-"));
            assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
            assert_ne!(a, netns_name(SiteName::A, (n + 1) % SLOTS));
        }
    }

    #[test]
    fn ss_lines_parse_and_loopback_ends_are_recognised() {
        let text = "\
udp   UNCONN 0      0          10.250.0.2:41234        0.0.0.0:*
udp   UNCONN 0      0           127.0.0.1:5353         0.0.0.0:*
tcp   LISTEN 0      1024       10.250.0.2:9410         0.0.0.0:*
tcp   ESTAB  0      0          10.250.0.1:50000     127.0.0.1:9410
udp   UNCONN 0      0               [::1]:53              [::]:*
udp   UNCONN 0      0      [::1]%lo:53                  *:*
udp   UNCONN 0      0      [fe80::1]%eth0:53            *:*
short line
";
        let s = parse_ss(text);
        assert_eq!(s.len(), 7);
        assert_eq!(s[0].proto, "udp");
        assert_eq!(s[2].state, "LISTEN");
        let loopback: Vec<bool> = s.iter().map(SocketEntry::uses_loopback).collect();
        assert_eq!(loopback, [false, true, false, true, true, true, false]);
    }

    #[test]
    fn link_counters_parse_from_ip_json_and_garbage_is_an_error() {
        let json = r#"[{"ifname":"to-site-b","stats64":{"rx":{"bytes":12,"packets":1},"tx":{"bytes":3400,"packets":2}}}]"#;
        assert_eq!(
            parse_link_bytes(json).expect("parse"),
            LinkBytes { rx: 12, tx: 3400 }
        );
        assert!(parse_link_bytes("[]").is_err());
        assert!(parse_link_bytes("not json").is_err());
    }

    #[test]
    fn the_other_site_of_a_site_is_the_one_its_interface_leads_to() {
        for s in [SiteName::A, SiteName::B] {
            assert_eq!(s.other().other(), s);
            assert_eq!(s.interface(), format!("to-{}", s.other().label()));
        }
    }
}
