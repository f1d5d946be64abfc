//! `cargo xtask bench tracker` (placeholder until the harness lands).

pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("the tracker benchmark is not built yet")
}
