//! Test-only fault injection into the reader's completions, and the tests of
//! the retry and failure paths that use it with real reads. Not compiled into
//! production readers.

use std::io;

/// Errors injected into completions, so that tests can drive the retry and
/// failure paths with real reads.
#[derive(Debug, Default, Clone)]
pub(crate) struct Faults {
    /// Every n-th completion becomes EINTR or EAGAIN (alternately).
    pub(crate) interrupt_every: u64,
    /// Every n-th completion is cut short, to an unaligned length.
    pub(crate) short_every: u64,
    /// Reads of the chunk at this offset fail with EIO.
    pub(crate) eio_at: Option<u64>,
    seen: u64,
}

impl Faults {
    pub(super) fn apply(
        &mut self,
        dev_offset: u64,
        result: io::Result<usize>,
    ) -> io::Result<usize> {
        self.seen += 1;
        if self.eio_at == Some(dev_offset) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if self.interrupt_every > 0 && self.seen.is_multiple_of(self.interrupt_every) {
            let errno = if self.seen.is_multiple_of(2 * self.interrupt_every) {
                libc::EINTR
            } else {
                libc::EAGAIN
            };
            return Err(io::Error::from_raw_os_error(errno));
        }
        match result {
            Ok(n)
                if n > 1 && self.short_every > 0 && self.seen.is_multiple_of(self.short_every) =>
            {
                Ok((n / 2).saturating_sub(100).max(1))
            }
            other => other,
        }
    }
}

mod tests {
    use std::io::Write;

    use super::super::*;
    use super::Faults;

    fn data(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_9abc_def1u64;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 65536) % 3 == 2 { 0 } else { x as u8 }
            })
            .collect()
    }

    fn run(
        src: &[u8],
        config: &ReaderConfig,
        faults: Faults,
    ) -> (Vec<Chunk>, Vec<(u64, ReaderError)>, Vec<bool>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(src).unwrap();
        let (handle, mut events) = spawn_with(f.path(), config, faults).unwrap();
        handle.submit(0, src.len() as u64).unwrap();
        handle.submit(100_000, 300_000).unwrap();
        handle.close();
        let (mut chunks, mut failed, mut done) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(ev) = events.blocking_next() {
            match ev {
                ReaderEvent::Chunk { chunk, .. } => chunks.push(chunk),
                ReaderEvent::ChunkFailed { offset, error, .. } => failed.push((offset, error)),
                ReaderEvent::RangeDone { ok, .. } => done.push(ok),
                ReaderEvent::Fatal(e) => panic!("{e}"),
            }
        }
        handle.join();
        (chunks, failed, done)
    }

    fn assert_matches_source(src: &[u8], chunks: &[Chunk]) {
        for c in chunks {
            let plain = blockferry_proto::verify_chunk(c).unwrap().to_bytes();
            let at = c.offset as usize;
            assert!(plain[..] == src[at..at + plain.len()], "chunk at {at}");
        }
    }

    #[test]
    fn interrupted_and_short_reads_are_retried_until_the_bytes_are_right() {
        let src = data(2 * 1024 * 1024 + 5000);
        for direct in [true, false] {
            let config = ReaderConfig {
                direct,
                queue_depth: 4,
                ..ReaderConfig::default()
            };
            let faults = Faults {
                interrupt_every: 3,
                short_every: 2,
                ..Faults::default()
            };
            let (chunks, failed, done) = run(&src, &config, faults);
            assert!(failed.is_empty(), "{failed:?}");
            assert_eq!(done, vec![true, true]);
            // 33 chunks for the whole file, then 6 for the second range.
            assert_eq!(chunks.len(), 33 + 6);
            assert_matches_source(&src, &chunks);
        }
    }

    #[test]
    fn a_failed_read_is_reported_in_place_and_the_range_is_not_ok() {
        let src = data(1024 * 1024);
        let faults = Faults {
            eio_at: Some(131072),
            ..Faults::default()
        };
        let (chunks, failed, done) = run(&src, &ReaderConfig::default(), faults);
        assert_eq!(done, vec![false, false]);
        let offsets: Vec<u64> = failed.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![131072, 131072]);
        let msg = failed[0].1.to_string();
        assert!(msg.contains("offset 131072"), "{msg}");
        assert!(chunks.iter().all(|c| c.offset != 131072));
        assert_eq!(chunks.len(), 16 - 1 + 6 - 1);
        assert_matches_source(&src, &chunks);
    }
}
