//! The running VM: owns guest memory, the KVM VM, the vCPU threads and the device event
//! loop, and runs the lifecycle: start vCPUs → serve events and control requests → on the
//! first exit reason stop the vCPUs, drop devices, release everything.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiServer, Command, Response};
use crate::devices::legacy::MARKER_UNSET;
use crate::exit::{ExitNotifier, ExitReason};
use crate::metrics::{DeviceEntry, VmMetrics};
use crate::seccomp::{SeccompPolicy, ThreadKind};
use crate::vstate::vcpu::{VcpuContext, Vcpus};
use crate::vstate::vm::Vm;

/// The event manager type shared by all devices.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Reads one pending signal from a signalfd; `None` when nothing was pending.
pub fn read_signalfd(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain old data; all-zero is a valid value.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which is exactly that large.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// Wakes the event loop for VMM-level events: the exit eventfd, the control socket's
/// request eventfd, and termination signals through a signalfd.
pub struct ControlEvents {
    exit: Arc<ExitNotifier>,
    exit_evt: EventFd,
    api_evt: Option<EventFd>,
    signal_fd: Option<OwnedFd>,
}

impl ControlEvents {
    /// Watches `exit`, the control socket (`api_evt`) and `signal_fd`.
    pub fn new(
        exit: Arc<ExitNotifier>,
        api_evt: Option<EventFd>,
        signal_fd: Option<OwnedFd>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            exit_evt: exit.eventfd().try_clone()?,
            exit,
            api_evt,
            signal_fd,
        })
    }
}

impl MutEventSubscriber for ControlEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit_evt.as_raw_fd() {
            let _ = self.exit_evt.read();
        } else if self.api_evt.as_ref().is_some_and(|e| e.as_raw_fd() == fd) {
            if let Some(e) = &self.api_evt {
                let _ = e.read();
            }
        } else if let Some(sfd) = self.signal_fd.as_ref().filter(|s| s.as_raw_fd() == fd) {
            if let Some(signo) = read_signalfd(sfd) {
                self.exit.notify(ExitReason::Signal(signo));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![self.exit_evt.as_raw_fd()];
        fds.extend(self.api_evt.as_ref().map(|e| e.as_raw_fd()));
        fds.extend(self.signal_fd.as_ref().map(|s| s.as_raw_fd()));
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("cannot watch control fd {fd}: {e:?}");
            }
        }
    }
}

/// A device whose data path runs on its own thread and event loop, so that slow backend
/// I/O (virtio-fs file system calls) does not delay the other devices. Stopped and joined on
/// drop.
pub struct DeviceThread {
    stop: EventFd,
    handle: Option<std::thread::JoinHandle<()>>,
}

struct StopFlag {
    evt: EventFd,
    stopped: bool,
}

impl MutEventSubscriber for StopFlag {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("cannot watch the device thread stop event: {e:?}");
        }
    }
}

impl DeviceThread {
    /// Runs `device`'s event handling on a new thread named `name`, under the worker seccomp
    /// filter when `seccomp` says so (a failure to install it ends the VM through `exit`).
    pub fn spawn(
        name: String,
        device: Subscriber,
        seccomp: SeccompPolicy,
        exit: Arc<ExitNotifier>,
    ) -> Result<Self, VmmError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::DeviceThread)?;
        let flag = Arc::new(Mutex::new(StopFlag {
            evt: stop.try_clone().map_err(VmmError::DeviceThread)?,
            stopped: false,
        }));
        let mut em: EventManager<Subscriber> =
            EventManager::new().map_err(VmmError::EventManager)?;
        em.add_subscriber(device);
        em.add_subscriber(flag.clone());
        let handle = crate::thread_builder(name)
            .spawn(move || {
                if let Err(e) = seccomp.apply(ThreadKind::Worker) {
                    exit.notify(ExitReason::VmmError(e.to_string()));
                    return;
                }
                while !crate::devices::lock(&flag).stopped {
                    if let Err(e) = em.run() {
                        tracing::error!("device event loop: {e:?}");
                        return;
                    }
                }
            })
            .map_err(VmmError::DeviceThread)?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!("a device thread panicked");
            }
        }
    }
}

/// Errors running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The vCPU threads could not be started.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// A device thread's event manager could not be created.
    #[error("cannot create event manager: {0:?}")]
    EventManager(#[source] event_manager::Error),
    /// A device thread (its stop eventfd, or the thread itself) could not be created.
    #[error("cannot create device thread: {0}")]
    DeviceThread(#[source] std::io::Error),
}

/// A built VM, ready to run.
pub struct Vmm {
    // Field order is drop order: threads first, then devices, then KVM, then memory.
    pub(crate) vcpus: Option<Vcpus>,
    pub(crate) vcpu_fds: Vec<VcpuFd>,
    pub(crate) device_threads: Vec<DeviceThread>,
    pub(crate) event_manager: EventManager<Subscriber>,
    pub(crate) api: Option<ApiServer>,
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) exit: Arc<ExitNotifier>,
    pub(crate) boot_ms: Arc<AtomicU64>,
    /// The virtio-mem device, when the VM has hotplug memory.
    pub(crate) hotplug: Option<Arc<Mutex<crate::devices::virtio::mem::VirtioMem>>>,
    /// Every device's counters, for `metrics`.
    pub(crate) metrics: Vec<DeviceEntry>,
    pub(crate) vcpu_count: u64,
    /// Boot memory, bytes.
    pub(crate) mem_bytes: u64,
    pub(crate) vcpu_ctx: VcpuContext,
    pub(crate) paused: bool,
}

