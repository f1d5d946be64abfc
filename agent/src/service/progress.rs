//! What a person sees of an initial sync: a progress bar on a terminal, log
//! lines otherwise.

use std::time::{Duration, Instant};

use crate::config::DiskConfig;

/// Progress of an initial sync: a bar (bytes, rate, ETA) on a terminal, a log
/// line every few seconds otherwise, as services log.
pub(super) struct SyncProgress {
    started: Option<(Instant, u64)>,
    last_log: Instant,
    bar: Option<indicatif::ProgressBar>,
}

/// How often an initial sync logs its progress when not on a terminal.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

impl SyncProgress {
    pub(super) fn new() -> Self {
        SyncProgress {
            started: None,
            last_log: Instant::now(),
            bar: None,
        }
    }

    /// `done` bytes of `size` are durable at the relay.
    pub(super) fn update(&mut self, disk: &DiskConfig, done: u64, size: u64) {
        let now = Instant::now();
        let (t0, from) = *self.started.get_or_insert((now, done));
        if self.bar.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new(size);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(format!("initial sync {}", disk.path.display()));
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        } else if now.duration_since(self.last_log) >= PROGRESS_LOG_EVERY {
            self.last_log = now;
            let secs = now.duration_since(t0).as_secs_f64().max(0.001);
            let rate = (done - from.min(done)) as f64 / secs;
            let eta = if rate > 0.0 {
                format!("{:.0}", (size - done.min(size)) as f64 / rate)
            } else {
                "unknown".to_owned()
            };
            tracing::info!(disk = %disk.id, done_bytes = done, size_bytes = size,
                percent = format!("{:.1}", done as f64 * 100.0 / size.max(1) as f64),
                mb_per_s = format!("{:.1}", rate / 1e6), eta_s = eta,
                "initial sync progress");
        }
    }

    pub(super) fn finish(&mut self, disk: &DiskConfig, size: u64) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let rate = self.started.map(|(t0, from)| {
            (size - from.min(size)) as f64 / t0.elapsed().as_secs_f64().max(0.001) / 1e6
        });
        tracing::info!(disk = %disk.id, size_bytes = size,
            mb_per_s = rate.map(|r| format!("{r:.1}")).unwrap_or_default(),
            "initial sync complete");
    }
}
