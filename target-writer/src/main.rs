//! `blockferry-target`: the master target's command line. Parses arguments,
//! sets up logging and calls into the library; no logic lives here.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use blockferry_target::TargetError;
use blockferry_target::control::{
    ControlError, ExportRequest, request_commit, request_export, request_failover,
    request_test_failover, socket_path,
};
use blockferry_target::export::{ExportFormat, export_point};
use blockferry_target::failover::{
    CommitRequest, CopyMethod, DrState, DrStatus, Failover, FailoverRequest, FailoverState,
    PointChoice, TestFailover, TestFailoverRequest, dr_status,
};
use blockferry_target::feed::{FeedItem, decode_all};
use blockferry_target::reprotect::failover_in_place;
use blockferry_target::store::{DiskStore, StoreOptions, label_name, list_points};
use blockferry_transport::log::{self, LogFormat};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blockferry-target",
    version,
    about = "blockferry target writer: VMDK replicas and recovery points"
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
    /// List the recovery points of a disk: id, time, label, size of the undo kept.
    Points {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a recovery point out as a disk image (through the running
    /// service when `serve` holds the store; replication goes on meanwhile).
    Export {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        point: u64,
        /// raw, vmdk-flat or vmdk-sparse
        #[arg(long)]
        format: ExportFormat,
        /// The image to write; an existing file is replaced.
        #[arg(long)]
        out: PathBuf,
        /// An earlier export of the same disk to chain to (sparse delta).
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Export a point cut while the replica was incomplete.
        #[arg(long)]
        force: bool,
    },
    /// Failover of a disk on the target host: the writable disk of a point
    /// (a VMDK in --out, and with --attach a loop device), and the replica
    /// promoted at that point (its former source is fenced). Run again with
    /// another --point (and --discard-writes) to change the point, until
    /// --commit. With --test, a throw-away copy while replication goes on,
    /// removed with --cleanup. Through the running service when `serve`
    /// holds the store.
    Failover {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        disk: String,
        /// Make a test failover: replication goes on, nothing is promoted.
        #[arg(long, conflicts_with_all = ["cleanup", "commit", "planned", "discard_writes"])]
        test: bool,
        /// Remove the disk's test failover: loop device, files, directory.
        #[arg(long, conflicts_with_all = ["commit", "planned", "discard_writes"])]
        cleanup: bool,
        /// Make the disk's failover final: its point cannot change any more.
        #[arg(long, conflicts_with_all = ["planned", "discard_writes"])]
        commit: bool,
        /// Only to the final point of a source that stopped (after the
        /// agent's `handoff`): refused unless the point is complete, the
        /// latest, and the replica holds nothing after it. On a seed store
        /// (the original disk taken back by `reprotect`) without --out, the
        /// failover happens in place: the seed is the writable disk.
        #[arg(long)]
        planned: bool,
        /// Move a failover to another point although its writable disk may
        /// have been written: that disk is removed and made anew.
        #[arg(long)]
        discard_writes: bool,
        /// latest, latest-consistent or a point id.
        #[arg(long, default_value = "latest")]
        point: PointChoice,
        /// The directory to write the disk to.
        #[arg(long, required_unless_present_any = ["cleanup", "commit", "planned"])]
        out: Option<PathBuf>,
        /// Attach the disk as a loop device on this host (needs root).
        #[arg(long)]
        attach: bool,
        /// Use a point cut while the replica was incomplete.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Promote the replica of a disk (the promote step of a failover): it
    /// becomes the source in a new generation, and its former source is
    /// fenced (its frames are refused). Run on the target host; while `serve`
    /// holds the store, it asks the service through its control socket.
    Promote {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        json: bool,
    },
    /// Reprotect: take an existing disk (a block device or a VMDK, the seed)
    /// as the replica of DISK that the source replicates into, after
    /// comparing the two copies' generation records. The first sync is a
    /// checksum compare: only chunks that differ travel. Run it before the
    /// agent connects (serve must not hold the disk).
    Reprotect {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        disk: String,
        /// The original disk: a block device or a VMDK descriptor.
        #[arg(long)]
        seed: PathBuf,
        /// The source's generation record (a copy of the promoted replica's
        /// generation.rec, or of the agent's DISK.generation).
        #[arg(long)]
        source_record: PathBuf,
        /// The seed's generation record (its former agent's DISK.generation);
        /// without it the seed's history is unknown (see --allow-unrelated).
        #[arg(long)]
        seed_record: Option<PathBuf>,
        /// After a split brain: discard the seed's changes since the common point.
        #[arg(long, value_name = "COPY")]
        discard_changes_of: Option<DiscardOf>,
        /// Accept a seed that shares no generation with the source: the whole
        /// disk is compared by checksum.
        #[arg(long)]
        allow_unrelated: bool,
        /// Print the mode and the estimate; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Resync chunk size of the estimate (the target's resync_chunk_kib).
        #[arg(long, default_value_t = 64)]
        chunk_kib: u64,
        /// Read rate of the seed assumed by the time estimate, MiB/s.
        #[arg(long, default_value_t = 200)]
        read_mib_s: u64,
        #[arg(long)]
        json: bool,
    },
    /// Create the (all-zero) replica of a new disk.
    Create {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        disk: String,
        /// Size in bytes, a multiple of 512.
        #[arg(long)]
        size: u64,
        /// A thin replica: one monolithicSparse file holding only what was
        /// written (default: vmfs descriptor + preallocated flat extent).
        #[arg(long)]
        thin: bool,
    },
    /// Check the structure of a VMDK (what qemu-img check does not); exits non-zero on a problem.
    Check {
        file: PathBuf,
        /// Follow extent and parent paths that are absolute or leave the
        /// descriptor's directory (a delta exported beside a parent elsewhere).
        /// Refused by default, so an untrusted image cannot make the checker
        /// read files outside its own directory.
        #[arg(long)]
        allow_external_paths: bool,
    },
    /// Receive from the relay over QUIC and apply.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Apply a feed file of batches and barriers, printing each durable step (tests).
    #[command(hide = true)]
    ApplyFile {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        input: PathBuf,
        /// Create the disk with this size if it does not exist.
        #[arg(long)]
        create_size: Option<u64>,
        #[arg(long, default_value_t = 64 << 20)]
        checkpoint_bytes: u64,
        /// Create the disk with a thin replica.
        #[arg(long)]
        thin: bool,
    },
}

/// The copy whose changes a reprotect discards: only the seed (the source's
/// changes are what reprotect keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DiscardOf {
    Seed,
}

/// `blockferry-target reprotect`.
fn reprotect_cmd(req: &blockferry_target::reprotect::ReprotectRequest, json: bool) -> Result<()> {
    let r = blockferry_target::reprotect::reprotect(req, now_ms()).with_context(|| {
        format!(
            "reprotect of disk {} onto {} refused",
            req.disk,
            req.seed.display()
        )
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let verb = if r.dry_run {
        "would reprotect"
    } else {
        "reprotected"
    };
    println!(
        "{verb} disk {} onto the seed {} ({})",
        r.disk,
        r.seed.display(),
        r.kind
    );
    let mode = match r.mode.as_str() {
        "in-sync" => "in-sync: the records are in the same generation",
        "delta-by-generation" => {
            "delta-by-generation: the records prove the seed is behind the source"
        }
        "full" => "full: the seed shares no generation with the source, the whole disk is compared",
        _ => "checksum-compare: the seed may differ anywhere since the common point",
    };
    println!("mode: {mode}");
    println!(
        "sync: a checksum compare (a seed's record does not prove its content): only chunks whose hashes differ travel"
    );
    match &r.common {
        Some(c) => println!(
            "common point: generation g{} (wire {}) at seq {}{}",
            c.generation,
            c.number,
            c.seq,
            if r.discarded {
                "; the seed's changes since then are discarded"
            } else {
                ""
            }
        ),
        None => println!("common point: none"),
    }
    if let Some(p) = &r.retired {
        let verb = if r.dry_run {
            "would be retired to"
        } else {
            "retired to"
        };
        println!(
            "the promoted store of disk {} {verb} {} (renamed, nothing deleted)",
            r.disk,
            p.display()
        );
    }
    if r.already {
        println!("the store of this seed and source exists already: nothing to do");
    }
    println!(
        "the store holds generation {} through seq {} ({}): the source's next frame is seq {}",
        r.generation,
        r.applied_seq,
        r.lineage,
        r.applied_seq + 1
    );
    let e = &r.estimate;
    println!(
        "estimate: hash traffic {}..{} bytes (nothing..everything differs, {} KiB chunks); data at most {} bytes (what differs is unknown until compared); the target reads the seed once, {} bytes at {} MiB/s: about {:.0} s",
        e.hash_bytes_min,
        e.hash_bytes_max,
        e.chunk_size >> 10,
        e.data_bytes_max,
        e.read_bytes,
        e.read_rate_bytes_per_s >> 20,
        e.read_seconds
    );
    if r.dry_run {
        println!("dry run: nothing was changed");
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time in milliseconds.
fn fmt_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil-from-days (proleptic Gregorian), valid for all u64 days we meet.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A test failover of the store, in this process or through the service
/// that holds it.
fn test_failover(store: &Path, req: &TestFailoverRequest) -> Result<TestFailover> {
    let failed = || format!("test failover of disk {} failed", req.disk);
    match DiskStore::open(store, &req.disk, StoreOptions::default()) {
        Ok(s) => {
            let s = std::sync::Mutex::new(s);
            let stop = std::sync::atomic::AtomicBool::new(false);
            let rec = blockferry_target::failover::test_failover(&s, req, now_ms(), &stop)
                .with_context(failed)?;
            s.into_inner().unwrap_or_else(|p| p.into_inner()).close()?;
            Ok(rec)
        }
        Err(TargetError::Locked { .. }) => {
            let socket = socket_path(store);
            tracing::info!(socket = %socket.display(), "the store is served; asking the service for the test failover");
            request_test_failover(&socket, req).map_err(|e| match e {
                e @ ControlError::Connect { .. } => anyhow::Error::new(e).context(format!(
                    "the store {} is locked by another process",
                    store.display()
                )),
                e => anyhow::Error::new(e).context(failed()),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `f` on the store opened here, or, while `serve` holds it, asks the
/// service with `remote` through its control socket.
fn with_store<T>(
    store: &Path,
    disk: &str,
    what: &str,
    f: impl FnOnce(&std::sync::Mutex<DiskStore>) -> std::result::Result<T, TargetError>,
    remote: impl FnOnce(&Path) -> std::result::Result<T, ControlError>,
) -> Result<T> {
    let failed = || format!("{what} of disk {disk} failed");
    match DiskStore::open(store, disk, StoreOptions::default()) {
        Ok(s) => {
            let s = std::sync::Mutex::new(s);
            let r = f(&s);
            let closed = s.into_inner().unwrap_or_else(|p| p.into_inner()).close();
            let r = r.with_context(failed)?;
            closed?;
            Ok(r)
        }
        Err(TargetError::Locked { .. }) => {
            let socket = socket_path(store);
            tracing::info!(socket = %socket.display(), "the store is served; asking the service for the {what}");
            remote(&socket).map_err(|e| match e {
                e @ ControlError::Connect { .. } => anyhow::Error::new(e).context(format!(
                    "the store {} is locked by another process",
                    store.display()
                )),
                e => anyhow::Error::new(e).context(failed()),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// A failover of the store, in this process or through the service.
fn real_failover(store: &Path, req: &FailoverRequest) -> Result<Failover> {
    with_store(
        store,
        &req.disk,
        "failover",
        |s| {
            let stop = std::sync::atomic::AtomicBool::new(false);
            blockferry_target::failover::failover(s, req, now_ms(), &stop)
        },
        |socket| request_failover(socket, req),
    )
}

fn commit_failover(store: &Path, disk: &str) -> Result<Failover> {
    let req = CommitRequest {
        disk: disk.to_string(),
    };
    with_store(
        store,
        disk,
        "failover commit",
        |s| blockferry_target::failover::commit(s, now_ms()),
        |socket| request_commit(socket, &req),
    )
}

fn print_failover(store: &Path, rec: &Failover) {
    let method = match rec.method {
        Some(CopyMethod::Reflink) => "reflink clone",
        Some(CopyMethod::Export) => "export",
        None => "not made",
    };
    println!(
        "disk {} failed over to point {} (#{}, {method}) in {:.3} s",
        rec.disk,
        rec.point,
        rec.seq,
        rec.ready_secs.unwrap_or(0.0)
    );
    println!("writable disk: {}", rec.descriptor.display());
    if let Some(dev) = &rec.loop_device {
        println!("loop device: {}", dev.display());
    }
    println!(
        "replica promoted: generation {} ({}); frames of its former source are refused",
        rec.generation.unwrap_or(0),
        rec.lineage.as_deref().unwrap_or("")
    );
    if rec.state == FailoverState::FailedOver {
        println!(
            "to change the point, fail over again with another --point and --discard-writes; to make it final: blockferry-target failover --commit --store {} --disk {}",
            store.display(),
            rec.disk
        );
    }
}

/// The status line above the points: role and state of the disk.
fn status_line(st: &DrStatus) -> String {
    let role = st.role.as_deref().unwrap_or("replica");
    let since = st
        .since_ms
        .map_or(String::new(), |t| format!(" since {}", fmt_utc(t)));
    let point = st.point.map_or(String::new(), |p| format!(" point {p}"));
    match st.state {
        DrState::Protected => format!("disk {}: {role}, protected", st.disk),
        DrState::TestFailover => {
            format!(
                "disk {}: {role}, test failover of{point} running{since}",
                st.disk
            )
        }
        DrState::FailingOver => format!(
            "disk {}: {role}, failover to{point} unfinished (started{since}): run the failover again to finish it",
            st.disk
        ),
        DrState::FailedOver => format!(
            "disk {}: {role}, failed over to{point}{since}; not committed (the point can still change)",
            st.disk
        ),
        DrState::Committed => format!(
            "disk {}: {role}, failed over to{point}, committed{since}",
            st.disk
        ),
        DrState::Promoted => format!("disk {}: {role}, promoted (without a failover)", st.disk),
    }
}

/// A test failover as `--json` and `points --json` show it.
fn test_json(t: &TestFailover) -> serde_json::Value {
    serde_json::json!({
        "disk": t.disk,
        "point": t.point,
        "state": t.state.name(),
        "started": fmt_utc(t.started_ms),
        "started_ms": t.started_ms,
        "cleaned_up": t.cleaned_ms.map(fmt_utc),
        "method": t.method,
        "descriptor": t.descriptor,
        "flat": t.flat,
        "loop_device": t.loop_device,
        "ready_secs": t.ready_secs,
    })
}

async fn serve(cfg: blockferry_target::serve::ServeConfig) -> Result<()> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let handle = blockferry_target::serve::start(cfg, cancel.clone()).await?;
    // One line on stdout tells scripts (and tests) where the target listens
    // when the config asked for port 0.
    println!("listening quic={}", handle.listen_addr);
    blockferry_transport::notify::ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for SIGINT")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    blockferry_transport::notify::stopping();
    cancel.cancel();
    handle.serve.await.context("serve task failed")?;
    Ok(())
}

fn main() -> Result<()> {
    // Whatever a command creates (spool, store, records, exports, keys) holds
    // replicated data or secrets: private to the service's user.
    blockferry_durable::set_umask(0o077);
    let cli = Cli::parse();
    log::init("info", cli.log_format);
    match cli.cmd {
        Cmd::Points { store, disk, json } => {
            let points = list_points(&store, &disk)?;
            let status = dr_status(&store, &disk)?;
            let test = status.test_failover.as_ref();
            let tested = |id: u64| test.filter(|t| t.point == id);
            let failed_over = |id: u64| status.failover.as_ref().filter(|f| f.point == id);
            let label = |p: &blockferry_target::PointMeta| {
                if p.incomplete {
                    "incomplete"
                } else {
                    label_name(p.label)
                }
            };
            if json {
                let v: Vec<_> = points
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "id": p.id,
                            "time": fmt_utc(p.time_ms),
                            "time_ms": p.time_ms,
                            "label": label(p),
                            "consistency": label_name(p.label),
                            "incomplete": p.incomplete,
                            "generation": p.generation,
                            "seq": p.seq,
                            "size": p.segment_len,
                            "test_failover": tested(p.id).map(test_json),
                            "failover": failed_over(p.id).map(|f| f.summary()),
                        })
                    })
                    .collect();
                let out = serde_json::json!({
                    "disk": disk,
                    "role": status.role,
                    "state": status.state.name(),
                    "state_point": status.point,
                    "since": status.since_ms.map(fmt_utc),
                    "since_ms": status.since_ms,
                    "failover": status.failover.as_ref().map(|f| f.summary()),
                    "points": v,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("{}", status_line(&status));
                println!(
                    "{:>6}  {:<20}  {:<16}  {:>12}  FAILOVER",
                    "ID", "TIME", "LABEL", "SIZE"
                );
                for p in &points {
                    let mut t = tested(p.id).map_or(String::new(), |t| {
                        format!("test {} since {}", t.state.name(), fmt_utc(t.started_ms))
                    });
                    if failed_over(p.id).is_some() {
                        if !t.is_empty() {
                            t.push_str("; ");
                        }
                        t.push_str(status.state.name());
                    }
                    println!(
                        "{:>6}  {:<20}  {:<16}  {:>12}  {t}",
                        p.id,
                        fmt_utc(p.time_ms),
                        label(p),
                        p.segment_len
                    );
                }
            }
        }
        Cmd::Export {
            store,
            disk,
            point,
            format,
            out,
            parent,
            force,
        } => {
            let bar = std::io::stderr().is_terminal().then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b
            });
            let mut last_tenth = 0;
            let mut progress = |done: u64, total: u64| match &bar {
                Some(b) => {
                    b.set_length(total);
                    b.set_position(done);
                }
                None => {
                    let tenth = done * 10 / total.max(1);
                    if tenth > last_tenth {
                        last_tenth = tenth;
                        tracing::info!(done, total, "export {}%", tenth * 10);
                    }
                }
            };
            let failed = || format!("export of point {point} of disk {disk} failed");
            let files = match DiskStore::open(&store, &disk, StoreOptions::default()) {
                Ok(mut s) => {
                    s.usable_point(point, force)?;
                    let files = export_point(
                        &mut s,
                        point,
                        format,
                        &out,
                        parent.as_deref(),
                        &mut progress,
                    )
                    .with_context(failed)?;
                    s.close()?;
                    files
                }
                Err(TargetError::Locked { .. }) => {
                    // The service holds the store: ask it, through its socket.
                    let socket = socket_path(&store);
                    let abs = |p: &Path| {
                        std::path::absolute(p)
                            .with_context(|| format!("cannot resolve {}", p.display()))
                    };
                    let req = ExportRequest {
                        disk: disk.clone(),
                        point,
                        format,
                        out: abs(&out)?,
                        parent: parent.as_deref().map(abs).transpose()?,
                        force,
                    };
                    tracing::info!(socket = %socket.display(), "the store is served; asking the service to export");
                    match request_export(&socket, &req, &mut progress) {
                        Ok(files) => files,
                        Err(e @ ControlError::Connect { .. }) => {
                            return Err(anyhow::Error::new(e).context(format!(
                                "the store {} is locked by another process",
                                store.display()
                            )));
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context(failed())),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(b) = bar {
                b.finish();
            }
            for f in files {
                println!("{}", f.display());
            }
        }
        Cmd::Failover {
            store,
            disk,
            test,
            cleanup,
            commit,
            planned,
            discard_writes,
            point,
            out,
            attach,
            force,
            json,
        } => {
            if commit {
                let rec = commit_failover(&store, &disk)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rec.summary())?);
                } else {
                    println!(
                        "failover of disk {} to point {} committed: the point cannot change any more",
                        rec.disk, rec.point
                    );
                }
                return Ok(());
            }
            if !cleanup && !test {
                // A planned failover of a seed store (failback onto the
                // original disk) happens in place: the seed itself is the
                // writable disk, so there is nothing to copy to --out.
                let seed = blockferry_target::store::summary(&store, &disk)?
                    .is_some_and(|s| s.seed.is_some());
                if seed && planned && out.is_none() {
                    let done = failover_in_place(&store, &disk)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&done)?);
                    } else {
                        println!(
                            "disk {} failed over in place at its final point {}: {} ({}) is the writable disk; generation {} ({})",
                            done.promoted.disk,
                            done.point,
                            done.path.display(),
                            done.kind,
                            done.promoted.generation,
                            done.promoted.lineage
                        );
                    }
                    return Ok(());
                }
                let Some(out) = out else {
                    bail!(
                        "--out DIR is needed: the directory to write the disk to (only a planned failover of a seed store, the failback onto the original disk, happens in place without it)"
                    );
                };
                let out = std::path::absolute(&out)
                    .with_context(|| format!("cannot resolve {}", out.display()))?;
                let req = FailoverRequest {
                    disk: disk.clone(),
                    point,
                    out,
                    attach,
                    force,
                    planned,
                    discard_writes,
                };
                let rec = real_failover(&store, &req)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rec.summary())?);
                } else {
                    print_failover(&store, &rec);
                }
                return Ok(());
            }
            let rec = if cleanup {
                blockferry_target::failover::cleanup(&store, &disk, now_ms())?
            } else {
                let Some(out) = out else {
                    bail!("--out DIR is needed: the directory to write the disk to");
                };
                let out = std::path::absolute(&out)
                    .with_context(|| format!("cannot resolve {}", out.display()))?;
                let req = TestFailoverRequest {
                    disk: disk.clone(),
                    point,
                    out,
                    attach,
                    force,
                };
                test_failover(&store, &req)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&test_json(&rec))?);
            } else if cleanup {
                println!(
                    "test failover of disk {} (point {}) cleaned up",
                    rec.disk, rec.point
                );
            } else {
                println!("{}", rec.descriptor.display());
                if let Some(dev) = &rec.loop_device {
                    println!("{}", dev.display());
                }
            }
        }
        Cmd::Promote { store, disk, json } => {
            let p = match blockferry_target::promote::promote(&store, &disk) {
                Ok(p) => p,
                Err(e @ TargetError::Locked { .. }) => {
                    let socket = socket_path(&store);
                    if !socket.exists() {
                        return Err(anyhow::Error::new(e).context(format!(
                            "cannot promote disk {disk}: another process holds the store {}; stop it and run promote again",
                            store.display()
                        )));
                    }
                    // The service holds the store: it promotes between two applies.
                    let req = blockferry_target::control::PromoteRequest { disk: disk.clone() };
                    blockferry_target::control::request_promote(&socket, &req).with_context(
                        || {
                            format!(
                                "the service at {} could not promote disk {disk}",
                                socket.display()
                            )
                        },
                    )?
                }
                Err(e) => return Err(e).context(format!("promotion of disk {disk} failed")),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!(
                    "promoted disk {} to generation {} ({}): it is the source now; frames of its former source are refused",
                    p.disk, p.generation, p.lineage
                );
            }
        }
        Cmd::Reprotect {
            store,
            disk,
            seed,
            source_record,
            seed_record,
            discard_changes_of,
            allow_unrelated,
            dry_run,
            chunk_kib,
            read_mib_s,
            json,
        } => {
            let seed = std::path::absolute(&seed)
                .with_context(|| format!("cannot resolve {}", seed.display()))?;
            let req = blockferry_target::reprotect::ReprotectRequest {
                root: store,
                disk,
                seed,
                source_record,
                seed_record,
                discard_seed: discard_changes_of == Some(DiscardOf::Seed),
                allow_unrelated,
                dry_run,
                chunk_size: chunk_kib << 10,
                read_rate: read_mib_s << 20,
            };
            reprotect_cmd(&req, json)?;
        }
        Cmd::Create {
            store,
            disk,
            size,
            thin,
        } => {
            let opts = StoreOptions {
                thin,
                ..StoreOptions::default()
            };
            let s = DiskStore::create(&store, &disk, size, now_ms(), opts)?;
            println!("{}", s.replica_path().display());
            s.close()?;
        }
        Cmd::Check {
            file,
            allow_external_paths,
        } => {
            let report = blockferry_target::vmdk::check::check_with(&file, allow_external_paths)
                .with_context(|| format!("cannot check {}", file.display()))?;
            for p in &report.problems {
                println!("{}: {p}", file.display());
            }
            if !report.is_clean() {
                bail!(
                    "{}: {} problem(s) found",
                    file.display(),
                    report.problem_count
                );
            }
            println!(
                "{}: ok ({}, {} bytes, {} grains)",
                file.display(),
                report.create_type,
                report.capacity,
                report.grains
            );
        }
        Cmd::Serve { config } => {
            let cfg = blockferry_target::serve::ServeConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(serve(cfg))?;
        }
        Cmd::ApplyFile {
            store,
            disk,
            input,
            create_size,
            checkpoint_bytes,
            thin,
        } => {
            let opts = StoreOptions {
                checkpoint_bytes,
                thin,
                ..StoreOptions::default()
            };
            let bytes = std::fs::read(&input)
                .with_context(|| format!("cannot read feed {}", input.display()))?;
            let items =
                decode_all(&bytes).with_context(|| format!("bad feed {}", input.display()))?;
            let mut s = match DiskStore::open(&store, &disk, opts.clone()) {
                Ok(s) => s,
                Err(TargetError::NoDisk { .. }) if create_size.is_some() => {
                    DiskStore::create(&store, &disk, create_size.unwrap_or(0), now_ms(), opts)?
                }
                Err(e) => return Err(e.into()),
            };
            let mut out = std::io::stdout().lock();
            for item in &items {
                match item {
                    FeedItem::Batch(b) => {
                        let r = s.apply(b)?;
                        writeln!(out, "applied {} {:?}", b.seq, r)?;
                    }
                    FeedItem::Barrier(b) => match s.barrier(b, now_ms())? {
                        Some(p) => writeln!(out, "point {} {} {}", p.id, p.seq, b.seq)?,
                        None => writeln!(out, "barrier {} (point since removed)", b.seq)?,
                    },
                }
                out.flush()?;
            }
            s.close()?;
        }
    }
    Ok(())
}
