//! ACPI tables for the microVM, built with rust-vmm's `acpi_tables` and written into the BIOS
//! area of guest memory: RSDP → XSDT → {FADT → {FACS, DSDT}, MADT}.
//!
//! The guest uses them for two things: the MADT announces the vCPUs' local APICs, the IOAPIC
//! and the SCI's interrupt source override (the MP table stays for kernels without ACPI), and
//! the FADT's PM1a control register plus the DSDT's `_S5` package let `poweroff` reach the VMM
//! (see [`crate::devices::legacy::AcpiPm`]).
//!
//! The FADT is deliberately *not* hardware-reduced: a full fixed-hardware FADT (PM1a event and
//! control blocks in port I/O, an SCI, no SMI command port because the platform is always in
//! ACPI mode) keeps Linux's legacy PIC and its identity mapping of ISA IRQs 0–15. That is what
//! the COM1 UART (IRQ 4) and the `virtio_mmio.device=` command-line devices (GSIs from 5) rely
//! on, exactly as with the MP table; a hardware-reduced FADT would drop both and require every
//! device to be described in the DSDT instead (docs/vmm.md, "ACPI"). There is no PM timer, GPE
//! block, CMOS RTC or PCI host bridge.

use acpi_tables::aml::{Name, Package};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC_START, IRQ_ACPI_SCI, LAPIC_START};
use crate::devices::legacy::{
    ACPI_PM1_CNT_LEN, ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_LEN, ACPI_PM_PORT, ACPI_RESET_PORT,
    ACPI_RESET_VALUE, ACPI_S5_TYPE,
};

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
/// FADT `P_LVL2_LAT` / `P_LVL3_LAT` values meaning "C2 / C3 not supported".
const NO_C2: u16 = 101;
const NO_C3: u16 = 1001;
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT interrupt structure types and MPS INTI flags (ACPI 6.5 §5.2.12).
const MADT_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LAPIC_NMI: u8 = 4;
const INTI_ACTIVE_HIGH: u16 = 0b01;
const INTI_LEVEL: u16 = 0b11 << 2;
const INTI_EDGE: u16 = 0b01 << 2;

/// Errors writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More vCPUs than a MADT local APIC entry (8-bit APIC id) can name.
    #[error("{0} vCPUs requested; the MADT describes at most 254")]
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

/// DSDT with the one object the guest needs:
/// `Name (_S5, Package () { ACPI_S5_TYPE, ACPI_S5_TYPE, 0, 0 })` (SLP_TYPa, SLP_TYPb, reserved).
fn dsdt() -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"MOATDSDT", OEM_REVISION);
    let s5 = aml_bytes(&Name::new(
        "_S5_".into(),
        &Package::new(vec![&ACPI_S5_TYPE, &ACPI_S5_TYPE, &0u8, &0u8]),
    ));
    sdt.append_slice(&s5);
    sdt.as_slice().to_vec()
}

/// A port I/O generic address of `bytes` bytes accessed `access`-wide.
fn io_gas(port: u16, bytes: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bytes * 8, 0, access, port.into())
}

/// FADT: PM1a event block at [`ACPI_PM_PORT`], PM1a control block at [`ACPI_PM1_CNT_PORT`]
/// (both as 32-bit block addresses and as extended GAS, which agree), SCI on
/// [`IRQ_ACPI_SCI`], no SMI command port (always in ACPI mode), reset register on
/// [`ACPI_RESET_PORT`], no fixed-feature power or sleep button, no C2/C3.
fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"MOATFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(Flags::Wbinvd)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.sci_int = (IRQ_ACPI_SCI as u16).into();
    f.pm1a_evt_blk = u32::from(ACPI_PM_PORT).into();
    f.pm1_evt_len = ACPI_PM1_EVT_LEN;
    f.x_pm1a_evt_blk = io_gas(ACPI_PM_PORT, ACPI_PM1_EVT_LEN, AccessSize::WordAccess);
    f.pm1a_cnt_blk = u32::from(ACPI_PM1_CNT_PORT).into();
    f.pm1_cnt_len = ACPI_PM1_CNT_LEN;
    f.x_pm1a_cnt_blk = io_gas(ACPI_PM1_CNT_PORT, ACPI_PM1_CNT_LEN, AccessSize::WordAccess);
    f.p_lvl2_lat = NO_C2.into();
    f.p_lvl3_lat = NO_C3.into();
    f.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    f.reset_reg = io_gas(ACPI_RESET_PORT, 1, AccessSize::ByteAccess);
    f.reset_value = ACPI_RESET_VALUE;
    aml_bytes(&f.finalize())
}

