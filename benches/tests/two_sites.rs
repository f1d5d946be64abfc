//! Two sites in two network namespaces, as root: the harness itself (the
//! sites reach each other over the veth and nothing else, and leave nothing
//! behind), then real replication across them in both directions, agent on a
//! loop device on one site, relay and target on the other, checked with
//! `qemu-img compare` against the replica's flat extent.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockferry_benches::netns::{SiteName, TwoSites};
use blockferry_benches::site::{
    Binaries, Placement, ProtectedDisk, Role, Site, SiteOptions, new_disk_id,
};
use blockferry_testkit::devices::{LoopDev, dd_write};
use blockferry_testkit::privileged::require_root;

const MIB: u64 = 1 << 20;
const CATCH_UP: Duration = Duration::from_secs(120);

fn two_sites() -> Arc<TwoSites> {
    Arc::new(TwoSites::new().unwrap_or_else(|e| panic!("{e:#}")))
}

#[test]
#[ignore = "needs root: network namespaces and a veth pair"]
fn a_site_reaches_the_other_over_the_veth_and_not_over_127_0_0_1() {
    require_root("a_site_reaches_the_other_over_the_veth_and_not_over_127_0_0_1");
    let sites = two_sites();
    let b = sites.addr(SiteName::B);
    // Two listeners in site-b: on its veth address and on its loopback.
    let (on_veth, on_lo) = sites
        .run_in(SiteName::B, || {
            let veth = TcpListener::bind((b, 0)).expect("bind the veth address");
            let lo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1");
            (veth, lo)
        })
        .expect("enter site-b");
    let veth_addr = on_veth.local_addr().expect("address");
    let lo_port = on_lo.local_addr().expect("address").port();
    let (over_veth, over_lo) = sites
        .run_in(SiteName::A, || {
            (
                TcpStream::connect_timeout(&veth_addr, Duration::from_secs(5)),
                TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, lo_port)),
                    Duration::from_secs(5),
                ),
            )
        })
        .expect("enter site-a");
    assert!(
        over_veth.is_ok(),
        "site-a reaches {veth_addr} in site-b over the veth: {over_veth:?}"
    );
    assert!(
        over_lo.is_err(),
        "127.0.0.1:{lo_port} of site-a is not site-b's loopback"
    );
    let bytes = sites.link_bytes(SiteName::A).expect("counters");
    assert!(bytes.tx > 0, "the handshake crossed the veth: {bytes:?}");
}

#[test]
#[ignore = "needs root: network namespaces and a veth pair"]
fn dropping_the_sites_kills_their_processes_and_removes_namespaces_and_veth() {
    require_root("dropping_the_sites_kills_their_processes_and_removes_namespaces_and_veth");
    let sites = two_sites();
    let names = [sites.netns(SiteName::A), sites.netns(SiteName::B)];
    let mut child = sites
        .command(SiteName::A, "sleep")
        .expect("command")
        .arg("600")
        .spawn()
        .expect("start sleep in site-a");
    assert_eq!(
        sites.pids(SiteName::A).expect("pids"),
        vec![child.id()],
        "the process runs inside site-a"
    );
    // Dropped by a panic, as a failing test drops it.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _sites = sites;
        panic!("a test failing with the sites up");
    }));
    assert!(caught.is_err());
    let status = child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed on drop: {status}");
    for ns in names {
        assert!(
            !Path::new("/run/netns").join(&ns).exists(),
            "{ns} is removed"
        );
    }
    // The veth ends lived only in the namespaces and went with them: no trace
    // of them on this host.
    let links = blockferry_testkit::privileged::run("ip", &["-o", "link", "show"]);
    assert!(
        !links.contains("to-site-a") && !links.contains("to-site-b"),
        "no veth end is left on the host: {links}"
    );
}

