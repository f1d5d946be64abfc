//! All unsafe code of the reader: the aligned buffer pool registered with the
//! ring, the io_uring submission of `READ_FIXED` reads into it, and the
//! `BLKGETSIZE64` ioctl.
//!
//! Ownership rule that makes this sound: every buffer of the pool is owned by
//! exactly one [`Lease`] at a time. While a read is in flight its lease sits
//! inside [`UringReader`]'s in-flight table, unreachable by anyone else, and it
//! comes out only with the completion of that read. The pool's memory is freed
//! only when the last lease and the ring are gone, and the ring is never torn
//! down while the kernel may still write into a buffer.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use io_uring::{IoUring, opcode, types};

/// Alignment of buffers, device offsets and read lengths. 4 KiB satisfies
/// O_DIRECT for every logical block size Linux supports on common hardware.
pub(crate) const ALIGN: usize = 4096;

/// A fixed set of equally sized, `ALIGN`-aligned buffers in one allocation.
pub(crate) struct BufferPool {
    base: NonNull<u8>,
    layout: Layout,
    buf_size: usize,
    count: usize,
}

// SAFETY: the pool is a plain heap allocation; which thread touches which
// buffer is governed by the lease rule of this module (one lease per buffer),
// so sharing the pool itself across threads is sound.
unsafe impl Send for BufferPool {}
// SAFETY: see `Send`: `&BufferPool` only exposes buffers through leases.
unsafe impl Sync for BufferPool {}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("buf_size", &self.buf_size)
            .field("count", &self.count)
            .finish()
    }
}

/// Where a lease goes when it is dropped; it gets the lease back when the
/// destination is gone, and then the buffer is simply not reused.
pub(crate) type Home = Arc<dyn Fn(Lease) -> Result<(), Lease> + Send + Sync>;

impl BufferPool {
    /// Allocates `count` zeroed buffers of `buf_size` bytes (a multiple of
    /// `ALIGN`) and hands out one lease per buffer.
    pub(crate) fn leases(count: usize, buf_size: usize, home: Home) -> io::Result<Vec<Lease>> {
        if count == 0
            || count > usize::from(u16::MAX)
            || buf_size == 0
            || !buf_size.is_multiple_of(ALIGN)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer pool of {count} buffers of {buf_size} bytes is not supported"),
            ));
        }
        let total = count
            .checked_mul(buf_size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffer pool too large"))?;
        let layout = Layout::from_size_align(total, ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `layout` has a non-zero size (count and buf_size are > 0).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let pool = Arc::new(BufferPool {
            base,
            layout,
            buf_size,
            count,
        });
        // Each index is handed out exactly once here; from now on a buffer
        // changes hands only by moving its lease.
        Ok((0..count)
            .map(|i| Lease {
                pool: Arc::clone(&pool),
                index: i as u16,
                home: Some(Arc::clone(&home)),
            })
            .collect())
    }

    fn buf_ptr(&self, index: u16) -> *mut u8 {
        debug_assert!(usize::from(index) < self.count);
        // SAFETY: index < count, so the offset stays inside the allocation.
        unsafe { self.base.as_ptr().add(usize::from(index) * self.buf_size) }
    }

    fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                iov_base: self.buf_ptr(i as u16).cast(),
                iov_len: self.buf_size,
            })
            .collect()
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `leases` with exactly this layout; the pool is
        // dropped only when no lease and no ring (which holds an `Arc`) remain.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

/// Exclusive ownership of one buffer of a pool.
pub(crate) struct Lease {
    pool: Arc<BufferPool>,
    index: u16,
    home: Option<Home>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("index", &self.index).finish()
    }
}

impl Lease {
    /// The first `len` bytes of the buffer.
    pub(crate) fn as_slice(&self, len: usize) -> &[u8] {
        let len = len.min(self.pool.buf_size);
        // SAFETY: this lease is the only owner of the buffer and no I/O is in
        // flight into it (an in-flight lease is held by `UringReader` and not
        // reachable); the range lies inside the buffer.
        unsafe { std::slice::from_raw_parts(self.pool.buf_ptr(self.index), len) }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            let back = Lease {
                pool: Arc::clone(&self.pool),
                index: self.index,
                home: Some(Arc::clone(&home)),
            };
            if let Err(mut back) = home(back) {
                // Nobody takes buffers any more: let it go without recursing.
                back.home = None;
            }
        }
    }
}

/// A read of part of a buffer: the device bytes
/// `[dev_offset + filled, dev_offset + round_up(want))` into
/// `buffer[filled..round_up(want)]`.
#[derive(Debug)]
pub(crate) struct ReadOp<T> {
    pub(crate) lease: Lease,
    /// Device offset of the first byte of the buffer.
    pub(crate) dev_offset: u64,
    /// Bytes of the buffer already read (a multiple of `ALIGN` for O_DIRECT).
    pub(crate) filled: usize,
    /// Bytes wanted in all; the read is rounded up to `ALIGN`.
    pub(crate) want: usize,
    pub(crate) tag: T,
}

/// Why a read was not queued; the request comes back with it.
#[derive(Debug)]
pub(crate) enum PushError {
    /// The submission queue is full: submit, reap, then push again.
    QueueFull,
    /// The request itself is malformed (a bug in the caller).
    Invalid,
}

