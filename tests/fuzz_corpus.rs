//! The committed fuzz corpora (`fuzz/corpus/`, issue 12) as a regression test: every input the
//! campaigns kept, and every crash reproducer promoted into them, goes through the same checks
//! as the `cargo fuzz` targets (`fuzz/common/*.rs`, shared), on stable and without a sanitizer.
#![cfg(all(feature = "agent", feature = "sink"))]

use std::collections::BTreeMap;
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

/// The first campaign's findings (docs/benchmarks.md, "Fuzzing (issue 12)"), fixed in
/// `Outbox::self_check` (src/agent/outbox/files.rs): `(target, file, the outcome it must have)`.
/// Each was a damaged file that passed `PRAGMA quick_check`, opened as healthy, and then failed
/// every `enqueue` (the agent could never store another event and never set the file aside).
const FIXED_FINDINGS: &[(&str, &str, &str)] = &[
    // The `next_seq` row's key and its index entry damaged: `integrity_check(meta)` sees the
    // index out of step with its rows, set aside. (A counter row merely missing is re-created
    // above the stored rows: `outbox_self_check_repairs_a_missing_seq_counter` in tests/outbox.rs.)
    (
        "outbox",
        "open-finding-next-seq-row-lost",
        "damaged: quarantined, the fresh outbox works",
    ),
    // The counter's value damaged below the queued rows' seqs: set above them again.
    (
        "outbox",
        "open-finding-next-seq-behind-rows",
        "damaged: opened as it is, and works",
    ),
    // A column renamed in the schema text: the write probe fails, the file is set aside.
    (
        "outbox",
        "open-finding-schema-column-renamed",
        "damaged: quarantined, the fresh outbox works",
    ),
    // An entry of `meta`'s index damaged: `integrity_check(meta)` sees it, set aside.
    (
        "outbox",
        "open-finding-malformed-after-quick-check",
        "damaged: quarantined, the fresh outbox works",
    ),
];

/// Runs `check` on every file; fails naming each file that broke an invariant or panicked
/// (or, for a fixed finding, that ends otherwise than recorded). Returns how many inputs had
/// each outcome.
fn run(
    target: &str,
    min_files: usize,
    check: fn(&[u8]) -> Result<&'static str, String>,
) -> BTreeMap<&'static str, usize> {
    let files = corpus(target);
    assert!(
        files.len() >= min_files,
        "fuzz/corpus/{target} holds {} files, expected at least {min_files}",
        files.len()
    );
    let mut broken = Vec::new();
    let mut known = 0;
    let mut outcomes = BTreeMap::new();
    for (path, data) in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut outcome: Option<&'static str> = None;
        let failure = match std::panic::catch_unwind(|| check(data)) {
            Ok(Ok(o)) => {
                *outcomes.entry(o).or_insert(0) += 1;
                outcome = Some(o);
                None
            }
            Ok(Err(e)) => Some(e),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Some(format!("panicked: {msg}"))
            }
        };
        let fixed = FIXED_FINDINGS
            .iter()
            .find(|(t, file, _)| *t == target && *file == name);
        match (fixed, failure) {
            (None, None) => {}
            (_, Some(e)) => broken.push(format!("{name}: {e}")),
            (Some((_, _, want)), None) => {
                known += 1;
                if outcome != Some(*want) {
                    broken.push(format!(
                        "{name}: a fixed finding ends otherwise: {outcome:?} (must: {want})"
                    ));
                }
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
    let listed = FIXED_FINDINGS.iter().filter(|(t, ..)| *t == target).count();
    assert_eq!(
        known, listed,
        "a fixed finding of {target} is missing from the corpus"
    );
    eprintln!(
        "fuzz/corpus/{target}: {} inputs checked, {known} of them fixed findings; {outcomes:?}",
        files.len()
    );
    outcomes
}

#[test]
fn sink_message_corpus_is_judged_without_panics_and_consistently() {
    let outcomes = run("sink_message", 10, sink_fuzz::check);
    // The re-encoding check only runs for accepted events: the corpus must hold some.
    assert!(
        outcomes.get("accepted").copied().unwrap_or(0) >= 3,
        "{outcomes:?}"
    );
    assert!(
        outcomes.get("dead-lettered").copied().unwrap_or(0) >= 3,
        "{outcomes:?}"
    );
}

#[test]
fn outbox_corpus_reads_back_what_was_stored_and_opens_damaged_files() {
    let outcomes = run("outbox", 6, outbox_fuzz::check);
    outbox_fuzz::cleanup();
    // Every path the checks guard is taken by some input.
    for outcome in [
        "payload: read back",
        "payload: a typed error",
        "damaged: open refused with a typed error",
        "damaged: quarantined, the fresh outbox works",
        "damaged: opened as it is, and works",
    ] {
        assert!(
            outcomes.contains_key(outcome),
            "no input: {outcome} ({outcomes:?})"
        );
    }
}

/// Writes the damaged database file of every corrupted-file-mode input of the outbox corpus
/// whose name starts with `open-finding` into `$EDGE_VISION_FUZZ_DUMP` (for `sqlite3`):
/// `EDGE_VISION_FUZZ_DUMP=/tmp/d cargo test --release --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "a tool: dumps the damaged files of the fixed findings"]
fn dump_damaged_files_of_open_findings() {
    let out =
        PathBuf::from(std::env::var_os("EDGE_VISION_FUZZ_DUMP").expect("EDGE_VISION_FUZZ_DUMP"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("template.db"), outbox_fuzz::template()).unwrap();
    for (path, data) in corpus("outbox") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("open-finding") && data.first().is_some_and(|m| m & 1 == 1) {
            std::fs::write(
                out.join(format!("{name}.db")),
                outbox_fuzz::damaged(&data[1..]),
            )
            .unwrap();
        }
    }
}
