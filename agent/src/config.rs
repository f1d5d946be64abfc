//! The agent's configuration: `agent.toml` parsed and validated into a [`Config`]
//! that the service is built from. Errors read like advice.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blockferry_proto::ids::DiskId;
use blockferry_transport::tls::TlsFiles;
use serde::Deserialize;

/// What can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    #[serde(default)]
    tracker_pin_dir: Option<PathBuf>,
    relay: RawRelay,
    #[serde(default)]
    replication: RawReplication,
    #[serde(rename = "disk", default)]
    disks: Vec<RawDisk>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    address: String,
    #[serde(default = "default_server_name")]
    server_name: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn default_server_name() -> String {
    "relay".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawReplication {
    chunk_size_kib: u32,
    zstd_level: i32,
    queue_depth: u32,
    bandwidth_mbit: u64,
    rpo_alert_seconds: u64,
    max_batch_kib: u32,
}

impl Default for RawReplication {
    fn default() -> Self {
        Self {
            chunk_size_kib: 64,
            zstd_level: 1,
            queue_depth: 32,
            bandwidth_mbit: 0,
            rpo_alert_seconds: 30,
            max_batch_kib: 4096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    id: String,
    path: PathBuf,
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// Where the tracker is pinned in bpffs, so tracking outlives the process.
    pub tracker_pin_dir: PathBuf,
    pub relay: RelayConfig,
    pub replication: ReplicationConfig,
    pub disks: Vec<DiskConfig>,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub address: SocketAddr,
    pub server_name: String,
    pub tls: TlsFiles,
}

#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// Chunk size in bytes: the unit of hashing, compression and resync.
    pub chunk_size: u32,
    pub zstd_level: i32,
    pub queue_depth: u32,
    /// Cap on the bytes per second put on the wire; `None` is unlimited.
    pub bandwidth_bytes_per_sec: Option<u64>,
    pub rpo_alert: std::time::Duration,
    /// Largest batch in bytes of plain data.
    pub max_batch: u32,
}

#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Stable identity of the disk, the same on every site and across role swaps.
    pub id: DiskId,
    /// Device path, preferably stable (`/dev/disk/by-id/…`).
    pub path: PathBuf,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates the text of a configuration; `path` names it in errors
    /// and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let address = raw.relay.address.parse::<SocketAddr>().map_err(|_| {
            invalid(format!(
                "relay.address `{}` is not an address with a port, for example \"192.0.2.10:4433\"",
                raw.relay.address
            ))
        })?;
        let r = raw.replication;
        if !(4..=1024).contains(&r.chunk_size_kib) || !r.chunk_size_kib.is_power_of_two() {
            return Err(invalid(format!(
                "replication.chunk_size_kib = {} must be a power of two from 4 to 1024",
                r.chunk_size_kib
            )));
        }
        if !(1..=19).contains(&r.zstd_level) {
            return Err(invalid(format!(
                "replication.zstd_level = {} must be from 1 to 19 (1 is the fastest)",
                r.zstd_level
            )));
        }
        if !(1..=4096).contains(&r.queue_depth) {
            return Err(invalid(format!(
                "replication.queue_depth = {} must be from 1 to 4096",
                r.queue_depth
            )));
        }
        if r.max_batch_kib < r.chunk_size_kib || r.max_batch_kib > 16 * 1024 {
            return Err(invalid(format!(
                "replication.max_batch_kib = {} must be at least chunk_size_kib and at most 16384",
                r.max_batch_kib
            )));
        }
        if raw.disks.is_empty() {
            return Err(invalid(
                "no [[disk]] to protect: add one with `id` and `path`".to_owned(),
            ));
        }
        let mut disks = Vec::with_capacity(raw.disks.len());
        for d in raw.disks {
            let id: DiskId = d.id.parse().map_err(|e| {
                invalid(format!(
                    "disk `{}`: {e}; generate one with `blockferry-agent new-disk-id`",
                    d.path.display()
                ))
            })?;
            if disks
                .iter()
                .any(|x: &DiskConfig| x.id == id || x.path == d.path)
            {
                return Err(invalid(format!(
                    "disk `{}` ({}) is listed twice",
                    d.id,
                    d.path.display()
                )));
            }
            disks.push(DiskConfig { id, path: d.path });
        }
        let tracker_pin_dir = raw
            .tracker_pin_dir
            .unwrap_or_else(|| PathBuf::from(crate::tracker::DEFAULT_PIN_DIR));
        if !tracker_pin_dir.starts_with("/sys/fs/bpf/") {
            return Err(invalid(format!(
                "tracker_pin_dir = {:?} must be a directory under /sys/fs/bpf (bpffs)",
                tracker_pin_dir
            )));
        }
        Ok(Config {
            state_dir: anchor(&raw.state_dir),
            tracker_pin_dir,
            relay: RelayConfig {
                address,
                server_name: raw.relay.server_name,
                tls: TlsFiles::new(raw.relay.ca, raw.relay.cert, raw.relay.key).anchored(base),
            },
            replication: ReplicationConfig {
                chunk_size: r.chunk_size_kib * 1024,
                zstd_level: r.zstd_level,
                queue_depth: r.queue_depth,
                bandwidth_bytes_per_sec: (r.bandwidth_mbit > 0)
                    .then_some(r.bandwidth_mbit * 1_000_000 / 8),
                rpo_alert: std::time::Duration::from_secs(r.rpo_alert_seconds),
                max_batch: r.max_batch_kib * 1024,
            },
            disks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
state_dir = "state"
[relay]
address = "127.0.0.1:4433"
ca = "pki/ca.pem"
cert = "pki/agent.pem"
key = "pki/agent.key"
[[disk]]
id = "6f1c2a9e-0b7d-4c3e-9a51-2d8e4f7a1b03"
path = "/dev/disk/by-id/virtio-db1"
"#;

    #[test]
    fn good_config_is_anchored_at_its_directory() {
        let c = Config::parse(GOOD, Path::new("/etc/blockferry/agent.toml")).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/blockferry/state"));
        assert_eq!(c.relay.tls.ca, Path::new("/etc/blockferry/pki/ca.pem"));
        assert_eq!(c.replication.chunk_size, 64 * 1024);
        assert_eq!(c.disks.len(), 1);
    }

    #[test]
    fn bad_address_says_what_to_write() {
        let text = GOOD.replace("127.0.0.1:4433", "relay.example");
        let e = Config::parse(&text, Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("with a port"), "{e}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let text = format!("{GOOD}\nbogus = 1\n");
        assert!(matches!(
            Config::parse(&text, Path::new("a.toml")),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn duplicate_disk_is_refused() {
        let text = format!(
            "{GOOD}\n[[disk]]\nid = \"6f1c2a9e-0b7d-4c3e-9a51-2d8e4f7a1b03\"\npath = \"/dev/vdb\"\n"
        );
        let e = Config::parse(&text, Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    /// `StateDirectory=` of a unit in dist/systemd, as an absolute path.
    fn unit_state_directory(unit: &str) -> PathBuf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../dist/systemd")
            .join(unit);
        let text = std::fs::read_to_string(&path).unwrap();
        let dir = text
            .lines()
            .find_map(|l| l.strip_prefix("StateDirectory="))
            .unwrap_or_else(|| panic!("no StateDirectory= in {}", path.display()));
        Path::new("/var/lib").join(dir)
    }

    #[test]
    fn example_config_in_dist_is_accepted_and_keeps_state_in_the_units_state_directory() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/etc/agent.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(
            c.state_dir,
            unit_state_directory("blockferry-agent.service")
        );
        assert_eq!(c.disks.len(), 1);
        assert!(c.relay.tls.key.ends_with("pki/agent-host-a.key"));
    }
}
