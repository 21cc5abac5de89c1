//! The DNS request path, bytes to bytes: parse, answer from a sample catalog, encode; over
//! UDP and TCP, with and without forwarding. Panics when an invariant breaks (see
//! `causeway::dns::fuzzing`). Run with `RUSTC_BOOTSTRAP=1 cargo fuzz run dns_request` (or
//! `cargo +nightly fuzz run dns_request`); `cargo test` runs the corpus and 100 000 mutations
//! deterministically without a fuzzer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    causeway::dns::fuzzing::exercise(data);
});
