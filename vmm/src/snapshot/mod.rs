//! Snapshots: the file format (header, versioned sections, checksums).
//! Pause, save and restore build on it.

pub mod format;
