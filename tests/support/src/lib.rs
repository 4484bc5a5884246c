//! What the crates' host tests share: reporting a test that cannot run on this machine as
//! **skipped**, so that the closing `N passed, N failed, N skipped` line of `scripts/test` never
//! counts it as passed.
//!
//! libtest has no way for a running test to say "skipped": a test that returns early passes. So a
//! test that cannot run calls [`skip`] and returns; `scripts/test` names a file in
//! `MOAT_TEST_SKIP_LOG`, [`skip`] appends the test's name to it, and the summary moves each named
//! test from passed to skipped.

use std::fmt::Display;
use std::io::Write;

/// The environment variable naming the file skipped tests are recorded in.
pub const SKIP_LOG_ENV: &str = "MOAT_TEST_SKIP_LOG";

/// Reports the calling test as skipped for `reason`: prints `skipped: REASON` and, when
/// [`SKIP_LOG_ENV`] names a file, appends `TEST-NAME<TAB>REASON` to it. The caller returns right
/// after.
pub fn skip(reason: impl Display) {
    let name = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    eprintln!("skipped: {reason}");
    let Some(path) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    let line = format!("{name}\t{}\n", reason.to_string().replace('\n', " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        // The summary would count this test as passed: make that impossible to miss.
        panic!(
            "cannot record the skip of {name} in {}: {e}",
            path.to_string_lossy()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_recorded_under_the_test_name() {
        let dir = std::env::temp_dir().join(format!("moat-skip-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        // The variable is read by this thread only; the other test in this binary does not skip.
        std::env::set_var(SKIP_LOG_ENV, &log);
        skip("needs\na thing");
        std::env::remove_var(SKIP_LOG_ENV);
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            "tests::a_skip_is_recorded_under_the_test_name\tneeds a thing\n"
        );
    }
}
