//! The agent's SQLite outbox: foreign payloads read back, and damaged database files opened;
//! the logic is in `common/outbox.rs`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

#[path = "../common/outbox.rs"]
mod outbox;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(broken) = outbox::check(data) {
        panic!("outbox invariant broken: {broken}");
    }
});
