//! virtio-blk backed by a raw host file, read-only or read-write, with flush and get-id.
//!
//! Requests are served synchronously on the event loop thread with positioned reads and
//! writes; each request is validated (header, direction, bounds, 512-byte multiples) and
//! answered with a status byte, never a crash.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::{bump, BlkCounters};

use super::{
    device_type, drain_queue, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 256;
const SECTOR_SIZE: u64 = 512;
/// Largest data transfer of a single request.
const MAX_REQUEST: usize = 4 << 20;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the device id returned by GET_ID.
const ID_LEN: usize = 20;

/// Errors opening the backing file, and why a request failed (reported to the guest as a
/// status byte).
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The file cannot be opened with the requested access.
    #[error("cannot open block backing file {path}: {err}")]
    Open {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        err: std::io::Error,
    },
    /// The file size is not a multiple of 512 bytes.
    #[error("block backing file {0} has a size that is not a multiple of 512 bytes")]
    Size(String),
    /// Creating the queue eventfd failed.
    #[error("cannot create eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The request header could not be read from the chain.
    #[error("malformed descriptor chain: short request header: {0}")]
    ShortHeader(#[source] std::io::Error),
    /// Data could not be copied between the chain and the host buffer.
    #[error("malformed descriptor chain: {0}")]
    Chain(#[source] std::io::Error),
    /// The request reaches past the end of the disk.
    #[error("request beyond the end of the disk (sector {0}, {1} bytes)")]
    OutOfRange(u64, usize),
    /// The transfer is not made of whole sectors, or exceeds the largest request.
    #[error("transfer length {0} is not a multiple of 512 or too large")]
    BadLength(usize),
    /// A write request to a disk opened read-only.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The backing file refused the read, write or flush.
    #[error("host I/O error: {0}")]
    Io(#[source] std::io::Error),
}

/// The block device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    evts: [EventFd; 1],
    active: Option<ActivateContext>,
    stats: Arc<BlkCounters>,
}

impl Block {
    /// Opens `path`; `read_only` opens it read-only and offers `VIRTIO_BLK_F_RO`.
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlkError> {
        let display = path.display().to_string();
        let file = File::options()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|err| BlkError::Open {
                path: display.clone(),
                err,
            })?;
        let len = file
            .metadata()
            .map_err(|err| BlkError::Open {
                path: display.clone(),
                err,
            })?
            .len();
        if len % SECTOR_SIZE != 0 {
            return Err(BlkError::Size(display));
        }
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
            id,
            evts: [EventFd::new(libc::EFD_NONBLOCK).map_err(BlkError::EventFd)?],
            active: None,
            stats: Arc::default(),
        })
    }

    /// The device's counters, shared with the control socket's `metrics`.
    pub fn counters(&self) -> Arc<BlkCounters> {
        self.stats.clone()
    }

    /// Serves every pending request.
    pub fn process_queue(&mut self) {
        let Some(mut ctx) = self.active.take() else {
            return;
        };
        let mem = ctx.mem.clone();
        drain_queue(&mut ctx.queues[0], &mem, &ctx.irq, |chain| {
            self.serve(chain, &mem)
        });
        self.active = Some(ctx);
    }

    /// Serves one request and returns the number of bytes written to guest buffers.
    fn serve(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                bump(&self.stats.errors, 1);
                guest_warn!("virtio-blk: malformed request: {e}");
                return 0;
            }
        };
        // The status byte is the last writable byte.
        let writable = writer.available_bytes();
        if writable == 0 {
            bump(&self.stats.errors, 1);
            guest_warn!("virtio-blk: request without a status byte");
            return 0;
        }
        let mut status_writer = match writer.split_at(writable - 1) {
            Ok(s) => s,
            Err(e) => {
                bump(&self.stats.errors, 1);
                guest_warn!("virtio-blk: malformed request: {e}");
                return 0;
            }
        };
        let (status, data_len) = match self.execute(&mut reader, &mut writer) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(BlkError::Unsupported(t)) => {
                bump(&self.stats.errors, 1);
                tracing::debug!("virtio-blk: unsupported request type {t}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
            Err(e) => {
                bump(&self.stats.errors, 1);
                guest_warn!("virtio-blk: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        if let Err(e) = status_writer.write_all(&[status]) {
            guest_warn!("virtio-blk: cannot write status: {e}");
            return data_len as u32;
        }
        data_len as u32 + 1
    }

    /// Executes a request; returns the data bytes written to the guest.
    fn execute(
        &mut self,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> Result<usize, BlkError> {
        let mut hdr = [0u8; 16];
        reader.read_exact(&mut hdr).map_err(BlkError::ShortHeader)?;
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let off = self.check_range(sector, len)?;
                let mut buf = vec![0u8; len];
                self.file
                    .read_exact_at(&mut buf, off)
                    .map_err(BlkError::Io)?;
                writer.write_all(&buf).map_err(BlkError::Chain)?;
                bump(&self.stats.read_requests, 1);
                bump(&self.stats.read_bytes, len as u64);
                Ok(len)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(BlkError::ReadOnly);
                }
                let len = reader.available_bytes();
                let off = self.check_range(sector, len)?;
                let mut buf = vec![0u8; len];
                reader.read_exact(&mut buf).map_err(BlkError::Chain)?;
                self.file.write_all_at(&buf, off).map_err(BlkError::Io)?;
                bump(&self.stats.write_requests, 1);
                bump(&self.stats.write_bytes, len as u64);
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(BlkError::Io)?;
                }
                bump(&self.stats.flush_requests, 1);
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(ID_LEN);
                writer.write_all(&self.id[..n]).map_err(BlkError::Chain)?;
                Ok(n)
            }
            other => Err(BlkError::Unsupported(other)),
        }
    }

    fn check_range(&self, sector: u64, len: usize) -> Result<u64, BlkError> {
        if !(len as u64).is_multiple_of(SECTOR_SIZE) || len > MAX_REQUEST {
            return Err(BlkError::BadLength(len));
        }
        let sectors = len as u64 / SECTOR_SIZE;
        match sector.checked_add(sectors) {
            Some(end) if end <= self.capacity_sectors => Ok(sector * SECTOR_SIZE),
            _ => Err(BlkError::OutOfRange(sector, len)),
        }
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        // seg_max at offset 12: segments per request.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data)
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.expect_queues(1)?;
        self.active = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if super::fired_queue(&self.evts, &events).is_some() {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        super::register_queue_events(&self.evts, ops, "virtio-blk");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::Driver;
    use crate::devices::virtio::IrqTrigger;
    use crate::metrics::CounterSource;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    fn disk(sectors: u64, ro: bool) -> (Block, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "moat-vmm-blk-{}-{}",
            std::process::id(),
            DISKS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        std::fs::write(&path, data).unwrap();
        (Block::new(&path, ro).unwrap(), path)
    }
    static DISKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn activate(b: &mut Block, d: &Driver) {
        b.activate(ActivateContext {
            mem: d.mem.clone(),
            queues: vec![d.queue()],
            acked_features: VIRTIO_F_VERSION_1,
            irq: Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        })
        .unwrap();
    }

    fn header(d: &Driver, kind: u32, sector: u64) {
        d.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        d.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        d.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(d: &Driver) -> u8 {
        d.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn read_write_flush_and_id() {
        let (mut b, path) = disk(8, false);
        let mut d = Driver::new(64);
        activate(&mut b, &d);
        assert_eq!(&b.config()[..8], &8u64.to_le_bytes());

        header(&d, VIRTIO_BLK_T_IN, 3);
        d.add_chain(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_OK);
        assert_eq!(d.used(0).1, 1025);
        let mut buf = vec![0u8; 1024];
        d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|x| *x == 3) && buf[512..].iter().all(|x| *x == 4));

        header(&d, VIRTIO_BLK_T_OUT, 7);
        d.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        d.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_OK);
        assert_eq!(d.used(1).1, 1);
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[7 * 512..].iter().all(|x| *x == 0xab));

        header(&d, VIRTIO_BLK_T_FLUSH, 0);
        d.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_OK);

        header(&d, VIRTIO_BLK_T_GET_ID, 0);
        d.add_chain(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_OK);

        header(&d, 77, 0);
        d.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_UNSUPP);
        let c = b.counters().snapshot();
        assert_eq!((c["read_requests"], c["read_bytes"]), (1, 1024), "{c:?}");
        assert_eq!((c["write_requests"], c["write_bytes"]), (1, 512));
        assert_eq!((c["flush_requests"], c["errors"]), (1, 1));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_requests_get_an_error_status() {
        let (mut b, path) = disk(4, true);
        let mut d = Driver::new(64);
        activate(&mut b, &d);
        assert_ne!(b.features() & VIRTIO_BLK_F_RO, 0);
        // Write to a read-only disk.
        header(&d, VIRTIO_BLK_T_OUT, 0);
        d.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_IOERR);
        // Read past the end.
        header(&d, VIRTIO_BLK_T_IN, 3);
        d.add_chain(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_IOERR);
        // Sector overflow.
        header(&d, VIRTIO_BLK_T_IN, u64::MAX);
        d.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_IOERR);
        // Not a multiple of 512.
        header(&d, VIRTIO_BLK_T_IN, 0);
        d.add_chain(&[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_IOERR);
        // Short header.
        header(&d, VIRTIO_BLK_T_IN, 0);
        d.add_chain(&[(HDR, 8, false), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&d), VIRTIO_BLK_S_IOERR);
        // No writable status byte at all (wrong direction).
        d.add_chain(&[(HDR, 16, false), (STATUS, 1, false)]);
        // Data buffer outside guest memory.
        d.add_chain(&[
            (HDR, 16, false),
            (0x4000_0000, 512, true),
            (STATUS, 1, true),
        ]);
        b.process_queue();
        assert_eq!(d.used_idx(), 7);
        assert_eq!(d.used(5).1, 0);
        assert_eq!(d.used(6).1, 0);
        let c = b.counters().snapshot();
        assert_eq!((c["read_bytes"], c["write_bytes"], c["errors"]), (0, 0, 7));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn open_errors_are_reported() {
        assert!(matches!(
            Block::new(Path::new("/nonexistent/disk.img"), true),
            Err(BlkError::Open { .. })
        ));
        let path = std::env::temp_dir().join(format!("moat-vmm-blk-odd-{}", std::process::id()));
        std::fs::write(&path, [0u8; 100]).unwrap();
        assert!(matches!(Block::new(&path, true), Err(BlkError::Size(_))));
        std::fs::remove_file(path).unwrap();
    }
}
