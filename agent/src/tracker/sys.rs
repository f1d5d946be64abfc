//! The kernel end of the tracker: loads the programs of `ebpf/tracker.bpf.c`
//! with aya, attaches them, fills the filter map and reads the ring buffer.
//! Everything that needs root lives here, behind [`EventSource`]; aya owns the
//! memory mapping of the ring buffer and `ring` its registration with tokio,
//! so this module needs no `unsafe`.

use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::programs::{BtfTracePoint, RawTracePoint, RawTracePointRunOptions, TestRun};
use aya::{Btf, Ebpf, EbpfLoader};

use super::abi::{self, RawEvent};
use super::ring::Ring;
use super::{DeviceInfo, DiskFilter, EventSource, KernelDev, TrackerError};

/// The compiled programs, built by `agent/build.rs` against this kernel's BTF.
#[cfg(feature = "bpf")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracker.bpf.o"));
/// Built without the `bpf` feature: there is nothing to load.
#[cfg(not(feature = "bpf"))]
static OBJECT: &[u8] = &[];

const FILTER_WORDS: usize = 2 * abi::MAX_RANGES as usize;
type Filter = [u64; FILTER_WORDS];

/// One kernel hook and whether it attached.
#[derive(Debug, Clone)]
pub struct Hook {
    pub program: &'static str,
    pub tracepoint: &'static str,
    /// What the hook is for.
    pub role: &'static str,
    /// Without it the tracker cannot keep its promise; loading fails.
    pub required: bool,
    /// `None` when attached, else why not.
    pub error: Option<String>,
}

const HOOKS: [(&str, &str, &str, bool); 3] = [
    (
        "bf_bio_queue",
        "block_bio_queue",
        "submission of every bio",
        true,
    ),
    (
        "bf_rq_complete",
        "block_rq_complete",
        "completion on request-based disks",
        true,
    ),
    (
        "bf_bio_complete",
        "block_bio_complete",
        "completion on bio-based disks",
        false,
    ),
];

/// The real event source: the tracker programs loaded in this kernel. Dropping
/// it detaches and unloads them, unless they are pinned (see `pin`): then they
/// keep tracking until the pins are removed.
#[derive(Debug)]
pub struct BpfSource {
    ring: Ring,
    tick: Option<tokio::time::Interval>,
    protected: HashMap<MapData, u32, Filter>,
    drops: HashMap<MapData, u32, u64>,
    /// Drops user space has accounted for, per disk; kept only when pinned.
    seen: HashMap<MapData, u32, u64>,
    /// Pinned: the drop accounting in `seen` must survive this process.
    persistent: bool,
    /// The pin directory, locked: one agent per pinned tracker.
    lock: Option<std::fs::File>,
    /// Decoding failures (records of an unknown layout): a lost event, so they
    /// count as drops for every protected disk.
    pub undecodable: u64,
    hooks: Vec<Hook>,
    kconsts: Vec<(&'static str, Option<u64>)>,
    // Last: the programs (and their links) must outlive nothing above, and
    // dropping the Ebpf detaches the links that are not pinned. `None` when
    // opened from pins: the kernel holds the programs through the pinned links.
    _ebpf: Option<Ebpf>,
}

fn is_root() -> bool {
    // /proc/self is owned by the effective uid of the process.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Checks the prerequisites a person can fix, with advice.
pub fn check_prerequisites() -> Result<(), TrackerError> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(TrackerError::Unsupported(
            "/sys/kernel/btf/vmlinux is missing: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF), \
             which the tracker's CO-RE programs need; boot a kernel with BTF (every major \
             distribution ships one since 2020)"
                .into(),
        ));
    }
    if !is_root() {
        return Err(TrackerError::Privilege(
            "loading eBPF programs needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN): run as root".into(),
        ));
    }
    Ok(())
}

fn map_err(name: &str, e: impl std::error::Error + Send + Sync + 'static) -> TrackerError {
    TrackerError::Kernel {
        what: format!("map {name}"),
        source: Box::new(e),
    }
}

