//! `blockferry-agent`: parses the command line and wires the library together.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use blockferry_agent::config::Config;
use blockferry_agent::tracker::{self, Tracker};
use blockferry_agent::{service, status};
use blockferry_transport::log::{self, LogFormat};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blockferry-agent",
    version,
    about = "blockferry agent: tracks, reads and ships changed blocks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines on stderr: `text` (colour only on a terminal) or `json`
    /// (one object per line, for log collectors).
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stream the changed extents of a block device until interrupted (diagnostic).
    Track(TrackArgs),
    /// Load and attach the kernel programs, report hooks and kernel features, detach.
    Probe,
    /// Run the replication service: initial sync, continuous replication, resync.
    Run {
        /// The agent configuration (TOML).
        #[arg(long, default_value = "/etc/blockferry/agent.toml")]
        config: PathBuf,
    },
    /// Show each protected disk: state, RPO, backlog, bytes sent, last resync.
    Status {
        #[arg(long, default_value = "/etc/blockferry/agent.toml")]
        config: PathBuf,
        /// The status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a new random disk id for a `[[disk]]` entry of the configuration.
    NewDiskId,
    /// Planned failover, source side: with the service stopped and the device
    /// unused, ship the disk to RPO zero, cut a final point, wait until the
    /// replica has it durable, then demote this copy and mark the disk
    /// handed off.
    Handoff {
        #[arg(long, default_value = "/etc/blockferry/agent.toml")]
        config: PathBuf,
        /// The disk id (as in the configuration's `[[disk]]`).
        #[arg(long)]
        disk: blockferry_proto::DiskId,
        /// Give up (the disk stays the source) after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Protect a disk that was failed over to this host: install the promoted
    /// replica's generation record (STORE/ID/generation.rec, copied from the
    /// target host) and start the disk with a checksum resync against the
    /// target's seed. Run while the agent service is stopped.
    Reprotect {
        #[arg(long, default_value = "/etc/blockferry/agent.toml")]
        config: PathBuf,
        /// The disk id (as in the configuration's `[[disk]]`).
        #[arg(long)]
        disk: blockferry_proto::DiskId,
        /// The promoted replica's generation record.
        #[arg(long)]
        record: PathBuf,
        /// Replace the disk's entry even while it is protected by this agent
        /// (that protection is dropped).
        #[arg(long)]
        force: bool,
        /// The result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the kernel tracking that outlives the agent (uninstall): removes its pins.
    Untrack {
        /// Every device: the tracker's pins are removed and its programs detach.
        #[arg(long, required = true)]
        all: bool,
        /// Where the tracker is pinned.
        #[arg(long, default_value = tracker::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Args)]
struct TrackArgs {
    /// Block device to track: a whole disk (/dev/vdb) or a partition (/dev/vdb1).
    #[arg(long)]
    device: PathBuf,
    /// One JSON object per line: {"device","offset","len","op"} (byte offsets).
    #[arg(long, conflicts_with = "quiet")]
    json: bool,
    /// Print nothing per extent, only a summary at exit (to measure the tracker's cost).
    #[arg(long)]
    quiet: bool,
}

/// The service logs its progress; the diagnostic commands only warnings. A
/// handoff logs its progress too, unless a terminal shows its progress line.
fn default_log_level(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::Run { .. } => "info",
        Cmd::Handoff { .. } if !std::io::IsTerminal::is_terminal(&std::io::stderr()) => "info",
        _ => "warn",
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    log::init(default_log_level(&cli.cmd), cli.log_format);
    match cli.cmd {
        Cmd::Probe => {
            let report = tracker::probe().context("probe failed")?;
            println!("{report}");
            Ok(())
        }
        Cmd::Track(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(track(args)),
        Cmd::Run { config } => {
            let config = Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?
                .block_on(run(config))
        }
        Cmd::Status { config, json } => {
            let config = Config::load(&config)?;
            let st = status::current(&config.state_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                print!("{}", status::render(&st, now_ms));
            }
            Ok(())
        }
        Cmd::Untrack { all: _, pin_dir } => {
            let removed = Tracker::remove_pins(&pin_dir).with_context(|| {
                format!("cannot remove the tracker pins in {}", pin_dir.display())
            })?;
            if removed {
                println!("tracking stopped: pins in {} removed", pin_dir.display());
            } else {
                println!("nothing pinned in {}", pin_dir.display());
            }
            Ok(())
        }
        Cmd::Reprotect {
            config,
            disk,
            record,
            force,
            json,
        } => {
            let config = Config::load(&config)?;
            let out = blockferry_agent::reprotect::reprotect(&config, disk, &record, force)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "disk {} on {} ({} bytes) reprotected in generation {} after seq {}: start `blockferry-agent run`; it compares checksums with the target's seed and ships only what differs\nlineage: {}",
                    out.disk, out.device, out.size, out.generation, out.seq, out.lineage
                );
            }
            Ok(())
        }
        Cmd::Handoff {
            config,
            disk,
            timeout,
            json,
        } => {
            let config = Config::load(&config)?;
            let out = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?
                .block_on(handoff(config, disk, timeout))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "disk {} handed off: the replica holds everything through seq {} (generation {}); {:.1} s, {} bytes shipped\nnext, on the replica's site: `blockferry-target failover --planned --store STORE --disk {} --point latest`\nlineage: {}",
                    out.disk,
                    out.final_seq,
                    out.generation,
                    out.seconds,
                    out.bytes_shipped,
                    out.disk,
                    out.lineage
                );
            }
            Ok(())
        }
        Cmd::NewDiskId => {
            let mut bytes = [0u8; 16];
            getrandom(&mut bytes)?;
            println!("{}", blockferry_proto::DiskId::from_bytes(bytes));
            Ok(())
        }
    }
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("cannot read /dev/urandom")
}

async fn run(config: Config) -> Result<()> {
    let cancel = stop_on_signal()?;
    service::run(config, cancel).await?;
    Ok(())
}

async fn handoff(
    config: Config,
    disk: blockferry_proto::DiskId,
    timeout_s: u64,
) -> Result<service::HandedOff> {
    let cancel = stop_on_signal()?;
    let out = service::handoff(
        config,
        disk,
        std::time::Duration::from_secs(timeout_s),
        cancel,
    )
    .await?;
    Ok(out)
}

/// A token cancelled at SIGTERM or SIGINT.
fn stop_on_signal() -> Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};

    let cancel = tokio_util::sync::CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let stopper = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stop requested");
        blockferry_transport::notify::stopping();
        stopper.cancel();
    });
    Ok(cancel)
}

