#!/usr/bin/env python3
"""rootns.py COMMAND [ARGS...]: run COMMAND in a mount namespace whose root *is* the current
root directory, with shared propagation.

Why: the software-KVM host runs its command chrooted into /host (a 9p mount on the initramfs'
rootfs). A container runtime that pivot_roots from a chroot leaves the container's root mounted
at /host in the namespace, not over its root, so a process that later joins the container's mount
namespace (runc exec, nsenter) lands in the initramfs instead of the container: every `exec` then
sees the wrong files. Real nodes boot with switch_root, which moves the new root *onto* `/`;
this does the same for our processes only: in a new mount namespace it leaves the chroot, moves
the chroot's mount onto `/`, chroots into it and makes every mount rshared (as systemd does, for
the mount propagation specs). Nothing outside the new namespace changes.

Where the root already is the namespace's root (a hardware-KVM host, or a test host whose init
moves /host onto / itself, as tests/kvm-host/init does since 2026-12-04), it only makes the
mounts rshared in a new namespace.
"""

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20

libc = ctypes.CDLL(None, use_errno=True)


def mount(source, target, flags):
    src = source.encode() if source else None
    if libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount({source!r}, {target!r}, {flags:#x}): {os.strerror(err)}")


def root_id():
    """The mount id and inode of this process's root directory."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            mnt = next((l.split()[1] for l in f if l.startswith("mnt_id:")), "?")
        return f"{mnt}:{os.fstat(fd).st_ino}"
    finally:
        os.close(fd)


def chrooted():
    """True when this process's root is not its mount namespace's root: a child that joins the
    namespace again (setns, as `runc exec` does) gets the namespace's root; compare the two."""
    here = root_id()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        try:
            fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNS) == 0:
                os.write(w, root_id().encode())
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    seen = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return bool(seen) and seen != here


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    move = chrooted()
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    mount(None, "/", MS_REC | MS_PRIVATE)
    if move:
        cwd = os.getcwd()
        root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        # Leave the chroot: chroot into a subdirectory while the working directory stays
        # outside it, climb to the real root and chroot there.
        escape = "/tmp/.moat-cri-rootns-%d" % os.getpid()
        os.mkdir(escape)
        os.chroot(escape)
        for _ in range(64):
            os.chdir("..")
        os.chroot(".")
        mount(None, "/", MS_REC | MS_PRIVATE)
        # Move the former chroot's mount onto / and enter it, as switch_root does.
        os.fchdir(root_fd)
        os.close(root_fd)
        mount(".", "/", MS_MOVE)
        os.chroot(".")
        os.rmdir(escape)
        os.chdir(cwd)
    mount(None, "/", MS_REC | MS_SHARED)
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
