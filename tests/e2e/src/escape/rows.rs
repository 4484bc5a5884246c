//! The escape matrix's rows: one trial per attack, each asserting its part of what the
//! campaign ([`super`]) recorded in the guest and on the host.

use moat_e2e::{ensure, trial, Check, Trial};

use super::record;

pub fn trials() -> Vec<Trial> {
    vec![
        trial("escape::a_read_only_volume_stays_read_only", row_a),
        trial("escape::b_device_nodes_do_not_reach_host_devices", row_b),
        trial(
            "escape::c_setuid_from_the_guest_gives_no_host_privilege",
            row_c,
        ),
        trial("escape::d_symlinks_and_dotdot_stay_in_the_share", row_d),
        trial("escape::e_no_hard_link_to_files_outside", row_e),
        trial("escape::f_forged_file_handles_open_nothing_outside", row_f),
        trial(
            "escape::g_filling_is_bounded_by_the_volume_and_the_share",
            row_g,
        ),
        trial("escape::h_flood_keeps_the_vmm_in_its_limits", row_h),
        trial(
            "escape::i_containers_cannot_reach_the_agent_over_vsock",
            row_i,
        ),
        trial("escape::campaign_leaves_nothing", row_cleanup),
    ]
}

/// Parses `rc=N` at the start of a guest result.
fn rc(v: &str) -> Option<i32> {
    v.strip_prefix("rc=")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn failed(v: &str) -> bool {
    rc(v).is_some_and(|r| r != 0)
}

fn row_a() -> Check {
    let r = record()?;
    r.row_ok('a')?;
    ensure(
        r.host("a-ro-file")? == "host\n",
        format!(
            "the host file of the ro volume changed: {:?}",
            r.host("a-ro-file")?
        ),
    )?;
    ensure(
        r.host("a-ro-entries")?.contains("\"f\"") && !r.host("a-ro-entries")?.contains("new"),
        format!(
            "the ro volume's entries changed: {}",
            r.host("a-ro-entries")?
        ),
    )?;
    // The remount in the guest is allowed (the guest is root of its VM); what counts is that
    // the writes after it fail with EROFS from the host.
    for k in [
        "a-write-ro",
        "a-write-after-remount",
        "a-create-after-remount",
        "a-chmod-after-remount",
        "a-write-via-share",
        "a-unlink-via-share",
    ] {
        let v = r.guest(k)?;
        ensure(
            failed(&v),
            format!("{k}: the write succeeded in the guest: {v}"),
        )?;
    }
    for k in ["a-write-after-remount", "a-write-via-share"] {
        let v = r.guest(k)?;
        ensure(
            v.contains("Read-only file system"),
            format!("{k}: expected EROFS from the host, got: {v}"),
        )?;
    }
    eprintln!(
        "escape: a: remount in the guest: {}",
        r.guest("a-remount-rw")?
    );
    Ok(())
}

fn row_b() -> Check {
    let r = record()?;
    r.row_ok('b')?;
    for k in [
        "b-mknod-char-mem",
        "b-mknod-char-null",
        "b-mknod-block",
        "b-mknod-via-share",
    ] {
        let v = r.guest(k)?;
        ensure(
            failed(&v),
            format!("{k}: the guest created a device node in a volume: {v}"),
        )?;
    }
    // Control: what containers need still works.
    let fifo = r.guest("b-mknod-fifo")?;
    ensure(
        rc(&fifo) == Some(0),
        format!("mknod of a FIFO in a volume failed: {fifo}"),
    )?;
    ensure(
        r.host("b-devices-in-volume")?.is_empty(),
        format!(
            "device nodes appeared in the host volume: {}",
            r.host("b-devices-in-volume")?
        ),
    )?;
    ensure(
        !r.host("b-open-via-share")?.contains("OPENED"),
        format!(
            "a device node opened through the share: {}",
            r.host("b-open-via-share")?
        ),
    )
}

fn row_c() -> Check {
    let r = record()?;
    r.row_ok('c')?;
    let via_share = r.host("c-run-via-share")?;
    eprintln!(
        "escape: c: modes idcopy {} bb {}; as nobody via the share: {via_share}; via the volume's host source: {}",
        r.host("c-mode-idcopy")?,
        r.host("c-mode-bb")?,
        r.host("c-run-via-source")?
    );
    ensure(
        via_share.contains("uid=65534"),
        format!("the probe did not run as nobody through the share: {via_share}"),
    )?;
    ensure(
        !via_share.contains("euid=0"),
        format!("a setuid binary from the guest gave root through the share: {via_share}"),
    )?;
    // The volume's host source is an ordinary host directory (not a mount of the shim's):
    // nosuid cannot apply there. The guest must not be able to leave a setuid-root file in it.
    let via_source = r.host("c-run-via-source")?;
    ensure(
        !via_source.contains("euid=0"),
        format!(
            "ESCAPE: the guest made a host-root-owned file setuid in a writable volume ({}); run by \
             an unprivileged host user from the volume's host path it gives: {via_source}",
            r.host("c-mode-idcopy")?
        ),
    )
}

fn row_d() -> Check {
    let r = record()?;
    r.row_ok('d')?;
    let nonce_seen = r.guest_text.contains("SECRET-");
    ensure(
        !nonce_seen,
        format!(
            "the guest read the host file outside the share:\n{}",
            r.guest_text
        ),
    )?;
    for k in [
        "d-read-abs",
        "d-read-rel",
        "d-read-up",
        "d-read-share-dotdot",
    ] {
        r.guest(k)?;
    }
    let listing = r.guest("d-list-share-dotdot")?;
    for host_only in ["vmm.pid", "console.log", "vsock.sock", "outside"] {
        ensure(
            !listing.contains(host_only),
            format!("`..` of the share listed host entries ({host_only}): {listing}"),
        )?;
    }
    ensure(r.cleanup.is_some(), "the pods were not removed")?;
    ensure(
        r.host("d-secret-after-removal")? == "true",
        "the file the guest's links pointed at is gone after the pod's removal",
    )?;
    ensure(
        r.host("d-outside-after-removal")? == "Some(1)",
        format!(
            "the directory the guest's links pointed at changed: {}",
            r.host("d-outside-after-removal")?
        ),
    )
}

fn row_e() -> Check {
    let r = record()?;
    r.row_ok('e')?;
    for k in [
        "e-link-ro-into-rw",
        "e-link-rootfs-into-rw",
        "e-link-guest-file",
    ] {
        let v = r.guest(k)?;
        ensure(failed(&v), format!("{k}: the hard link was made: {v}"))?;
    }
    ensure(
        r.host("e-ro-nlink")? == "1",
        format!(
            "the ro file got another link: nlink {}",
            r.host("e-ro-nlink")?
        ),
    )?;
    for k in ["e-link-within-rw", "e-link-within-via-share"] {
        let v = r.guest(k)?;
        ensure(
            !failed(&v),
            format!("{k}: a hard link inside one volume failed: {v}"),
        )?;
    }
    // The three names are one host inode with three links.
    let within = r.host("e-within-nlink")?;
    let inodes: Vec<&str> = within.split(',').collect();
    ensure(
        inodes.len() == 3 && inodes.iter().all(|i| *i == inodes[0]) && inodes[0].ends_with(":3"),
        format!("the links inside the volume are not one inode with 3 links: {within}"),
    )?;
    ensure(
        r.host("e-links-in-volume")?.is_empty(),
        format!(
            "links appeared in the volume: {}",
            r.host("e-links-in-volume")?
        ),
    )
}

fn row_f() -> Check {
    let r = record()?;
    r.row_ok('f')?;
    let forged = r.guest("f-forged")?;
    eprintln!(
        "escape: f: {} / {} / {forged}",
        r.guest("f-name-to-handle")?,
        r.guest("f-real")?
    );
    // A forged handle may only ever name what the server already handed to this guest (the
    // share's own inodes); nothing opened may show the host around the share.
    let opened = r
        .guest
        .get("f-forged-open")
        .cloned()
        .unwrap_or_default()
        .join("\n");
    for host_only in [
        "vmm.pid",
        "console.log",
        "vsock.sock",
        "SECRET-",
        "outside,",
        "etc,",
        "usr,",
    ] {
        ensure(
            !opened.contains(host_only),
            format!(
                "a forged handle opened a host object outside the share ({host_only}):\n{opened}"
            ),
        )?;
    }
    ensure(
        forged.contains("tried="),
        format!("the probe did not run: {forged}"),
    )
}

fn row_g() -> Check {
    let r = record()?;
    r.row_ok('g')?;
    let v = r.guest("g-fill-volume")?;
    ensure(
        failed(&v) && v.contains("No space left"),
        format!("filling the 1 MiB volume: expected ENOSPC, got: {v}"),
    )?;
    let kib: u64 = r.host("g-small-kib")?.parse().unwrap_or(u64::MAX);
    ensure(kib <= 1024, format!("the 1 MiB volume holds {kib} KiB"))?;
    // The share itself is a small tmpfs of the shim's: writing into it directly (not into a
    // volume or the rootfs) ends in ENOSPC instead of filling the host's state directory.
    for k in ["g-fill-share-root", "g-fill-share-dir"] {
        let v = r.guest(k)?;
        ensure(
            failed(&v) && v.contains("No space left"),
            format!(
                "{k}: expected ENOSPC, got: {v}\nshare: {}",
                r.host("g-share-fstype")?
            ),
        )?;
    }
    Ok(())
}

/// `(fds, rss_kib, nofile, alive)` as recorded.
fn sample(s: &str) -> Option<(usize, u64, u64, bool)> {
    let t = s.trim_matches(|c| c == '(' || c == ')');
    let mut p = t.split(", ");
    Some((
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
        p.next()? == "true",
    ))
}

fn row_h() -> Check {
    let r = record()?;
    r.row_ok('h')?;
    let held = r.host("h-held")?;
    eprintln!(
        "escape: h: before {} during {} after {}; {held}",
        r.host("h-before")?,
        r.host("h-during")?,
        r.host("h-after")?
    );
    let (fds0, _, nofile, _) = sample(r.host("h-before")?).ok_or("unparsable sample")?;
    let (fds1, rss1, _, alive1) = sample(r.host("h-during")?).ok_or("unparsable sample")?;
    let (_, _, _, alive2) = sample(r.host("h-after")?).ok_or("unparsable sample")?;
    ensure(
        alive1 && alive2,
        "the attacker's moat-vmm died under the flood",
    )?;
    ensure(
        fds1 <= nofile as usize,
        format!("moat-vmm holds {fds1} fds, above its RLIMIT_NOFILE {nofile}"),
    )?;
    ensure(
        fds1 > fds0,
        format!("the flood did not reach the VMM (fds {fds0} → {fds1}): {held}"),
    )?;
    // Guest RAM (256 MiB) plus the VMM's own: bounded by RLIMIT_AS; here a generous bound.
    ensure(
        rss1 < 1024 * 1024,
        format!("moat-vmm's RSS under the flood is {rss1} KiB"),
    )?;
    ensure(
        r.host("h-bystander")?.contains("bystander-alive"),
        format!(
            "the other pod did not answer during the flood: {}",
            r.host("h-bystander")?
        ),
    )?;
    ensure(
        r.host("h-attacker-after")?.contains("attacker-alive"),
        format!(
            "the flooding pod's agent did not answer afterwards: {}",
            r.host("h-attacker-after")?
        ),
    )
}

fn row_i() -> Check {
    let r = record()?;
    r.row_ok('i')?;
    let tries = r.guest.get("i-connect").cloned().unwrap_or_default();
    eprintln!("escape: i: own cid {}: {tries:?}", r.guest("i-own-cid")?);
    ensure(
        tries.len() == 6,
        format!("the vsock probe did not try all 6 addresses: {tries:?}"),
    )?;
    let connected: Vec<&String> = tries
        .iter()
        .filter(|t| t.split_whitespace().any(|w| w == "rc=0"))
        .collect();
    ensure(
        connected.is_empty(),
        format!("a container connected to an agent port over vsock: {connected:?}"),
    )
}

fn row_cleanup() -> Check {
    let r = record()?;
    match &r.cleanup {
        Some(left) if left.is_empty() => Ok(()),
        Some(left) => Err(format!("left behind: {left}").into()),
        None => Err("the campaign did not get to its cleanup".into()),
    }
}
