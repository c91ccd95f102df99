//! hyphae example program: prints a recognizable line, the GREETING
//! environment variable when set, and exits with EXIT_CODE (default 0).

use std::env;
use std::process::ExitCode;

fn main() -> ExitCode {
    println!("hello from rust");
    if let Ok(g) = env::var("GREETING") {
        println!("GREETING={g}");
    }
    match env::var("EXIT_CODE") {
        Ok(s) => match s.trim().parse::<u8>() {
            Ok(n) => ExitCode::from(n),
            Err(_) => ExitCode::from(2),
        },
        Err(_) => ExitCode::SUCCESS,
    }
}
