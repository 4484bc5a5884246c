//! Intel MultiProcessor Specification 1.4 table in the EBDA: announces the vCPUs (local APIC
//! ids 0..n), the in-kernel IOAPIC and the ISA interrupt routing, so the guest brings up SMP
//! without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, IOAPIC_START, IRQ_MAX, LAPIC_START};

/// Most vCPUs the table (and the 1 KiB EBDA it lives in) can describe.
pub const MAX_VCPUS: u8 = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const FLOATING_POINTER_SIZE: usize = 16;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table can hold.
    #[error("{0} vCPUs requested; the MP table supports 1 to {MAX_VCPUS}")]
    TooManyCpus(u8),
    /// The EBDA is not backed by guest RAM.
    #[error("cannot write the MP table into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, for `num_cpus` vCPUs,
/// to be placed at `EBDA_START`.
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = EBDA_START as u32 + FLOATING_POINTER_SIZE as u32;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"MOAT    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_SIZE + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs into the EBDA.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, MAX_VCPUS] {
            let t = build(n).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let entries = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(entries as usize, n as usize + 2 + 24 + 2);
            let cpus = table[44..].chunks(20).take(n as usize);
            for (i, c) in cpus.enumerate() {
                assert_eq!(c[0], ENTRY_PROCESSOR);
                assert_eq!(c[1] as usize, i);
                assert_eq!(c[3] & CPU_BOOT_PROCESSOR != 0, i == 0);
            }
            assert!(t.len() <= 0x400, "fits the EBDA");
        }
    }

    #[test]
    fn rejects_bad_counts() {
        assert!(matches!(build(0), Err(MptableError::TooManyCpus(0))));
        assert!(build(MAX_VCPUS + 1).is_err());
    }

    #[test]
    fn written_into_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START + 16))
            .unwrap();
        assert_eq!(&sig, b"PCMP");
    }
}
