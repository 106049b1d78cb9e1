//! The committed fuzz corpora (`fuzz/corpus/`, issue 12) as a regression test: every input the
//! campaigns kept, and every crash reproducer promoted into them, goes through the same checks
//! as the `cargo fuzz` targets (`fuzz/common/*.rs`, shared), on stable and without a sanitizer.
#![cfg(all(feature = "agent", feature = "sink"))]

use std::path::{Path, PathBuf};

#[path = "../fuzz/common/outbox.rs"]
mod outbox_fuzz;
#[path = "../fuzz/common/sink.rs"]
mod sink_fuzz;

/// Every file of `fuzz/corpus/<target>`, sorted by name.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// Runs `check` on every file; fails naming each file that broke an invariant or panicked.
fn run(target: &str, min_files: usize, check: fn(&[u8]) -> Result<(), String>) {
    let files = corpus(target);
    assert!(
        files.len() >= min_files,
        "fuzz/corpus/{target} holds {} files, expected at least {min_files}",
        files.len()
    );
    let mut broken = Vec::new();
    for (path, data) in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match std::panic::catch_unwind(|| check(data)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => broken.push(format!("{name}: {e}")),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                broken.push(format!("{name}: panicked: {msg}"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} of {} inputs of fuzz/corpus/{target} break an invariant:\n{}",
        broken.len(),
        files.len(),
        broken.join("\n")
    );
    eprintln!("fuzz/corpus/{target}: {} inputs checked", files.len());
}

#[test]
fn sink_message_corpus_is_judged_without_panics_and_consistently() {
    run("sink_message", 10, sink_fuzz::check);
}

#[test]
fn outbox_corpus_reads_back_what_was_stored_and_opens_damaged_files() {
    run("outbox", 6, outbox_fuzz::check);
    outbox_fuzz::cleanup();
}
