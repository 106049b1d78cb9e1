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

/// Corpus inputs that reproduce findings of the fuzz campaign still open in `src/`
/// (docs/benchmarks.md, "Fuzzing (issue 12)"): `(target, file, what it must still fail with)`.
/// Each must keep failing exactly so; once `src/` is fixed the test fails here, the entry goes
/// and the input stays as an ordinary regression input.
///
/// All four are one weakness of `Outbox::open` (src/agent/outbox/mod.rs): a damaged file that
/// passes `PRAGMA quick_check` (src/agent/outbox/files.rs, `healthy`) is opened as healthy,
/// and then every `enqueue` fails (a typed error, no panic): the agent can never store another
/// event and never quarantines the file.
const OPEN_FINDINGS: &[(&str, &str, &str)] = &[
    // The `next_seq` row's key damaged: no row, so `NEXT_SEQ` finds nothing.
    (
        "outbox",
        "open-finding-next-seq-row-lost",
        "enqueue fails: outbox: Query returned no rows",
    ),
    // The counter's value damaged below the queued rows' seqs: every insert collides.
    (
        "outbox",
        "open-finding-next-seq-behind-rows",
        "enqueue fails: outbox: UNIQUE constraint failed: events.seq",
    ),
    // The schema's SQL text in sqlite_master damaged (a column renamed): integrity_check too
    // says ok.
    (
        "outbox",
        "open-finding-schema-column-renamed",
        "enqueue fails: outbox: table events has no column named class",
    ),
    // Damage quick_check does not look at (quick_check skips index contents), found by the
    // first write.
    (
        "outbox",
        "open-finding-malformed-after-quick-check",
        "enqueue fails: outbox: database disk image is malformed",
    ),
];

/// Runs `check` on every file; fails naming each file that broke an invariant or panicked
/// (or, for an open finding, that no longer fails as recorded). Returns how many inputs had
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
        let failure = match std::panic::catch_unwind(|| check(data)) {
            Ok(Ok(outcome)) => {
                *outcomes.entry(outcome).or_insert(0) += 1;
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
        let open = OPEN_FINDINGS
            .iter()
            .find(|(t, file, _)| *t == target && *file == name);
        match (open, failure) {
            (None, None) => {}
            (None, Some(e)) => broken.push(format!("{name}: {e}")),
            (Some((_, _, want)), Some(e)) if e.contains(want) => known += 1,
            (Some((_, _, want)), Some(e)) => {
                broken.push(format!("{name}: open finding fails otherwise: {e} (recorded: {want})"))
            }
            (Some(_), None) => broken.push(format!(
                "{name}: the open finding no longer reproduces (fixed?): remove it from OPEN_FINDINGS"
            )),
        }
    }
    assert!(
        broken.is_empty(),
        "{} of {} inputs of fuzz/corpus/{target} break an invariant:\n{}",
        broken.len(),
        files.len(),
        broken.join("\n")
    );
    let listed = OPEN_FINDINGS.iter().filter(|(t, ..)| *t == target).count();
    assert_eq!(
        known, listed,
        "an open finding of {target} is missing from the corpus"
    );
    eprintln!(
        "fuzz/corpus/{target}: {} inputs checked, {known} of them open findings; {outcomes:?}",
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
#[ignore = "a tool: dumps the damaged files of the open findings"]
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
