//! Loopback bring-up: every network namespace the agent creates (the
//! sandbox's, a container's own) and the guest's root namespace get `lo` up,
//! so workloads can use `127.0.0.1`/`::1`. A fresh network namespace has `lo`
//! down; nothing else in the guest would raise it.
//!
//! Uses the classic `SIOCGIFFLAGS`/`SIOCSIFFLAGS` ioctls on an `AF_INET`
//! datagram socket, which act on the caller's current network namespace and
//! need `CAP_NET_ADMIN` over it (held by the agent and its setup helper).

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Errors raising an interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The control socket could not be opened.
    #[error("opening an AF_INET control socket to configure {ifname}: {source}")]
    Socket {
        /// The interface.
        ifname: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// An interface ioctl failed.
    #[error("{op} on {ifname}: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The interface.
        ifname: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
}

nix::ioctl_read_bad!(
    /// `SIOCGIFFLAGS`: reads the flags of the interface named in the `ifreq` into
    /// `ifr_ifru.ifru_flags`.
    get_flags,
    libc::SIOCGIFFLAGS,
    libc::ifreq
);
nix::ioctl_write_ptr_bad!(
    /// `SIOCSIFFLAGS`: sets the flags of the interface named in the `ifreq` from
    /// `ifr_ifru.ifru_flags`.
    set_flags,
    libc::SIOCSIFFLAGS,
    libc::ifreq
);

/// Sets `IFF_UP` on `lo` in the calling thread's network namespace.
pub fn loopback_up() -> Result<(), NetError> {
    const IFNAME: &str = "lo";
    let sock: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| NetError::Socket {
        ifname: IFNAME,
        source,
    })?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(IFNAME.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a valid socket and a properly sized, NUL-terminated ifreq.
    unsafe { get_flags(sock.as_raw_fd(), &mut req) }.map_err(|source| NetError::Ioctl {
        op: "SIOCGIFFLAGS",
        ifname: IFNAME,
        source,
    })?;
    // SAFETY: the union member written by SIOCGIFFLAGS is `ifru_flags`.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: as above; the kernel only reads the request.
    unsafe { set_flags(sock.as_raw_fd(), &req) }.map_err(|source| NetError::Ioctl {
        op: "SIOCSIFFLAGS",
        ifname: IFNAME,
        source,
    })?;
    Ok(())
}
