//! Shared code of the moat-vmm fuzz targets: the corpus replayer used when the targets are
//! built as plain binaries (`--features replay`, stable toolchain).

use std::path::{Path, PathBuf};

/// Runs every input file named on the command line (directories are expanded one level; with
/// no arguments, `corpus/<target>/` next to this crate) through `moat_vmm::fuzzing::run`.
/// Prints how many inputs ran; exits non-zero if one could not be read.
pub fn replay_main(target: &str) {
    let mut args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.is_empty() {
        args.push(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("corpus")
                .join(target),
        );
    }
    let mut files = Vec::new();
    for a in args {
        match std::fs::read_dir(&a) {
            Ok(dir) => files.extend(dir.filter_map(Result::ok).map(|e| e.path())),
            Err(_) => files.push(a),
        }
    }
    files.sort();
    for f in &files {
        match std::fs::read(f) {
            Ok(data) => moat_vmm::fuzzing::run(target, &data),
            Err(e) => {
                eprintln!("{target}: cannot read {}: {e}", f.display());
                moat_vmm::fuzzing::remove_scratch();
                std::process::exit(1);
            }
        }
    }
    moat_vmm::fuzzing::remove_scratch();
    println!("{target}: {} inputs replayed", files.len());
}
