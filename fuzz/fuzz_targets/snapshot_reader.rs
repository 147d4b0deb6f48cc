//! The snapshot file reader: magic, header (length, JSON, checksum), the
//! section index and every section's bytes, as `abide restore` reads them.
#![no_main]

use abide_vmm::snapshot::format::Snapshot;
use abide_vmm::snapshot::KNOWN_SECTIONS;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = Snapshot::parse(data.to_vec(), KNOWN_SECTIONS) else {
        return;
    };
    let names: Vec<String> = snap.sections().map(String::from).collect();
    for name in names {
        let _ = snap.section(&name);
    }
});
