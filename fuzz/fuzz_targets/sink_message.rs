//! One Kafka message through the sink's decoding, validation and column conversions
//! (`edge_vision::sink::judge`); the checks are in `common/sink.rs`, shared with
//! `tests/fuzz_corpus.rs`.
#![no_main]

#[path = "../common/sink.rs"]
mod sink;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(broken) = sink::check(data) {
        panic!("sink_message invariant broken: {broken}");
    }
});
