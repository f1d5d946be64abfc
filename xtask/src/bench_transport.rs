//! `cargo xtask bench transport` (placeholder until the harness lands).

pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("the transport benchmark is not built yet")
}
