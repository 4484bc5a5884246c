//! Builds a ready-to-run [`Vmm`] from a [`VmConfig`]: guest memory, KVM VM, kernel and
//! initrd, boot structures, legacy devices on the port I/O bus, virtio-mmio devices on the
//! MMIO bus (announced on the kernel command line) and the vCPUs.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{
    self, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{self, BootInfo};
use crate::arch::x86_64::layout::{self, *};
use crate::arch::x86_64::regs::BootEntry;
use crate::arch::x86_64::{acpi, mptable};
use crate::config::{SerialOut, VmConfig, DEFAULT_CMDLINE};
use crate::devices::legacy::{self, BootMarker, SerialDevice, SerialInput, I8042, MARKER_UNSET};
use crate::devices::virtio::mmio::{MmioError, MmioTransport};
use crate::devices::virtio::{
    balloon, blk, fs, mem as vmem, net, rng, vsock, IrqTrigger, VirtioDevice,
};
use crate::devices::{Bus, BusError};
use crate::exit::ExitNotifier;
use crate::metrics::{CounterSource, DeviceEntry};
use crate::seccomp::SeccompPolicy;
use crate::vmm::{ControlEvents, DeviceThread, Subscriber, Vmm, VmmError};
use crate::vstate::vcpu::{VcpuContext, VcpuControl};
use crate::vstate::vm::{Vm, VmError};

/// Errors building the VM. Each names the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] layout::LayoutError),
    /// KVM refused something.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {err}")]
    KernelOpen {
        /// Path.
        path: String,
        /// OS error.
        #[source]
        err: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("cannot load kernel {path} (need an x86_64 ELF vmlinux or a bzImage): {err}")]
    KernelLoad {
        /// Path.
        path: String,
        /// Loader error.
        #[source]
        err: loader::Error,
    },
    /// The initrd cannot be opened.
    #[error("cannot open initrd {path}: {err}")]
    InitrdOpen {
        /// Path.
        path: String,
        /// OS error.
        #[source]
        err: std::io::Error,
    },
    /// Boot structures could not be written.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The command line is invalid or too long.
    #[error("kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be copied into guest memory.
    #[error("cannot write the kernel command line: {0}")]
    CmdlineLoad(#[source] loader::Error),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The serial output file cannot be opened.
    #[error("cannot open serial output {path}: {err}")]
    SerialOpen {
        /// Path.
        path: String,
        /// OS error.
        #[source]
        err: std::io::Error,
    },
    /// A virtio-mmio transport could not be created.
    #[error(transparent)]
    Mmio(#[from] MmioError),
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] vsock::VsockError),
    /// A virtio-fs device could not be created.
    #[error(transparent)]
    Fs(#[from] fs::FsError),
    /// A virtio-blk device could not be created.
    #[error(transparent)]
    Blk(#[from] blk::BlkError),
    /// A virtio-net device could not be created.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// No random MAC address could be generated for a `--net` device without `mac=`.
    #[error("cannot generate a MAC address: {0}")]
    MacAddr(#[source] std::io::Error),
    /// A device thread (its event manager or the thread itself) could not be started.
    #[error(transparent)]
    DeviceThread(#[from] VmmError),
    /// The event loop's event manager could not be created.
    #[error("cannot create event manager: {0:?}")]
    EventManager(#[source] event_manager::Error),
    /// More virtio devices than interrupt lines.
    #[error("too many virtio devices: at most {} are supported", IRQ_MAX - IRQ_VIRTIO_FIRST + 1)]
    TooManyDevices,
    /// A device range clashes on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An eventfd, epoll or similar OS object could not be created.
    #[error("cannot create {0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
}

struct Devices<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    mmio: Bus,
    cmdline: &'a mut Cmdline,
    em: &'a mut EventManager<Subscriber>,
    threads: Vec<DeviceThread>,
    count: u64,
    seccomp: SeccompPolicy,
    exit: Arc<ExitNotifier>,
}

impl Devices<'_> {
    /// Adds `dev`; with `own_thread` its data path gets a thread of its own instead of the
    /// shared event loop.
    fn add<D>(&mut self, dev: D, own_thread: Option<String>) -> Result<Arc<Mutex<D>>, BuildError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let irq = IRQ_VIRTIO_FIRST + self.count as u32;
        if irq > IRQ_MAX {
            return Err(BuildError::TooManyDevices);
        }
        let base = MMIO_DEVICES_START + self.count * MMIO_DEVICE_SIZE;
        let dev = Arc::new(Mutex::new(dev));
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Os("eventfd", e))?;
        self.vm.register_irqfd(&irq_evt, irq)?;
        let trigger = Arc::new(IrqTrigger::new(irq_evt));
        for (i, evt) in crate::devices::lock(&dev).queue_events().iter().enumerate() {
            self.vm.register_mmio_ioevent(
                evt,
                base + crate::devices::virtio::mmio::reg::QUEUE_NOTIFY,
                i as u32,
            )?;
        }
        let virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let transport = MmioTransport::new(virtio, self.mem.clone(), trigger)?;
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_DEVICE_SIZE)?;
        match own_thread {
            Some(name) => self.threads.push(DeviceThread::spawn(
                name,
                dev.clone(),
                self.seccomp,
                self.exit.clone(),
            )?),
            None => {
                self.em.add_subscriber(dev.clone());
            }
        }
        self.cmdline
            .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(base), irq, None)
            .map_err(BuildError::Cmdline)?;
        self.count += 1;
        Ok(dev)
    }
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
) -> Result<(KernelLoaderResult, BootEntry), BuildError> {
    let path = cfg.kernel.display().to_string();
    let mut file = File::open(&cfg.kernel).map_err(|err| BuildError::KernelOpen {
        path: path.clone(),
        err,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut file, himem) {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => BootEntry::Pvh(a.0),
                _ => BootEntry::Linux64(r.kernel_load.0),
            };
            Ok((r, entry))
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut file, himem)
                .map_err(|err| BuildError::KernelLoad { path, err })?;
            // The 64-bit entry point of a bzImage is 0x200 past its load address.
            Ok((r, BootEntry::Linux64(r.kernel_load.0 + 0x200)))
        }
        Err(err) => Err(BuildError::KernelLoad { path, err }),
    }
}

