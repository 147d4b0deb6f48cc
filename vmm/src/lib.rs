//! Abide VMM library.
