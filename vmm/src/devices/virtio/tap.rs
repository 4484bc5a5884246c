//! Host side of virtio-net: an existing Linux tap interface opened through `/dev/net/tun` with
//! virtio-net headers (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), its offload settings
//! (`TUNSETOFFLOAD`, `TUNSETVNETHDRSZ`), and joining the network namespace the taps live in
//! (`--netns`, `setns(CLONE_NEWNET)`).
//!
//! The VMM never creates interfaces: the caller (the shim, a test) creates the tap, puts it in
//! the right namespace, addresses and bridges it; the VMM only attaches to it.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Longest interface name (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;

/// Errors attaching to a tap or joining a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Not a usable interface name.
    #[error("invalid tap name {0:?}: use 1 to 15 bytes without '/', ',', '=', ':' or whitespace")]
    Name(String),
    /// No interface of that name in the VMM's network namespace.
    #[error(
        "tap interface {0} does not exist in the VMM's network namespace (create it first, e.g. \
         `ip tuntap add {0} mode tap`, in the namespace given with --netns)"
    )]
    Missing(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded?): {0}")]
    OpenTun(#[source] std::io::Error),
    /// `TUNSETIFF` refused the interface.
    #[error(
        "cannot attach to tap {name} (it must be a tap, not a tun or another kind of interface, \
         with no other process attached): {err}"
    )]
    Attach {
        /// Interface name.
        name: String,
        /// OS error.
        #[source]
        err: std::io::Error,
    },
    /// A tap ioctl failed.
    #[error("tap {name}: {what} failed: {err}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// The ioctl.
        what: &'static str,
        /// OS error.
        #[source]
        err: std::io::Error,
    },
    /// The namespace file cannot be opened.
    #[error("cannot open network namespace {path}: {err}")]
    NetnsOpen {
        /// The path.
        path: String,
        /// OS error.
        #[source]
        err: std::io::Error,
    },
    /// `setns` refused the file.
    #[error(
        "cannot join network namespace {path} (needs CAP_SYS_ADMIN and a network namespace file \
         such as /run/netns/NAME or /proc/PID/ns/net): {err}"
    )]
    NetnsJoin {
        /// The path.
        path: String,
        /// OS error.
        #[source]
        err: std::io::Error,
    },
}

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags (the rest of the union is
/// unused padding, 40 bytes in all on x86_64).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks an interface name: 1 to 15 bytes, none of the characters the kernel or our command
/// line reject.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let bad = |c: char| c.is_whitespace() || matches!(c, '/' | ',' | '=' | ':' | '\0');
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || name.contains(bad)
    {
        return Err(TapError::Name(name.to_string()));
    }
    Ok(())
}

