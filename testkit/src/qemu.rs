//! qemu-img as the independent oracle of the VMDK files (read-only commands).

use std::path::Path;
use std::process::Command;

/// qemu-img is needed; in CI its absence is a failure, elsewhere a skip.
pub fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-img is required in CI"
        );
        eprintln!("skipping: qemu-img not installed");
    }
    ok
}

/// `qemu-img compare` of a raw model against a VMDK: true when identical.
pub fn qemu_same(raw: &Path, vmdk: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "vmdk"])
        .arg(raw)
        .arg(vmdk)
        .output()
        .expect("run qemu-img compare");
    if !out.status.success() {
        eprintln!(
            "qemu-img compare: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// `qemu-img info --output=json --backing-chain`, parsed.
pub fn qemu_info(vmdk: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "--backing-chain"])
        .arg(vmdk)
        .output()
        .expect("run qemu-img info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img info json")
}
