//! The validated configuration of `serve`, parsed from `target.toml`.
//!
//! Config (`target.toml`; relative paths are taken from its directory):
//!
//! ```toml
//! listen = "0.0.0.0:7411"      # port 0 picks one; printed as `listening quic=…`
//! store = "target-store"       # one directory per disk id
//! ca = "pki/ca.crt"
//! cert = "pki/target.crt"
//! key = "pki/target.key"
//! # revocation_list = "pki/revoked.txt"
//! # loopback_tuning = false
//! # peers = ["relay"]          # certificate names allowed to send
//! # point_every_secs = 600     # scheduled points; 0 = only barriers
//! # resync_chunk_kib = 64      # the agents' chunk_size_kib
//! # checkpoint_mib = 64
//! # max_disk_bytes = 70368744177664   # largest replica a relay may create (64 TiB)
//! # [retention]
//! # keep_all_secs = 3600
//! # tiers = [{ every_secs = 600, up_to_secs = 86400 }, { every_secs = 86400, up_to_secs = 604800 }]
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blockferry_transport::tls::TlsFiles;
use serde::Deserialize;

use crate::retention::RetentionPolicy;

use super::ServeError;

/// What is wrong in a config text, said as what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Syntax(#[from] toml::de::Error),
    #[error("listen = {0:?} is not an address: write IP:PORT, for example \"0.0.0.0:7411\"")]
    Listen(String),
    #[error(
        "resync_chunk_kib = {0} must be a power of two from 4 to 1024 (the agents' chunk_size_kib)"
    )]
    ResyncChunk(u32),
    #[error("retention tiers need every_secs > 0")]
    ZeroTier,
    #[error(
        "max_disk_bytes = {0} must be a positive multiple of 512 (the largest replica a relay may create, 70368744177664 for 64 TiB)"
    )]
    MaxDiskBytes(u64),
}

/// Default largest replica: 64 TiB.
pub const DEFAULT_MAX_DISK_BYTES: u64 = 64 << 40;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    store: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    revocation_list: Option<PathBuf>,
    #[serde(default)]
    loopback_tuning: bool,
    /// Certificate names allowed to send (the relays).
    peers: Option<Vec<String>>,
    /// Seconds between scheduled points; 0 disables them.
    point_every_secs: Option<u64>,
    retention: Option<RetentionPolicy>,
    resync_chunk_kib: Option<u32>,
    checkpoint_mib: Option<u64>,
    max_disk_bytes: Option<u64>,
    /// New replicas are thin monolithicSparse files.
    #[serde(default)]
    thin_replicas: bool,
}

/// The validated configuration of `serve` (paths resolved against the
/// config file's directory).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub store: PathBuf,
    pub tls: TlsFiles,
    pub revocation_list: Option<PathBuf>,
    pub loopback_tuning: bool,
    pub peers: HashSet<String>,
    pub point_every_secs: u64,
    pub retention: RetentionPolicy,
    pub resync_chunk_size: u64,
    pub checkpoint_bytes: u64,
    /// Largest disk size a hello may announce (creating or growing a replica).
    pub max_disk_bytes: u64,
    /// Create new replicas thin (monolithicSparse) instead of vmfs + flat.
    pub thin_replicas: bool,
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|source| ServeError::BadConfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses config text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        let listen = raw
            .listen
            .parse()
            .map_err(|_| ConfigError::Listen(raw.listen.clone()))?;
        let chunk_kib = raw.resync_chunk_kib.unwrap_or(64);
        if !(4..=1024).contains(&chunk_kib) || !chunk_kib.is_power_of_two() {
            return Err(ConfigError::ResyncChunk(chunk_kib));
        }
        let retention = raw.retention.unwrap_or_default();
        if retention.tiers.iter().any(|t| t.every_secs == 0) {
            return Err(ConfigError::ZeroTier);
        }
        let max_disk_bytes = raw.max_disk_bytes.unwrap_or(DEFAULT_MAX_DISK_BYTES);
        if max_disk_bytes == 0 || !max_disk_bytes.is_multiple_of(512) {
            return Err(ConfigError::MaxDiskBytes(max_disk_bytes));
        }
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(ServeConfig {
            listen,
            store: abs(raw.store),
            tls: TlsFiles::new(raw.ca, raw.cert, raw.key).anchored(base),
            revocation_list: raw.revocation_list.map(abs),
            loopback_tuning: raw.loopback_tuning,
            peers: raw
                .peers
                .unwrap_or_else(|| vec!["relay".to_string()])
                .into_iter()
                .collect(),
            point_every_secs: raw.point_every_secs.unwrap_or(600),
            retention,
            resync_chunk_size: u64::from(chunk_kib) << 10,
            checkpoint_bytes: raw.checkpoint_mib.unwrap_or(64) << 20,
            max_disk_bytes,
            thin_replicas: raw.thin_replicas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_resolves_paths_and_reads_retention() {
        let cfg = ServeConfig::parse(
            r#"
listen = "127.0.0.1:0"
store = "s"
ca = "/etc/bf/ca.crt"
cert = "b"
key = "c"
point_every_secs = 0
[retention]
keep_all_secs = 60
tiers = [{ every_secs = 600, up_to_secs = 86400 }]
"#,
            Path::new("/base"),
        )
        .unwrap();
        assert_eq!(cfg.store, Path::new("/base/s"));
        assert_eq!(cfg.tls.ca, Path::new("/etc/bf/ca.crt"));
        assert_eq!(cfg.retention.keep_all_secs, 60);
        assert_eq!(cfg.retention.tiers.len(), 1);
        assert!(cfg.peers.contains("relay"));
        assert_eq!(cfg.resync_chunk_size, 65536);
    }

    #[test]
    fn config_errors_say_what_to_write() {
        let e = ServeConfig::parse(
            "listen = \"nowhere\"\nstore = \"s\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Listen(_)), "{e}");
        assert!(e.to_string().contains("IP:PORT"), "{e}");
        let e = ServeConfig::parse(
            "listen = \"127.0.0.1:1\"\nstore = \"s\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nbogus = 1\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = ServeConfig::parse(
            "listen = \"127.0.0.1:1\"\nstore = \"s\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nmax_disk_bytes = 1000\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::MaxDiskBytes(1000)), "{e}");
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
    fn example_config_in_dist_is_accepted_and_stores_in_the_units_state_directory() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/etc/target.toml");
        let c = ServeConfig::load(&path).unwrap();
        assert!(
            c.store
                .starts_with(unit_state_directory("blockferry-target.service")),
            "{}",
            c.store.display()
        );
        assert!(c.peers.contains("relay"));
        assert_eq!(c.retention.tiers.len(), 2);
    }
}
