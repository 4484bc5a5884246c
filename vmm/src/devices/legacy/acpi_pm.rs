//! The ACPI fixed-hardware power-management registers the FADT points at (`arch::x86_64::acpi`):
//! the PM1a event block (status and enable), the PM1a control block and the reset register, on
//! the port I/O bus from [`ACPI_PM_PORT`]. Entering S5 (`poweroff`) ends the VM with
//! `guest-poweroff`; writing the reset value ends it with `guest-reset`.
//!
//! There are no fixed events (no PM timer, power or sleep button, RTC alarm), so the status
//! register always reads 0 and the SCI is never raised. The enable register keeps what the guest
//! writes (ACPICA checks that `GBL_EN` sticks to learn that the global lock exists; the lock
//! itself lives in the FACS). The control register reads with `SCI_EN` set: the platform is
//! always in ACPI mode (the FADT has no SMI command port).

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

/// First port of the block: PM1a event block (status at +0, enable at +2, 16 bits each).
pub const ACPI_PM_PORT: u16 = 0x600;
/// PM1a event block length in bytes (FADT `PM1_EVT_LEN`).
pub const ACPI_PM1_EVT_LEN: u8 = 4;
/// PM1a control register (16 bits; FADT `PM1_CNT_LEN` = 2).
pub const ACPI_PM1_CNT_PORT: u16 = ACPI_PM_PORT + ACPI_PM1_EVT_LEN as u16;
/// PM1a control block length in bytes.
pub const ACPI_PM1_CNT_LEN: u8 = 2;
/// Reset register, one byte, after the control register.
pub const ACPI_RESET_PORT: u16 = ACPI_PM1_CNT_PORT + ACPI_PM1_CNT_LEN as u16;
/// Ports covered on the bus: event block, control block, reset register.
pub const ACPI_PM_LEN: u64 = ACPI_PM1_EVT_LEN as u64 + ACPI_PM1_CNT_LEN as u64 + 1;
/// Value the guest writes to the reset register (FADT `RESET_VALUE`).
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP the DSDT's `_S5` package announces for soft-off.
pub const ACPI_S5_TYPE: u8 = 5;

/// PM1 control register fields (ACPI 6.5 §4.8.2.2.1): SCI_EN in bit 0, SLP_TYP in bits 10–12,
/// SLP_EN in bit 13.
const SCI_EN: u16 = 1;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
const SLP_EN: u16 = 1 << 13;

/// Register offsets inside the block.
const OFF_STATUS: u64 = 0;
const OFF_ENABLE: u64 = 2;
const OFF_CONTROL: u64 = ACPI_PM1_EVT_LEN as u64;
const OFF_RESET: u64 = OFF_CONTROL + ACPI_PM1_CNT_LEN as u64;

/// The PM1a event and control registers and the reset register.
pub struct AcpiPm {
    exit: Arc<ExitNotifier>,
    enable: u16,
    control: u16,
}

