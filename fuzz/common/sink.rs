//! The `sink_message` fuzz target's checks, shared with `tests/fuzz_corpus.rs` (which includes
//! this file with `#[path]`): one Kafka message through `edge_vision::sink::judge`.

/// Longest dead-letter reason the sink stores: 2,000 characters plus the `...` marking a cut.
pub const MAX_REASON_CHARS: usize = 2003;

/// Judges one message and checks the invariants; `Ok` says what the sink did with it, `Err`
/// names the invariant that broke (a panic in the sink propagates as a panic).
///
/// * a dead-letter reason holds no NUL and at most [`MAX_REASON_CHARS`] characters;
/// * an accepted event, re-encoded with serde_json, is accepted again with the same id (what
///   the sink writes and what it would dead-letter agree).
pub fn check(data: &[u8]) -> Result<&'static str, String> {
    match edge_vision::sink::judge(data) {
        Err(reason) => check_reason(&reason).map(|()| "dead-lettered"),
        Ok(id) => {
            let ev = edge_vision::event::decode(data)
                .map_err(|e| format!("judge accepted {id} but event::decode refuses it: {e}"))?;
            if ev.event_id != id {
                return Err(format!("judge says {id}, decode says {}", ev.event_id));
            }
            let again = serde_json::to_vec(&ev).map_err(|e| format!("re-encoding {id}: {e}"))?;
            match edge_vision::sink::judge(&again) {
                Ok(id2) if id2 == id => Ok("accepted"),
                Ok(id2) => Err(format!("re-encoded {id} is judged as {id2}")),
                Err(reason) => Err(format!(
                    "re-encoded {id} is dead-lettered: {reason} (re-encoded: {})",
                    String::from_utf8_lossy(&again)
                )),
            }
        }
    }
}

fn check_reason(reason: &str) -> Result<(), String> {
    if reason.contains('\0') {
        return Err(format!("dead-letter reason holds NUL: {reason:?}"));
    }
    let chars = reason.chars().count();
    if chars > MAX_REASON_CHARS {
        return Err(format!(
            "dead-letter reason of {chars} characters (at most {MAX_REASON_CHARS})"
        ));
    }
    Ok(())
}
