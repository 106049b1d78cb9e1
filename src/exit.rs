//! Exit codes of every binary, in one place. Library errors say which code they mean through
//! [`ExitStatus`]; `main` only prints the error and returns the code.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (or stopped by SIGTERM/SIGINT) |
//! | 1 | internal or runtime error |
//! | 2 | bad usage or configuration (the message names the key and where it came from) |
//! | 3 | unusable input: a model, image or outbox file (`detect` still does the other images) |
//! | 4 | network (a model download) |
//!
//! A configuration value that cannot be used is a 2 wherever it is found: in the file, in the
//! environment, or in a flag that overrides them (`edge-sink run --database-url`, a
//! `metrics_listen` address that cannot be bound).

/// Success.
pub const OK: u8 = 0;
/// Internal or runtime error.
pub const INTERNAL: u8 = 1;
/// Bad usage or configuration.
pub const USAGE: u8 = 2;
/// An input file that cannot be used.
pub const INPUT: u8 = 3;
/// A network failure.
pub const NETWORK: u8 = 4;

/// The exit code an error stands for.
pub trait ExitStatus: std::error::Error {
    fn exit_code(&self) -> u8;
}

/// A binary's whole `main`: logs to stderr (`RUST_LOG`, else `default_log`), runs `command`
/// (argument parsing and one library call) and turns its result into the exit code.
pub fn main<E: ExitStatus>(
    program: &str,
    default_log: &str,
    command: impl FnOnce() -> Result<u8, E>,
) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_log.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    report(program, command())
}

/// What a binary's `main` does with a command's result: prints the error chain on stderr as
/// `PROGRAM: error: cause: ...` and returns the code to exit with.
fn report<E: ExitStatus>(program: &str, result: Result<u8, E>) -> std::process::ExitCode {
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                let more = s.to_string();
                if !text.contains(&more) {
                    text.push_str(": ");
                    text.push_str(&more);
                }
                source = s.source();
            }
            eprintln!("{program}: {text}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}