impl AcpiPm {
    /// Registers whose power-off and reset end the VM through `exit`.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self {
            exit,
            enable: 0,
            control: SCI_EN,
        }
    }

    /// Reads or writes byte `i` (0 or 1) of a 16-bit register.
    fn byte_of(reg: u16, i: u64) -> u8 {
        reg.to_le_bytes()[(i & 1) as usize]
    }

    fn with_byte(reg: u16, i: u64, v: u8) -> u16 {
        let mut b = reg.to_le_bytes();
        b[(i & 1) as usize] = v;
        u16::from_le_bytes(b)
    }

    fn write_control(&mut self, value: u16) {
        // SCI_EN is read-only here (always in ACPI mode); SLP_EN is write-only.
        self.control = (value & !SLP_EN) | SCI_EN;
        if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == u16::from(ACPI_S5_TYPE)
        {
            self.exit.notify(ExitReason::GuestPowerOff);
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = match at {
                OFF_ENABLE | 3 => Self::byte_of(self.enable, at - OFF_ENABLE),
                OFF_CONTROL | 5 => Self::byte_of(self.control, at - OFF_CONTROL),
                // Status: no event is ever pending. Reset: write-only.
                _ => 0,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // A 16-bit register written whole (the FADT announces word access) or one byte at a
        // time; the control register acts on every write, like hardware would.
        let mut control = None;
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i as u64;
            match at {
                OFF_ENABLE | 3 => self.enable = Self::with_byte(self.enable, at - OFF_ENABLE, v),
                OFF_CONTROL | 5 => {
                    let cur = control.unwrap_or(self.control);
                    control = Some(Self::with_byte(cur, at - OFF_CONTROL, v));
                }
                OFF_RESET if v == ACPI_RESET_VALUE => self.exit.notify(ExitReason::GuestReset),
                // Status bits are write-1-to-clear and none is ever set.
                OFF_STATUS | 1 => {}
                _ => {}
            }
        }
        if let Some(value) = control {
            self.write_control(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (AcpiPm, Arc<ExitNotifier>) {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        (AcpiPm::new(exit.clone()), exit)
    }

    fn read16(dev: &mut AcpiPm, off: u64) -> u16 {
        let mut b = [0xffu8; 2];
        dev.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut dev, exit) = dev();
        let s5 = u16::from(ACPI_S5_TYPE) << SLP_TYP_SHIFT;
        // What ACPICA does for S5: clear the status bits, read the control register, write
        // SLP_TYP alone, then SLP_TYP | SLP_EN.
        dev.write(OFF_STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(read16(&mut dev, OFF_STATUS), 0);
        let cnt = read16(&mut dev, OFF_CONTROL);
        assert_eq!(cnt, SCI_EN);
        dev.write(OFF_CONTROL, &(cnt | s5).to_le_bytes());
        // Another sleep type with SLP_EN does nothing either.
        dev.write(
            OFF_CONTROL,
            &(cnt | (3 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes(),
        );
        assert_eq!(exit.reason(), None);
        // SLP_EN reads back as 0, SCI_EN stays set.
        assert_eq!(read16(&mut dev, OFF_CONTROL), SCI_EN | (3 << SLP_TYP_SHIFT));
        dev.write(OFF_CONTROL, &(cnt | s5 | SLP_EN).to_le_bytes());
        assert_eq!(exit.reason(), Some(ExitReason::GuestPowerOff));
        assert_eq!(ExitReason::GuestPowerOff.exit_code(), 0);
    }

    #[test]
    fn s5_written_as_bytes_powers_off() {
        let (mut dev, exit) = dev();
        let v = (u16::from(ACPI_S5_TYPE) << SLP_TYP_SHIFT) | SLP_EN;
        let [lo, hi] = v.to_le_bytes();
        dev.write(OFF_CONTROL, &[lo]);
        assert_eq!(exit.reason(), None);
        dev.write(OFF_CONTROL + 1, &[hi]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestPowerOff));
    }

    #[test]
    fn enable_register_keeps_what_is_written() {
        let (mut dev, exit) = dev();
        assert_eq!(read16(&mut dev, OFF_ENABLE), 0);
        // GBL_EN (bit 5) and PWRBTN_EN (bit 8).
        dev.write(OFF_ENABLE, &0x0120u16.to_le_bytes());
        assert_eq!(read16(&mut dev, OFF_ENABLE), 0x0120);
        let mut whole = [0xffu8; 4];
        dev.read(OFF_STATUS, &mut whole);
        assert_eq!(whole, [0, 0, 0x20, 0x01]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn reset_register_resets_only_with_the_reset_value() {
        let (mut dev, exit) = dev();
        dev.write(OFF_RESET, &[0]);
        dev.write(OFF_RESET, &[]);
        assert_eq!(exit.reason(), None);
        dev.write(OFF_RESET, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn layout_matches_the_fadt_blocks() {
        assert_eq!(ACPI_PM1_CNT_PORT, 0x604);
        assert_eq!(ACPI_RESET_PORT, 0x606);
        assert_eq!(
            u64::from(ACPI_PM_PORT) + ACPI_PM_LEN,
            u64::from(ACPI_RESET_PORT) + 1
        );
    }
}
