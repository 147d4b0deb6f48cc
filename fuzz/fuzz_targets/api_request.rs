//! The API's HTTP request parser, with the server's limits.
#![no_main]

use abide_vmm::api::http::{self, Limits};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_header: 16 << 10,
    max_body: 256 << 10,
};

fuzz_target!(|data: &[u8]| {
    let _ = http::parse(data, &LIMITS);
});
