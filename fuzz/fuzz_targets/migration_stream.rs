//! The migration stream as a destination reads it: the header, then frames
//! (pages, passes, state sections, end, commit, abort) with their
//! payloads checked and state sections kept within their bounds.
#![no_main]

use abide_vmm::migration::wire;
use abide_vmm::snapshot::format::accept_section;
use abide_vmm::snapshot::state::Sections;
use abide_vmm::snapshot::KNOWN_SECTIONS;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    // Half the inputs start with a header, as a real stream does; the
    // others go straight to frames, so both readers get exercised.
    if data.first().is_some_and(|b| b & 1 == 0) {
        if wire::read_header(&mut r).is_err() {
            return;
        }
    } else {
        r = &data[1.min(data.len())..];
    }
    let mut buf = Vec::new();
    let mut sections = Sections::default();
    while let Ok(tag) = wire::read_frame(&mut r, &mut buf) {
        match tag {
            wire::PAGES => {
                if let Ok(pages) = wire::parse_pages(&buf) {
                    for (gpa, page) in pages {
                        assert_eq!(gpa % 4096, 0);
                        assert!(page.is_none_or(|p| p.len() == 4096));
                    }
                }
            }
            wire::SECTION => {
                if let Ok((entry, bytes)) = wire::parse_section(&buf) {
                    assert_eq!(bytes.len() as u64, entry.length);
                    if accept_section(&entry, KNOWN_SECTIONS).unwrap_or(false) {
                        let _ = sections.insert(&entry.name, entry.version, bytes.to_vec());
                    }
                }
            }
            _ => {
                let _ = wire::parse_json::<serde_json::Value>(tag, &buf);
                let _ = wire::error_text(&buf);
            }
        }
    }
});
