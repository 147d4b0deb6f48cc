//! The JSON VM configuration (`--config`, the API's vm.create): parsing
//! and resolving it against the machine types.
#![no_main]

use abide_vmm::spec::VmSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = VmSpec::from_json(data, None) {
        if let Ok(cfg) = spec.resolve() {
            // What resolves must print back to a configuration that
            // resolves again (`abide config` round trip).
            let again = serde_json::to_vec(&VmSpec::from_config(&cfg)).expect("serializes");
            let back = VmSpec::from_json(&again, None).expect("reparses");
            back.resolve().expect("resolves again");
        }
    }
});