fn serial_out(cfg: &VmConfig) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match &cfg.serial {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::None => Box::new(std::io::sink()),
        SerialOut::File(p) => Box::new(File::options().create(true).append(true).open(p).map_err(
            |err| BuildError::SerialOpen {
                path: p.display().to_string(),
                err,
            },
        )?),
    })
}

/// One step of the boot timeline at debug level (`MOAT_VMM_LOG=debug`): where the VMM's share
/// of a boot goes, in ms since `start` (the VMM's start).
pub fn log_timeline(start: Instant, step: &str) {
    tracing::debug!(
        "boot timeline: {step} at {} ms",
        start.elapsed().as_micros() as f64 / 1000.0
    );
}

/// Builds the VM described by `cfg`. `start` is the VMM's start time (for the boot marker),
/// `signal_fd` delivers termination signals, `api_evt` wakes the event loop for control
/// requests (hand the control socket itself over with [`Vmm::set_api`]).
pub fn build(
    cfg: &VmConfig,
    start: Instant,
    exit: Arc<ExitNotifier>,
    api_evt: Option<EventFd>,
    signal_fd: Option<OwnedFd>,
) -> Result<Vmm, BuildError> {
    let timeline = |step: &str| log_timeline(start, step);
    timeline("building");
    let mem_size = cfg.mem_mib << 20;
    let mem = layout::create_guest_memory(cfg.mem_mib, cfg.mem_hotplug_mib)?;
    let vm = Vm::new(&mem)?;
    timeline("guest memory and KVM VM ready");
    let mut em: EventManager<Subscriber> = EventManager::new().map_err(BuildError::EventManager)?;

    let (kernel, entry) = load_kernel(&mem, cfg)?;
    timeline("kernel loaded");
    let initrd = match &cfg.initrd {
        Some(p) => {
            let mut f = File::open(p).map_err(|err| BuildError::InitrdOpen {
                path: p.display().to_string(),
                err,
            })?;
            Some(boot::load_initrd(
                &mem,
                &mut f,
                kernel.kernel_end,
                mem_size,
            )?)
        }
        None => None,
    };
    timeline("initrd loaded");

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
    cmdline
        .insert_str(DEFAULT_CMDLINE)
        .map_err(BuildError::Cmdline)?;

    // Legacy devices on the port I/O bus.
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Os("eventfd", e))?;
    vm.register_irqfd(&serial_irq, IRQ_SERIAL)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out(cfg)?)));
    pio.insert(serial.clone(), legacy::SERIAL_PORT, legacy::SERIAL_LEN)?;
    if cfg.serial == SerialOut::Stdout {
        em.add_subscriber(Arc::new(Mutex::new(SerialInput::new(
            libc::STDIN_FILENO,
            serial,
        ))));
    }
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        legacy::I8042_PORT,
        legacy::I8042_LEN,
    )?;
    pio.insert(
        Arc::new(Mutex::new(legacy::AcpiPm::new(exit.clone()))),
        legacy::ACPI_PM_PORT.into(),
        legacy::ACPI_PM_LEN,
    )?;
    let boot_ms = Arc::new(AtomicU64::new(MARKER_UNSET));
    pio.insert(
        Arc::new(Mutex::new(BootMarker::new(start, boot_ms.clone()))),
        legacy::MARKER_PORT,
        1,
    )?;

    // virtio-mmio devices.
    let mut devices = Devices {
        vm: &vm,
        mem: &mem,
        mmio: Bus::new(),
        cmdline: &mut cmdline,
        em: &mut em,
        threads: Vec::new(),
        count: 0,
        seccomp: cfg.seccomp,
        exit: exit.clone(),
    };
    // vsock and rng only shuffle bytes: the shared event loop. fs and blk make blocking file
    // system calls (including fsync): a thread each, so they cannot stall the others.
    // Each device's counters, for the control socket's `metrics`.
    let mut metrics = Vec::new();
    let mut counted = |device: String, kind: &'static str, counters: Arc<dyn CounterSource>| {
        metrics.push(DeviceEntry {
            device,
            kind,
            counters,
        })
    };
    if let Some(v) = &cfg.vsock {
        let dev = vsock::Vsock::new(v.cid, &v.uds)?;
        counted("vsock0".into(), "vsock", dev.counters());
        devices.add(dev, None)?;
    }
    for share in &cfg.fs {
        let dev = fs::Fs::new(&share.tag, &share.dir)?;
        let name = format!("fs-{}", share.tag);
        counted(name.clone(), "fs", dev.counters());
        devices.add(dev, Some(name))?;
    }
    for (i, disk) in cfg.blk.iter().enumerate() {
        let dev = blk::Block::new(&disk.path, disk.read_only)?;
        counted(format!("blk{i}"), "blk", dev.counters());
        devices.add(dev, Some(format!("blk{i}")))?;
    }
    if cfg.rng {
        let dev = rng::Rng::new().map_err(|e| BuildError::Os("eventfd", e))?;
        devices.add(dev, None)?;
    }
    let hotplug = if cfg.mem_hotplug_mib > 0 {
        // Plug requests are bookkeeping and the odd madvise: the shared event loop.
        let dev = vmem::VirtioMem::new(
            mem.clone(),
            layout::hotplug_base(mem_size),
            cfg.mem_hotplug_mib << 20,
        )
        .map_err(|e| BuildError::Os("eventfd", e))?;
        let dev = devices.add(dev, None)?;
        counted("mem0".into(), "mem", dev.clone());
        Some(dev)
    } else {
        None
    };
    if cfg.balloon {
        // Free page reporting: a few madvise calls every few seconds at most.
        let dev = balloon::Balloon::new().map_err(|e| BuildError::Os("eventfd", e))?;
        counted("balloon0".into(), "balloon", dev.stats());
        devices.add(dev, None)?;
    }
    // virtio-net last, in --net order: the guest names them eth0, eth1, ... as it probes them.
    // Their data path is tap reads and writes, which never block: the shared event loop.
    for (i, n) in cfg.net.iter().enumerate() {
        let mac = match n.mac {
            Some(m) => m,
            None => net::MacAddr::random_local().map_err(BuildError::MacAddr)?,
        };
        let dev = net::Net::new(&n.tap, mac)?;
        counted(format!("net{i}"), "net", dev.counters());
        devices.add(dev, None)?;
    }
    let device_threads = std::mem::take(&mut devices.threads);
    let mmio = devices.mmio;
    timeline("devices ready");

    if cfg.mem_hotplug_mib > 0 {
        // The kernel onlines what virtio-mem plugs by itself, movable where the ratio to
        // kernel memory allows (so it can be unplugged again), in the normal zone beyond.
        cmdline
            .insert_str("memhp_default_state=online memory_hotplug.online_policy=auto-movable")
            .map_err(BuildError::Cmdline)?;
    }
    if let Some(extra) = &cfg.cmdline_extra {
        cmdline.insert_str(extra).map_err(BuildError::Cmdline)?;
    }
    loader::load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(BuildError::CmdlineLoad)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(BuildError::Cmdline)?
        .as_bytes_with_nul()
        .len();
    // Both: kernels without ACPI (or booted with `acpi=off`) use the MP table; ACPI kernels use
    // the MADT and get power-off through the FADT (docs/vmm.md, "ACPI").
    mptable::setup(&mem, cfg.vcpus)?;
    let rsdp = acpi::setup(&mem, cfg.vcpus)?;
    let info = BootInfo {
        mem_size,
        cmdline_size,
        initrd,
        rsdp: Some(rsdp),
    };
    match entry {
        BootEntry::Pvh(_) => boot::write_pvh_info(&mem, &info)?,
        BootEntry::Linux64(_) => boot::write_zero_page(&mem, kernel.setup_header, &info)?,
    }

    let vcpu_fds = (0..cfg.vcpus)
        .map(|i| vm.create_vcpu(i, cfg.vcpus, &mem, entry))
        .collect::<Result<Vec<_>, _>>()?;

    timeline("boot structures written, vCPUs created");
    let control = ControlEvents::new(exit.clone(), api_evt, signal_fd)
        .map_err(|e| BuildError::Os("eventfd", e))?;
    em.add_subscriber(Arc::new(Mutex::new(control)));

    let vcpu_ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        exit: exit.clone(),
        control: Arc::new(VcpuControl::default()),
        seccomp: cfg.seccomp,
    };
    Ok(Vmm {
        vcpus: None,
        vcpu_fds,
        device_threads,
        event_manager: em,
        api: None,
        vm,
        mem,
        exit,
        boot_ms,
        hotplug,
        metrics,
        vcpu_count: u64::from(cfg.vcpus),
        mem_bytes: mem_size,
        vcpu_ctx,
        paused: false,
    })
}
