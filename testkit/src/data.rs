//! Deterministic test data, temp dirs and comparison helpers.

use std::path::Path;
use std::process::Command;

/// Deterministic data with every kind of chunk: random (incompressible),
/// text-like (compressible), half-compressible, and all-zero stretches.
pub fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let kind = next() % 4;
        let run = 4096 + (next() % (200 * 1024)) as usize;
        for i in 0..run {
            v.push(match kind {
                0 => next() as u8,
                1 => b"blockferry replicates "[i % 22],
                2 if i % 2 == 0 => next() as u8,
                2 => 0,
                _ => 0,
            });
        }
    }
    v.truncate(len);
    v
}

/// The deterministic content of batch `i`.
pub fn block(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (j as u64).wrapping_mul(7).wrapping_add(i * 13) as u8)
        .collect()
}

/// A one-chunk batch for index `i` (seq i+1 on a fresh disk), of [`block`]`(i, len)`.
pub fn batch(i: u64, len: usize) -> Vec<blockferry_proto::Chunk> {
    vec![blockferry_proto::build_chunk(i * len as u64, &block(i, len), None).unwrap()]
}

/// Index of the first differing byte, for readable failures.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// A temp dir on tmpfs when there is one: for tests whose crashes are
/// injected (not real), where thousands of real fsyncs would only cost time.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    // Containers often give /dev/shm only 64 MiB: use it only when roomy.
    let avail_kib = Command::new("df")
        .args(["-k", "--output=avail"])
        .arg(shm)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    if avail_kib >= 512 << 10
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("temp dir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_diff_points_at_the_first_differing_byte_or_the_shorter_length() {
        assert_eq!(first_diff(b"abc", b"abc"), None);
        assert_eq!(first_diff(b"abc", b"abd"), Some(2));
        assert_eq!(first_diff(b"abc", b"ab"), Some(2));
    }

    #[test]
    fn mixed_data_is_deterministic_per_seed_and_has_all_zero_and_zero_free_blocks() {
        let a = mixed_data(4 << 20, 7);
        assert_eq!(a.len(), 4 << 20);
        assert_eq!(a, mixed_data(4 << 20, 7));
        assert_ne!(a, mixed_data(4 << 20, 8));
        assert!(a.chunks(4096).any(|c| c.iter().all(|&b| b == 0)));
        assert!(a.chunks(4096).any(|c| c.iter().all(|&b| b != 0)));
    }
}
