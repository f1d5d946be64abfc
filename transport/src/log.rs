//! How every blockferry service logs: to stderr, filtered by `RUST_LOG`, with
//! colour only on a terminal, so a pipe or journald gets plain text.

use std::io::IsTerminal;

/// Installs the global subscriber; `default_level` applies when `RUST_LOG`
/// is unset or invalid (e.g. `"info"`).
pub fn init(default_level: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
}