/// A site with its agent in `source` and relay and target in the other site.
fn across(
    dir: &Path,
    dev: &LoopDev,
    sites: &Arc<TwoSites>,
    source: SiteName,
) -> (Site, ProtectedDisk) {
    let disk = ProtectedDisk {
        id: new_disk_id().expect("disk id"),
        device: dev.path.clone(),
    };
    let bins = Binaries::of_this_build().expect("binaries");
    let opts = SiteOptions {
        quiet: std::env::var_os("BLOCKFERRY_E2E_VERBOSE").is_none(),
        placement: Placement::across(sites, source),
        ..SiteOptions::default()
    };
    let site = Site::start(bins, dir, vec![disk.clone()], opts)
        .unwrap_or_else(|e| panic!("start relay and target in {}: {e:#}", source.other()));
    (site, disk)
}

fn logs(site: &Site) -> String {
    let mut out = String::new();
    for role in [Role::Agent, Role::Relay, Role::Target] {
        let path = site.log_file(role);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {} (last lines) ---\n", path.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

/// Replicates `dev` from `source` to the other site and checks that the data
/// arrived and that only the veth carried it.
fn replicate_across(sites: &Arc<TwoSites>, source: SiteName, size: u64) {
    let dev = LoopDev::new(size, true);
    // Data before protection: the initial sync must carry it across.
    dd_write(dev.path_str(), MIB, 2, 6, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut site, disk) = across(dir.path(), &dev, sites, source);
    let server = source.other();
    for (role, addr) in [("relay", site.relay_addr()), ("target", site.target_addr())] {
        assert_eq!(
            addr.map(|a| a.ip()),
            Some(sites.addr(server).into()),
            "the {role} listens on {server}'s veth address"
        );
    }
    let before = sites.link_bytes(source).expect("counters");
    site.start_agent().expect("agent");
    // Writes while the initial sync runs.
    dd_write(dev.path_str(), 4096, 3000, 64, &[]);
    dd_write(dev.path_str(), 64 * 1024, 200, 16, &[]);
    let st = site
        .wait_caught_up(CATCH_UP)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&site)));
    if let Err(e) = site.compare_flat(&disk) {
        panic!("{e:#}\n{}", logs(&site));
    }
    site.compare(&disk)
        .expect("the VMDK reads the same as its flat extent");

    // Nothing of either site listens or talks on 127.0.0.1: the relay and the
    // target listen on the veth address, the agent reaches the relay there.
    for s in [SiteName::A, SiteName::B] {
        let sockets = sites.sockets(s).expect("ss");
        let on_lo: Vec<_> = sockets.iter().filter(|e| e.uses_loopback()).collect();
        assert!(
            on_lo.is_empty(),
            "no socket of {s} uses 127.0.0.1: {on_lo:?}"
        );
    }
    let relay_port = site.relay_addr().expect("relay address").port();
    assert!(
        sites
            .sockets(server)
            .expect("ss")
            .iter()
            .any(|e| e.proto == "udp" && e.local == format!("{}:{relay_port}", sites.addr(server))),
        "the relay's QUIC socket is bound to {server}'s veth address"
    );
    // What the agent sent crossed the veth, from its site to the other.
    let after = sites.link_bytes(source).expect("counters");
    let sent = st["disks"][0]["bytes_sent"].as_u64().unwrap_or(0);
    assert!(sent > 0, "the agent sent data: {st}");
    assert!(
        after.tx - before.tx >= sent,
        "{source}'s veth carried the {sent} bytes the agent sent (tx grew by {})",
        after.tx - before.tx
    );
}

#[test]
#[ignore = "needs root: network namespaces, loop devices, eBPF and the three binaries"]
fn agent_in_site_a_replicates_to_relay_and_target_in_site_b_over_the_veth_only() {
    require_root("agent_in_site_a_replicates_to_relay_and_target_in_site_b_over_the_veth_only");
    let sites = two_sites();
    replicate_across(&sites, SiteName::A, 64 * MIB);
}

#[test]
#[ignore = "needs root: network namespaces, loop devices, eBPF and the three binaries"]
fn agent_in_site_b_replicates_to_relay_and_target_in_site_a_as_reprotect_will() {
    require_root("agent_in_site_b_replicates_to_relay_and_target_in_site_a_as_reprotect_will");
    let sites = two_sites();
    replicate_across(&sites, SiteName::B, 32 * MIB);
}
