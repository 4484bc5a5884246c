//! virtio-fs served inside the VMM: FUSE requests from the guest's queues are handed to
//! fuse-backend-rs's `Server` over a `PassthroughFs` rooted at the shared host directory.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT), queue 1 the single request queue.
//! No DAX window: the guest reads and writes through the queues. The passthrough server sits
//! behind [`PolicyFs`], which refuses device nodes (see [`super::fs_policy`]).

use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use vmm_sys_util::eventfd::EventFd;

use super::fs_policy::PolicyFs;
use super::{
    device_type, drain_queue, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::metrics::{bump, FsCounters};

const QUEUE_SIZE: u16 = 256;
const NUM_QUEUES: usize = 2;
/// Size of the `tag` field of the config space.
pub const TAG_LEN: usize = 36;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or longer than 36 bytes.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    Tag(String),
    /// The shared directory is not a directory.
    #[error("virtio-fs shared path {0} is not a directory")]
    NotADirectory(String),
    /// fuse-backend-rs could not open the directory.
    #[error("cannot share {path} over virtio-fs: {err}")]
    Passthrough {
        /// The directory.
        path: String,
        /// The error.
        #[source]
        err: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// The virtio-fs device.
pub struct Fs {
    config: [u8; TAG_LEN + 4],
    server: Arc<Server<Arc<PolicyFs<PassthroughFs>>>>,
    evts: [EventFd; NUM_QUEUES],
    active: Option<ActivateContext>,
    stats: Arc<FsCounters>,
}

impl Fs {
    /// Shares `dir` under `tag`.
    pub fn new(tag: &str, dir: &Path) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.to_string()));
        }
        let display = dir.display().to_string();
        if !dir.is_dir() {
            return Err(FsError::NotADirectory(display));
        }
        let passthrough_err = |err| FsError::Passthrough {
            path: display.clone(),
            err,
        };
        let cfg = Config {
            root_dir: display.clone(),
            do_import: true,
            xattr: true,
            cache_policy: CachePolicy::Auto,
            ..Default::default()
        };
        let fs = PassthroughFs::new(cfg).map_err(passthrough_err)?;
        fs.import().map_err(passthrough_err)?;
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd);
        Ok(Self {
            config,
            server: Arc::new(Server::new(Arc::new(PolicyFs::new(fs)))),
            evts: [evt()?, evt()?],
            active: None,
            stats: Arc::default(),
        })
    }

    /// The device's counters, shared with the control socket's `metrics`.
    pub fn counters(&self) -> Arc<FsCounters> {
        self.stats.clone()
    }

    /// Serves every pending request of queue `index`.
    pub fn process_queue(&mut self, index: usize) {
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        let mem = ctx.mem.clone();
        let server = self.server.clone();
        let stats = &self.stats;
        drain_queue(&mut ctx.queues[index], &mem, &ctx.irq, |chain| {
            bump(&stats.requests, 1);
            let reader = match Reader::from_descriptor_chain(&mem, chain.clone()) {
                Ok(r) => r,
                Err(e) => {
                    bump(&stats.errors, 1);
                    guest_warn!("virtio-fs: malformed request: {e}");
                    return 0;
                }
            };
            let writer = match VirtioFsWriter::new(&mem, chain) {
                Ok(w) => w,
                Err(e) => {
                    bump(&stats.errors, 1);
                    guest_warn!("virtio-fs: malformed request: {e}");
                    return 0;
                }
            };
            match server.handle_message(reader, writer.into(), None, None) {
                Ok(n) => {
                    bump(&stats.reply_bytes, n as u64);
                    n as u32
                }
                Err(e) => {
                    bump(&stats.errors, 1);
                    guest_warn!("virtio-fs: request failed: {e}");
                    0
                }
            }
        });
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data)
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.expect_queues(NUM_QUEUES)?;
        self.active = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Fs {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(i) = super::fired_queue(&self.evts, &events) {
            self.process_queue(i);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        super::register_queue_events(&self.evts, ops, "virtio-fs");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::Driver;
    use crate::devices::virtio::IrqTrigger;
    use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, OutHeader};
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    const FUSE_INIT: u32 = 26;
    const FUSE_LOOKUP: u32 = 1;
    const REQ: u64 = 0x10000;
    const REPLY: u64 = 0x20000;

    fn share(name: &str) -> (Fs, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("moat-vfs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hello"), b"hi").unwrap();
        (Fs::new("share", &dir).unwrap(), dir)
    }

    fn activate(fs: &mut Fs, d: &Driver) {
        fs.activate(ActivateContext {
            mem: d.mem.clone(),
            queues: vec![d.queue(), d.queue()],
            acked_features: VIRTIO_F_VERSION_1,
            irq: Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        })
        .unwrap();
    }

    #[test]
    fn config_space_has_tag_and_queue_count() {
        let (fs, dir) = share("config");
        let mut tag = [0u8; 6];
        fs.read_config(0, &mut tag);
        assert_eq!(&tag, b"share\0");
        let mut n = [0u8; 4];
        fs.read_config(TAG_LEN as u64, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn init_and_lookup_through_the_queue() {
        let (mut fs, dir) = share("queue");
        let mut d = Driver::new(64);
        activate(&mut fs, &d);
        let init_len = (std::mem::size_of::<InHeader>() + std::mem::size_of::<InitIn>()) as u32;
        let hdr = InHeader {
            len: init_len,
            opcode: FUSE_INIT,
            unique: 1,
            nodeid: 0,
            ..Default::default()
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: 0,
        };
        d.mem.write_obj(hdr, GuestAddress(REQ)).unwrap();
        d.mem
            .write_slice(
                init.as_slice(),
                GuestAddress(REQ + std::mem::size_of::<InHeader>() as u64),
            )
            .unwrap();
        d.add_chain(&[(REQ, init_len, false), (REPLY, 4096, true)]);
        fs.process_queue(1);
        let out: OutHeader = d.mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!(out.error, 0);
        assert_eq!(out.unique, 1);
        assert_eq!(d.used(0).1, out.len);

        // LOOKUP "hello" in the root (node 1).
        let name = b"hello\0";
        let len = (std::mem::size_of::<InHeader>() + name.len()) as u32;
        let hdr = InHeader {
            len,
            opcode: FUSE_LOOKUP,
            unique: 2,
            nodeid: 1,
            ..Default::default()
        };
        d.mem.write_obj(hdr, GuestAddress(REQ)).unwrap();
        d.mem
            .write_slice(
                name,
                GuestAddress(REQ + std::mem::size_of::<InHeader>() as u64),
            )
            .unwrap();
        d.add_chain(&[(REQ, len, false), (REPLY, 4096, true)]);
        fs.process_queue(1);
        let out: OutHeader = d.mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!((out.error, out.unique), (0, 2));

        // Malformed: reply buffer outside guest memory, and a chain with no header.
        d.add_chain(&[(REQ, len, false), (0x4000_0000, 4096, true)]);
        d.add_chain(&[(REPLY, 4096, true)]);
        fs.process_queue(1);
        assert_eq!(d.used_idx(), 4);
        assert_eq!(d.used(2).1, 0);
        assert_eq!(d.used(3).1, 0);
        let c = crate::metrics::CounterSource::snapshot(&*fs.counters());
        assert_eq!((c["requests"], c["errors"]), (4, 2), "{c:?}");
        assert_eq!(c["reply_bytes"], u64::from(d.used(0).1 + d.used(1).1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Sends one FUSE request (header + `body`) and returns the reply's error and payload.
    fn call(fs: &mut Fs, d: &mut Driver, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        let len = (std::mem::size_of::<InHeader>() + body.len()) as u32;
        let unique = u64::from(d.used_idx()) + 100;
        let hdr = InHeader {
            len,
            opcode,
            unique,
            nodeid,
            ..Default::default()
        };
        d.mem.write_obj(hdr, GuestAddress(REQ)).unwrap();
        let at = REQ + std::mem::size_of::<InHeader>() as u64;
        d.mem.write_slice(body, GuestAddress(at)).unwrap();
        d.mem
            .write_slice(&[0u8; 4096], GuestAddress(REPLY))
            .unwrap();
        d.add_chain(&[(REQ, len, false), (REPLY, 4096, true)]);
        let before = d.used_idx();
        fs.process_queue(1);
        assert_eq!(
            d.used_idx(),
            before.wrapping_add(1),
            "one reply per request"
        );
        let out: OutHeader = d.mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!(out.unique, unique);
        let n = (out.len as usize).saturating_sub(std::mem::size_of::<OutHeader>());
        let mut payload = vec![0u8; n];
        d.mem
            .read_slice(
                &mut payload,
                GuestAddress(REPLY + std::mem::size_of::<OutHeader>() as u64),
            )
            .unwrap();
        (out.error, payload)
    }

    /// Escape row f at the VMM (docs/security.md): a hostile guest kernel names nodeids and
    /// file handles it was never given. fuse-backend-rs resolves them only in its own inode
    /// and handle tables, so every forged one fails and nothing outside the share is reached:
    /// each successful reply's inode is one of the share's.
    #[test]
    fn forged_nodeids_and_handles_reach_nothing_outside_the_share() {
        use fuse_backend_rs::abi::fuse_abi::{
            AttrOut, EntryOut, GetattrIn, OpenIn, OpenOut, ReadIn,
        };
        use std::os::unix::fs::MetadataExt;
        const GETATTR: u32 = 3;
        const OPEN: u32 = 14;
        const READ: u32 = 15;
        const OPENDIR: u32 = 27;

        let top = std::env::temp_dir().join(format!("moat-vfs-forged-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let dir = top.join("share");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("hello"), b"hi").unwrap();
        std::fs::write(top.join("secret"), b"host secret").unwrap();
        let share_inodes: std::collections::HashSet<u64> = [".", "sub", "hello"]
            .iter()
            .map(|n| std::fs::metadata(dir.join(n)).unwrap().ino())
            .collect();
        let outside = [
            std::fs::metadata(&top).unwrap().ino(),
            std::fs::metadata(top.join("secret")).unwrap().ino(),
        ];
        let mut fs = Fs::new("share", &dir).unwrap();
        let mut d = Driver::new(64);
        activate(&mut fs, &d);
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: 0,
        };
        assert_eq!(call(&mut fs, &mut d, FUSE_INIT, 0, init.as_slice()).0, 0);

        // What the guest was given: the root and the entries it looked up.
        let mut given = vec![1u64];
        for name in ["hello", "sub", "..", "."] {
            let mut body = name.as_bytes().to_vec();
            body.push(0);
            let (err, out) = call(&mut fs, &mut d, FUSE_LOOKUP, 1, &body);
            assert_eq!(err, 0, "lookup {name}");
            let e = EntryOut::from_slice(&out[..std::mem::size_of::<EntryOut>()]).unwrap();
            assert!(
                share_inodes.contains(&e.attr.ino),
                "{name} resolved outside the share"
            );
            given.push(e.nodeid);
        }
        // Names that are paths are refused, never resolved against the host.
        for name in ["../secret", "/etc/passwd", "sub/../../secret"] {
            let mut body = name.as_bytes().to_vec();
            body.push(0);
            assert_ne!(call(&mut fs, &mut d, FUSE_LOOKUP, 1, &body).0, 0, "{name}");
        }

        let forged: Vec<u64> = (0..=48u64)
            .chain([
                64,
                255,
                1 << 20,
                1 << 32,
                (1 << 56) + 1,
                u64::MAX - 1,
                u64::MAX,
            ])
            .chain(outside)
            .filter(|n| !given.contains(n))
            .collect();
        let mut refused = 0;
        for &node in &forged {
            let ga = GetattrIn::default();
            let (err, out) = call(&mut fs, &mut d, GETATTR, node, ga.as_slice());
            if err == 0 {
                let a = AttrOut::from_slice(&out[..std::mem::size_of::<AttrOut>()]).unwrap();
                assert!(
                    share_inodes.contains(&a.attr.ino),
                    "nodeid {node} reached {}",
                    a.attr.ino
                );
            } else {
                refused += 1;
            }
            let body = b"secret\0";
            assert_ne!(
                call(&mut fs, &mut d, FUSE_LOOKUP, node, body).0,
                0,
                "lookup via {node}"
            );
            let oi = OpenIn {
                flags: libc::O_RDONLY as u32,
                fuse_flags: 0,
            };
            for op in [OPEN, OPENDIR] {
                assert_ne!(
                    call(&mut fs, &mut d, op, node, oi.as_slice()).0,
                    0,
                    "open {node}"
                );
            }
        }
        assert_eq!(refused, forged.len(), "every forged nodeid is refused");

        // File handles: a real one reads the share's file; forged ones read nothing.
        let hello = given[1];
        let oi = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let (err, out) = call(&mut fs, &mut d, OPEN, hello, oi.as_slice());
        assert_eq!(err, 0);
        let fh = OpenOut::from_slice(&out[..std::mem::size_of::<OpenOut>()])
            .unwrap()
            .fh;
        let read = |fh: u64| ReadIn {
            fh,
            offset: 0,
            size: 64,
            ..Default::default()
        };
        let (err, data) = call(&mut fs, &mut d, READ, hello, read(fh).as_slice());
        assert_eq!((err, data.as_slice()), (0, &b"hi"[..]));
        for bad in [0, fh + 1, fh + 1000, 1 << 40, u64::MAX] {
            let (err, data) = call(&mut fs, &mut d, READ, hello, read(bad).as_slice());
            assert!(
                err != 0 && data.is_empty(),
                "forged handle {bad} read {data:?}"
            );
        }
        std::fs::remove_dir_all(top).unwrap();
    }

    #[test]
    fn bad_shares_are_rejected() {
        assert!(matches!(Fs::new("", Path::new("/")), Err(FsError::Tag(_))));
        assert!(matches!(
            Fs::new("x", Path::new("/nonexistent-moat")),
            Err(FsError::NotADirectory(_))
        ));
    }
}
