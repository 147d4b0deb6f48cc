//! Refusals of machine-declared values a device model cannot implement.
//!
//! Every device takes its guest-visible values from the machine
//! description. One that cannot give a declared value refuses when the
//! machine is built, naming itself, the field and the value, so a machine
//! type never claims something its devices silently drop.

/// A value the machine declares that a device model cannot implement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Feature bits the model does not implement.
    #[error("{device}: the machine type declares {}, which this model does not implement", names.join(", "))]
    Features {
        /// Device model.
        device: &'static str,
        /// The bits, by name.
        names: Vec<String>,
    },
    /// No `VIRTIO_F_VERSION_1`.
    #[error("{device}: the machine type does not declare VIRTIO_F_VERSION_1; this model implements only the virtio 1.x interface")]
    NoVersion1 {
        /// Device model.
        device: &'static str,
    },
    /// Any other declared value.
    #[error("{device}: {field} = {value} cannot be implemented: {reason}")]
    Value {
        /// Device model.
        device: &'static str,
        /// The machine description's field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What the model implements instead.
        reason: String,
    },
}

impl ModelError {
    /// A [`ModelError::Value`].
    pub fn value(
        device: &'static str,
        field: &'static str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self::Value {
            device,
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
