//! Global descriptor table entries for the boot GDT and their KVM segment form.

use kvm_bindings::kvm_segment;

/// Builds a GDT entry from access/flags (`0xF0FF` mask: flags in bits 12..15, access in 0..7),
/// base and 20-bit limit, as in the Intel SDM vol. 3 figure 3-8.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    // With the granularity bit set the limit counts 4 KiB pages.
    if entry & (1 << 55) != 0 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM segment register described by GDT `entry` at `table_index`.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        padding: 0,
        unusable: u8::from(bit(47) == 0),
    }
}

/// Index of the code segment in the boot GDT (selector 0x08).
pub const CODE_INDEX: u8 = 1;
/// Index of the data segment in the boot GDT (selector 0x10).
pub const DATA_INDEX: u8 = 2;
/// Index of the TSS in the boot GDT (selector 0x18).
pub const TSS_INDEX: u8 = 3;

/// The boot GDT: null, code (64-bit when `long_mode`, else 32-bit flat), data, TSS.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code = if long_mode {
        gdt_entry(0xa09b, 0, 0xfffff)
    } else {
        gdt_entry(0xc09b, 0, 0xfffff)
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment() {
        let gdt = boot_gdt(true);
        let cs = kvm_segment_from_gdt(gdt[1], CODE_INDEX);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn protected_mode_segments() {
        let gdt = boot_gdt(false);
        let cs = kvm_segment_from_gdt(gdt[1], CODE_INDEX);
        assert_eq!((cs.l, cs.db, cs.g), (0, 1, 1));
        let ds = kvm_segment_from_gdt(gdt[2], DATA_INDEX);
        assert_eq!((ds.type_, ds.s, ds.selector), (3, 1, 0x10));
        let tss = kvm_segment_from_gdt(gdt[3], TSS_INDEX);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.selector, 40);
    }
}
