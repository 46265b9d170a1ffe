//! Shared by the integration tests that run the `apar` binary.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Longest one CLI run may take before it counts as a hang. Generous (the machine is
/// shared and debug builds are slow); the bad-input cases answer in milliseconds.
pub const HANG: Duration = Duration::from_secs(120);

/// Runs the CLI with `args`, killing it after [`HANG`] (the test then fails);
/// returns (exit code, stdout, stderr). Output is read while the process runs, so a
/// large plan does not block on a full pipe.
pub fn apar(args: &[&str]) -> (i32, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_apar"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(HANG) {
        Ok(out) => {
            let out = out.expect("output");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("apar {args:?} hung for more than {HANG:?}");
        }
    }
}