/// MADT: the local APIC address, `PCAT_COMPAT`, one enabled local APIC per vCPU (APIC id =
/// index, as CPUID and the MP table say), the IOAPIC (id after the last CPU, GSI base 0), the
/// SCI as a level-triggered, active-high override of its ISA IRQ (every other ISA IRQ maps 1:1
/// to its GSI, as in the MP table) and LINT1 as NMI on every CPU.
fn madt(num_cpus: u8) -> Vec<u8> {
    let mut m = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"MOATAPIC", OEM_REVISION);
    m.write_u32(36, LAPIC_START as u32);
    m.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        m.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    m.append_slice(&aml_bytes(&IoApic::new(num_cpus, IOAPIC_START as u32, 0)));
    // Interrupt source override: type, length, bus 0 (ISA), source IRQ, GSI, flags.
    let mut iso = vec![MADT_INT_SRC_OVERRIDE, 10, 0, IRQ_ACPI_SCI as u8];
    iso.extend_from_slice(&IRQ_ACPI_SCI.to_le_bytes());
    iso.extend_from_slice(&(INTI_ACTIVE_HIGH | INTI_LEVEL).to_le_bytes());
    m.append_slice(&iso);
    // Local APIC NMI: type, length, all processors (0xff), flags, LINT1.
    let mut nmi = vec![MADT_LAPIC_NMI, 6, 0xff];
    nmi.extend_from_slice(&(INTI_ACTIVE_HIGH | INTI_EDGE).to_le_bytes());
    nmi.push(1);
    m.append_slice(&nmi);
    m.as_slice().to_vec()
}

