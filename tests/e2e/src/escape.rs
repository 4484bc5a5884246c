//! The escape matrix: attacks from a privileged container inside a pod VM (all capabilities, may
//! mount: the guest kernel is effectively the attacker's), each checked on the HOST side.
//!
//! One campaign runs everything, lazily, once per run (each pod VM boot costs tens of seconds in
//! the software-KVM host): pod `esc-attack` (privileged; a read-only volume, a writable volume, a
//! writable volume on a 1 MiB host tmpfs, a read-only tools volume with a static probe) runs one
//! shell script that prints one `ESC <row> ...` line per attempt; the host then inspects its
//! files and mounts; then a second pod `esc-bystander` starts and the attacker floods its VMM
//! with virtio-fs and vsock requests while the host samples both VMMs. The rows are separate
//! trials ([`rows`]) that each assert their part of the recorded results, so a failure names its
//! row.
//!
//! Layers (docs/security.md, "Escape matrix"): the shim's host mounts (`ro`, `nodev`,
//! `nosuid`, the share a bounded tmpfs), the VMM's virtio-fs policy (no device nodes), the VMM
//! jail (its own binds, rlimits), the kernel's mount boundaries (`EXDEV`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use moat_e2e::containerd::{check, seen_by, shim_pid, Containerd, IMAGE, RUNTIME};
use moat_e2e::{Check, Context, Failed, Scratch};

use crate::faults::ensure_nothing_left;

mod rows;

pub use rows::trials;

const ATTACKER: &str = "esc-attack";
const BYSTANDER: &str = "esc-bystander";
/// Files the flood creates and holds open (each costs the VMM at least one fd).
const FLOOD_FILES: usize = 3000;
/// vsock connections the flood opens towards the host.
const FLOOD_VSOCK: usize = 2000;
/// Bound of one step that waits on the guest (the software-KVM host is slow).
const STEP_SECS: u64 = 300;

/// What the campaign recorded, for the row trials.
#[derive(Debug, Default)]
struct Record {
    /// `ESC <key> <rest>` lines of the guest, by key (a key may repeat: all values kept).
    guest: BTreeMap<String, Vec<String>>,
    /// Everything the guest printed, for messages.
    guest_text: String,
    /// Host-side observations by name.
    host: BTreeMap<&'static str, String>,
    /// Per-row failures found while running the campaign (a step that could not be done).
    errors: BTreeMap<char, String>,
    /// The cleanup check after both pods were removed.
    cleanup: Option<String>,
}

impl Record {
    fn guest(&self, key: &str) -> Result<String, Failed> {
        self.guest.get(key).map(|v| v.join(" | ")).ok_or_else(|| {
            format!(
                "the guest printed no `ESC {key}` line; it printed:\n{}",
                self.guest_text
            )
            .into()
        })
    }

    fn host(&self, key: &str) -> Result<&str, Failed> {
        self.host
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("no host observation `{key}`; recorded: {:?}", self.host).into())
    }

    fn row_ok(&self, row: char) -> Check {
        match self.errors.get(&row) {
            Some(e) => Err(e.clone().into()),
            None => Ok(()),
        }
    }
}

static RECORD: OnceLock<Result<Record, String>> = OnceLock::new();

fn record() -> Result<&'static Record, Failed> {
    RECORD
        .get_or_init(|| {
            let _g = crate::faults::serial();
            campaign().map_err(|e| e.message().unwrap_or("escape campaign failed").to_owned())
        })
        .as_ref()
        .map_err(|e| Failed::from(format!("the escape campaign failed: {e}")))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace('\r', "")
}

/// The host side of one pod's files.
struct Layout {
    _scratch: Scratch,
    ro: PathBuf,
    rw: PathBuf,
    small: PathBuf,
    tools: PathBuf,
    outside: PathBuf,
    secret: PathBuf,
    nonce: String,
}

