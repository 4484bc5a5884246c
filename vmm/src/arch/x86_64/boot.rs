//! Boot information handed to the kernel: the Linux zero page (`boot_params`, 64-bit boot
//! protocol and bzImage) or the PVH `hvm_start_info` with its memory map and module list,
//! plus initrd placement.

use std::fs::File;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, ReadVolatile};

use super::layout::{self, *};

/// What the kernel needs to find: command line, initrd and the RAM size for the e820 map.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// Command line length in bytes, including the terminating NUL.
    pub cmdline_size: usize,
    /// Initrd guest address and size.
    pub initrd: Option<(u64, u64)>,
    /// Guest address of the ACPI RSDP, if the VM has ACPI tables.
    pub rsdp: Option<u64>,
}

/// Errors writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("initrd of {size} bytes does not fit in guest RAM above the kernel (ends at {kernel_end:#x}); give the guest more memory")]
    InitrdTooBig {
        /// initrd size.
        size: u64,
        /// End of the loaded kernel image.
        kernel_end: u64,
    },
    /// Reading the initrd into guest memory failed.
    #[error("cannot read initrd into guest memory: {0}")]
    InitrdRead(#[source] vm_memory::GuestMemoryError),
    /// Reading the initrd metadata failed.
    #[error("cannot stat initrd: {0}")]
    InitrdStat(#[source] std::io::Error),
    /// linux-loader refused to write the boot parameters.
    #[error("cannot write boot parameters: {0}")]
    Configurator(#[from] linux_loader::configurator::Error),
}

/// Copies `initrd` to the top of low RAM (page aligned), above `kernel_end`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    kernel_end: u64,
    mem_size: u64,
) -> Result<(u64, u64), BootError> {
    let size = initrd.metadata().map_err(BootError::InitrdStat)?.len();
    let top = layout::low_ram_end(mem_size);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooBig { size, kernel_end })?;
    let mut remaining = size as usize;
    let mut at = GuestAddress(addr);
    while remaining > 0 {
        let n = mem
            .get_slice(at, remaining.min(1 << 20))
            .and_then(|mut s| {
                initrd
                    .read_volatile(&mut s)
                    .map_err(vm_memory::GuestMemoryError::from)
            })
            .map_err(BootError::InitrdRead)?;
        if n == 0 {
            return Err(BootError::InitrdRead(
                vm_memory::GuestMemoryError::PartialBuffer {
                    expected: size as usize,
                    completed: size as usize - remaining,
                },
            ));
        }
        remaining -= n;
        at = GuestAddress(at.0 + n as u64);
    }
    Ok((addr, size))
}

/// The zero page for the 64-bit boot protocol; `header` is the bzImage setup header when
/// there is one.
pub fn zero_page(header: Option<setup_header>, info: &BootInfo) -> boot_params {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_size as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp.unwrap_or(0);
    let map = layout::e820_map(info.mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.type_ = e.kind;
    }
    params.e820_entries = map.len() as u8;
    params
}

/// Writes the zero page at `ZERO_PAGE_START`.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    info: &BootInfo,
) -> Result<(), BootError> {
    let params = zero_page(header, info);
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    Ok(())
}

/// Writes the PVH start info, memory map and (with an initrd) module list.
pub fn write_pvh_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
    let memmap: Vec<hvm_memmap_table_entry> = layout::e820_map(info.mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: info.rsdp.unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new(&start, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = info.initrd {
        start.nr_modules = 1;
        start.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&start, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&layout::ram_ranges(mib << 20)).unwrap()
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let m = mem(128);
        let info = BootInfo {
            mem_size: 128 << 20,
            cmdline_size: 42,
            initrd: Some((0x700_0000, 0x1234)),
            rsdp: Some(0xe_0000),
        };
        write_zero_page(&m, None, &info).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.type_ }),
            (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn bzimage_header_is_kept() {
        let h = setup_header {
            kernel_alignment: 0x20_0000,
            version: 0x20f,
            ..Default::default()
        };
        let p = zero_page(
            Some(h),
            &BootInfo {
                mem_size: 64 << 20,
                cmdline_size: 1,
                initrd: None,
                rsdp: None,
            },
        );
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.acpi_rsdp_addr }, 0);
    }

    #[test]
    fn pvh_start_info_and_memmap() {
        let m = mem(256);
        let info = BootInfo {
            mem_size: 256 << 20,
            cmdline_size: 10,
            initrd: Some((0xf00_0000, 4096)),
            rsdp: Some(0xe_0000),
        };
        write_pvh_info(&m, &info).unwrap();
        let s: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(s.magic, 0x336e_c578);
        assert_eq!(s.memmap_entries, 3);
        assert_eq!(s.nr_modules, 1);
        assert_eq!(s.cmdline_paddr, CMDLINE_START);
        assert_eq!(s.rsdp_paddr, 0xe_0000);
        let e: hvm_memmap_table_entry =
            m.read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24)).unwrap();
        assert_eq!(
            (e.addr, e.size, e.type_),
            (HIMEM_START, (256 << 20) - HIMEM_START, 1)
        );
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0xf00_0000, 4096));
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let m = mem(64);
        let mut f = tempfile();
        f.write_all(&[7u8; 5000]).unwrap();
        let (addr, size) = load_initrd(&m, &mut reopen(&f), 0x200_0000, 64 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr + size + 4096 > 64 << 20);
        let b: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 7);
        // A kernel ending near the top leaves no room.
        let err = load_initrd(&m, &mut reopen(&f), (64 << 20) - 100, 64 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { size: 5000, .. }));
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!("moat-vmm-initrd-{}", std::process::id()));
        let f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn reopen(f: &File) -> File {
        let mut g = f.try_clone().unwrap();
        std::io::Seek::rewind(&mut g).unwrap();
        g
    }
}