/// Builds every table for `num_cpus` vCPUs with the RSDP at `RSDP_START`: the blobs and their
/// guest addresses, in order.
pub fn build(num_cpus: u8) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    // APIC id `num_cpus` is the IOAPIC's; 0xff is the broadcast id.
    if num_cpus == 0 || num_cpus >= u8::MAX - 1 {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    let align = |a: u64, to: u64| a.div_ceil(to) * to;
    let mut tables = Vec::new();
    let mut next = RSDP_START + Rsdp::len() as u64;
    let mut place = |blob: Vec<u8>, to: u64, tables: &mut Vec<(u64, Vec<u8>)>| {
        let at = align(next, to);
        next = at + blob.len() as u64;
        tables.push((at, blob));
        at
    };
    // The FACS must be 64-byte aligned; the others are aligned for tidiness.
    let facs_addr = place(aml_bytes(&FACS::new()), 64, &mut tables);
    let dsdt_addr = place(dsdt(), 16, &mut tables);
    let fadt_addr = place(fadt(dsdt_addr, facs_addr), 16, &mut tables);
    let madt_addr = place(madt(num_cpus), 16, &mut tables);
    let mut xsdt = XSDT::new(OEM_ID, *b"MOATXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(aml_bytes(&xsdt), 16, &mut tables);
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

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
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

    /// The XSDT entries of `tables`, in order.
    fn xsdt_entries(tables: &[(u64, Vec<u8>)]) -> Vec<&[u8]> {
        let xsdt = table(tables, u64_at(&tables[0].1, 24));
        (36..xsdt.len())
            .step_by(8)
            .map(|off| table(tables, u64_at(xsdt, off)))
            .collect()
    }

    #[test]
    fn rsdp_chain_checksums_and_lengths() {
        let tables = build(4).unwrap();
        let (rsdp_addr, rsdp) = &tables[0];
        assert_eq!(*rsdp_addr, RSDP_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP with an XSDT");
        assert_eq!(&table(&tables, u64_at(rsdp, 24))[..4], b"XSDT");
        let mut end = 0;
        for (addr, blob) in &tables[1..] {
            assert!(*addr >= end, "tables overlap");
            end = addr + blob.len() as u64;
            assert!(end <= ACPI_END);
            assert_eq!(u32_at(blob, 4) as usize, blob.len());
            if &blob[..4] != b"FACS" {
                // The FACS has no checksum.
                assert_eq!(sum(blob), 0, "checksum of {:?}", &blob[..4]);
            }
        }
        let sigs: Vec<&[u8]> = xsdt_entries(&tables).iter().map(|t| &t[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
    }

    #[test]
    fn fadt_has_fixed_hardware_pm1_blocks_sci_and_reset() {
        let tables = build(1).unwrap();
        let fadt = xsdt_entries(&tables)[0];
        // Not hardware-reduced (bit 20 clear): WBINVD, PWR_BUTTON, SLP_BUTTON, RESET_REG_SUP.
        assert_eq!(u32_at(fadt, 112), 1 | (1 << 4) | (1 << 5) | (1 << 10));
        assert_eq!(u16_at(fadt, 46), IRQ_ACPI_SCI as u16, "SCI_INT");
        assert_eq!(u32_at(fadt, 48), 0, "no SMI_CMD: always in ACPI mode");
        // PM1a event (56, length at 88) and control (64, length at 89) blocks; no PM1b, PM2,
        // PM timer or GPE blocks.
        assert_eq!(u32_at(fadt, 56), u32::from(ACPI_PM_PORT));
        assert_eq!(u32_at(fadt, 64), u32::from(ACPI_PM1_CNT_PORT));
        assert_eq!((fadt[88], fadt[89]), (4, 2));
        for off in [60, 68, 72, 76, 80, 84] {
            assert_eq!(u32_at(fadt, off), 0, "block at {off}");
        }
        assert_eq!(&fadt[90..94], &[0, 0, 0, 0]);
        // X_PM1a_EVT_BLK (148) and X_PM1a_CNT_BLK (172) agree with the 32-bit blocks.
        for (off, port, bits) in [(148, ACPI_PM_PORT, 32), (172, ACPI_PM1_CNT_PORT, 16)] {
            assert_eq!(fadt[off], 1, "system I/O");
            assert_eq!(fadt[off + 1], bits);
            assert_eq!(u64_at(fadt, off + 4), u64::from(port));
        }
        // No C2/C3.
        assert!(u16_at(fadt, 96) > 100 && u16_at(fadt, 98) > 1000);
        // Reset register GAS at 116: system I/O, 8 bits, at the reset port; value at 128.
        assert_eq!(fadt[116], 1);
        assert_eq!(fadt[117], 8);
        assert_eq!(u64_at(fadt, 120), u64::from(ACPI_RESET_PORT));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        // X_FIRMWARE_CTRL (132) points at a 64-byte aligned FACS.
        let facs_addr = u64_at(fadt, 132);
        assert_eq!(facs_addr % 64, 0);
        let facs = table(&tables, facs_addr);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(facs.len(), 64);
    }

    #[test]
    fn dsdt_announces_s5() {
        let tables = build(1).unwrap();
        let fadt = xsdt_entries(&tables)[0];
        // X_DSDT at 140 points at a DSDT holding the _S5_ name.
        let dsdt = table(&tables, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        let aml = &dsdt[36..];
        let at = aml
            .windows(4)
            .position(|w| w == b"_S5_")
            .expect("_S5_ in DSDT");
        // NameOp before the name; then PackageOp, length, 4 elements: SLP_TYPa and SLP_TYPb
        // (BytePrefix + value), then two reserved zeros (ZeroOp).
        assert_eq!(aml[at - 1], 0x08);
        assert_eq!(aml[at + 4], 0x12);
        assert_eq!(aml[at + 6], 4);
        assert_eq!(
            &aml[at + 7..],
            &[0x0a, ACPI_S5_TYPE, 0x0a, ACPI_S5_TYPE, 0x00, 0x00]
        );
    }

    #[test]
    fn madt_lists_every_cpu_the_ioapic_the_sci_override_and_nmi() {
        let tables = build(3).unwrap();
        let madt = xsdt_entries(&tables)[1];
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(u32_at(madt, 36), LAPIC_START as u32);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        let mut off = 44;
        let (mut cpus, mut ioapic, mut overrides, mut nmis) = (vec![], None, vec![], vec![]);
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            let e = &madt[off..off + len];
            match kind {
                0 => cpus.push((e[2], e[3], u32_at(e, 4))),
                1 => ioapic = Some((e[2], u32_at(e, 4), u32_at(e, 8))),
                2 => overrides.push((e[2], e[3], u32_at(e, 4), u16_at(e, 8))),
                4 => nmis.push((e[2], u16_at(e, 3), e[5])),
                other => panic!("unexpected MADT entry {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(cpus, [(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapic, Some((3, IOAPIC_START as u32, 0)));
        // ISA IRQ 3 → GSI 3, active high (01), level (11 << 2).
        assert_eq!(overrides, [(0, 3, 3, 0b1101)]);
        assert_eq!(nmis, [(0xff, 0b0101, 1)]);
    }

    #[test]
    fn cpu_count_is_checked_and_tables_land_in_memory() {
        assert!(matches!(build(0), Err(AcpiError::TooManyCpus(0))));
        assert!(matches!(build(254), Err(AcpiError::TooManyCpus(254))));
        assert!(build(253).is_ok());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(setup(&mem, 2).unwrap(), RSDP_START);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(RSDP_START)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(setup(&small, 1), Err(AcpiError::Memory(_))));
    }
}
