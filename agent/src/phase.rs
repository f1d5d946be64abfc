//! The sans-IO phase logic of one protected disk: when the initial sync runs
//! and how far it is durable, when a checksum resync is wanted and when it may
//! start, what a resize or lost tracking means, and when recovery points may be
//! cut. No I/O, no clock, no tasks: the service feeds it what happened
//! (`handle_*`, with the time where it matters) and carries out what it asks
//! (`poll_*` and the returned actions), as [`crate::tracker::TrackerCore`] does
//! for the kernel events. Every transition is tested here in memory.
//!
//! Phases (persisted in [`DiskState::phase`]):
//! - **initial sync**: the whole disk is read once, in order, in pieces of
//!   [`SYNC_PIECE`]; the end of the durable prefix is remembered, so a restart
//!   continues where it stopped;
//! - **resync**: after an unclean stop, lost tracking, a shrunk disk or a
//!   stream that cannot resume, the disk is compared by checksum with the
//!   target; it replaces whatever initial sync was left;
//! - **continuous**: tracked writes are read and shipped as they complete.
//!
//! Beside the phase, a disk may be **fenced** ([`DiskState::fenced`],
//! persisted): the peer holds a newer generation because the replica was
//! promoted. A fenced disk reads and ships nothing, starts no resync and
//! cuts no point; the tracker keeps its dirty set, so nothing is lost. It
//! stays fenced across restarts until the disk is protected again.
//!
//! A disk **handed off** ([`DiskState::handed_off`], persisted by
//! `blockferry-agent handoff`, a planned failover) is halted the same way:
//! its replica holds everything and takes over. A refusal of the stream is
//! then expected, and is no fence.
//!
//! A disk **reprotected** from a promoted copy's record
//! ([`DiskState::reprotected`]) starts with a checksum resync; its replica
//! (the target's seed) already holds the record's sequence, so nothing is
//! read or compared until the peer confirmed a durable sequence at or after
//! it: the stream's numbering follows the peer's, and a sequence at or below
//! the record's would be taken for one the replica already holds.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::Path;

use blockferry_proto::{Generation, Seq};

use crate::state::{DiskState, Fence, HandOff, SyncPhase};

/// Initial sync reads the disk in pieces of this size.
pub const SYNC_PIECE: u64 = 16 << 20;

/// Why a checksum resync is wanted; logged when it starts.
pub type Reason = &'static str;

/// What the service must do for a disk whose size changed while it was
/// protected, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resize {
    /// The disk grew: re-read the device size, tell the relay the new size
    /// (before any chunk past the old end), then mark `grown` dirty: the old
    /// range stays tracked, the new one is shipped whole.
    Grew { old: u64, grown: Range<u64> },
    /// The disk shrank: the replica keeps its size (a replica never shrinks);
    /// the disk is resynced by checksum, and `message` tells the user what to do.
    Shrank { message: String },
}

/// How the initial sync moved at a [`DiskPhase::handle_durable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncAdvance {
    /// No initial sync runs.
    Idle,
    /// Everything below `done` is durable at the relay.
    Progress { done: u64 },
    /// The initial sync has just completed: the disk is now continuous.
    Complete,
}

/// The phase of one disk and the bookkeeping its transitions need.
#[derive(Debug, Clone)]
pub struct DiskPhase {
    state: DiskState,
    /// Initial sync: next offset to read, `None` when no initial sync reads.
    sync_next: Option<u64>,
    /// End offsets of the initial sync pieces read so far, in order, each with
    /// the sequence that makes it durable once it is shipped.
    sync_shipped: VecDeque<(u64, Option<Seq>)>,
    resync_wanted: Option<Reason>,
    resync_running: bool,
    durable: Seq,
    /// A reprotected disk's peer answered at or after the record's sequence.
    floor_confirmed: bool,
}