impl Layout {
    fn new() -> Result<Self, Failed> {
        let scratch = Scratch::new("escape")?;
        let p = |n: &str| scratch.path().join(n);
        let (ro, rw, small, tools, outside) =
            (p("ro"), p("rw"), p("small"), p("tools"), p("outside"));
        for d in [&ro, &rw, &small, &tools, &outside] {
            std::fs::create_dir_all(d).context(format!("mkdir {}", d.display()))?;
        }
        // World-traversable, so an unprivileged host user can reach the share's files (row c).
        for d in [scratch.path(), &rw] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).context("chmod")?;
        }
        let nonce = format!(
            "SECRET-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        );
        let secret = outside.join("secret");
        std::fs::write(&secret, format!("{nonce}\n")).context("write secret")?;
        std::fs::write(ro.join("f"), "host\n").context("write ro/f")?;
        std::fs::write(rw.join("marker"), "rw\n").context("write rw/marker")?;
        // A probe binary an unprivileged user may run; the guest makes it setuid (row c).
        std::fs::copy("/usr/bin/id", rw.join("idcopy")).context("copy /usr/bin/id")?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0755", "esc-small"])
            .arg(&small)
            .output()
            .context("mount tmpfs")?;
        check(&out, "mount the 1 MiB tmpfs volume")?;
        let out = Command::new("gcc")
            .args(["-static", "-O1", "-o"])
            .arg(tools.join("probe"))
            .arg(moat_e2e::workspace_root().join("tests/e2e/src/escape_probe.c"))
            .output()
            .context("run gcc (apt-get install gcc libc6-dev)")?;
        check(&out, "gcc -static escape_probe.c")?;
        std::fs::write(tools.join("attack.sh"), ATTACK_SCRIPT).context("write attack.sh")?;
        Ok(Self {
            _scratch: scratch,
            ro,
            rw,
            small,
            tools,
            outside,
            secret,
            nonce,
        })
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.small).status();
    }
}

/// The guest side of rows a-g: `sh /tools/attack.sh ID SECRET_PATH OUTSIDE_DIR`. `try` runs a
/// command and prints its status and output on one line.
const ATTACK_SCRIPT: &str = r#"
id=$1; secret=$2; outside=$3
try() { out=$("$@" 2>&1); rc=$?; echo "rc=$rc $out" | tr '\n' ' '; }
say() { k=$1; shift; echo "ESC $k $*"; }
rel_of() { awk -v d="$1" '$5==d {print $4}' /proc/self/mountinfo | tail -1; }

# (a) a read-only volume, before and after remounting it rw in the guest, and through a fresh
# mount of the whole share (same virtio-fs superblock).
say a-write-ro "$(try sh -c 'echo guest > /ro/f')"
say a-remount-rw "$(try mount -o remount,rw,bind /ro)"
say a-write-after-remount "$(try sh -c 'echo guest > /ro/f')"
say a-create-after-remount "$(try sh -c 'echo guest > /ro/new')"
say a-chmod-after-remount "$(try chmod 777 /ro/f)"
mkdir -p /mnt/share
say share-mount "$(try mount -t virtiofs moatfs /mnt/share)"
ro=/mnt/share$(rel_of /ro); rw=/mnt/share$(rel_of /rw)
say share-paths "ro=$ro rw=$rw"
say a-write-via-share "$(try sh -c "echo guest > $ro/f")"
say a-unlink-via-share "$(try rm -f $ro/f)"

# (b) device nodes in a writable volume.
say b-mknod-char-mem "$(try mknod /rw/mem c 1 1)"
say b-mknod-char-null "$(try mknod /rw/null c 1 3)"
say b-mknod-block "$(try mknod /rw/blk b 7 0)"
say b-mknod-fifo "$(try mknod /rw/fifo p)"
say b-mknod-via-share "$(try mknod $rw/mem2 c 1 1)"

# (c) setuid binaries placed by the guest.
say c-chmod-suid-hostfile "$(try chmod 4755 /rw/idcopy)"
say c-copy-busybox "$(try cp /bin/busybox /rw/bb)"
say c-chmod-suid-guestfile "$(try chmod 4755 /rw/bb)"
say c-modes "$(ls -ln /rw/idcopy /rw/bb | tr -s ' ' | tr '\n' ';')"

# (d) symlinks and .. pointing out of the volume and the share.
say d-link-abs "$(try ln -s $secret /rw/abs)"
say d-link-rel "$(try ln -s ../outside/secret /rw/rel)"
say d-link-up "$(try ln -s ../../../../../../../../../../.. /rw/up)"
say d-read-abs "$(try cat /rw/abs)"
say d-read-rel "$(try cat /rw/rel)"
say d-read-up "$(try cat /rw/up$secret)"
say d-read-share-dotdot "$(try cat /mnt/share/../outside/secret /mnt/share/../../../../../../$secret)"
say d-list-share-dotdot "$(try ls /mnt/share/.. /mnt/share/$id/..)"
say d-plant-in-share "$(try ln -s $outside /mnt/share/$id/evil)"
say d-plant-in-share-root "$(try ln -s $outside /mnt/share/evil-root)"
say d-plant-mounts-link "$(try ln -s $outside /mnt/share/$id/mounts/evil)"

