//! Replays the seed corpora of `agent/fuzz/corpus/<target>/` through the
//! fuzz entry points of `moat_agent::fuzzing` on stable Rust, so every seed
//! runs through every target in `cargo test -p moat-agent`. Beyond "no
//! panic", seeds are named after what the agent must do with them.

use std::path::PathBuf;

use moat_agent::fuzzing;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("corpus entry").path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("reading a seed"))
        })
        .collect();
    v.sort();
    assert!(v.len() >= 10, "corpus {target} too small");
    v
}

#[test]
fn every_seed_through_every_target() {
    for target in ["agent_request", "oci_spec"] {
        for (name, data) in seeds(target) {
            let _ = fuzzing::agent_request(&data);
            let _ = fuzzing::oci_spec(&data);
            eprintln!("{target}/{name}: ok");
        }
    }
}

#[test]
fn oci_spec_seeds_are_judged_by_name() {
    for (name, data) in seeds("oci_spec") {
        let r = fuzzing::oci_spec(&data);
        if name.starts_with("valid") {
            assert_eq!(r, Ok(()), "{name}");
        } else {
            assert!(name.starts_with("hostile"), "seed {name} needs a prefix");
            let e = r.expect_err(&name);
            assert!(!e.is_empty(), "{name}");
        }
    }
}

#[test]
fn agent_request_seeds_are_judged_by_name() {
    for (name, data) in seeds("agent_request") {
        let r = fuzzing::agent_request(&data);
        let e = match r {
            Ok(()) => continue,
            Err(e) => e,
        };
        // Requests that pass validation stop at the missing sandbox or
        // container; hostile ones must be refused before that.
        let got_through = e.contains("no sandbox") || e.contains("not found");
        if name.contains("valid") && !name.contains("invalid") || name == "remove-force" {
            assert!(got_through, "{name}: {e}");
        }
        if [
            "bad",
            "hostile",
            "not-json",
            "negative",
            "no-ref",
            "garbage",
            "truncated",
        ]
        .iter()
        .any(|w| name.contains(w))
        {
            assert!(!got_through, "{name} was not refused early: {e}");
        }
    }
}