/// A finished read: the op with its lease, and the raw result (`Ok(bytes)`
/// or the errno of the read).
#[derive(Debug)]
pub(crate) struct Completion<T> {
    pub(crate) op: ReadOp<T>,
    pub(crate) result: Result<usize, io::Error>,
}

/// One io_uring instance reading one file with `READ_FIXED` into a pool.
pub(crate) struct UringReader<T> {
    ring: IoUring,
    file: File,
    inflight: Vec<Option<ReadOp<T>>>,
    n_inflight: usize,
    pool: Arc<BufferPool>,
}

impl<T> std::fmt::Debug for UringReader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringReader")
            .field("n_inflight", &self.n_inflight)
            .field("pool", &self.pool)
            .finish()
    }
}

impl<T> UringReader<T> {
    /// Sets up a ring of `entries` and registers the pool that `leases` (all
    /// leases of one pool) belong to.
    pub(crate) fn new(file: File, entries: u32, leases: &[Lease]) -> io::Result<Self> {
        let pool = leases
            .first()
            .map(|l| Arc::clone(&l.pool))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty buffer pool"))?;
        let ring = IoUring::new(entries)?;
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs point into the pool's allocation, which stays
        // alive until the ring is dropped: `UringReader` keeps an `Arc` to the
        // pool and drops the ring first (field order, and `Drop` below waits
        // for every in-flight read before that).
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        let mut inflight = Vec::with_capacity(pool.count);
        inflight.resize_with(pool.count, || None);
        Ok(UringReader {
            ring,
            file,
            inflight,
            n_inflight: 0,
            pool,
        })
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.n_inflight
    }

    /// Queues one read (not yet submitted). On failure the op comes back.
    pub(crate) fn push(&mut self, op: ReadOp<T>) -> Result<(), (PushError, ReadOp<T>)> {
        let buf_size = self.pool.buf_size;
        let end = op.want.next_multiple_of(ALIGN);
        let idx = usize::from(op.lease.index);
        if !Arc::ptr_eq(&op.lease.pool, &self.pool)
            || op.filled >= end
            || end > buf_size
            || self.inflight.get(idx).is_none_or(|s| s.is_some())
        {
            return Err((PushError::Invalid, op));
        }
        let Ok(len) = u32::try_from(end - op.filled) else {
            return Err((PushError::Invalid, op));
        };
        let Some(offset) = op.dev_offset.checked_add(op.filled as u64) else {
            return Err((PushError::Invalid, op));
        };
        // SAFETY: filled < end <= buf_size, so the pointer stays inside this
        // lease's buffer.
        let ptr = unsafe { self.pool.buf_ptr(op.lease.index).add(op.filled) };
        let entry =
            opcode::ReadFixed::new(types::Fd(self.file.as_raw_fd()), ptr, len, op.lease.index)
                .offset(offset)
                .build()
                .user_data(u64::from(op.lease.index));
        let mut sq = self.ring.submission();
        // SAFETY: the buffer range [ptr, ptr + len) is registered (index and
        // range checked above) and owned by `op.lease`, which moves into the
        // in-flight table right below and leaves it only when the completion
        // with this user_data arrives; the file stays open as long as `self`.
        let pushed = unsafe { sq.push(&entry) };
        drop(sq);
        match pushed {
            Ok(()) => {
                self.inflight[idx] = Some(op);
                self.n_inflight += 1;
                Ok(())
            }
            Err(_full) => Err((PushError::QueueFull, op)),
        }
    }

    /// Submits what was pushed and waits for at least `want` completions.
    pub(crate) fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        loop {
            match self.ring.submit_and_wait(want) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                other => return other,
            }
        }
    }

    /// Moves every available completion into `out`.
    pub(crate) fn reap(&mut self, out: &mut Vec<Completion<T>>) {
        for cqe in self.ring.completion() {
            let Ok(idx) = usize::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(op) = self.inflight.get_mut(idx).and_then(Option::take) else {
                tracing::error!(
                    user_data = cqe.user_data(),
                    "completion for no read in flight"
                );
                continue;
            };
            self.n_inflight -= 1;
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            out.push(Completion { op, result });
        }
    }
}

impl<T> Drop for UringReader<T> {
    fn drop(&mut self) {
        // The kernel may still write into buffers of reads in flight: wait for
        // every completion before the ring and the pool can go away.
        let mut done = Vec::new();
        while self.n_inflight > 0 {
            if let Err(e) = self.submit_and_wait(1) {
                tracing::error!(error = %e, in_flight = self.n_inflight,
                    "cannot wait for reads in flight; leaking their buffers");
                // Never free memory the kernel may still write into.
                std::mem::forget(Arc::clone(&self.pool));
                for op in self.inflight.iter_mut().filter_map(Option::take) {
                    std::mem::forget(op);
                }
                return;
            }
            self.reap(&mut done);
            done.clear();
        }
    }
}

/// Size in bytes of the block device open as `file`.
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    // _IOR(0x12, 114, size_t) on the architectures with the generic ioctl
    // encoding (x86_64, aarch64, riscv64).
    const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live local; the fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Drops the page cache of `file` (used by benchmarks to read from disk).
pub fn evict_page_cache(file: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is open.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}
