//! The Rust core without Python: `cargo run --release --example rebuild -- IMAGE` rebuilds an
//! image's refcount structure (as `qcowrs rebuild`) and prints the check of the result.
//! bench/bench_rebuild.py uses it to show the core's own time and memory.

use std::process::ExitCode;

#[allow(clippy::print_stdout, clippy::print_stderr)] // a command-line tool
fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: rebuild IMAGE");
        return ExitCode::from(1);
    };
    match qcowrs::check_path(std::path::Path::new(&path), qcowrs::Repair::All, true) {
        Ok(r) => {
            for (k, v) in r.json_fields() {
                println!("{k}: {v}");
            }
            ExitCode::from(u8::try_from(r.exit_code()).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("rebuild: {e}");
            ExitCode::from(1)
        }
    }
}
