//! Legacy PC platform devices: UART, i8042, CMOS RTC, ACPI PM block, and
//! for firmware boot fw_cfg and the debug console port.

pub mod fw_cfg;
pub mod i8042;
pub mod irq;
pub mod pm;
pub mod rtc;
pub mod serial;

pub use i8042::I8042;
pub use irq::IrqLine;
pub use pm::{AcpiPm, ResetControl};
pub use rtc::Rtc;
pub use serial::Serial;
