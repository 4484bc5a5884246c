//! The KVM smoke trial: proves this host's `/dev/kvm` runs guest code, independently of moat-vmm.
//!
//! It creates a VM and one vCPU with kvm-ioctls, puts a 20-byte 64-bit payload in guest memory
//! (identity-mapped with one 2 MiB page, long mode set up directly in the vCPU's registers), and
//! runs it: the payload writes a message to the serial port 0x3f8 byte by byte and halts. The trial
//! checks the exact bytes seen on the port and that the vCPU stopped on `hlt`.

use std::ptr::NonNull;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use moat_e2e::{ensure, trial, Check, Context, Trial};

const MEM_SIZE: usize = 2 << 20;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const CODE: u64 = 0x10000;
const STACK: u64 = 0x8000;
const MESSAGE: &[u8] = b"moat: hello from a 64-bit KVM guest\n";
const SERIAL_PORT: u16 = 0x3f8;
/// Upper bound on exits: the payload needs one per byte plus the final `hlt`.
const MAX_EXITS: usize = 10_000;

/// mov dx, 0x3f8; lea rsi, [rip+9]; loop: lodsb; test al, al; jz done; out dx, al; jmp loop;
/// done: hlt — followed by the NUL-terminated message (at offset 20).
const PAYLOAD: [u8; 20] = [
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x48, 0x8d, 0x35, 0x09, 0x00, 0x00, 0x00, // lea rsi, [rip + 9]
    0xac, // lodsb
    0x84, 0xc0, // test al, al
    0x74, 0x03, // jz +3 (hlt)
    0xee, // out dx, al
    0xeb, 0xf8, // jmp -8 (lodsb)
    0xf4, // hlt
];

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "kvm_smoke::long_mode_payload_prints_on_serial",
        long_mode_payload,
    )]
}

/// Anonymous guest memory, unmapped on drop.
struct GuestMem {
    ptr: NonNull<u8>,
    len: usize,
}

impl GuestMem {
    fn new(len: usize) -> Result<Self, moat_e2e::Failed> {
        // SAFETY: anonymous private mapping with no fixed address; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap guest memory: {}", std::io::Error::last_os_error()).into());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or("mmap returned null")?;
        Ok(Self { ptr, len })
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let start = addr as usize;
        assert!(
            start + bytes.len() <= self.len,
            "payload layout exceeds guest memory"
        );
        // SAFETY: in bounds (checked above) of a mapping this struct owns.
        let all = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) };
        all[start..start + bytes.len()].copy_from_slice(bytes);
    }

    fn write_u64(&mut self, addr: u64, value: u64) {
        self.write(addr, &value.to_le_bytes());
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

fn long_mode_payload() -> Check {
    let kvm = Kvm::new().context("open /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;

    let mut mem = GuestMem::new(MEM_SIZE)?;
    // GDT: null, 64-bit code (0x08), data (0x10).
    mem.write_u64(GDT, 0);
    mem.write_u64(GDT + 8, 0x00af_9b00_0000_ffff);
    mem.write_u64(GDT + 16, 0x00cf_9300_0000_ffff);
    // Identity map of the first 2 MiB: PML4[0] → PDPT[0] → PD[0] = one 2 MiB page.
    mem.write_u64(PML4, PDPT | 0x3);
    mem.write_u64(PDPT, PD | 0x3);
    mem.write_u64(PD, 0x83);
    mem.write(CODE, &PAYLOAD);
    let mut message = MESSAGE.to_vec();
    message.push(0);
    mem.write(CODE + PAYLOAD.len() as u64, &message);

    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the region is backed by `mem`, which outlives `vm` (dropped after it, below).
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;

    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.cs = segment(0x08, 0xb, true);
    let data = segment(0x10, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = (1 << 0) | (1 << 4) | (1 << 31); // PE, ET, PG
    sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs.rip = CODE;
    regs.rsp = STACK;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;

    let mut serial = Vec::new();
    let mut halted = false;
    for _ in 0..MAX_EXITS {
        match vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(SERIAL_PORT, data) => serial.extend_from_slice(data),
            VcpuExit::Hlt => {
                halted = true;
                break;
            }
            other => return Err(format!("unexpected vCPU exit {other:?}").into()),
        }
    }
    drop(vcpu);
    drop(vm);
    drop(mem);

    ensure(
        serial == MESSAGE,
        format!(
            "serial output was {:?}, expected {:?}",
            String::from_utf8_lossy(&serial),
            String::from_utf8_lossy(MESSAGE)
        ),
    )?;
    ensure(
        halted,
        "the payload did not reach hlt within the exit budget",
    )
}
