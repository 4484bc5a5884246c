//! Legacy PC devices on the port I/O bus: the 8250 UART on COM1 (guest console), the i8042
//! controller (enough for a guest to request a reset), the boot marker port, and the ACPI
//! power-management registers (guest power-off and reset).

pub mod acpi_pm;
pub mod i8042;
pub mod marker;
pub mod serial;

pub use acpi_pm::{
    AcpiPm, ACPI_PM1_CNT_LEN, ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_LEN, ACPI_PM_LEN, ACPI_PM_PORT,
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_TYPE,
};
pub use i8042::{I8042, I8042_LEN, I8042_PORT};
pub use marker::{BootMarker, MARKER_PORT, MARKER_UNSET, MARKER_VALUE};
pub use serial::{EventFdTrigger, SerialDevice, SerialInput, SERIAL_LEN, SERIAL_PORT};