# (e) hard links to files outside the volume.
say e-link-ro-into-rw "$(try ln $ro/f $rw/hl-ro)"
say e-link-rootfs-into-rw "$(try ln /mnt/share/$id/rootfs/bin/busybox $rw/hl-rootfs)"
say e-link-guest-file "$(try ln /etc/passwd /rw/hl-guest)"
# ... while hard links inside one volume work, plain and through the whole-share mount.
echo linked > /rw/orig
say e-link-within-rw "$(try ln /rw/orig /rw/hl-within)"
say e-link-within-via-share "$(try ln $rw/orig $rw/hl-within-share)"
say e-link-within-read "$(try cat /rw/hl-within-share)"

# (f) forged file handles against virtio-fs.
/tools/probe handles /rw

# (i) the agent's vsock ports, from a container (AF_VSOCK is not namespaced).
/tools/probe vsock

# (g) filling a size-limited volume and the share itself.
say g-fill-volume "$(try dd if=/dev/zero of=/small/fill bs=65536 count=64 conv=fsync)"
say g-fill-share-root "$(try dd if=/dev/zero of=/mnt/share/fill bs=65536 count=128 conv=fsync)"
say g-fill-share-dir "$(try dd if=/dev/zero of=/mnt/share/$id/fill bs=65536 count=128 conv=fsync)"
rm -f /mnt/share/fill /mnt/share/$id/fill
say done "ok"
"#;

/// `ESC key rest` lines.
fn parse_guest(out: &str) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix("ESC ") {
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            m.entry(k.to_owned()).or_default().push(v.trim().to_owned());
        }
    }
    m
}

/// The pod's shared directory on the host, as its shim sees it (the share and everything
/// mounted below it live in the shim's mount namespace).
fn shared_of(c: &Containerd, id: &str) -> PathBuf {
    c.moat_state.join("default").join(id).join("shared")
}

/// The share's copy of the host directory whose `marker` file is `name` (its index is the
/// spec's, unknown here), as a path in the shim's mount namespace.
fn share_copy_of(c: &Containerd, shim: u32, id: &str, file: &str) -> Result<PathBuf, Failed> {
    let dir = shared_of(c, id).join(id).join("mounts");
    let seen = seen_by(shim, &dir);
    for e in std::fs::read_dir(&seen).context(format!("read {}", seen.display()))? {
        let name = e.context("read_dir")?.file_name();
        if seen.join(&name).join(file).exists() {
            return Ok(dir.join(name));
        }
    }
    Err(format!("no entry of {} holds {file}", seen.display()).into())
}

/// Pids of moat-vmm for pod `id`: the supervisor named by vmm.pid and its children.
fn vmm_pids(c: &Containerd, id: &str) -> Result<Vec<u32>, Failed> {
    let path = c.moat_state.join("default").join(id).join("vmm.pid");
    let sup: u32 = std::fs::read_to_string(&path)
        .context(format!("read {}", path.display()))?
        .trim()
        .parse()
        .context("parse vmm.pid")?;
    let mut pids = vec![sup];
    let children =
        std::fs::read_to_string(format!("/proc/{sup}/task/{sup}/children")).unwrap_or_default();
    pids.extend(
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok()),
    );
    Ok(pids)
}

