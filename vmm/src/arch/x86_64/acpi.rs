//! ACPI tables for a hardware-reduced platform, built with rust-vmm's `acpi_tables` and written
//! into the BIOS area of guest memory: RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! The guest uses them for two things: the MADT announces the vCPUs' local APICs and the IOAPIC
//! (the MP table stays for kernels without ACPI), and the FADT's sleep control register plus the
//! DSDT's `_S5` package let `poweroff` reach the VMM (see
//! [`crate::devices::legacy::AcpiPm`]). There is no SCI, PM timer, GPE or PCI: with
//! `HW_REDUCED_ACPI` the guest needs none of them.
//!
//! Not wired into the builder yet: Linux also needs `CONFIG_PCI` to load the tables and, once
//! hardware-reduced, DSDT descriptions of the UART and the virtio-mmio devices for their IRQs
//! (docs/vmm.md, "Exit status").

use acpi_tables::aml::{Name, Package};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC_START, LAPIC_START};
use crate::devices::legacy::{ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_TYPE, ACPI_SLEEP_PORT};

/// Where the RSDP goes: the start of the BIOS area Linux also scans (reserved in the e820 map).
pub const RSDP_START: u64 = 0xe_0000;
/// End (exclusive) of the area the tables may use.
const ACPI_END: u64 = 0x10_0000;
const OEM_ID: [u8; 6] = *b"MOAT  ";
const OEM_REVISION: u32 = 1;
/// FADT IA-PC boot architecture flags: an i8042 is present, there is no VGA, no CMOS RTC.
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// Errors writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More vCPUs than a MADT local APIC entry (8-bit APIC id) can name.
    #[error("{0} vCPUs requested; the MADT describes at most 255")]
    TooManyCpus(u8),
    /// The tables outgrew the BIOS area.
    #[error("the ACPI tables need {0} bytes, more than the {ACPI_END:#x} limit allows")]
    TooLarge(u64),
    /// The BIOS area is not backed by guest RAM.
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// DSDT with the one object the guest needs: `Name (_S5, Package () { ACPI_S5_TYPE })`.
fn dsdt() -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"MOATDSDT", OEM_REVISION);
    let s5 = aml_bytes(&Name::new(
        "_S5_".into(),
        &Package::new(vec![&ACPI_S5_TYPE]),
    ));
    sdt.append_slice(&s5);
    sdt.as_slice().to_vec()
}

/// FADT: hardware-reduced, sleep control/status on [`ACPI_SLEEP_PORT`], reset register on
/// [`ACPI_RESET_PORT`].
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, *b"MOATFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    f.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    f.sleep_control_reg = io_byte(ACPI_SLEEP_PORT);
    f.sleep_status_reg = io_byte(ACPI_SLEEP_PORT);
    f.reset_reg = io_byte(ACPI_RESET_PORT);
    f.reset_value = ACPI_RESET_VALUE;
    aml_bytes(&f.finalize())
}

/// MADT: one enabled local APIC per vCPU (APIC id = index, as CPUID and the MP table say) and
/// the IOAPIC (id after the last CPU, GSI base 0; ISA IRQs map 1:1 to GSIs, no overrides).
fn madt(num_cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"MOATAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for cpu in 0..num_cpus {
        m.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(num_cpus, IOAPIC_START as u32, 0));
    aml_bytes(&m)
}

