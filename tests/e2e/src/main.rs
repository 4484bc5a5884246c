//! The E2E test binary: every end-to-end trial of moat, one module per area, run by one harness.
//!
//! `cargo test -p moat-e2e` (or `--test e2e`) runs this binary. Unless it already runs on a real KVM
//! (`MOAT_KVM_HOST` is set by `tests/kvm-host/run`), it re-runs itself through
//! `tests/kvm-host/run`, so all trials share one boot of the software-KVM host; their libtest-style
//! lines (`test vmm::boot ... ok`) and the closing `test result:` line come back to the caller, and
//! the exit status is the inner run's. Filters and flags (`--list`, `--exact`, `NAME`) pass through.

mod agent;
mod cli;
mod escape;
mod faults;
mod guest;
mod kvm_smoke;
mod net;
mod portforward;
mod shim;
mod vmm;

use std::env;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use libtest_mimic::Arguments;

fn all_trials() -> Vec<moat_e2e::Trial> {
    let mut trials = Vec::new();
    trials.extend(kvm_smoke::trials());
    trials.extend(vmm::trials());
    trials.extend(guest::trials());
    trials.extend(agent::trials());
    trials.extend(shim::trials());
    trials.extend(cli::trials());
    trials.extend(faults::trials());
    trials.extend(net::trials());
    trials.extend(portforward::trials());
    trials.extend(escape::trials());
    trials
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    if moat_e2e::kvm_host().is_none() && !args.list {
        // Re-run this very binary, with the same arguments, on a real KVM.
        let runner = moat_e2e::workspace_root().join("tests/kvm-host/run");
        let exe = match env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                eprintln!("e2e: cannot find this test binary: {e}");
                return ExitCode::FAILURE;
            }
        };
        let err = Command::new(&runner)
            .arg("--")
            .arg(exe)
            .args(env::args_os().skip(1))
            .exec();
        eprintln!("e2e: cannot run {}: {err}", runner.display());
        return ExitCode::FAILURE;
    }
    let conclusion = libtest_mimic::run(&args, all_trials());
    moat_e2e::containerd::shutdown();
    conclusion.exit_code()
}