/// One queue of a tap interface, non-blocking, with 12-byte virtio-net headers on every frame.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap `name` in the calling thread's network namespace, sets the
    /// virtio-net header size to `vnet_hdr_len` and turns every offload off (see
    /// [`Tap::set_offload`]).
    pub fn open(name: &str, vnet_hdr_len: usize) -> Result<Self, TapError> {
        check_name(name)?;
        let cname = CString::new(name).map_err(|_| TapError::Name(name.to_string()))?;
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is one, live for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                err: std::io::Error::last_os_error(),
            });
        }
        let tap = Self {
            file,
            name: name.to_string(),
        };
        let size = libc::c_int::try_from(vnet_hdr_len).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer; `size` lives for the call.
        if unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            err: std::io::Error::last_os_error(),
        }
    }

    /// Tells the tap which offloads the reader (the guest) handles, as `TUN_F_*` bits: with
    /// `TUN_F_CSUM` frames may arrive with a partial checksum (`NEEDS_CSUM`), with
    /// `TUN_F_TSO4`/`TUN_F_TSO6` as TCP segments of up to 64 KiB. 0: every frame read is a
    /// complete, checksummed Ethernet frame. (Frames written may always use offloads.)
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(self.ioctl_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included).
    pub fn write(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Moves the calling thread into the network namespace `path` (`/run/netns/NAME`,
/// `/proc/PID/ns/net`). Threads created afterwards inherit it; file system paths (Unix sockets,
/// images) are unaffected.
pub fn join_netns(path: &Path) -> Result<(), TapError> {
    let display = path.display().to_string();
    let file = File::open(path).map_err(|err| TapError::NetnsOpen {
        path: display.clone(),
        err,
    })?;
    // SAFETY: setns on an fd we own; it changes only the calling thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(TapError::NetnsJoin {
            path: display,
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Test helpers: a private network namespace per test thread with a real tap in it.
#[cfg(test)]
pub mod testing {
    use std::process::Command;

    /// Moves the calling test thread into a fresh network namespace (so the taps it creates
    /// are invisible to the host and vanish with the thread) and creates the tap `name` there,
    /// down and without IPv6 (so the kernel sends no router solicitations on it). `None` (after
    /// printing why) when this host cannot do that: no `/dev/net/tun`, not root, no `ip`.
    ///
    /// Bring it up with [`run_ip`] once a device is attached: a tap that goes up without
    /// carrier gets its queueing discipline only when the kernel's link watcher notices the
    /// carrier (up to a second later) and drops what is sent until then.
    pub fn private_tap(name: &str) -> Option<()> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipping: /dev/net/tun is missing (no tun module)");
            return None;
        }
        // SAFETY: unshare only affects the calling thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipping: cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        run_ip(&["tuntap", "add", name, "mode", "tap"]);
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1")
            .expect("disable IPv6 on the test tap");
        Some(())
    }

    /// Runs `ip ARGS` in the calling thread's network namespace; panics if it fails.
    pub fn run_ip(args: &[&str]) {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "ip {args:?} failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a,b",
            "a=b",
            "0123456789abcdef",
        ] {
            assert!(matches!(check_name(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        check_name("tap0").unwrap();
        check_name("0123456789abcde").unwrap();
    }

    #[test]
    fn missing_tap_and_bad_netns_are_clear_errors() {
        let e = Tap::open("moat-nosuch0", 12).unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
        assert!(e.to_string().contains("ip tuntap add moat-nosuch0"));
        let e = join_netns(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(matches!(e, TapError::NetnsOpen { .. }), "{e}");
        // A file that is not a network namespace.
        let e = join_netns(Path::new("/proc/self/ns/uts"));
        assert!(matches!(e, Err(TapError::NetnsJoin { .. })), "{e:?}");
    }

    #[test]
    fn attach_to_an_existing_tap_and_join_its_namespace() {
        // Thread A makes a namespace with tap mt-ns0; this thread joins it by path and attaches.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let owner = std::thread::spawn(move || {
            let ok = testing::private_tap("mt-ns0").is_some();
            // SAFETY: gettid has no arguments.
            let tid = unsafe { libc::gettid() };
            tx.send(ok.then_some(tid)).unwrap();
            let _ = done_rx.recv();
        });
        let Some(tid) = rx.recv().unwrap() else {
            drop(done_tx);
            owner.join().unwrap();
            return;
        };
        let joined = std::thread::spawn(move || {
            assert!(matches!(Tap::open("mt-ns0", 12), Err(TapError::Missing(_))));
            let ns = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
            join_netns(Path::new(&ns)).unwrap();
            let tap = Tap::open("mt-ns0", 12).unwrap();
            assert_eq!(tap.name(), "mt-ns0");
            // A second attachment to the same single-queue tap is refused.
            assert!(matches!(
                Tap::open("mt-ns0", 12),
                Err(TapError::Attach { .. })
            ));
            // Nothing queued: a non-blocking read says so.
            let mut buf = [0u8; 64];
            let e = tap.read(&mut buf).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
            tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
            // TSO without checksum offload is invalid for the kernel.
            assert!(tap.set_offload(libc::TUN_F_TSO4).is_err());
        });
        let r = joined.join();
        drop(done_tx);
        owner.join().unwrap();
        r.unwrap();
    }
}
