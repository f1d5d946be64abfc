//! Relay metrics and a minimal HTTP/1.1 responder for Prometheus' `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use blockferry_proto::DiskId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Per-disk progress: newest sequence spooled and newest acked by the target.
#[derive(Debug, Default, Clone, Copy)]
struct DiskProgress {
    spooled: u64,
    target_acked: u64,
}

/// Counters and gauges of one relay.
#[derive(Debug, Default)]
pub struct Metrics {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub agent_connections: AtomicU64,
    pub agent_connections_total: AtomicU64,
    pub refused_connections_total: AtomicU64,
    pub target_connected: AtomicU64,
    disks: Mutex<BTreeMap<DiskId, DiskProgress>>,
}

impl Metrics {
    pub fn set_spooled(&self, disk: DiskId, seq: u64) {
        if let Ok(mut d) = self.disks.lock() {
            let e = d.entry(disk).or_default();
            e.spooled = e.spooled.max(seq);
        }
    }

    pub fn set_target_acked(&self, disk: DiskId, seq: u64) {
        if let Ok(mut d) = self.disks.lock() {
            let e = d.entry(disk).or_default();
            e.target_acked = e.target_acked.max(seq);
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "blockferry_relay_bytes_in_total",
            "counter",
            "Frame bytes received from agents.",
            get(&self.bytes_in),
        );
        metric(
            "blockferry_relay_bytes_out_total",
            "counter",
            "Frame bytes sent to the target.",
            get(&self.bytes_out),
        );
        metric(
            "blockferry_relay_spool_bytes",
            "gauge",
            "Bytes spooled and not yet acked by the target.",
            get(&self.spool_bytes),
        );
        metric(
            "blockferry_relay_agent_connections",
            "gauge",
            "Agent connections open now.",
            get(&self.agent_connections),
        );
        metric(
            "blockferry_relay_agent_connections_total",
            "counter",
            "Agent connections accepted.",
            get(&self.agent_connections_total),
        );
        metric(
            "blockferry_relay_refused_connections_total",
            "counter",
            "Connections refused at the handshake or by the registry.",
            get(&self.refused_connections_total),
        );
        metric(
            "blockferry_relay_target_connected",
            "gauge",
            "1 when the relay is connected to the target.",
            get(&self.target_connected),
        );
        let _ = writeln!(
            out,
            "# HELP blockferry_relay_disk_lag_frames Frames of a disk spooled but not yet acked by the target.\n# TYPE blockferry_relay_disk_lag_frames gauge"
        );
        if let Ok(d) = self.disks.lock() {
            for (disk, p) in d.iter() {
                let _ = writeln!(
                    out,
                    "blockferry_relay_disk_lag_frames{{disk=\"{disk}\"}} {}",
                    p.spooled.saturating_sub(p.target_acked)
                );
            }
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    cancel: CancellationToken,
) {
    loop {
        let (mut sock, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Only the request line matters; bound what is read from a client.
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let ok = head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?");
            let (status, body) = if ok {
                ("200 OK", metrics.render())
            } else {
                (
                    "404 Not Found",
                    "only /metrics is served here\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = sock.write_all(resp.as_bytes()).await {
                tracing::debug!(%peer, error = %e, "metrics client went away");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_endpoint_answers_with_prometheus_text() {
        let m = std::sync::Arc::new(Metrics::default());
        m.bytes_in.store(1234, Ordering::Relaxed);
        let disk = DiskId::from_bytes([7; 16]);
        m.set_spooled(disk, 10);
        m.set_target_acked(disk, 4);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, m, cancel.clone()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(
            resp.contains("blockferry_relay_bytes_in_total 1234"),
            "{resp}"
        );
        assert!(
            resp.contains(&format!(
                "blockferry_relay_disk_lag_frames{{disk=\"{disk}\"}} 6"
            )),
            "{resp}"
        );
        cancel.cancel();
        task.await.unwrap();
    }
}
