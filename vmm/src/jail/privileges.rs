//! The jailed VMM's credentials and limits: which capabilities it keeps (none, or the
//! file-ownership set virtio-fs needs, plus `CAP_NET_ADMIN` for taps without a user
//! namespace), the rlimits on fds, address space and core dumps, the switch to
//! `--jail-uid`/`--jail-gid`, and `no_new_privs`. With the user namespace (the default) the
//! capabilities kept are the VMM's in its own namespace only (see [`super::userns`]).

use std::collections::HashSet;

use caps::{CapSet, Capability};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use super::error::{caps_err, sys, JailError};
use crate::config::VmConfig;

/// `RLIMIT_NOFILE` of a VMM without virtio-fs: vsock connections, disks, taps, eventfds and
/// KVM fds stay far below it.
pub const NOFILE: u64 = 4096;
/// `RLIMIT_NOFILE` of a VMM serving virtio-fs (capped by `/proc/sys/fs/nr_open`): the
/// passthrough server holds one fd per guest-cached inode, as virtiofsd does.
pub const NOFILE_FS: u64 = 1 << 20;
/// `RLIMIT_AS` is guest RAM plus this margin (MiB) for the VMM's own mappings: thread stacks,
/// malloc arenas (up to 64 MiB of address space each), the binary and its buffers.
pub const AS_MARGIN_MIB: u64 = 4096;

/// The capabilities a VMM serving virtio-fs keeps (virtiofsd's set without `CAP_MKNOD`): the
/// passthrough server switches its effective uid/gid to the guest caller's for each request
/// and creates, chowns and chmods files on the guest's behalf, file capabilities included.
/// Device nodes are refused (`devices::virtio::fs_policy`); FIFOs, sockets and whiteouts need
/// no capability.
pub const FS_CAPS: [Capability; 7] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
];

/// The capabilities the VMM keeps (when it stays uid 0): in its own user namespace by
/// default, in the caller's with `--no-userns`.
fn kept_caps(cfg: &VmConfig) -> HashSet<Capability> {
    let mut keep = HashSet::new();
    // A deferred start may receive `add-fs` before boot.
    if !cfg.fs.is_empty() || cfg.defer_start {
        keep.extend(FS_CAPS);
    }
    if !cfg.net.is_empty() && !cfg.jail.userns {
        // Attaching to a tap its owner did not hand to our uid (TUNSETIFF). The kernel checks
        // it in the user namespace owning the network namespace: never the VMM's own, so
        // there it would be useless.
        keep.insert(Capability::CAP_NET_ADMIN);
    }
    keep
}

/// The rlimits of the jailed VMM.
fn rlimits(cfg: &VmConfig, nr_open: u64) -> [(Resource, u64); 3] {
    let nofile = if cfg.fs.is_empty() && !cfg.defer_start {
        NOFILE
    } else {
        NOFILE_FS.min(nr_open)
    };
    [
        (Resource::RLIMIT_NOFILE, nofile),
        (
            Resource::RLIMIT_AS,
            (cfg.mem_mib + cfg.mem_hotplug_mib + AS_MARGIN_MIB).saturating_mul(1 << 20),
        ),
        // A core dump would hold guest memory.
        (Resource::RLIMIT_CORE, 0),
    ]
}

pub(super) fn limit(cfg: &VmConfig, nr_open: u64) -> Result<(), JailError> {
    for (res, v) in rlimits(cfg, nr_open) {
        let (_, hard) = getrlimit(res).map_err(sys(format!("getrlimit {res:?}")))?;
        // Raising a hard limit needs CAP_SYS_RESOURCE: without it, the current one stays.
        match setrlimit(res, v, v) {
            Ok(()) => {}
            Err(_) if v > hard => {
                setrlimit(res, hard, hard).map_err(sys(format!("setrlimit {res:?}")))?
            }
            Err(e) => return Err(sys(format!("setrlimit {res:?}"))(e)),
        }
    }
    Ok(())
}

/// With `--jail-uid`: drops the supplementary groups. Runs before the user namespace is
/// entered (its `setgroups` is denied there).
pub(super) fn drop_groups(cfg: &VmConfig) -> Result<(), JailError> {
    if cfg.jail.ids.is_some() {
        setgroups(&[]).map_err(sys("setgroups"))?;
    }
    Ok(())
}

/// Clears the bounding, ambient and inheritable sets, then either switches to
/// `--jail-uid`/`--jail-gid` or keeps [`kept_caps`]; sets `no_new_privs`. In the user
/// namespace this runs after it was entered (entering it fills every set again).
pub(super) fn drop_privileges(cfg: &VmConfig) -> Result<(), JailError> {
    for c in caps::all() {
        caps::drop(None, CapSet::Bounding, c).map_err(caps_err("clear the bounding set"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clear the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("clear the inheritable set"))?;
    match cfg.jail.ids {
        Some((uid, gid)) => {
            let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
            setresgid(gid, gid, gid).map_err(sys(format!("setresgid {gid}")))?;
            // Leaving uid 0 clears the permitted and effective sets.
            setresuid(uid, uid, uid).map_err(sys(format!("setresuid {uid}")))?;
        }
        None => {
            let keep = kept_caps(cfg);
            caps::set(None, CapSet::Effective, &keep).map_err(caps_err("set the effective set"))?;
            caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("set the permitted set"))?;
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(sys("PR_SET_NO_NEW_PRIVS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &str) -> VmConfig {
        VmConfig::from_args(args.split_whitespace().map(String::from)).unwrap()
    }

    #[test]
    fn caps_and_limits_follow_the_devices() {
        let plain = cfg("--kernel /k --mem-mib 512");
        assert!(kept_caps(&plain).is_empty());
        let l = rlimits(&plain, 1 << 30);
        assert_eq!(l[0], (Resource::RLIMIT_NOFILE, NOFILE));
        assert_eq!(l[1], (Resource::RLIMIT_AS, (512 + AS_MARGIN_MIB) << 20));
        assert_eq!(l[2], (Resource::RLIMIT_CORE, 0));
        let fs = cfg("--kernel /k --fs t=/d --net tap=t0");
        let k = kept_caps(&fs);
        assert!(FS_CAPS.iter().all(|c| k.contains(c)));
        assert!(!k.contains(&Capability::CAP_SYS_ADMIN));
        assert!(!k.contains(&Capability::CAP_MKNOD));
        assert_eq!(
            k.len(),
            FS_CAPS.len(),
            "no CAP_NET_ADMIN in the user namespace"
        );
        let k = kept_caps(&cfg("--kernel /k --fs t=/d --net tap=t0 --no-userns"));
        assert!(k.contains(&Capability::CAP_NET_ADMIN));
        assert_eq!(k.len(), FS_CAPS.len() + 1);
        assert_eq!(rlimits(&fs, 65536)[0], (Resource::RLIMIT_NOFILE, 65536));
    }
}
