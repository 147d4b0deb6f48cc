//! The descriptor-chain walkers of virtio-blk, virtio-net (receive and
//! transmit) and virtio-rng, over a guest memory the fuzzer fills:
//! descriptor table, rings and buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    abide_devices::virtio::fuzzing::walk_chains(data);
});