/// `fds=N rss_kib=N nofile=N alive=B` of the jailed VMM (the last pid: the supervisor's child).
fn vmm_sample(c: &Containerd, id: &str) -> Result<(usize, u64, u64, bool), Failed> {
    let pids = vmm_pids(c, id)?;
    let vmm = *pids.last().ok_or("no moat-vmm pid")?;
    let fds = std::fs::read_dir(format!("/proc/{vmm}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let limits = std::fs::read_to_string(format!("/proc/{vmm}/limits")).unwrap_or_default();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0);
    let alive = pids
        .iter()
        .all(|p| Path::new(&format!("/proc/{p}")).exists());
    Ok((fds, rss, nofile, alive))
}

/// Runs `path` as nobody, in the mount namespace of process `ns` when given.
fn run_as_nobody(path: &Path, ns: Option<u32>) -> String {
    let mut cmd = match ns {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--mount=/proc/{pid}/ns/mnt")).arg("setpriv");
            c
        }
        None => Command::new("setpriv"),
    };
    let out = cmd
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(path)
        .output();
    match out {
        Ok(o) => format!("{} {}", o.status, text(&o.stdout).trim()) + &text(&o.stderr),
        Err(e) => format!("cannot run: {e}"),
    }
}

fn device_nodes(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_type()
                        .map(|t| {
                            use std::os::unix::fs::FileTypeExt;
                            t.is_char_device() || t.is_block_device()
                        })
                        .unwrap_or(false)
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn used_kib(dir: &Path) -> String {
    Command::new("du")
        .args(["-sk"])
        .arg(dir)
        .output()
        .map(|o| {
            text(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_owned()
        })
        .unwrap_or_default()
}

fn campaign() -> Result<Record, Failed> {
    let c = Containerd::shared()?;
    let lay = Layout::new()?;
    let mut rec = Record::default();
    let mount = |src: &Path, dst: &str, opts: &str| {
        format!("type=bind,src={},dst={dst},options={opts}", src.display())
    };
    let (m_ro, m_rw, m_small, m_tools) = (
        mount(&lay.ro, "/ro", "rbind:ro"),
        mount(&lay.rw, "/rw", "rbind:rw"),
        mount(&lay.small, "/small", "rbind:rw"),
        mount(&lay.tools, "/tools", "rbind:ro"),
    );
    let out = c.run_ctr(&[
        "run",
        "-d",
        "--privileged",
        "--mount",
        &m_ro,
        "--mount",
        &m_rw,
        "--mount",
        &m_small,
        "--mount",
        &m_tools,
        "--runtime",
        RUNTIME,
        IMAGE,
        ATTACKER,
        "sleep",
        "1000",
    ])?;
    check(&out, "ctr run -d --privileged esc-attack")?;
    let res = attack(c, &lay, &mut rec);
    // Whatever happened: remove both pods, then check nothing is left.
    for id in [ATTACKER, BYSTANDER] {
        let _ = c.run_ctr(&["task", "rm", "-f", id]);
        let _ = c.run_ctr(&["container", "rm", id]);
    }
    res?;
    let left = [ATTACKER, BYSTANDER]
        .iter()
        .map(|id| {
            ensure_nothing_left(c, id)
                .err()
                .and_then(|e| e.message().map(str::to_owned))
        })
        .collect::<Vec<_>>();
    let left: Vec<String> = left.into_iter().flatten().collect();
    // After the pod's removal: the shim's cleanup did not follow the links the guest planted.
    let secret_ok = std::fs::read_to_string(&lay.secret)
        .unwrap_or_default()
        .contains(&lay.nonce);
    rec.host
        .insert("d-secret-after-removal", secret_ok.to_string());
    rec.host.insert(
        "d-outside-after-removal",
        format!(
            "{:?}",
            std::fs::read_dir(&lay.outside).map(|d| d.count()).ok()
        ),
    );
    rec.cleanup = Some(left.join("; "));
    Ok(rec)
}

fn attack(c: &Containerd, lay: &Layout, rec: &mut Record) -> Check {
    let secret = lay.secret.to_string_lossy().into_owned();
    let outside = lay.outside.to_string_lossy().into_owned();
    let shared = shared_of(c, ATTACKER);
    let shim = shim_pid(ATTACKER)?;
    rec.host
        .insert("share-mountinfo", mountinfo_below(shim, &shared));
    let out = c.run_ctr(&[
        "task",
        "exec",
        "--exec-id",
        "attack",
        ATTACKER,
        "sh",
        "/tools/attack.sh",
        ATTACKER,
        &secret,
        &outside,
    ])?;
    rec.guest_text = format!("{}{}", text(&out.stdout), text(&out.stderr));
    rec.guest = parse_guest(&rec.guest_text);
    eprintln!("escape: guest said:\n{}", rec.guest_text);

    // Host-side observations, rows a-g.
    rec.host.insert(
        "a-ro-file",
        std::fs::read_to_string(lay.ro.join("f")).unwrap_or_else(|e| format!("unreadable: {e}")),
    );
    rec.host.insert(
        "a-ro-entries",
        format!(
            "{:?}",
            std::fs::read_dir(&lay.ro)
                .map(|d| d
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .collect::<Vec<_>>())
                .ok()
        ),
    );
    rec.host
        .insert("b-devices-in-volume", device_nodes(&lay.rw).join(","));
    let rw_copy = share_copy_of(c, shim, ATTACKER, "marker")?;
    let mut via_share = Vec::new();
    for name in device_nodes(&lay.rw) {
        let r = std::fs::File::open(seen_by(shim, &rw_copy.join(&name)));
        via_share.push(format!(
            "{name}:{}",
            r.map(|_| "OPENED".to_owned())
                .unwrap_or_else(|e| e.to_string())
        ));
    }
    rec.host.insert("b-open-via-share", via_share.join(","));
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| format!("{:o} uid={}", m.mode(), m.uid()))
            .unwrap_or_else(|e| e.to_string())
    };
    rec.host
        .insert("c-mode-idcopy", mode(&lay.rw.join("idcopy")));
    rec.host.insert("c-mode-bb", mode(&lay.rw.join("bb")));
    rec.host.insert(
        "c-run-via-share",
        run_as_nobody(&rw_copy.join("idcopy"), Some(shim)),
    );
    rec.host.insert(
        "c-run-via-source",
        run_as_nobody(&lay.rw.join("idcopy"), None),
    );
    rec.host.insert(
        "e-ro-nlink",
        std::fs::metadata(lay.ro.join("f"))
            .map(|m| m.nlink().to_string())
            .unwrap_or_default(),
    );
    rec.host.insert(
        "e-links-in-volume",
        ["hl-ro", "hl-rootfs", "hl-guest"]
            .iter()
            .filter(|n| lay.rw.join(n).exists())
            .copied()
            .collect::<Vec<_>>()
            .join(","),
    );
    rec.host.insert(
        "e-within-nlink",
        ["orig", "hl-within", "hl-within-share"]
            .iter()
            .map(|n| {
                std::fs::metadata(lay.rw.join(n))
                    .map(|m| format!("{}:{}", m.ino(), m.nlink()))
                    .unwrap_or_else(|e| e.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
    );
    rec.host.insert("g-small-kib", used_kib(&lay.small));
    rec.host
        .insert("g-share-kib", used_kib(&seen_by(shim, &shared)));
    rec.host.insert(
        "g-share-fstype",
        mountinfo_below(shim, &shared)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned(),
    );

    // (h) the flood, with a second pod beside it.
    if let Err(e) = flood(c, lay, rec) {
        rec.errors
            .insert('h', e.message().unwrap_or("flood failed").to_owned());
    }
    Ok(())
}

/// Lines of process `pid`'s mount table at or below `dir`.
fn mountinfo_below(pid: u32, dir: &Path) -> String {
    let d = dir.to_string_lossy();
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&*d)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads lines of `child`'s stdout until one starts with `prefix` (bounded by [`STEP_SECS`]).
fn wait_line(
    child: &mut Child,
    reader: &mut BufReader<std::process::ChildStdout>,
    prefix: &str,
) -> Result<String, Failed> {
    let deadline = Instant::now() + Duration::from_secs(STEP_SECS);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        // The exec's output ends when it exits; `timeout` (below) bounds the whole exec.
        let n = reader
            .read_line(&mut line)
            .context("read the flood's output")?;
        if n == 0 || Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("the flood never printed `{prefix}`; it printed:\n{seen}").into());
        }
        seen.push_str(&line);
        if line.starts_with(prefix) {
            return Ok(line.trim().to_owned());
        }
    }
}

fn flood(c: &Containerd, lay: &Layout, rec: &mut Record) -> Check {
    c.run_sleeper(BYSTANDER, 1000)?;
    let before = vmm_sample(c, ATTACKER)?;
    rec.host.insert("h-before", format!("{before:?}"));
    let release = lay.rw.join("release");
    let mut child = Command::new("timeout")
        .arg((STEP_SECS * 2).to_string())
        .arg("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args([
            "task",
            "exec",
            "--exec-id",
            "flood",
            ATTACKER,
            "/tools/probe",
            "flood",
            "/rw",
        ])
        .arg(FLOOD_FILES.to_string())
        .arg(FLOOD_VSOCK.to_string())
        .arg("/rw/release")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn ctr task exec flood")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut reader = BufReader::new(stdout);
    let held = wait_line(&mut child, &mut reader, "ESC h-held");
    // Sample while the flood is held, and use the other pod meanwhile.
    let during = vmm_sample(c, ATTACKER);
    let other = c.run_ctr(&[
        "task",
        "exec",
        "--exec-id",
        "alive",
        BYSTANDER,
        "echo",
        "bystander-alive",
    ]);
    let _ = std::fs::write(&release, "go");
    let released = held
        .as_ref()
        .ok()
        .map(|_| wait_line(&mut child, &mut reader, "ESC h-released"));
    let _ = child.wait();
    rec.host.insert("h-held", held?);
    if let Some(r) = released {
        rec.host.insert("h-released", r?);
    }
    rec.host.insert("h-during", format!("{:?}", during?));
    let other = other?;
    rec.host.insert(
        "h-bystander",
        format!("{} {}", other.status, text(&other.stdout).trim()),
    );
    let again = c.run_ctr(&[
        "task",
        "exec",
        "--exec-id",
        "again",
        ATTACKER,
        "sh",
        "-c",
        "rm -f /rw/flood-*; echo attacker-alive",
    ])?;
    rec.host.insert(
        "h-attacker-after",
        format!("{} {}", again.status, text(&again.stdout).trim()),
    );
    rec.host
        .insert("h-after", format!("{:?}", vmm_sample(c, ATTACKER)?));
    Ok(())
}