/// The peer of a reprotected disk answered below the record's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the replica of this reprotected disk holds seq {peer}, before the promoted record's seq {record}: its target store is not the seed made from this record; run `blockferry-target reprotect` with this record on the target, then restart the agent"
)]
pub struct FloorError {
    pub peer: Seq,
    pub record: Seq,
}

impl DiskPhase {
    /// The phase of a disk at the start of the service. `prev` is what the
    /// agent state remembers of it (`None` for a new disk); `size` is the
    /// device's size now; `was_clean` whether the last stop was clean;
    /// `continuous` whether the kernel tracked the disk while the agent was
    /// down. Returns the phase and the range to mark dirty because the disk
    /// grew while the agent was down (the replica grows at the first Hello,
    /// which carries the new size).
    pub fn start(
        prev: Option<DiskState>,
        path: &Path,
        size: u64,
        was_clean: bool,
        continuous: bool,
    ) -> (DiskPhase, Option<Range<u64>>) {
        let known = prev.is_some();
        let mut state = prev.unwrap_or_else(|| DiskState::new(path.to_owned(), size));
        let mut resync_wanted = None;
        if known && !was_clean {
            resync_wanted = Some("the last stop was not clean");
        } else if known && !continuous {
            resync_wanted = Some("kernel tracking was not continuous while the agent was down");
        }
        let mut grown = None;
        if state.size < size {
            grown = Some(state.size..size);
            state.size = size;
        } else if state.size != size {
            state.size = size;
            resync_wanted = Some("the disk size changed");
        }
        state.path = path.to_owned();
        let sync_next = match state.phase {
            SyncPhase::InitialSync { next_offset } if resync_wanted.is_none() => {
                Some(next_offset.min(size))
            }
            _ => None,
        };
        if resync_wanted.is_some() || matches!(state.phase, SyncPhase::Resync) {
            resync_wanted.get_or_insert("a resync was under way");
            state.phase = SyncPhase::Resync;
        }
        let phase = DiskPhase {
            state,
            sync_next,
            sync_shipped: VecDeque::new(),
            resync_wanted,
            resync_running: false,
            durable: Seq::ZERO,
            floor_confirmed: false,
        };
        (phase, grown)
    }

    /// What is persisted of the disk.
    pub fn state(&self) -> &DiskState {
        &self.state
    }

    /// The size of the disk as replicated.
    pub fn size(&self) -> u64 {
        self.state.size
    }

    pub fn generation(&self) -> Generation {
        Generation(self.state.generation)
    }

    /// Why a resync is wanted and not yet started.
    pub fn resync_wanted(&self) -> Option<Reason> {
        self.resync_wanted
    }

    /// A resync is wanted or running: the disk is not in a state where a clean
    /// stop can leave it.
    pub fn resync_pending(&self) -> bool {
        self.resync_running || self.resync_wanted.is_some()
    }

    /// The kernel lost events of the disk: compare it by checksum.
    pub fn handle_tracking_lost(&mut self) {
        self.resync_wanted = Some("the tracker lost events");
    }

    /// The tracker sees the disk at `size` bytes now.
    pub fn handle_resize(&mut self, path: &Path, size: u64) -> Option<Resize> {
        let old = self.state.size;
        if size > old {
            self.state.size = size;
            Some(Resize::Grew {
                old,
                grown: old..size,
            })
        } else if size != old {
            // The replica keeps its size: what lies past it is not shipped
            // until the disk is protected again.
            self.resync_wanted = Some("the disk changed size");
            Some(Resize::Shrank {
                message: format!(
                    "{} shrank from {old} to {size} bytes; the replica keeps its {old} bytes (a replica never shrinks: grow the disk back, or protect it as a new disk)",
                    path.display(),
                ),
            })
        } else {
            None
        }
    }

    /// The fence of this disk, if its replica was promoted.
    pub fn fence(&self) -> Option<Fence> {
        self.state.fenced
    }

