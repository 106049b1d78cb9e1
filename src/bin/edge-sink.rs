//! `edge-sink`: Kafka -> PostgreSQL. Only `--version` exists until the sink issue lands.

fn main() {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") | Some("-V") | None => println!("edge-sink {}", edge_vision::VERSION),
        Some(other) => {
            eprintln!("edge-sink: unknown argument `{other}` (only --version exists so far)");
            std::process::exit(2);
        }
    }
}
