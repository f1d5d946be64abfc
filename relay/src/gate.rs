//! The spool's byte budget: reserving waits while the spool is full, which
//! stops the stream reader, which stops the agent through QUIC flow control.
//! Nothing is dropped.

use std::sync::Mutex;

use tokio::sync::Notify;

/// A byte budget with async reservation.
#[derive(Debug)]
pub struct ByteGate {
    limit: u64,
    used: Mutex<u64>,
    freed: Notify,
}

impl ByteGate {
    /// A gate of `limit` bytes of which `used` are already taken (a restart
    /// with a non-empty spool).
    pub fn new(limit: u64, used: u64) -> Self {
        ByteGate {
            limit,
            used: Mutex::new(used),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `n` bytes, waiting until they fit. A request larger than the
    /// whole budget passes when the gate is empty, so it cannot wait forever.
    pub async fn reserve(&self, n: u64) {
        loop {
            // Registered before the check: a release in between still wakes us.
            let notified = self.freed.notified();
            {
                let mut used = self.lock();
                if *used == 0 || used.saturating_add(n) <= self.limit {
                    *used += n;
                    return;
                }
            }
            notified.await;
        }
    }

    /// Returns `n` bytes.
    pub fn release(&self, n: u64) {
        let mut used = self.lock();
        *used = used.saturating_sub(n);
        drop(used);
        self.freed.notify_waiters();
    }

    pub fn used(&self) -> u64 {
        *self.lock()
    }

    pub fn is_full_for(&self, n: u64) -> bool {
        let used = *self.lock();
        used != 0 && used.saturating_add(n) > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn reserve_waits_until_release() {
        let g = Arc::new(ByteGate::new(100, 0));
        g.reserve(80).await;
        assert!(g.is_full_for(30));
        let g2 = g.clone();
        let waiter = tokio::spawn(async move {
            g2.reserve(30).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        g.release(80);
        waiter.await.unwrap();
        assert_eq!(g.used(), 30);
    }

    #[tokio::test]
    async fn oversized_request_passes_an_empty_gate() {
        let g = ByteGate::new(10, 0);
        g.reserve(1000).await;
        assert_eq!(g.used(), 1000);
    }
}