impl BpfSource {
    /// Loads the programs and attaches every hook. Fails if a required hook
    /// does not attach; an optional one that fails is reported by [`hooks`](Self::hooks).
    pub fn load() -> Result<BpfSource, TrackerError> {
        Self::load_with_ring_bytes(abi::RINGBUF_BYTES as u32)
    }

    /// Like [`load`](Self::load) with a ring buffer of `bytes` (a power of two,
    /// at least the page size): small ones let tests provoke overflows.
    pub fn load_with_ring_bytes(bytes: u32) -> Result<BpfSource, TrackerError> {
        Self::load_inner(bytes, None)
    }

    /// Loads, attaches, and pins the maps and links under `dir` (which exists,
    /// on bpffs), then writes `build` into `bf_build`: the last step, so pins
    /// without it are an unfinished set.
    pub(super) fn load_pinned(
        bytes: u32,
        dir: &Path,
        build: u64,
    ) -> Result<BpfSource, TrackerError> {
        Self::load_inner(bytes, Some((dir, build)))
    }

    fn load_inner(bytes: u32, pin: Option<(&Path, u64)>) -> Result<BpfSource, TrackerError> {
        if OBJECT.is_empty() {
            return Err(TrackerError::Unsupported(
                "this agent was built without the `bpf` feature, so it holds no kernel programs; \
                 rebuild it with default features (needs clang, bpftool and libbpf-dev)"
                    .into(),
            ));
        }
        check_prerequisites()?;
        let btf = Btf::from_sys_fs().map_err(|e| TrackerError::Kernel {
            what: "reading /sys/kernel/btf/vmlinux".into(),
            source: Box::new(e),
        })?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .map_max_entries(abi::MAP_EVENTS, bytes)
            .load(OBJECT)
            .map_err(|e| TrackerError::Kernel {
                what: "loading the tracker object (maps and CO-RE relocations)".into(),
                source: Box::new(e),
            })?;

        let mut hooks = Vec::new();
        for (program, tracepoint, role, required) in HOOKS {
            let attached = attach(&mut ebpf, &btf, program, tracepoint);
            let error = match (attached, pin) {
                (Ok(id), Some((dir, _))) => pin_link(&mut ebpf, program, id, dir).err(),
                (Ok(_), None) => None,
                (Err(e), _) => Some(e),
            };
            if let Some(e) = &error {
                if required {
                    return Err(TrackerError::Kernel {
                        what: format!("attaching {program} to tp_btf/{tracepoint}: {e}"),
                        source: e.clone().into(),
                    });
                }
                tracing::warn!(hook = tracepoint, error = %e, "optional hook not attached");
            }
            hooks.push(Hook {
                program,
                tracepoint,
                role,
                required,
                error,
            });
        }
        let kconsts = read_kconsts(&mut ebpf);
        if let Some((dir, _)) = pin {
            for name in super::pin::MAPS {
                let map = ebpf.map(name).ok_or_else(|| TrackerError::Kernel {
                    what: format!("map {name} missing from the tracker object"),
                    source: "object and header disagree".into(),
                })?;
                let path = dir.join(name);
                map.pin(&path).map_err(|e| TrackerError::Kernel {
                    what: format!("pinning map {name} at {}", path.display()),
                    source: Box::new(e),
                })?;
            }
        }

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).ok_or_else(|| TrackerError::Kernel {
                what: format!("map {name} missing from the tracker object"),
                source: "object and header disagree".into(),
            })
        };
        let ring = RingBuf::try_from(take(&mut ebpf, abi::MAP_EVENTS)?)
            .map_err(|e| map_err(abi::MAP_EVENTS, e))?;
        let protected = HashMap::try_from(take(&mut ebpf, abi::MAP_PROTECTED)?)
            .map_err(|e| map_err(abi::MAP_PROTECTED, e))?;
        let drops = HashMap::try_from(take(&mut ebpf, abi::MAP_DROPS)?)
            .map_err(|e| map_err(abi::MAP_DROPS, e))?;
        let seen = HashMap::try_from(take(&mut ebpf, abi::MAP_SEEN)?)
            .map_err(|e| map_err(abi::MAP_SEEN, e))?;
        if let Some((_, build)) = pin {
            let mut stamp: Array<MapData, u64> = Array::try_from(take(&mut ebpf, abi::MAP_BUILD)?)
                .map_err(|e| map_err(abi::MAP_BUILD, e))?;
            stamp
                .set(0, build, 0)
                .map_err(|e| map_err(abi::MAP_BUILD, e))?;
        }
        Ok(BpfSource {
            ring: Ring::Plain(ring),
            tick: None,
            protected,
            drops,
            seen,
            persistent: pin.is_some(),
            undecodable: 0,
            hooks,
            kconsts,
            lock: None,
            _ebpf: Some(ebpf),
        })
    }

    /// Opens the pins under `dir` left by an earlier process, without loading
    /// or attaching anything. `Err` says why they cannot be used (the caller
    /// removes them and loads afresh).
    pub(super) fn open_pinned(dir: &Path, build: u64) -> Result<BpfSource, String> {
        check_prerequisites().map_err(|e| e.to_string())?;
        let open = |name: &str| {
            MapData::from_pin(dir.join(name))
                .and_then(aya::maps::Map::from_map_data)
                .map_err(|e| format!("map {name}: {}", explain(&e)))
        };
        let stamp: Array<MapData, u64> = Array::try_from(open(abi::MAP_BUILD)?)
            .map_err(|e| format!("map {}: {e}", abi::MAP_BUILD))?;
        let found = stamp
            .get(&0, 0)
            .map_err(|e| format!("map {}: {e}", abi::MAP_BUILD))?;
        if found == 0 {
            return Err("the pins are an unfinished set (a previous start was interrupted)".into());
        }
        if found != build {
            return Err(format!(
                "the pins were made by another build of the tracker programs ({found:#x}, this \
                 build is {build:#x})"
            ));
        }
        // The typed views check key and value sizes against the pinned maps.
        let ring = RingBuf::try_from(open(abi::MAP_EVENTS)?)
            .map_err(|e| format!("map {}: {e}", abi::MAP_EVENTS))?;
        let protected = HashMap::try_from(open(abi::MAP_PROTECTED)?)
            .map_err(|e| format!("map {}: {e}", abi::MAP_PROTECTED))?;
        let drops = HashMap::try_from(open(abi::MAP_DROPS)?)
            .map_err(|e| format!("map {}: {e}", abi::MAP_DROPS))?;
        let seen = HashMap::try_from(open(abi::MAP_SEEN)?)
            .map_err(|e| format!("map {}: {e}", abi::MAP_SEEN))?;
        let mut hooks = Vec::new();
        for (program, tracepoint, role, required) in HOOKS {
            let path = dir.join(super::pin::link_name(program));
            // A pinned link of a tp_btf program stays attached as long as the
            // pin exists: finding it is finding the hook attached.
            let error = match PinnedLink::from_pin(&path) {
                Ok(link) => match FdLink::from(link).info() {
                    Ok(_) => None,
                    Err(e) => Some(explain(&e)),
                },
                Err(e) => Some(explain(&e)),
            };
            if let (Some(e), true) = (&error, required) {
                return Err(format!("the link of {program} (tp_btf/{tracepoint}): {e}"));
            }
            hooks.push(Hook {
                program,
                tracepoint,
                role,
                required,
                error,
            });
        }
        Ok(BpfSource {
            ring: Ring::Plain(ring),
            tick: None,
            protected,
            drops,
            seen,
            persistent: true,
            undecodable: 0,
            hooks,
            kconsts: Vec::new(),
            lock: None,
            _ebpf: None,
        })
    }

    /// Keeps the lock of the pin directory for as long as this source lives.
    pub(super) fn hold_lock(&mut self, lock: std::fs::File) {
        self.lock = Some(lock);
    }

    /// The embedded object file.
    pub(super) fn object() -> &'static [u8] {
        OBJECT
    }

    /// The hooks and whether each attached.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// The kernel enum values CO-RE resolved (`None`: not present on this kernel).
    pub fn kernel_constants(&self) -> &[(&'static str, Option<u64>)] {
        &self.kconsts
    }
}

fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    program: &str,
    tracepoint: &str,
) -> Result<BtfTracePointLinkId, String> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load(tracepoint, btf).map_err(|e| explain(&e))?;
    prog.attach().map_err(|e| explain(&e))
}

/// Moves the attachment out of aya's bookkeeping and pins it: from then on it
/// stays attached after this process exits, until the pin is removed.
fn pin_link(
    ebpf: &mut Ebpf,
    program: &str,
    id: BtfTracePointLinkId,
    dir: &Path,
) -> Result<(), String> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    let link = prog.take_link(id).map_err(|e| explain(&e))?;
    let fd = FdLink::from(link);
    let path = dir.join(super::pin::link_name(program));
    fd.pin(&path)
        .map_err(|e| format!("pinning at {}: {}", path.display(), explain(&e)))?;
    Ok(())
}

/// An error with its causes, and advice for the one a person can fix.
fn explain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    if text.contains("Operation not permitted") {
        text.push_str(" (needs root with CAP_BPF and CAP_PERFMON; under lockdown=confidentiality tracing programs are refused)");
    }
    text
}

/// Runs `bf_kconsts_fill` once (BPF_PROG_TEST_RUN) and reads what it stored.
fn read_kconsts(ebpf: &mut Ebpf) -> Vec<(&'static str, Option<u64>)> {
    const NAMES: [(&str, u64); 10] = [
        ("REQ_OP_WRITE", abi::KC_REQ_OP_WRITE),
        ("REQ_OP_FLUSH", abi::KC_REQ_OP_FLUSH),
        ("REQ_OP_DISCARD", abi::KC_REQ_OP_DISCARD),
        ("REQ_OP_SECURE_ERASE", abi::KC_REQ_OP_SECURE_ERASE),
        ("REQ_OP_WRITE_ZEROES", abi::KC_REQ_OP_WRITE_ZEROES),
        ("REQ_OP_ZONE_APPEND", abi::KC_REQ_OP_ZONE_APPEND),
        ("REQ_OP_BITS", abi::KC_REQ_OP_BITS),
        ("__REQ_PREFLUSH", abi::KC_REQ_PREFLUSH),
        ("__REQ_FUA", abi::KC_REQ_FUA),
        ("__REQ_NOUNMAP", abi::KC_REQ_NOUNMAP),
    ];
    let ran = (|| -> Result<(), String> {
        let prog: &mut RawTracePoint = ebpf
            .program_mut("bf_kconsts_fill")
            .ok_or("program bf_kconsts_fill missing")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load().map_err(|e| explain(&e))?;
        prog.test_run(RawTracePointRunOptions::new())
            .map_err(|e| explain(&e))?;
        Ok(())
    })();
    if let Err(e) = ran {
        tracing::warn!(error = %e, "cannot read the resolved kernel constants");
        return NAMES.iter().map(|&(n, _)| (n, None)).collect();
    }
    let Some(map) = ebpf.map(abi::MAP_KCONSTS) else {
        return NAMES.iter().map(|&(n, _)| (n, None)).collect();
    };
    let Ok(array) = Array::<&MapData, u64>::try_from(map) else {
        return NAMES.iter().map(|&(n, _)| (n, None)).collect();
    };
    NAMES
        .iter()
        .map(|&(n, idx)| {
            let v = array
                .get(&(idx as u32), 0)
                .ok()
                .filter(|&v| v != abi::KC_MISSING);
            (n, v)
        })
        .collect()
}

