//! Socket buffer sizes beyond `net.core.{r,w}mem_max`. The only unsafe code of
//! this crate: `setsockopt` with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`, which socket2
//! does not wrap.

use std::os::fd::AsRawFd;

/// Which buffer to size.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Buffer {
    Receive,
    Send,
}

/// Sets the buffer to `bytes`, forcing past the sysctl limit when this process
/// may (CAP_NET_ADMIN), else asking for it normally (the kernel caps it).
/// Returns whether the forced variant was accepted.
pub(crate) fn set(socket: &socket2::Socket, which: Buffer, bytes: usize) -> std::io::Result<bool> {
    let opt = match which {
        Buffer::Receive => libc::SO_RCVBUFFORCE,
        Buffer::Send => libc::SO_SNDBUFFORCE,
    };
    let value: libc::c_int = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is owned by `socket` and open for the duration of the call;
    // the option value points to a live c_int whose exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    match which {
        Buffer::Receive => socket.set_recv_buffer_size(bytes)?,
        Buffer::Send => socket.set_send_buffer_size(bytes)?,
    }
    Ok(false)
}
