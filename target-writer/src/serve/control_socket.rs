//! The local control socket `<store>/control.sock` ([`crate::control`]): one
//! request line, progress lines, one answer; exports, test failovers and
//! failovers run on the blocking pool.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::control::{self, ExportRequest, ProgressThrottle, Reply, Request};
use crate::error::TargetError;
use crate::failover::{CommitRequest, FailoverRequest, TestFailoverRequest};

use super::{ServeError, TargetSink};

/// Binds the control socket: a socket file nobody answers on (a service
/// that died) is replaced; one that answers is another service of this store.
pub(super) fn bind_control(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ServeError::Control {
        path: path.to_path_buf(),
        source,
    };
    if path.symlink_metadata().is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::ControlBusy {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // Whoever can connect can write files as this service: its user only,
    // from the first moment. The socket is bound inside a private directory,
    // restricted, and only then moved to its place.
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.with_extension(format!("bind-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(err)?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(err)?;
    let private = dir.join("control.sock");
    let bound = UnixListener::bind(&private)
        .and_then(|l| {
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&private, path)?;
            Ok(l)
        })
        .map_err(err);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        warn!(path = %dir.display(), error = %e, "cannot remove the directory the control socket was bound in");
    }
    bound
}

/// Accepts control connections until `cancel`, then waits for the running
/// exports (which stop at their next step and remove their output).
pub(super) async fn control_loop(
    listener: UnixListener,
    sink: Arc<TargetSink>,
    cancel: CancellationToken,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    conns.spawn(control_conn(stream, sink.clone(), cancel.clone()));
                }
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(r) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = r {
                    warn!(error = %e, "control connection task failed");
                }
            }
        }
    }
    while conns.join_next().await.is_some() {}
}

/// The message of an error with its sources, for a client without our log.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

/// How long a control client has to send its request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One control connection: one request line, progress lines, one answer.
async fn control_conn(stream: UnixStream, sink: Arc<TargetSink>, cancel: CancellationToken) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd.take(control::MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    // A client that connects and says nothing does not hold a task forever.
    let read = tokio::time::timeout(REQUEST_TIMEOUT, rd.read_until(b'\n', &mut line));
    let read = tokio::select! {
        _ = cancel.cancelled() => return,
        r = read => r,
    };
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            debug!(error = %e, "control connection read failed");
            return;
        }
        Err(_) => {
            debug!("control client sent no request");
            return;
        }
    }
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    let req = match control::decode_request(line) {
        Ok(req) => req,
        Err(e) => {
            warn!(error = %e, "bad control request refused");
            let reply = Reply::Error(e.to_string());
            answer_and_close(rd.into_inner().into_inner(), wr, &reply, &cancel).await;
            return;
        }
    };
    let reply = match req {
        Request::Export(req) => {
            let span = tracing::info_span!("export", disk = %req.disk, point = req.point);
            run_export(req, &mut wr, sink, &cancel)
                .instrument(span)
                .await
        }
        Request::TestFailover(req) => {
            let span = tracing::info_span!("test_failover", disk = %req.disk);
            run_test_failover(req, sink, &cancel).instrument(span).await
        }
        Request::Failover(req) => {
            let span = tracing::info_span!("failover", disk = %req.disk);
            run_failover(req, sink, &cancel).instrument(span).await
        }
        Request::Commit(req) => {
            let span = tracing::info_span!("commit", disk = %req.disk);
            run_commit(req, sink).instrument(span).await
        }
        Request::Promote(req) => {
            info!(disk = %req.disk, "promotion requested on the control socket");
            let disk = req.disk.clone();
            match tokio::task::spawn_blocking(move || sink.promote_blocking(&req.disk)).await {
                Ok(Ok(p)) => Reply::Promoted(p),
                Ok(Err(e)) => {
                    let msg = error_chain(&e);
                    warn!(disk = %disk, error = %msg, "promotion failed");
                    Reply::Error(msg)
                }
                Err(e) => Reply::Error(format!("promotion task failed: {e}")),
            }
        }
    };
    answer_and_close(rd.into_inner().into_inner(), wr, &reply, &cancel).await;
}

/// Sends the last line and closes. A Unix stream closed with unread input
/// resets its peer, which then may never read the answer (to a request line
/// that was too long, say): half-close, and discard what the client still
/// sends (bounded) until it closes.
async fn answer_and_close(
    rd: tokio::net::unix::OwnedReadHalf,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
    cancel: &CancellationToken,
) {
    let sent = async {
        wr.write_all(&control::encode(reply)).await?;
        wr.shutdown().await
    };
    if let Err(e) = sent.await {
        debug!(error = %e, "control client gone before the answer");
        return;
    }
    let mut rest = rd.take(control::MAX_REQUEST as u64 * 16);
    let mut discard = tokio::io::sink();
    tokio::select! {
        _ = cancel.cancelled() => {}
        r = tokio::io::copy(&mut rest, &mut discard) => {
            if let Err(e) = r {
                debug!(error = %e, "control connection read failed");
            }
        }
    }
}