/// Builds every table for `num_cpus` vCPUs with the RSDP at `RSDP_START`: the blobs and their
/// guest addresses, in order.
pub fn build(num_cpus: u8) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    if num_cpus == 0 || num_cpus == u8::MAX {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    let align = |a: u64| (a + 15) & !15;
    let mut tables = Vec::new();
    let mut next = align(RSDP_START + Rsdp::len() as u64);
    let mut place = |blob: Vec<u8>, tables: &mut Vec<(u64, Vec<u8>)>| {
        let at = next;
        next = align(at + blob.len() as u64);
        tables.push((at, blob));
        at
    };
    let dsdt_addr = place(dsdt(), &mut tables);
    let fadt_addr = place(fadt(dsdt_addr), &mut tables);
    let madt_addr = place(madt(num_cpus), &mut tables);
    let mut xsdt = XSDT::new(OEM_ID, *b"MOATXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(aml_bytes(&xsdt), &mut tables);
    if next > ACPI_END {
        return Err(AcpiError::TooLarge(next - RSDP_START));
    }
    tables.insert(0, (RSDP_START, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
    Ok(tables)
}

/// Writes the tables into guest memory; returns the RSDP address for the boot protocol.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<u64, AcpiError> {
    for (addr, blob) in build(num_cpus)? {
        mem.write_slice(&blob, GuestAddress(addr))?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn table(tables: &[(u64, Vec<u8>)], addr: u64) -> &[u8] {
        &tables
            .iter()
            .find(|(a, _)| *a == addr)
            .expect("table at address")
            .1
    }

    #[test]
    fn rsdp_chain_checksums_and_lengths() {
        let tables = build(4).unwrap();
        let (rsdp_addr, rsdp) = &tables[0];
        assert_eq!(*rsdp_addr, RSDP_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt = table(&tables, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        for (addr, blob) in &tables[1..] {
            assert_eq!(sum(blob), 0, "checksum of {:?}", &blob[..4]);
            assert_eq!(u32_at(blob, 4) as usize, blob.len());
            assert!(addr + blob.len() as u64 <= ACPI_END);
        }
        let sigs: Vec<&[u8]> = (36..xsdt.len())
            .step_by(8)
            .map(|off| &table(&tables, u64_at(xsdt, off))[..4])
            .collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let tables = build(1).unwrap();
        let rsdp = &tables[0].1;
        let xsdt = table(&tables, u64_at(rsdp, 24));
        let fadt = table(&tables, u64_at(xsdt, 36));
        // Flags at 112: HW_REDUCED_ACPI (bit 20) and RESET_REG_SUP (bit 10).
        assert_eq!(u32_at(fadt, 112), (1 << 20) | (1 << 10));
        // Reset register GAS at 116: system I/O, 8 bits, at the reset port; value at 128.
        assert_eq!(fadt[116], 1);
        assert_eq!(fadt[117], 8);
        assert_eq!(u64_at(fadt, 120), u64::from(ACPI_RESET_PORT));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        // Sleep control (244) and status (256) registers: system I/O at the sleep port.
        for off in [244, 256] {
            assert_eq!(fadt[off], 1);
            assert_eq!(u64_at(fadt, off + 4), u64::from(ACPI_SLEEP_PORT));
        }
        // X_DSDT at 140 points at a DSDT holding the _S5_ name.
        let dsdt = table(&tables, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        let aml = &dsdt[36..];
        let at = aml
            .windows(4)
            .position(|w| w == b"_S5_")
            .expect("_S5_ in DSDT");
        // NameOp before the name; then PackageOp, length, one element: BytePrefix 5 or the
        // one-byte constant.
        assert_eq!(aml[at - 1], 0x08);
        assert_eq!(aml[at + 4], 0x12);
        assert_eq!(aml[at + 6], 1);
        assert!(aml[at + 7..].starts_with(&[0x0a, ACPI_S5_TYPE]));
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let tables = build(3).unwrap();
        let xsdt = table(&tables, u64_at(&tables[0].1, 24));
        let madt = table(&tables, u64_at(xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(u32_at(madt, 36), LAPIC_START as u32);
        let mut off = 44;
        let mut cpus = Vec::new();
        let mut ioapic = None;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => cpus.push((madt[off + 3], u32_at(madt, off + 4))),
                1 => ioapic = Some((madt[off + 2], u32_at(madt, off + 4), u32_at(madt, off + 8))),
                other => panic!("unexpected MADT entry {other}"),
            }
            off += len;
        }
        assert_eq!(cpus, [(0, 1), (1, 1), (2, 1)]);
        assert_eq!(ioapic, Some((3, IOAPIC_START as u32, 0)));
    }

    #[test]
    fn cpu_count_is_checked_and_tables_land_in_memory() {
        assert!(matches!(build(0), Err(AcpiError::TooManyCpus(0))));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(setup(&mem, 2).unwrap(), RSDP_START);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(RSDP_START)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(setup(&small, 1), Err(AcpiError::Memory(_))));
    }
}