    /// The hand-off of this disk, if it was failed over in a planned way.
    pub fn handed_off(&self) -> Option<HandOff> {
        self.state.handed_off
    }

    /// Fenced or handed off: nothing is read, shipped, compared or cut.
    pub fn halted(&self) -> bool {
        !self.state.is_protected()
    }

    /// The planned failover completed with the replica holding everything
    /// through `final_seq` of `generation`: the disk is halted from now on.
    pub fn handle_handed_off(&mut self, final_seq: Seq, generation: Generation, now_unix_s: u64) {
        self.state.handed_off = Some(HandOff {
            final_seq: final_seq.0,
            generation: generation.0,
            since: now_unix_s,
        });
        self.sync_next = None;
        self.sync_shipped.clear();
        self.resync_wanted = None;
    }

    /// The resync after a reprotect has not completed yet.
    pub fn reprotecting(&self) -> bool {
        self.state.reprotected.is_some()
    }

    /// Waiting for the peer of a reprotected disk to confirm the sequence the
    /// record holds: nothing is read or compared until then.
    fn awaiting_floor(&self) -> bool {
        self.state.reprotected.is_some() && !self.floor_confirmed
    }

    /// The peer is up and holds `peer_durable`. For a reprotected disk this
    /// must be at or after the record's sequence (the seed holds it); an
    /// earlier one is refused: nothing is shipped, and the error says what
    /// to do.
    pub fn handle_peer_durable(
        &mut self,
        connected: bool,
        peer_durable: Seq,
    ) -> Result<(), FloorError> {
        let Some(r) = self.state.reprotected else {
            return Ok(());
        };
        if self.floor_confirmed || !connected {
            return Ok(());
        }
        if peer_durable < Seq(r.seq) {
            return Err(FloorError {
                peer: peer_durable,
                record: Seq(r.seq),
            });
        }
        self.floor_confirmed = true;
        Ok(())
    }

    /// The peer refused our stream as stale: it holds generation `by`, newer
    /// than ours, so the replica was promoted. Returns the fence if it is new
    /// (to log and persist once); nothing is shipped from now on.
    pub fn handle_fenced(&mut self, by: Generation, now_unix_s: u64) -> Option<Fence> {
        // A handed-off disk's replica was meant to move on.
        if self.halted() {
            return None;
        }
        let fence = Fence {
            by_generation: by.0,
            since: now_unix_s,
        };
        self.state.fenced = Some(fence);
        self.sync_next = None;
        self.sync_shipped.clear();
        self.resync_wanted = None;
        Some(fence)
    }

    /// The peer cannot resume the stream where it stopped and asks for a
    /// checksum resync. Unless one is already wanted or running, a resync is
    /// wanted and a new generation begins: returns it, for the channel to start.
    /// A fenced disk starts nothing.
    pub fn handle_peer_resync(&mut self) -> Option<Generation> {
        if self.resync_pending() || self.halted() {
            return None;
        }
        self.resync_wanted = Some("the stream cannot resume where it stopped");
        self.state.generation += 1;
        Some(self.generation())
    }

    /// Everything through `durable` is durable at the relay: moves the durable
    /// prefix of the initial sync forward, and completes it at the end of the disk.
    pub fn handle_durable(&mut self, durable: Seq) -> SyncAdvance {
        self.durable = durable;
        while let Some(&(end, Some(seq))) = self.sync_shipped.front() {
            if seq > self.durable {
                break;
            }
            self.sync_shipped.pop_front();
            self.state.phase = SyncPhase::InitialSync { next_offset: end };
        }
        if self.sync_next == Some(self.state.size) && self.sync_shipped.is_empty() {
            self.sync_next = None;
            self.state.phase = SyncPhase::Continuous;
            return SyncAdvance::Complete;
        }
        match self.state.phase {
            SyncPhase::InitialSync { next_offset } if self.sync_next.is_some() => {
                SyncAdvance::Progress { done: next_offset }
            }
            _ => SyncAdvance::Idle,
        }
    }