async fn track(args: TrackArgs) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut tracker = Tracker::load().context("cannot load the tracker")?;
    let id = tracker
        .protect(&args.device)
        .with_context(|| format!("cannot track {}", args.device.display()))?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    // Scripts wait for this line: from here on every write is reported.
    eprintln!("tracking {} (interrupt to stop)", args.device.display());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut summary = Summary::default();
    loop {
        let notices = tokio::select! {
            n = tracker.next() => n.context("tracking failed")?,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        print_notices(&args, &notices, &mut out, &mut summary)?;
        // The diagnostic has no reader: keep the dirty set from growing without bound.
        tracker.take_dirty(id, u64::MAX);
    }
    // Events already in the ring buffer at the signal belong to the output too.
    let notices = tracker.poll_now()?;
    print_notices(&args, &notices, &mut out, &mut summary)?;
    if args.quiet {
        writeln!(
            out,
            "{}: {} extents, {} bytes, {} flushes, {} resyncs",
            args.device.display(),
            summary.extents,
            summary.bytes,
            summary.flushes,
            summary.resyncs
        )?;
    }
    out.flush()?;
    Ok(())
}

#[derive(Default)]
struct Summary {
    extents: u64,
    bytes: u64,
    flushes: u64,
    resyncs: u64,
}

fn print_notices(
    args: &TrackArgs,
    notices: &[tracker::Notice],
    out: &mut impl Write,
    summary: &mut Summary,
) -> Result<()> {
    for n in notices {
        match n {
            tracker::Notice::Extent { len, .. } => {
                summary.extents += 1;
                summary.bytes += len;
            }
            tracker::Notice::Flush { .. } => summary.flushes += 1,
            tracker::Notice::Resync { .. } => {
                summary.resyncs += 1;
                // Loud whatever the output format: tracking was lost.
                eprintln!("{}", tracker::notice_text(&args.device, n));
            }
        }
        if args.quiet {
            continue;
        }
        if args.json {
            if let Some(line) = tracker::notice_json(&args.device, n) {
                writeln!(out, "{line}")?;
            }
        } else {
            writeln!(out, "{}", tracker::notice_text(&args.device, n))?;
        }
    }
    out.flush()?;
    Ok(())
}
