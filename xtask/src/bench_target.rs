//! `cargo xtask bench target` (placeholder until the harness lands).

pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("the target benchmark is not built yet")
}