    /// Starts the wanted resync if the relay is `connected`: returns why, and
    /// the service then takes the dirty set (the comparison covers it) and runs
    /// the comparison in this disk's generation. The initial sync, if any, is
    /// over: everything is compared.
    pub fn poll_resync_start(&mut self, connected: bool) -> Option<Reason> {
        if self.resync_running || !connected || self.halted() || self.awaiting_floor() {
            return None;
        }
        let why = self.resync_wanted.take()?;
        self.resync_running = true;
        self.state.phase = SyncPhase::Resync;
        self.sync_next = None;
        self.sync_shipped.clear();
        Some(why)
    }

    /// The comparison finished at `now_unix_s`. On success the service marks
    /// the differing ranges dirty and the disk is continuous; on failure the
    /// resync is wanted again.
    pub fn handle_resync_done(&mut self, ok: bool, now_unix_s: u64) {
        self.resync_running = false;
        if ok {
            self.state.last_resync = Some(now_unix_s);
            self.state.phase = SyncPhase::Continuous;
            self.state.reprotected = None;
        } else {
            self.resync_wanted = Some("the previous attempt failed");
        }
    }

    /// Whether tracked writes may be read now: not while a comparison runs,
    /// whose result covers them.
    pub fn may_read_dirty(&self) -> bool {
        !self.resync_running && !self.halted() && !self.awaiting_floor()
    }

    /// The next piece of the initial sync to read, if any, while fewer than
    /// `window` bytes are in reads (`in_reads`). The piece counts as read from
    /// here on: report it with [`Self::handle_sync_shipped`].
    pub fn poll_sync_read(&mut self, in_reads: u64, window: u64) -> Option<Range<u64>> {
        let next = self.sync_next?;
        if self.halted() || next >= self.state.size || in_reads >= window {
            return None;
        }
        let end = (next + SYNC_PIECE).min(self.state.size);
        self.sync_shipped.push_back((end, None));
        self.sync_next = Some(end);
        Some(next..end)
    }

    /// The sync piece ending at `end` was pushed in frames up to `last_seq`. A
    /// failed read counts too: its range is dirty and tracked now, and ships
    /// as a tracked write.
    pub fn handle_sync_shipped(&mut self, end: u64, last_seq: Seq) {
        if let Some(entry) = self
            .sync_shipped
            .iter_mut()
            .find(|(e, s)| *e == end && s.is_none())
        {
            entry.1 = Some(last_seq);
        }
    }

    /// A clean stop: no more initial sync reads; the sync resumes at the next start.
    pub fn stop_initial_sync(&mut self) {
        self.sync_next = None;
    }

    /// Whether the shipper may ask for recovery points: only when the replica
    /// is complete. During an initial sync or a resync a point could not be
    /// used and would only cost the target undo data.
    pub fn points_allowed(&self) -> bool {
        self.sync_next.is_none()
            && !self.halted()
            && self.sync_shipped.is_empty()
            && !self.resync_pending()
            && matches!(self.state.phase, SyncPhase::Continuous)
    }