/// Runs one export on the blocking pool, forwarding its progress; returns
/// the answer: the files written or the error.
async fn run_export(
    req: ExportRequest,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    sink: Arc<TargetSink>,
    cancel: &CancellationToken,
) -> Reply {
    info!(format = ?req.format, out = %req.out.display(), "export requested on the control socket");
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Reply>(16);
    let job = {
        let (sink, stop, req) = (sink.clone(), stop.clone(), req.clone());
        tokio::task::spawn_blocking(move || {
            let mut throttle = ProgressThrottle::new();
            let mut progress = |done, total| {
                // Called between read steps, with no store lock held.
                if throttle.due(done, total, Instant::now())
                    && tx.blocking_send(Reply::Progress { done, total }).is_err()
                {
                    stop.store(true, Ordering::Relaxed);
                }
            };
            sink.export_blocking(&req, &stop, &mut progress)
        })
    };
    let mut cancelled = false;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => {
                    if wr.write_all(&control::encode(&m)).await.is_err() {
                        // The client went away: the export stops at its next step.
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                None => break,
            },
            _ = cancel.cancelled(), if !cancelled => {
                cancelled = true;
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
    match job.await {
        Ok(Ok(files)) => {
            info!(files = files.len(), "export done");
            Reply::Done { files }
        }
        Ok(Err(e)) => {
            let msg = error_chain(&e);
            warn!(error = %msg, "export failed");
            Reply::Error(msg)
        }
        Err(e) => {
            warn!(error = %e, "export task failed");
            Reply::Error(format!("export task failed: {e}"))
        }
    }
}

/// Makes a test failover on the blocking pool (the copy reads the store in
/// locked steps, so applies go on); returns the record or the error.
async fn run_test_failover(
    req: TestFailoverRequest,
    sink: Arc<TargetSink>,
    cancel: &CancellationToken,
) -> Reply {
    info!(point = ?req.point, out = %req.out.display(), "test failover requested on the control socket");
    let stop = Arc::new(AtomicBool::new(false));
    let mut job = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(disk) = req.disk.parse::<blockferry_proto::DiskId>() else {
                return Err(crate::error::TargetError::NoDisk {
                    disk: req.disk.clone(),
                    path: sink.cfg.store.clone(),
                });
            };
            let store = sink.store(disk, None)?;
            crate::failover::test_failover(&store, &req, super::now_ms(), &stop)
        })
    };
    let r = tokio::select! {
        r = &mut job => r,
        _ = cancel.cancelled() => {
            stop.store(true, Ordering::Relaxed);
            job.await
        }
    };
    match r {
        Ok(Ok(rec)) => Reply::TestFailover(rec),
        Ok(Err(e)) => {
            let msg = error_chain(&e);
            warn!(error = %msg, "test failover failed");
            Reply::Error(msg)
        }
        Err(e) => Reply::Error(format!("test failover task failed: {e}")),
    }
}

/// The served store of `disk` (a disk id), opened if no relay wrote to it yet.
fn served_store(
    sink: &TargetSink,
    disk: &str,
) -> Result<
    (
        blockferry_proto::DiskId,
        super::Shared<crate::store::DiskStore>,
    ),
    TargetError,
> {
    let Ok(id) = disk.parse::<blockferry_proto::DiskId>() else {
        return Err(TargetError::NoDisk {
            disk: disk.to_string(),
            path: sink.cfg.store.clone(),
        });
    };
    Ok((id, sink.store(id, None)?))
}

/// Whether a failed failover may have left the store in memory unlike the
/// store on disk (a failed write): then it is reopened before the next use.
fn store_may_differ(e: &TargetError) -> bool {
    matches!(
        e,
        TargetError::Io { .. }
            | TargetError::NoSpace { .. }
            | TargetError::Corrupt { .. }
            | TargetError::Poisoned { .. }
            | TargetError::Generation { .. }
            | TargetError::EncodeState { .. }
    )
}

/// Fails a served disk over on the blocking pool (the copy reads the store
/// in locked steps, so applies go on until the promotion refuses them);
/// returns the record or the error.
async fn run_failover(
    req: FailoverRequest,
    sink: Arc<TargetSink>,
    cancel: &CancellationToken,
) -> Reply {
    info!(point = ?req.point, out = %req.out.display(), planned = req.planned, "failover requested on the control socket");
    let stop = Arc::new(AtomicBool::new(false));
    let mut job = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let (id, store) = served_store(&sink, &req.disk)?;
            let r = crate::failover::failover(&store, &req, super::now_ms(), &stop);
            match &r {
                // The resync trees were built for a replica that now takes no frames.
                Ok(_) => {
                    super::lock(&sink.trees).remove(&id);
                }
                Err(e) if store_may_differ(e) => sink.drop_store(id),
                Err(_) => {}
            }
            r
        })
    };
    let r = tokio::select! {
        r = &mut job => r,
        _ = cancel.cancelled() => {
            stop.store(true, Ordering::Relaxed);
            job.await
        }
    };
    match r {
        Ok(Ok(rec)) => Reply::Failover(rec),
        Ok(Err(e)) => {
            let msg = error_chain(&e);
            warn!(error = %msg, "failover failed");
            Reply::Error(msg)
        }
        Err(e) => Reply::Error(format!("failover task failed: {e}")),
    }
}

/// Commits a served disk's failover.
async fn run_commit(req: CommitRequest, sink: Arc<TargetSink>) -> Reply {
    info!("failover commit requested on the control socket");
    let job = tokio::task::spawn_blocking(move || {
        let (_, store) = served_store(&sink, &req.disk)?;
        crate::failover::commit(&store, super::now_ms())
    });
    match job.await {
        Ok(Ok(rec)) => Reply::Failover(rec),
        Ok(Err(e)) => {
            let msg = error_chain(&e);
            warn!(error = %msg, "failover commit failed");
            Reply::Error(msg)
        }
        Err(e) => Reply::Error(format!("commit task failed: {e}")),
    }
}
