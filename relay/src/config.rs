//! `relay.toml` → a validated [`Config`]. Errors say what is wrong and what to
//! write instead. Relative paths are taken relative to the config file.
//!
//! ```toml
//! listen = "0.0.0.0:7410"
//! metrics_listen = "127.0.0.1:9410"      # optional Prometheus /metrics
//! spool_dir = "/var/lib/blockferry/spool"
//! spool_limit_bytes = 8589934592          # agents are slowed, never dropped, past this
//! max_disk_bytes = 70368744177664         # largest disk an agent may announce (64 TiB)
//! ca = "pki/ca.crt"
//! cert = "pki/relay.crt"
//! key = "pki/relay.key"
//! revocation_list = "pki/revoked.txt"     # optional: agent names or serial:HEX
//! loopback_tuning = false                 # 6450-byte datagrams (loopback/jumbo only)
//!
//! [target]
//! address = "10.0.0.5:7411"
//! server_name = "target"                  # name in the target's certificate
//! bandwidth_limit_bytes_per_sec = 0       # 0: no cap
//! recompress_level = 9                    # optional zstd level for the WAN hop
//!
//! [[agents]]
//! name = "host-a"                         # the agent certificate's name
//! disks = ["0b5e3c6a-1f4e-4c2a-9d7b-2a9c1e0f4d11"]
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blockferry_proto::DiskId;
use blockferry_transport::tls::TlsFiles;
use serde::Deserialize;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("config {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    metrics_listen: Option<String>,
    spool_dir: PathBuf,
    spool_limit_bytes: Option<u64>,
    spool_segment_bytes: Option<u64>,
    max_disk_bytes: Option<u64>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    revocation_list: Option<PathBuf>,
    #[serde(default)]
    loopback_tuning: bool,
    target: RawTarget,
    #[serde(default)]
    agents: Vec<RawAgent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    address: String,
    server_name: String,
    #[serde(default)]
    bandwidth_limit_bytes_per_sec: u64,
    recompress_level: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: String,
    disks: Vec<String>,
}

/// Where and how the relay forwards.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub address: SocketAddr,
    pub server_name: String,
    /// Bytes per second; `None` for no cap.
    pub bandwidth_limit: Option<u64>,
    /// Re-compress zstd/raw chunks at this level before forwarding.
    pub recompress_level: Option<i32>,
}

/// The validated relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub spool_dir: PathBuf,
    pub spool_limit: u64,
    pub spool_segment_bytes: u64,
    /// Largest disk size a hello may announce; checked before anything is
    /// registered or spooled.
    pub max_disk_bytes: u64,
    pub tls: TlsFiles,
    pub revocation_list: Option<PathBuf>,
    pub loopback_tuning: bool,
    pub target: TargetConfig,
    /// Agent name → the disks it may write.
    pub registry: HashMap<String, HashSet<DiskId>>,
}

/// Default spool limit: 8 GiB.
pub const DEFAULT_SPOOL_LIMIT: u64 = 8 << 30;