impl EventSource for BpfSource {
    fn set_filter(&mut self, disk: KernelDev, sectors: &[Range<u64>]) -> Result<(), TrackerError> {
        if sectors.is_empty() {
            match self.protected.remove(&disk.0) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(abi::MAP_PROTECTED, e)),
            }
            return Ok(());
        }
        let mut filter: Filter = [0; FILTER_WORDS];
        for (i, r) in sectors.iter().take(abi::MAX_RANGES as usize).enumerate() {
            filter[2 * i] = r.start;
            filter[2 * i + 1] = r.end;
        }
        // The drop counter must exist before the filter lets events through, or
        // a failed reserve would have nowhere to be counted. BPF_NOEXIST keeps
        // an existing count.
        match self.drops.insert(disk.0, 0, 1) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(map_err(abi::MAP_DROPS, e)),
        }
        self.protected
            .insert(disk.0, filter, 0)
            .map_err(|e| map_err(abi::MAP_PROTECTED, e))
    }

    fn drop_baseline(&mut self, disk: KernelDev) -> Result<u64, TrackerError> {
        if !self.persistent {
            return self.drop_count(disk);
        }
        // No record of what an earlier process accounted for: every drop
        // counted so far is news (a needless resync at worst, never a miss).
        match self.seen.get(&disk.0, 0) {
            Ok(n) => Ok(n.saturating_add(self.undecodable)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(self.undecodable),
            Err(e) => Err(map_err(abi::MAP_SEEN, e)),
        }
    }

    fn acknowledge_drops(&mut self, disk: KernelDev, total: u64) -> Result<(), TrackerError> {
        if !self.persistent {
            return Ok(());
        }
        // Only the kernel's part persists: undecodable records die with us.
        self.seen
            .insert(disk.0, total.saturating_sub(self.undecodable), 0)
            .map_err(|e| map_err(abi::MAP_SEEN, e))
    }

    fn filters(&self) -> Result<Vec<DiskFilter>, TrackerError> {
        let mut out = Vec::new();
        for item in self.protected.iter() {
            let (disk, filter) = item.map_err(|e| map_err(abi::MAP_PROTECTED, e))?;
            let ranges = filter
                .chunks_exact(2)
                .filter(|p| p[0] < p[1])
                .map(|p| p[0]..p[1])
                .collect();
            out.push((KernelDev(disk), ranges));
        }
        Ok(out)
    }

    fn drop_count(&self, disk: KernelDev) -> Result<u64, TrackerError> {
        match self.drops.get(&disk.0, 0) {
            Ok(n) => Ok(n.saturating_add(self.undecodable)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(self.undecodable),
            Err(e) => Err(map_err(abi::MAP_DROPS, e)),
        }
    }

    async fn readable(&mut self) -> Result<(), TrackerError> {
        // Created on first use: an Interval needs the runtime, loading does not.
        let tick = self.tick.get_or_insert_with(|| {
            let mut i = tokio::time::interval(std::time::Duration::from_millis(abi::POLL_MS));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        self.ring.readable(tick).await
    }

    fn geometry(&self, info: &DeviceInfo) -> Option<DeviceInfo> {
        // A device that vanished (detached loop device) reports nothing here.
        DeviceInfo::from_sysfs(&info.path, info.dev, Path::new("/sys/dev/block")).ok()
    }

    fn drain(&mut self, out: &mut Vec<RawEvent>) -> Result<(), TrackerError> {
        let mut bad = 0;
        if let Some(ring) = self.ring.get_mut() {
            while let Some(item) = ring.next() {
                match RawEvent::decode(&item) {
                    Some(ev) => out.push(ev),
                    None => bad += 1,
                }
            }
        }
        if bad > 0 {
            tracing::error!(
                records = bad,
                "undecodable tracker records: treating them as lost events"
            );
            self.undecodable += bad;
        }
        Ok(())
    }
}
