//! Guest physical memory layout of the microVM and its e820 map.
//!
//! ```text
//! 0x0000_0500  boot GDT            0x0000_0520  boot IDT (empty)
//! 0x0000_6000  PVH hvm_start_info, followed by its memory map and module list
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack pointer
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories (identity map of 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP table
//! 0x0010_0000  high memory: kernel image, then RAM up to 3 GiB; the initrd sits at its top
//! 0xc000_0000  MMIO hole (1 GiB): virtio-mmio devices from 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than 3 GiB
//! ```

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Boot GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT location (an empty IDT).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` location.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table (follows the start info).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6800;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum kernel command line size, including the NUL (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory (1 MiB); the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit address space.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// IOAPIC base address (KVM in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Address of the TSS KVM needs on Intel (three pages inside the MMIO hole).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// First GSI handed to virtio-mmio devices (0-4 are legacy: timer, i8042, cascade, COM2, COM1).
pub const IRQ_VIRTIO_FIRST: u32 = 5;
/// Last usable GSI on the in-kernel IOAPIC.
pub const IRQ_MAX: u32 = 23;
/// COM1 interrupt line.
pub const IRQ_SERIAL: u32 = 4;
/// i8042 keyboard interrupt line.
pub const IRQ_I8042: u32 = 1;
/// ACPI system control interrupt (FADT `SCI_INT`): the ISA line of the absent COM2, so that it
/// never shares a GSI with a virtio device. Never raised (there are no ACPI events).
pub const IRQ_ACPI_SCI: u32 = 3;

/// e820 entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// Errors building the guest memory.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The requested RAM size cannot hold the boot structures and a kernel.
    #[error("guest memory of {0} MiB is too small: at least 64 MiB are needed")]
    TooSmall(u64),
    /// The requested RAM size overflows the address space.
    #[error("guest memory of {0} MiB is too large")]
    TooLarge(u64),
    /// mmap of guest RAM failed (the host is out of memory or address space, or an rlimit
    /// on the address space is lower than the guest's RAM).
    #[error("cannot map guest memory: {0}")]
    Mmap(#[source] std::io::Error),
    /// The hotplug region's size is not a multiple of 128 MiB or too large.
    #[error("hotplug memory of {0} MiB: must be a multiple of 128 MiB and end below 64 TiB")]
    Hotplug(u64),
    /// vm-memory refused the mapping.
    #[error("cannot wrap guest memory: {0}")]
    Wrap(#[source] vm_memory::mmap::MmapRegionError),
    /// A RAM region would end beyond the guest physical address space.
    #[error("guest memory region at {0:#x} overflows the address space")]
    Overflow(u64),
    /// The RAM regions overlap or are out of order (a bug in `ram_ranges`).
    #[error("invalid guest memory layout: {0}")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// The guest RAM ranges for `mem_size` bytes: everything below the MMIO hole, the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(FOUR_GIB),
                (mem_size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// Alignment (and size granularity) of the virtio-mem hotplug region: Linux's memory block
/// size on x86_64 guests of less than 64 GiB, the unit it adds and onlines memory in.
pub const HOTPLUG_ALIGN: u64 = 128 << 20;

/// Guest physical address of the virtio-mem hotplug region for `mem_size` bytes of boot RAM:
/// the first [`HOTPLUG_ALIGN`]ed address at or above 4 GiB past the end of RAM. Not in the e820
/// map: the guest learns of it from the virtio-mem device.
pub fn hotplug_base(mem_size: u64) -> u64 {
    let ram_end = ram_ranges(mem_size)
        .last()
        .map_or(0, |(base, len)| base.0 + *len as u64);
    ram_end.max(FOUR_GIB).next_multiple_of(HOTPLUG_ALIGN)
}

/// Host and guest huge-page size: guest RAM is mapped at host addresses aligned to it.
pub const HUGE_PAGE: usize = 2 << 20;

/// Allocates guest RAM of `mem_mib` MiB laid out as `ram_ranges` says.
///
/// Each region is mapped at a host address aligned to [`HUGE_PAGE`] and advised for transparent
/// huge pages. The alignment is what lets huge pages reach the guest: KVM maps a 2 MiB guest page
/// with one second-level (EPT/NPT) entry only when the host address and the guest physical address
/// agree modulo 2 MiB, and the kernel backs only aligned 2 MiB ranges with a huge page. A plain
/// `mmap` returns a 4 KiB-aligned address, so the guest would take one nested page fault per 4 KiB
/// it touches first (measured in the software-KVM host: kernel start → `/init` 1.7–1.9 s with
/// such a mapping against 1.1–1.3 s for QEMU, which aligns its RAM). Advisory only: a host without
/// THP keeps 4 KiB pages and the same behaviour.
///
/// The mappings live as long as the process (as the VM does): device threads hold clones of the
/// returned memory until the process exits, so they are never unmapped early.
///
/// With `hotplug_mib` > 0 a further region of that size (a multiple of [`HOTPLUG_ALIGN`]) is
/// mapped the same way at [`hotplug_base`]: the virtio-mem device's, registered with KVM like RAM
/// but not announced to the guest as RAM.
pub fn create_guest_memory(mem_mib: u64, hotplug_mib: u64) -> Result<GuestMemoryMmap, LayoutError> {
    if mem_mib < 64 {
        return Err(LayoutError::TooSmall(mem_mib));
    }
    let size = mem_mib
        .checked_mul(1 << 20)
        .filter(|s| s.checked_add(FOUR_GIB).is_some())
        .ok_or(LayoutError::TooLarge(mem_mib))?;
    let mut ranges = ram_ranges(size);
    if hotplug_mib > 0 {
        let len = hotplug_mib
            .checked_mul(1 << 20)
            .filter(|l| l.is_multiple_of(HOTPLUG_ALIGN))
            .filter(|l| {
                hotplug_base(size)
                    .checked_add(*l)
                    .is_some_and(|e| e < 1 << 46)
            })
            .ok_or(LayoutError::Hotplug(hotplug_mib))?;
        ranges.push((GuestAddress(hotplug_base(size)), len as usize));
    }
    let regions = ranges
        .into_iter()
        .map(|(base, len)| {
            let ptr = map_aligned(len)?;
            // SAFETY: `ptr..ptr + len` is a live private anonymous mapping made for this region
            // alone and never unmapped (see above).
            let mapping = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(ptr) }
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
                .map_err(LayoutError::Wrap)?;
            GuestRegionMmap::new(mapping, base).ok_or(LayoutError::Overflow(base.0))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(LayoutError::Regions)
}

/// Maps `len` bytes of private anonymous memory at a [`HUGE_PAGE`]-aligned address and advises
/// them for transparent huge pages: reserves `len + HUGE_PAGE` and trims the unaligned ends.
fn map_aligned(len: usize) -> Result<*mut u8, LayoutError> {
    let reserve = len
        .checked_add(HUGE_PAGE)
        .ok_or(LayoutError::TooLarge(len as u64 >> 20))?;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; no existing memory is
    // touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(LayoutError::Mmap(std::io::Error::last_os_error()));
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = reserve - head - len;
    // SAFETY: both ranges lie inside the reservation just made and outside `aligned..+len`;
    // unmapping page-aligned parts of one's own fresh mapping is always sound.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // Advisory: a host without THP ignores it (EINVAL) and keeps 4 KiB pages.
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    Ok(aligned as *mut u8)
}

/// The e820 map for a guest with `mem_size` bytes of RAM.
///
/// Low memory up to the EBDA is RAM, the EBDA (MP table) and the legacy VGA/BIOS area are
/// reserved, high memory is RAM up to the MMIO hole and continues above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_HOLE_START);
    map.push(E820Entry {
        addr: HIMEM_START,
        size: low_end - HIMEM_START,
        kind: E820_RAM,
    });
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: FOUR_GIB,
            size: mem_size - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Last byte address (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory, GuestMemoryRegion};

    #[test]
    fn guest_ram_is_huge_page_aligned_on_the_host() {
        for mib in [64, 100, 256] {
            let mem = create_guest_memory(mib, 0).unwrap();
            let region = mem.iter().next().unwrap();
            assert_eq!(region.len(), mib << 20);
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0, "{mib} MiB");
            // The whole range is mapped and writable, both ends included.
            mem.write_obj(0xa5u8, GuestAddress(0)).unwrap();
            mem.write_obj(0x5au8, GuestAddress((mib << 20) - 1))
                .unwrap();
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress((mib << 20) - 1)).unwrap(),
                0x5a
            );
        }
    }

    #[test]
    fn small_guest_has_one_region_and_no_high_ram() {
        let mem = create_guest_memory(128, 0).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, 128 << 20);
        assert!(map.iter().all(|e| e.addr + e.size <= MMIO_HOLE_START));
    }

    #[test]
    fn big_guest_skips_the_mmio_hole() {
        let size = 4u64 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[1].0, GuestAddress(FOUR_GIB));
        assert_eq!(ranges[0].1 as u64 + ranges[1].1 as u64, size);
        let map = e820_map(size);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the legacy hole below 1 MiB is RAM.
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        for e in &map {
            let end = e.addr + e.size;
            assert!(
                end <= MMIO_HOLE_START || e.addr >= FOUR_GIB,
                "{e:?} overlaps the hole"
            );
        }
        // The 4 GiB mapping really exists in the guest memory object.
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ranges[..1]).unwrap();
        assert_eq!(mem.iter().next().unwrap().len(), MMIO_HOLE_START);
    }

    #[test]
    fn hotplug_region_sits_above_ram_aligned_and_outside_the_e820_map() {
        assert_eq!(hotplug_base(256 << 20), FOUR_GIB);
        let big = (3u64 << 30) + (100 << 20);
        // RAM above 4 GiB ends at 4 GiB + 100 MiB: the region starts at the next 128 MiB.
        assert_eq!(hotplug_base(big), FOUR_GIB + HOTPLUG_ALIGN);
        let mem = create_guest_memory(256, 512).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let r = mem.iter().nth(1).unwrap();
        assert_eq!((r.start_addr().0, r.len()), (FOUR_GIB, 512 << 20));
        assert!(e820_map(256 << 20)
            .iter()
            .all(|e| e.addr + e.size <= FOUR_GIB));
        assert!(matches!(
            create_guest_memory(256, 100),
            Err(LayoutError::Hotplug(100))
        ));
    }

    #[test]
    fn rejects_tiny_and_absurd_sizes() {
        assert!(matches!(
            create_guest_memory(16, 0),
            Err(LayoutError::TooSmall(16))
        ));
        assert!(matches!(
            create_guest_memory(u64::MAX >> 10, 0),
            Err(LayoutError::TooLarge(_))
        ));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 0x20u64),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MEMMAP_START, 0x800 - 0x40),
            (PVH_MODLIST_START, 0x800),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x4000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, 0x400),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
    }
}
