//! What the diagnostic commands print: the `probe` report of the kernel
//! features and hooks, and the lines of `track`.

use std::fmt;
use std::path::Path;

use super::{BpfSource, Notice, TrackerError, check_prerequisites};

/// What `blockferry-agent probe` found on this kernel.
#[derive(Debug)]
pub struct ProbeReport {
    pub kernel: String,
    pub btf: bool,
    pub tracefs: Option<&'static str>,
    pub ring_buffer_bytes: u64,
    pub hooks: Vec<super::Hook>,
    pub constants: Vec<(&'static str, Option<u64>)>,
}

fn tracefs_mount() -> Option<&'static str> {
    [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .map(|p| p.trim_end_matches("/events"))
}

/// Loads and attaches the programs, records what happened, and detaches them
/// (the source is dropped before returning).
pub fn probe() -> Result<ProbeReport, TrackerError> {
    check_prerequisites()?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let source = BpfSource::load()?;
    Ok(ProbeReport {
        kernel,
        btf: true,
        tracefs: tracefs_mount(),
        ring_buffer_bytes: super::abi::RINGBUF_BYTES,
        hooks: source.hooks().to_vec(),
        constants: source.kernel_constants().to_vec(),
    })
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel: {}", self.kernel)?;
        writeln!(
            f,
            "btf: {}",
            if self.btf {
                "yes (/sys/kernel/btf/vmlinux)"
            } else {
                "no"
            }
        )?;
        match self.tracefs {
            Some(p) => writeln!(f, "tracefs: mounted at {p} (tp_btf hooks do not need it)")?,
            None => writeln!(
                f,
                "tracefs: not mounted (tp_btf hooks do not need it; for classic tracepoints: mount -t tracefs tracefs /sys/kernel/tracing)"
            )?,
        }
        writeln!(
            f,
            "ring buffer: created, {} KiB",
            self.ring_buffer_bytes / 1024
        )?;
        writeln!(f, "tp_btf: supported")?;
        writeln!(f, "hooks:")?;
        for h in &self.hooks {
            match &h.error {
                None => writeln!(f, "  tp_btf/{:<20} attached   ({})", h.tracepoint, h.role)?,
                Some(e) => writeln!(
                    f,
                    "  tp_btf/{:<20} FAILED     ({}): {e}",
                    h.tracepoint, h.role
                )?,
            }
        }
        writeln!(f, "enum values resolved by CO-RE:")?;
        for (name, v) in &self.constants {
            match v {
                Some(v) => writeln!(f, "  {name:<22} {v}")?,
                None => writeln!(f, "  {name:<22} absent on this kernel")?,
            }
        }
        write!(f, "programs detached")
    }
}

/// One `track --json` line. Flushes are `"op":"flush"` with offset and len 0;
/// a resync is not an extent and has no JSON line (see [`notice_text`]).
pub fn notice_json(device: &Path, notice: &Notice) -> Option<String> {
    let (offset, len, op) = match notice {
        Notice::Extent {
            offset, len, op, ..
        } => (*offset, *len, op.as_str()),
        Notice::Flush { .. } => (0, 0, "flush"),
        Notice::Resync { .. } => return None,
    };
    #[derive(serde::Serialize)]
    struct Line<'a> {
        device: &'a str,
        offset: u64,
        len: u64,
        op: &'a str,
    }
    let device = device.to_string_lossy();
    serde_json::to_string(&Line {
        device: &device,
        offset,
        len,
        op,
    })
    .ok()
}

/// One human-readable `track` line.
pub fn notice_text(device: &Path, notice: &Notice) -> String {
    let device = device.display();
    match notice {
        Notice::Extent {
            offset, len, op, ..
        } => format!("{device} {op:<12} offset={offset} len={len}"),
        Notice::Flush { .. } => format!("{device} flush"),
        Notice::Resync { dropped, .. } => {
            format!(
                "{device} RESYNC NEEDED: {dropped} change events lost (ring buffer overflow); whole device marked dirty"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{DeviceId, Op};

    #[test]
    fn json_line_is_exactly_the_documented_shape() {
        let n = Notice::Extent {
            device: DeviceId(0),
            offset: 1048576,
            len: 4096,
            op: Op::Write,
        };
        assert_eq!(
            notice_json(Path::new("/dev/loop3"), &n).unwrap(),
            r#"{"device":"/dev/loop3","offset":1048576,"len":4096,"op":"write"}"#
        );
    }
}
