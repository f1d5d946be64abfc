//! `blockferry-relay`: parses arguments and wires the library together.

use std::path::PathBuf;

use anyhow::{Context, Result};
use blockferry_relay::Config;
use blockferry_relay::spool::{Spool, SpoolOptions};
use blockferry_transport::log::{self, LogFormat};
use blockferry_transport::pki;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "blockferry-relay",
    version,
    about = "blockferry relay: receives from agents, spools durably, forwards to the target"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines on stderr: `text` (colour only on a terminal) or `json`
    /// (one object per line, for log collectors).
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay.
    Serve {
        /// Path of relay.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Drop everything the spool holds of a disk (frames not yet delivered,
    /// its position and size), with the relay stopped. Part of reprotect and
    /// re-enable: after a failover the promoted copy's stream starts a new
    /// count, and the frames the fenced source left here must never reach
    /// the new replica.
    Forget {
        /// Path of relay.toml.
        #[arg(long)]
        config: PathBuf,
        /// The disk id.
        #[arg(long)]
        disk: blockferry_proto::DiskId,
        #[arg(long)]
        json: bool,
    },
    /// Certificates for relay, target and agents.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA and the relay and target certificates in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Name in the relay's certificate (agents' `server_name`).
        #[arg(long, default_value = "relay")]
        relay_name: String,
        /// Name in the target's certificate (relay.toml `target.server_name`).
        #[arg(long, default_value = "target")]
        target_name: String,
    },
    /// Issue the certificate of agent NAME with the CA in DIR.
    IssueAgent {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
}

fn main() -> Result<()> {
    // Whatever a command creates (spool, store, records, exports, keys) holds
    // replicated data or secrets: private to the service's user.
    blockferry_durable::set_umask(0o077);
    let cli = Cli::parse();
    log::init("info", cli.log_format);
    match cli.cmd {
        Cmd::Pki { cmd } => match cmd {
            PkiCmd::Init {
                dir,
                relay_name,
                target_name,
            } => {
                let files = pki::init(
                    &dir,
                    &pki::InitNames {
                        relay: relay_name,
                        target: target_name,
                    },
                )?;
                println!("CA:     {}", files.ca_cert.display());
                println!("relay:  {}", files.relay.cert.display());
                println!("target: {}", files.target.cert.display());
                Ok(())
            }
            PkiCmd::IssueAgent { dir, name } => {
                let files = pki::issue_agent(&dir, &name)?;
                println!(
                    "agent {name}: {} {}",
                    files.cert.display(),
                    files.key.display()
                );
                Ok(())
            }
        },
        Cmd::Forget { config, disk, json } => {
            let cfg = Config::load(&config)?;
            let mut spool = Spool::open(
                &cfg.spool_dir,
                SpoolOptions {
                    segment_bytes: cfg.spool_segment_bytes,
                    fsync: true,
                },
            )
            .with_context(|| format!("cannot open the spool {}", cfg.spool_dir.display()))?;
            let f = spool.forget(disk)?;
            let through = f.through.map(|(g, s)| (g.0, s.0));
            if json {
                let v = serde_json::json!({
                    "disk": disk.to_string(),
                    "frames": f.frames,
                    "bytes": f.bytes,
                    "through": through.map(|(g, s)| serde_json::json!({"generation": g, "seq": s})),
                });
                println!("{v}");
            } else if let Some((g, s)) = through {
                println!(
                    "disk {disk}: forgotten through generation {g} #{s}; {} frames ({} bytes) that were waiting for the target dropped",
                    f.frames, f.bytes
                );
            } else {
                println!("disk {disk}: the spool held nothing of it");
            }
            Ok(())
        }
        Cmd::Serve { config } => {
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(serve(cfg))
        }
    }
}

async fn serve(cfg: Config) -> Result<()> {
    let cancel = CancellationToken::new();
    let handle = blockferry_relay::start(cfg, cancel.clone()).await?;
    // One line on stdout tells scripts (and tests) where the relay listens
    // when the config asked for port 0.
    match handle.metrics_addr {
        Some(m) => println!("listening quic={} metrics={m}", handle.listen_addr),
        None => println!("listening quic={}", handle.listen_addr),
    }
    blockferry_transport::notify::ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for SIGINT")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    blockferry_transport::notify::stopping();
    cancel.cancel();
    handle.stopped().await;
    Ok(())
}
