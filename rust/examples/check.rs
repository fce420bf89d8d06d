//! The Rust core without Python: `cargo run --release --example check -- IMAGE` checks an
//! image (as `qcowrs check`) and prints the report's JSON fields. For profiling the core.

use std::process::ExitCode;

#[allow(clippy::print_stdout, clippy::print_stderr)] // a command-line tool
fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: check IMAGE");
        return ExitCode::from(1);
    };
    match qcowrs::check_path(std::path::Path::new(&path), qcowrs::Repair::None, false) {
        Ok(r) => {
            for (k, v) in r.json_fields() {
                println!("{k}: {v}");
            }
            ExitCode::from(u8::try_from(r.exit_code()).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("check: {e}");
            ExitCode::from(1)
        }
    }
}
