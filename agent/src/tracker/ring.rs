//! The ring buffer of change events, registered with tokio's reactor so the
//! tracker can await it. The tracker's only `unsafe` is here.

use std::os::fd::AsRawFd;

use aya::maps::{MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::TrackerError;

/// The ring buffer, plain until first awaited (registration needs a runtime;
/// loading the tracker does not).
pub(super) enum Ring {
    Plain(RingBuf<MapData>),
    Async(AsyncFd<RingBuf<MapData>>),
    /// Registration failed and the map could not be recovered.
    Gone,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ring::Plain(_) => "Ring::Plain",
            Ring::Async(_) => "Ring::Async",
            Ring::Gone => "Ring::Gone",
        })
    }
}

impl Ring {
    pub(super) fn get_mut(&mut self) -> Option<&mut RingBuf<MapData>> {
        match self {
            Ring::Plain(r) => Some(r),
            Ring::Async(a) => Some(a.get_mut()),
            Ring::Gone => None,
        }
    }

    /// Waits until the kernel signals new records or the poll interval passes
    /// (the kernel wakes user space only when the ring fills up; see
    /// `BF_WAKEUP_DIVISOR`). Must run inside a tokio runtime.
    pub(super) async fn readable(
        &mut self,
        tick: &mut tokio::time::Interval,
    ) -> Result<(), TrackerError> {
        if matches!(self, Ring::Plain(_)) {
            let Ring::Plain(ring) = std::mem::replace(self, Ring::Gone) else {
                return Ok(());
            };
            let fd = ring.as_raw_fd();
            // SAFETY: `fd` is the ring buffer map's descriptor, owned by `ring`,
            // which the AsyncFd owns from here on: the descriptor stays open and
            // the same for the AsyncFd's whole life, and `get_mut` callers only
            // consume records, never replace the map.
            match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
                Ok(afd) => *self = Ring::Async(afd),
                Err(e) => {
                    let (ring, source) = e.into_parts();
                    *self = Ring::Plain(ring);
                    return Err(TrackerError::Io {
                        what: format!(
                            "registering the ring buffer (fd {fd}) with the tokio reactor"
                        ),
                        source,
                    });
                }
            }
        }
        let Ring::Async(afd) = self else {
            return Err(TrackerError::Io {
                what: "waiting on the ring buffer".into(),
                source: std::io::Error::other("the ring buffer is gone"),
            });
        };
        tokio::select! {
            guard = afd.readable_mut() => {
                let mut guard = guard.map_err(|source| TrackerError::Io {
                    what: "waiting on the ring buffer".into(),
                    source,
                })?;
                // Cleared before the caller drains: a wakeup after this point
                // ends the next wait.
                guard.clear_ready();
            }
            _ = tick.tick() => {}
        }
        Ok(())
    }
}
