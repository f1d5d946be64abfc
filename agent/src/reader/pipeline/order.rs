//! The hash/compress workers and the sequencer that puts their chunks back in
//! submission order before they leave the reader.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use super::super::ReaderEvent;
use super::super::encode::Encoder;
use super::{Done, ToSequencer, Work};

pub(super) fn worker(rx: &Mutex<Receiver<Work>>, tx: &Sender<ToSequencer>, encoder: &mut Encoder) {
    loop {
        let work = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(w) = work else { return };
        let chunk = encoder.encode(w.offset, w.lease.as_slice(w.len));
        let done = Done::Chunk {
            range: w.range,
            last: w.last,
            chunk,
            _lease: w.lease,
        };
        if tx.send(ToSequencer::Item(w.seq, done)).is_err() {
            return;
        }
    }
}

pub(super) fn sequencer(
    rx: Receiver<ToSequencer>,
    out: tokio::sync::mpsc::Sender<ReaderEvent>,
    cancelled: &AtomicBool,
) {
    let mut next = 0u64;
    let mut held: BTreeMap<u64, Done> = BTreeMap::new();
    let mut range_ok = true;
    let mut listening = true;
    // Runs until every sender (io_uring thread and workers) is gone, so that
    // all leases come home even after the consumer went away.
    for msg in rx.iter() {
        match msg {
            ToSequencer::Fatal(e) => {
                if listening && out.blocking_send(ReaderEvent::Fatal(e)).is_err() {
                    tracing::debug!("reader events dropped before a fatal error");
                }
                listening = false;
                cancelled.store(true, Ordering::Release);
                held.clear();
            }
            ToSequencer::Item(seq, done) => {
                if !listening {
                    continue;
                }
                held.insert(seq, done);
                while let Some(done) = held.remove(&next) {
                    next += 1;
                    if !emit(done, &out, &mut range_ok) {
                        // Consumer gone: stop reading, release everything.
                        listening = false;
                        cancelled.store(true, Ordering::Release);
                        held.clear();
                        break;
                    }
                }
            }
        }
    }
}

/// Sends the events of one item; false when the consumer is gone.
fn emit(done: Done, out: &tokio::sync::mpsc::Sender<ReaderEvent>, range_ok: &mut bool) -> bool {
    let (range, last, event, lease) = match done {
        Done::Chunk {
            range,
            last,
            chunk,
            _lease,
        } => (
            range,
            last,
            ReaderEvent::Chunk { range, chunk },
            Some(_lease),
        ),
        Done::Failed {
            range,
            last,
            offset,
            error,
        } => {
            *range_ok = false;
            let event = ReaderEvent::ChunkFailed {
                range,
                offset,
                error,
            };
            (range, last, event, None)
        }
        Done::EmptyRange { range } => {
            let event = ReaderEvent::RangeDone { range, ok: true };
            (range, false, event, None)
        }
    };
    if out.blocking_send(event).is_err() {
        return false;
    }
    // The buffer goes back only now that its chunk has left.
    drop(lease);
    if last {
        let ok = std::mem::replace(range_ok, true);
        if out
            .blocking_send(ReaderEvent::RangeDone { range, ok })
            .is_err()
        {
            return false;
        }
    }
    true
}
