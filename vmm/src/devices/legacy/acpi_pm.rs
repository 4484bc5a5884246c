//! The hardware-reduced ACPI power-management registers the FADT points at: the sleep
//! control/status register (port [`ACPI_SLEEP_PORT`]) and the reset register (port
//! [`ACPI_RESET_PORT`]). Entering S5 (`poweroff`) or writing the reset value ends the VM.
//! Not on the port bus yet: it goes with the ACPI tables (`arch::x86_64::acpi`), which are not
//! given to guests yet (docs/vmm.md, "Exit status").

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

/// Sleep control (write) / sleep status (read) register, one byte.
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// Reset register, one byte, right after the sleep register.
pub const ACPI_RESET_PORT: u16 = 0x601;
/// First port of the device and its length on the port I/O bus.
pub const ACPI_PM_PORT: u64 = ACPI_SLEEP_PORT as u64;
/// Ports covered: sleep and reset.
pub const ACPI_PM_LEN: u64 = 2;
/// Value the guest writes to the reset register (FADT `RESET_VALUE`).
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP the DSDT's `_S5` package announces for soft-off.
pub const ACPI_S5_TYPE: u8 = 5;

/// Sleep control register fields (ACPI 6.5 §4.8.3.7): SLP_TYP in bits 2–4, SLP_EN in bit 5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const SLP_EN: u8 = 1 << 5;

/// The sleep and reset registers. Reads of the sleep status register return 0 (no wake event);
/// a write with SLP_EN and SLP_TYP = S5 is a power-off, other sleep types are ignored (the
/// DSDT announces no other state).
pub struct AcpiPm {
    exit: Arc<ExitNotifier>,
}

impl AcpiPm {
    /// Registers whose power-off and reset end the VM through `exit`.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            0 if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == ACPI_S5_TYPE => {
                self.exit.notify(ExitReason::GuestPowerOff)
            }
            1 if v == ACPI_RESET_VALUE => self.exit.notify(ExitReason::GuestReset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = AcpiPm::new(exit.clone());
        // What Linux writes first: WAK_STS to the status register; then SLP_TYP without SLP_EN.
        dev.write(0, &[0x80]);
        dev.write(0, &[ACPI_S5_TYPE << 2]);
        // Another sleep type with SLP_EN.
        dev.write(0, &[SLP_EN | (3 << 2)]);
        assert_eq!(exit.reason(), None);
        let mut b = [0xffu8];
        dev.read(0, &mut b);
        dev.write(0, &[SLP_EN | (ACPI_S5_TYPE << 2)]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestPowerOff));
        assert_eq!(ExitReason::GuestPowerOff.exit_code(), 0);
    }

    #[test]
    fn reset_register_resets_only_with_the_reset_value() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = AcpiPm::new(exit.clone());
        dev.write(1, &[0]);
        dev.write(1, &[]);
        assert_eq!(exit.reason(), None);
        dev.write(1, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }
}