impl Vmm {
    /// Milliseconds from VMM start to the guest's boot marker, if seen.
    pub fn boot_ms(&self) -> Option<u64> {
        let v = self.boot_ms.load(Ordering::SeqCst);
        (v != MARKER_UNSET).then_some(v)
    }

    /// The `metrics` answer: the VM's shape, boot time and every device's counters.
    pub fn metrics(&self) -> VmMetrics {
        VmMetrics {
            vcpus: self.vcpu_count,
            mem_bytes: self.mem_bytes,
            boot_ms: self.boot_ms(),
            devices: self.metrics.iter().map(DeviceEntry::read).collect(),
        }
    }

    /// Runs the guest until it stops; returns why. Every thread is joined and every device
    /// dropped before this returns; the control socket answers `wait` callers last.
    pub fn run(mut self) -> ExitReason {
        let fds = std::mem::take(&mut self.vcpu_fds);
        match Vcpus::start(fds, self.vcpu_ctx.clone()) {
            Ok(v) => self.vcpus = Some(v),
            Err(e) => self.exit.notify(ExitReason::VmmError(e.to_string())),
        }
        // The vCPU threads are started (each filtered itself before entering the guest):
        // from here on this thread only runs the event loop and the teardown.
        if let Err(e) = self.vcpu_ctx.seccomp.apply(ThreadKind::EventLoop) {
            self.exit.notify(ExitReason::VmmError(e.to_string()));
        }
        while self.exit.reason().is_none() {
            if let Err(e) = self.event_manager.run() {
                self.exit
                    .notify(ExitReason::VmmError(format!("event loop: {e:?}")));
            }
            self.serve_api();
        }
        let reason = self.exit.wait();
        if let Some(v) = self.vcpus.take() {
            v.stop();
        }
        self.device_threads.clear();
        let exit = self.exit.clone();
        let mut api = self.api.take();
        // Devices (sockets, files, eventfds), the VM fd and guest memory go here.
        drop(self);
        exit.mark_finished();
        if let Some(api) = api.as_mut() {
            api.shutdown();
        }
        reason
    }

    fn serve_api(&mut self) {
        let Some(api) = self.api.as_ref() else {
            return;
        };
        while let Ok(req) = api.requests.try_recv() {
            let response = match req.command {
                Command::Stop => {
                    self.exit.notify(ExitReason::Stopped);
                    Response::ok()
                }
                Command::Pause => {
                    if let Some(v) = &self.vcpus {
                        v.pause();
                    }
                    self.paused = true;
                    Response::ok()
                }
                Command::Resume => {
                    if let Some(v) = &self.vcpus {
                        v.resume();
                    }
                    self.paused = false;
                    Response::ok()
                }
                Command::Status => Response {
                    state: Some(if self.paused { "paused" } else { "running" }.into()),
                    boot_ms: self.boot_ms(),
                    ..self.hotplug_sizes(Response::ok())
                },
                Command::Metrics => Response {
                    metrics: Some(self.metrics()),
                    ..Response::ok()
                },
                Command::ResizeMemory { hotplug_mib } => match &self.hotplug {
                    None => Response::error(
                        "this VM has no hotplug memory (start moat-vmm with --mem-hotplug-mib)",
                    ),
                    Some(dev) => {
                        let bytes = hotplug_mib.saturating_mul(1 << 20);
                        let res = crate::devices::lock(dev).resize(bytes);
                        match res {
                            Ok(()) => self.hotplug_sizes(Response::ok()),
                            Err(e) => Response::error(e.to_string()),
                        }
                    }
                },
                Command::Start => Response::error("the VM is already running"),
                Command::AddFs(_) | Command::AddBlk(_) => {
                    Response::error("devices can only be added before start (use --defer-start)")
                }
                Command::Wait => Response::error("wait is answered by the connection thread"),
            };
            let _ = req.reply.send(response);
        }
    }

    /// `response` with the virtio-mem sizes filled in, when there is a virtio-mem device.
    fn hotplug_sizes(&self, response: Response) -> Response {
        match &self.hotplug {
            Some(dev) => {
                let (requested, plugged) = crate::devices::lock(dev).sizes();
                Response {
                    requested_mib: Some(requested >> 20),
                    plugged_mib: Some(plugged >> 20),
                    ..response
                }
            }
            None => response,
        }
    }

    /// Hands over the control socket; its requests are served by the event loop.
    pub fn set_api(&mut self, api: Option<ApiServer>) {
        self.api = api;
    }

    /// The guest memory (for tests).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM (for tests).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Registers an extra event subscriber (for tests and embedders).
    pub fn add_subscriber(&mut self, s: Subscriber) {
        self.event_manager.add_subscriber(s);
    }
}
