//! What a durable receiver of sequenced frames offers (the target's replica
//! store, or an in-memory model of one): apply batches, apply a barrier, and
//! report the last `(generation, seq)` that survives a crash. The simulation
//! drives any implementation through this trait, so the store that ships is
//! the store that is tested under loss, reordering and crashes.

use crate::frame::{Barrier, ExtentBatch};
use crate::ids::{Generation, Seq};

/// A receiver that makes sequenced frames durable, in the order of the
/// sequence invariant ([`crate::ids::Seq`]): each call returns once what it
/// accepted is durable, and after a crash [`DurableApply::durable`] reports
/// exactly what was accepted before it.
pub trait DurableApply {
    /// Why a frame was refused (a gap, a stale generation, a bad chunk, I/O).
    type Error: std::error::Error;

    /// Applies consecutive batches; a replayed batch is acknowledged again
    /// without being written. All-or-nothing: on error nothing was applied.
    fn apply_batches(&mut self, batches: &[ExtentBatch]) -> Result<(), Self::Error>;

    /// Applies a barrier (a recovery point), which takes its own sequence number.
    fn apply_barrier(&mut self, barrier: &Barrier) -> Result<(), Self::Error>;

    /// The last `(generation, seq)` made durable; `Seq::ZERO` when nothing was.
    fn durable(&self) -> (Generation, Seq);
}