    /// Percent of the initial sync durable, while it runs.
    pub fn sync_percent(&self) -> Option<f64> {
        match self.state.phase {
            SyncPhase::InitialSync { next_offset } if self.state.size > 0 => {
                Some(next_offset as f64 * 100.0 / self.state.size as f64)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn known(size: u64, phase: SyncPhase) -> DiskState {
        DiskState {
            generation: 4,
            phase,
            ..DiskState::new("/dev/old".into(), size)
        }
    }

    fn fresh(size: u64) -> DiskPhase {
        DiskPhase::start(None, Path::new("/dev/vdb"), size, true, true).0
    }

    /// Reads every sync piece, reports it shipped at `seq`, and makes it durable.
    fn sync_all(p: &mut DiskPhase, seq: Seq) -> SyncAdvance {
        while let Some(r) = p.poll_sync_read(0, u64::MAX) {
            p.handle_sync_shipped(r.end, seq);
        }
        p.handle_durable(seq)
    }

    #[test]
    fn a_new_disk_starts_an_initial_sync_from_zero_in_generation_one() {
        let (p, grown) = DiskPhase::start(None, Path::new("/dev/vdb"), 40 * MIB, false, false);
        assert_eq!(grown, None);
        assert_eq!(p.state().phase, SyncPhase::InitialSync { next_offset: 0 });
        assert_eq!(p.generation(), Generation(1));
        assert_eq!(p.resync_wanted(), None);
        assert!(!p.points_allowed());
    }

    #[test]
    fn a_clean_restart_continues_the_initial_sync_where_it_was_durable() {
        let prev = known(
            64 * MIB,
            SyncPhase::InitialSync {
                next_offset: 32 * MIB,
            },
        );
        let (mut p, _) = DiskPhase::start(Some(prev), Path::new("/dev/vdb"), 64 * MIB, true, true);
        assert_eq!(p.resync_wanted(), None);
        assert_eq!(p.poll_sync_read(0, u64::MAX), Some(32 * MIB..48 * MIB));
        assert_eq!(p.state().path, Path::new("/dev/vdb"));
    }

    #[test]
    fn an_unclean_stop_resyncs_a_known_disk_instead_of_continuing_its_sync() {
        let prev = known(
            64 * MIB,
            SyncPhase::InitialSync {
                next_offset: 32 * MIB,
            },
        );
        let (mut p, _) = DiskPhase::start(Some(prev), Path::new("/d"), 64 * MIB, false, true);
        assert_eq!(p.resync_wanted(), Some("the last stop was not clean"));
        assert_eq!(p.state().phase, SyncPhase::Resync);
        assert_eq!(p.poll_sync_read(0, u64::MAX), None);
    }

    #[test]
    fn tracking_lost_while_down_resyncs_a_known_continuous_disk() {
        let (p, _) = DiskPhase::start(
            Some(known(MIB, SyncPhase::Continuous)),
            Path::new("/d"),
            MIB,
            true,
            false,
        );
        assert!(p.resync_wanted().is_some());
        assert_eq!(p.state().phase, SyncPhase::Resync);
    }

    #[test]
    fn a_resync_under_way_at_the_stop_is_started_again() {
        let (p, _) = DiskPhase::start(
            Some(known(MIB, SyncPhase::Resync)),
            Path::new("/d"),
            MIB,
            true,
            true,
        );
        assert_eq!(p.resync_wanted(), Some("a resync was under way"));
    }

    #[test]
    fn a_disk_grown_while_down_ships_the_new_range_without_a_resync() {
        let (p, grown) = DiskPhase::start(
            Some(known(MIB, SyncPhase::Continuous)),
            Path::new("/d"),
            3 * MIB,
            true,
            true,
        );
        assert_eq!(grown, Some(MIB..3 * MIB));
        assert_eq!(p.size(), 3 * MIB);
        assert_eq!(p.resync_wanted(), None);
        assert!(p.points_allowed());
    }

    #[test]
    fn a_disk_shrunk_while_down_is_resynced() {
        let (p, grown) = DiskPhase::start(
            Some(known(3 * MIB, SyncPhase::Continuous)),
            Path::new("/d"),
            MIB,
            true,
            true,
        );
        assert_eq!(grown, None);
        assert_eq!(p.size(), MIB);
        assert_eq!(p.resync_wanted(), Some("the disk size changed"));
    }

    #[test]
    fn initial_sync_reads_pieces_in_order_within_the_window() {
        let mut p = fresh(40 * MIB);
        assert_eq!(p.poll_sync_read(0, 32 * MIB), Some(0..16 * MIB));
        assert_eq!(p.poll_sync_read(64 * MIB, 32 * MIB), None);
        assert_eq!(
            p.poll_sync_read(16 * MIB, 32 * MIB),
            Some(16 * MIB..32 * MIB)
        );
        assert_eq!(p.poll_sync_read(0, 32 * MIB), Some(32 * MIB..40 * MIB));
        assert_eq!(p.poll_sync_read(0, 32 * MIB), None);
    }

    #[test]
    fn initial_sync_progress_is_the_durable_prefix_only() {
        let mut p = fresh(48 * MIB);
        let a = p.poll_sync_read(0, u64::MAX).unwrap();
        let b = p.poll_sync_read(0, u64::MAX).unwrap();
        // The second piece ships first: nothing is durable until the first is.
        p.handle_sync_shipped(b.end, Seq(5));
        assert_eq!(p.handle_durable(Seq(5)), SyncAdvance::Progress { done: 0 });
        p.handle_sync_shipped(a.end, Seq(7));
        assert_eq!(p.handle_durable(Seq(6)), SyncAdvance::Progress { done: 0 });
        assert_eq!(
            p.handle_durable(Seq(7)),
            SyncAdvance::Progress { done: 32 * MIB }
        );
        assert_eq!(
            p.state().phase,
            SyncPhase::InitialSync {
                next_offset: 32 * MIB
            }
        );
        assert_eq!(p.sync_percent(), Some(200.0 / 3.0));
    }

    #[test]
    fn initial_sync_completes_only_when_the_last_piece_is_durable() {
        let mut p = fresh(20 * MIB);
        while let Some(r) = p.poll_sync_read(0, u64::MAX) {
            p.handle_sync_shipped(r.end, Seq(3));
        }
        assert_eq!(p.handle_durable(Seq(2)), SyncAdvance::Progress { done: 0 });
        assert!(!p.points_allowed());
        assert_eq!(p.handle_durable(Seq(3)), SyncAdvance::Complete);
        assert_eq!(p.state().phase, SyncPhase::Continuous);
        assert!(p.points_allowed());
        assert_eq!(p.handle_durable(Seq(3)), SyncAdvance::Idle);
    }

    #[test]
    fn an_empty_disk_completes_its_initial_sync_at_once() {
        let mut p = fresh(0);
        assert_eq!(p.poll_sync_read(0, u64::MAX), None);
        assert_eq!(p.handle_durable(Seq::ZERO), SyncAdvance::Complete);
    }

    #[test]
    fn a_stop_ends_the_sync_reads_but_keeps_the_durable_offset() {
        let mut p = fresh(64 * MIB);
        let r = p.poll_sync_read(0, u64::MAX).unwrap();
        p.handle_sync_shipped(r.end, Seq(1));
        p.stop_initial_sync();
        assert_eq!(p.poll_sync_read(0, u64::MAX), None);
        assert_eq!(p.handle_durable(Seq(1)), SyncAdvance::Idle);
        assert_eq!(
            p.state().phase,
            SyncPhase::InitialSync {
                next_offset: 16 * MIB
            }
        );
    }

    #[test]
    fn a_resync_waits_for_the_relay_and_replaces_the_initial_sync() {
        let mut p = fresh(64 * MIB);
        p.poll_sync_read(0, u64::MAX).unwrap();
        p.handle_tracking_lost();
        assert_eq!(p.poll_resync_start(false), None);
        assert_eq!(p.poll_resync_start(true), Some("the tracker lost events"));
        assert_eq!(p.state().phase, SyncPhase::Resync);
        assert!(!p.may_read_dirty());
        assert_eq!(p.poll_sync_read(0, u64::MAX), None);
        assert_eq!(p.handle_durable(Seq(9)), SyncAdvance::Idle);
        // Only one comparison at a time.
        p.handle_tracking_lost();
        assert_eq!(p.poll_resync_start(true), None);
        assert!(!p.points_allowed());
    }

    #[test]
    fn a_finished_resync_makes_the_disk_continuous_and_remembers_when() {
        let mut p = fresh(MIB);
        p.handle_tracking_lost();
        p.poll_resync_start(true).unwrap();
        p.handle_resync_done(true, 1_700_000_000);
        assert_eq!(p.state().phase, SyncPhase::Continuous);
        assert_eq!(p.state().last_resync, Some(1_700_000_000));
        assert!(p.may_read_dirty());
        assert!(p.points_allowed());
    }

    #[test]
    fn a_failed_resync_is_wanted_again() {
        let mut p = fresh(MIB);
        p.handle_tracking_lost();
        p.poll_resync_start(true).unwrap();
        p.handle_resync_done(false, 0);
        assert_eq!(p.resync_wanted(), Some("the previous attempt failed"));
        assert_eq!(p.state().phase, SyncPhase::Resync);
        assert_eq!(
            p.poll_resync_start(true),
            Some("the previous attempt failed")
        );
    }

    #[test]
    fn a_peer_resync_request_starts_one_new_generation() {
        let mut p = fresh(MIB);
        sync_all(&mut p, Seq(1));
        assert_eq!(p.handle_peer_resync(), Some(Generation(2)));
        // Asked again while wanted or running: no further generation.
        assert_eq!(p.handle_peer_resync(), None);
        p.poll_resync_start(true).unwrap();
        assert_eq!(p.handle_peer_resync(), None);
        p.handle_resync_done(true, 1);
        assert_eq!(p.handle_peer_resync(), Some(Generation(3)));
        assert_eq!(p.state().generation, 3);
    }

    #[test]
    fn a_grown_disk_is_shipped_past_its_old_end() {
        let mut p = fresh(MIB);
        sync_all(&mut p, Seq(1));
        assert_eq!(
            p.handle_resize(Path::new("/d"), 4 * MIB),
            Some(Resize::Grew {
                old: MIB,
                grown: MIB..4 * MIB
            })
        );
        assert_eq!(p.size(), 4 * MIB);
        assert_eq!(p.resync_wanted(), None);
        assert_eq!(p.handle_resize(Path::new("/d"), 4 * MIB), None);
    }

    #[test]
    fn a_shrunk_disk_keeps_the_replica_size_says_what_to_do_and_resyncs() {
        let mut p = fresh(4 * MIB);
        let Some(Resize::Shrank { message }) = p.handle_resize(Path::new("/dev/vdb"), MIB) else {
            panic!("a shrink is reported");
        };
        assert!(message.contains("grow the disk back"), "{message}");
        assert_eq!(p.size(), 4 * MIB);
        assert_eq!(p.resync_wanted(), Some("the disk changed size"));
    }

    #[test]
    fn a_fenced_disk_reads_nothing_starts_no_resync_and_is_fenced_once() {
        let mut p = fresh(40 * MIB);
        assert!(p.poll_sync_read(0, u64::MAX).is_some());
        let f = p.handle_fenced(Generation(2), 100).expect("a new fence");
        assert_eq!((f.by_generation, f.since), (2, 100));
        assert_eq!(p.handle_fenced(Generation(2), 101), None, "fenced once");
        assert_eq!(p.poll_sync_read(0, u64::MAX), None);
        assert!(!p.may_read_dirty());
        assert!(!p.points_allowed());
        assert_eq!(p.handle_peer_resync(), None, "no new generation");
        p.handle_tracking_lost();
        assert_eq!(p.poll_resync_start(true), None);
        assert_eq!(p.generation(), Generation(1), "the wire generation stays");
    }

    #[test]
    fn a_fenced_disk_stays_fenced_after_a_restart() {
        let mut p = fresh(40 * MIB);
        p.handle_fenced(Generation(2), 100);
        let (p, _) = DiskPhase::start(
            Some(p.state().clone()),
            Path::new("/dev/vdb"),
            40 * MIB,
            false,
            true,
        );
        assert_eq!(p.fence().map(|f| f.by_generation), Some(2));
        let mut p = p;
        assert_eq!(p.poll_sync_read(0, u64::MAX), None);
        assert_eq!(p.poll_resync_start(true), None);
        assert!(!p.may_read_dirty());
    }

    #[test]
    fn points_wait_for_a_complete_replica() {
        let mut p = fresh(MIB);
        assert!(!p.points_allowed());
        assert_eq!(sync_all(&mut p, Seq(1)), SyncAdvance::Complete);
        assert!(p.points_allowed());
        p.handle_tracking_lost();
        assert!(!p.points_allowed());
    }

    fn reprotected(seq: u64) -> DiskPhase {
        let id = blockferry_proto::DiskId::from_bytes([3; 16]);
        let mut r = crate::state::new_record(id, Generation(5));
        r.set_seq(Seq(seq)).unwrap();
        let st = DiskState::reprotected("/dev/loop1".into(), 4 * MIB, &r, 10);
        DiskPhase::start(Some(st), Path::new("/dev/loop1"), 4 * MIB, true, true).0
    }

    #[test]
    fn a_reprotected_disk_compares_by_checksum_in_the_records_generation() {
        let mut p = reprotected(100);
        assert_eq!(p.generation(), Generation(5));
        assert_eq!(p.state().phase, SyncPhase::Resync);
        assert!(p.reprotecting());
        assert_eq!(p.poll_sync_read(0, u64::MAX), None, "no full copy");
        assert_eq!(p.handle_peer_durable(true, Seq(100)), Ok(()));
        assert!(p.poll_resync_start(true).is_some());
        p.handle_resync_done(true, 20);
        assert!(!p.reprotecting(), "reprotecting ends with its resync");
        assert_eq!(p.state().phase, SyncPhase::Continuous);
    }

    #[test]
    fn a_reprotected_disk_reads_nothing_before_the_peer_holds_the_records_seq() {
        let mut p = reprotected(100);
        assert!(
            !p.may_read_dirty(),
            "nothing is numbered before the peer answered"
        );
        assert_eq!(p.poll_resync_start(true), None);
        // Not connected: no answer yet, no verdict.
        assert_eq!(p.handle_peer_durable(false, Seq::ZERO), Ok(()));
        let e = p.handle_peer_durable(true, Seq(99)).unwrap_err();
        assert_eq!(
            e,
            FloorError {
                peer: Seq(99),
                record: Seq(100)
            }
        );
        assert!(e.to_string().contains("blockferry-target reprotect"), "{e}");
        assert!(!p.may_read_dirty());
        assert_eq!(p.poll_resync_start(true), None);
        assert_eq!(p.handle_peer_durable(true, Seq(130)), Ok(()));
        assert!(p.may_read_dirty());
    }

    #[test]
    fn a_handed_off_disk_ships_nothing_and_a_refusal_is_no_fence() {
        let mut p = fresh(40 * MIB);
        sync_all(&mut p, Seq(3));
        p.handle_handed_off(Seq(9), Generation(1), 50);
        assert_eq!(
            p.handed_off(),
            Some(HandOff {
                final_seq: 9,
                generation: 1,
                since: 50
            })
        );
        assert!(!p.may_read_dirty());
        assert!(!p.points_allowed());
        assert_eq!(p.handle_fenced(Generation(2), 60), None);
        assert_eq!(p.fence(), None);
        assert_eq!(p.handle_peer_resync(), None);
        p.handle_tracking_lost();
        assert_eq!(p.poll_resync_start(true), None);
        // And after a restart.
        let (mut again, _) = DiskPhase::start(
            Some(p.state().clone()),
            Path::new("/dev/vdb"),
            40 * MIB,
            false,
            false,
        );
        assert!(again.halted());
        assert_eq!(again.poll_resync_start(true), None);
        assert_eq!(again.poll_sync_read(0, u64::MAX), None);
    }
}
