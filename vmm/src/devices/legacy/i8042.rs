//! The i8042 keyboard controller (ports 0x60 and 0x64), without a keyboard: what a guest
//! needs to initialise it quickly and to request a reset.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

/// i8042 data port; the command/status port is at +4.
pub const I8042_PORT: u64 = 0x60;
/// i8042 range (0x60..=0x64).
pub const I8042_LEN: u64 = 5;

/// The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command).
///
/// Only the controller is emulated, no keyboard: enough for Linux's i8042 driver to read and
/// write the configuration byte and self-test quickly (vm-superio's i8042 reads as all
/// zeros, which costs a booting guest seconds of probe time-outs), and for the reset command
/// (0xfe), which ends the VM through `exit`.
pub struct I8042 {
    exit: Arc<ExitNotifier>,
    ctr: u8,
    output: std::collections::VecDeque<u8>,
    writing_ctr: bool,
}

impl I8042 {
    const STATUS_OBF: u8 = 0x01;
    const STATUS_SYS: u8 = 0x04;
    /// Set when the keyboard is NOT locked.
    const STATUS_UNLOCKED: u8 = 0x10;
    const CMD_READ_CTR: u8 = 0x20;
    const CMD_WRITE_CTR: u8 = 0x60;
    const CMD_SELF_TEST: u8 = 0xaa;
    const CMD_KBD_TEST: u8 = 0xab;
    const CMD_AUX_TEST: u8 = 0xa9;
    const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
    const CMD_RESET_CPU: u8 = 0xfe;

    /// A controller whose reset command ends the VM through `exit`.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self {
            exit,
            // Keyboard interrupt on, system flag set, translation on.
            ctr: 0x45,
            output: std::collections::VecDeque::new(),
            writing_ctr: false,
        }
    }

    fn command(&mut self, cmd: u8) {
        self.writing_ctr = false;
        match cmd {
            Self::CMD_READ_CTR => self.output.push_back(self.ctr),
            Self::CMD_WRITE_CTR => self.writing_ctr = true,
            Self::CMD_SELF_TEST => self.output.push_back(0x55),
            Self::CMD_KBD_TEST => self.output.push_back(0x00),
            // No auxiliary (mouse) port.
            Self::CMD_AUX_TEST => self.output.push_back(0xff),
            Self::CMD_READ_OUTPUT_PORT => self.output.push_back(0x01),
            Self::CMD_RESET_CPU => self.exit.notify(ExitReason::GuestReset),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else {
            return;
        };
        *b = match offset {
            0 => self.output.pop_front().unwrap_or(0),
            4 => {
                let obf = if self.output.is_empty() {
                    0
                } else {
                    Self::STATUS_OBF
                };
                obf | Self::STATUS_SYS | Self::STATUS_UNLOCKED
            }
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            0 if self.writing_ctr => {
                self.ctr = v;
                self.writing_ctr = false;
            }
            // Bytes for the (absent) keyboard are dropped.
            0 => {}
            4 => self.command(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn i8042_config_byte_and_self_test() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        assert_eq!(read(&mut dev, 4) & 1, 0, "output buffer empty");
        dev.write(4, &[0x20]);
        assert_eq!(read(&mut dev, 4) & 1, 1);
        assert_eq!(read(&mut dev, 0), 0x45);
        dev.write(4, &[0x60]);
        dev.write(0, &[0x30]);
        dev.write(4, &[0x20]);
        assert_eq!(read(&mut dev, 0), 0x30);
        dev.write(4, &[0xaa]);
        assert_eq!(read(&mut dev, 0), 0x55);
        assert_eq!(read(&mut dev, 4) & 1, 0);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn i8042_reset_command_ends_the_vm() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None, "0xfe on the data port is not a reset");
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }
}