/// Default largest disk: 64 TiB.
pub const DEFAULT_MAX_DISK_BYTES: u64 = 64 << 40;

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { detail, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                detail,
            },
            ConfigError::Invalid { detail, .. } => ConfigError::Invalid {
                path: path.to_path_buf(),
                detail,
            },
            other => other,
        })
    }

    /// Parses TOML text; relative paths are joined to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            detail: e.to_string(),
        })?;
        let invalid = |detail: String| ConfigError::Invalid {
            path: PathBuf::new(),
            detail,
        };
        let addr = |field: &str, v: &str| -> Result<SocketAddr, ConfigError> {
            v.parse().map_err(|_| {
                invalid(format!(
                    "{field} = {v:?} is not an address: write IP:PORT, for example \"0.0.0.0:7410\""
                ))
            })
        };
        let abs = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let listen = addr("listen", &raw.listen)?;
        let metrics_listen = raw
            .metrics_listen
            .as_deref()
            .map(|m| addr("metrics_listen", m))
            .transpose()?;
        let target_addr = addr("target.address", &raw.target.address)?;
        if raw.target.server_name.is_empty() {
            return Err(invalid(
                "target.server_name is empty: give the name in the target's certificate (\"target\" after `pki init`)".into(),
            ));
        }
        let spool_limit = raw.spool_limit_bytes.unwrap_or(DEFAULT_SPOOL_LIMIT);
        if spool_limit < (64 << 10) {
            return Err(invalid(format!(
                "spool_limit_bytes = {spool_limit} is too small to be useful: give at least 65536 (a few GiB in production)"
            )));
        }
        let max_disk_bytes = raw.max_disk_bytes.unwrap_or(DEFAULT_MAX_DISK_BYTES);
        if max_disk_bytes == 0 || !max_disk_bytes.is_multiple_of(512) {
            return Err(invalid(format!(
                "max_disk_bytes = {max_disk_bytes} must be a positive multiple of 512 (the largest disk an agent may announce, 70368744177664 for 64 TiB)"
            )));
        }
        if let Some(level) = raw.target.recompress_level
            && !(1..=22).contains(&level)
        {
            return Err(invalid(format!(
                "target.recompress_level = {level}: zstd levels are 1..=22 (9-15 suit a WAN)"
            )));
        }
        let mut registry: HashMap<String, HashSet<DiskId>> = HashMap::new();
        let mut owner: HashMap<DiskId, String> = HashMap::new();
        for agent in raw.agents {
            if agent.name.is_empty() {
                return Err(invalid(
                    "an [[agents]] entry has an empty name: use the name given to `pki issue-agent`".into(),
                ));
            }
            let set = registry.entry(agent.name.clone()).or_default();
            for d in &agent.disks {
                let disk: DiskId = d
                    .parse()
                    .map_err(|e| invalid(format!("agent {}: {e}", agent.name)))?;
                if let Some(prev) = owner.insert(disk, agent.name.clone())
                    && prev != agent.name
                {
                    return Err(invalid(format!(
                        "disk {disk} is registered to both {prev} and {}: a disk has one writer",
                        agent.name
                    )));
                }
                set.insert(disk);
            }
        }
        Ok(Config {
            listen,
            metrics_listen,
            spool_dir: abs(raw.spool_dir),
            spool_limit,
            spool_segment_bytes: raw.spool_segment_bytes.unwrap_or(64 << 20).max(1 << 20),
            max_disk_bytes,
            tls: TlsFiles::new(raw.ca, raw.cert, raw.key).anchored(base),
            revocation_list: raw.revocation_list.map(abs),
            loopback_tuning: raw.loopback_tuning,
            target: TargetConfig {
                address: target_addr,
                server_name: raw.target.server_name,
                bandwidth_limit: (raw.target.bandwidth_limit_bytes_per_sec > 0)
                    .then_some(raw.target.bandwidth_limit_bytes_per_sec),
                recompress_level: raw.target.recompress_level,
            },
            registry,
        })
    }

    /// Whether agent `name` may write `disk`.
    pub fn may_write(&self, name: &str, disk: DiskId) -> bool {
        self.registry.get(name).is_some_and(|d| d.contains(&disk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:0"
spool_dir = "spool"
ca = "pki/ca.crt"
cert = "pki/relay.crt"
key = "pki/relay.key"
[target]
address = "127.0.0.1:7411"
server_name = "target"
[[agents]]
name = "host-a"
disks = ["00112233-4455-6677-8899-aabbccddeeff"]
"#;

    #[test]
    fn good_config_resolves_paths_and_registry() {
        let c = Config::parse(GOOD, Path::new("/etc/bf")).unwrap();
        assert_eq!(c.spool_dir, Path::new("/etc/bf/spool"));
        let d: DiskId = "00112233-4455-6677-8899-aabbccddeeff".parse().unwrap();
        assert!(c.may_write("host-a", d));
        assert!(!c.may_write("host-b", d));
        assert_eq!(c.spool_limit, DEFAULT_SPOOL_LIMIT);
        assert_eq!(c.max_disk_bytes, DEFAULT_MAX_DISK_BYTES);
    }

    #[test]
    fn max_disk_bytes_must_be_a_positive_multiple_of_512() {
        for bad in ["0", "1000"] {
            let text = GOOD.replace(
                "spool_dir = \"spool\"",
                &format!("spool_dir = \"spool\"\nmax_disk_bytes = {bad}"),
            );
            let e = Config::parse(&text, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("max_disk_bytes") && e.contains("512"), "{e}");
        }
        let text = GOOD.replace(
            "spool_dir = \"spool\"",
            "spool_dir = \"spool\"\nmax_disk_bytes = 1048576",
        );
        assert_eq!(
            Config::parse(&text, Path::new("/")).unwrap().max_disk_bytes,
            1 << 20
        );
    }

    #[test]
    fn errors_read_like_advice() {
        let bad_addr = GOOD.replace("127.0.0.1:7411", "nowhere");
        let e = Config::parse(&bad_addr, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("target.address") && e.contains("IP:PORT"), "{e}");
        let bad_disk = GOOD.replace("00112233-4455", "zz");
        let e = Config::parse(&bad_disk, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("host-a") && e.contains("hex"), "{e}");
        let typo = GOOD.replace("spool_dir", "spool_dri");
        assert!(Config::parse(&typo, Path::new("/")).is_err());
    }

    #[test]
    fn a_disk_has_one_writer() {
        let two = format!(
            "{GOOD}\n[[agents]]\nname = \"host-b\"\ndisks = [\"00112233-4455-6677-8899-aabbccddeeff\"]\n"
        );
        let e = Config::parse(&two, Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("one writer"), "{e}");
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
    fn example_config_in_dist_is_accepted_and_spools_in_the_units_state_directory() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/etc/relay.toml");
        let c = Config::load(&path).unwrap();
        assert!(
            c.spool_dir
                .starts_with(unit_state_directory("blockferry-relay.service")),
            "{}",
            c.spool_dir.display()
        );
        assert_eq!(c.registry.len(), 1);
        assert!(c.metrics_listen.is_some());
    }
}
