//! `moat`: the operator's command.
//!
//! - `moat check [--config PATH]`: host readiness, one line per item, non-zero exit when the host
//!   cannot run moat pods (see [`check`]).
//! - `moat ping ADDRESS [--timeout SECS]`: connects to a moat agent (`unix:///PATH` or
//!   `hvsock:///VMM_SOCKET:PORT`), asks its version and prints it; used to see that a pod VM's
//!   agent answers, and by the benchmarks to time boot-to-agent-ready.
//! - `moat demo [--address SOCKET]`: runs a busybox container in a moat microVM through
//!   containerd and prints its output (see [`demo`]).

mod check;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use moat_protocol::agent::VersionRequest;
use moat_protocol::connect::{connect, AgentAddress};
use moat_protocol::ttrpc::context;
use moat_shim::config::Config;

const USAGE: &str = "usage: moat check [--config PATH]\n       moat ping ADDRESS [--timeout SECS]\n       moat demo [--address CONTAINERD_SOCKET]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => cmd_check(&args[1..]),
        Some("ping") => cmd_ping(&args[1..]),
        Some("demo") => cmd_demo(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn cmd_check(args: &[String]) -> ExitCode {
    let explicit = match args {
        [] => None,
        [flag, path] if flag == "--config" => Some(PathBuf::from(path)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::load(explicit.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL config: {e}");
            return ExitCode::FAILURE;
        }
    };
    let items = check::run(std::path::Path::new("/"), &config);
    for i in &items {
        println!("{i}");
    }
    if items.iter().any(|i| i.verdict == check::Verdict::Fail) {
        println!("moat check: this host is not ready (see the FAIL lines)");
        ExitCode::FAILURE
    } else {
        println!("moat check: ready");
        ExitCode::SUCCESS
    }
}

fn cmd_demo(args: &[String]) -> ExitCode {
    let address = match args {
        [] => demo::DEFAULT_ADDRESS,
        [flag, address] if flag == "--address" => address.as_str(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match demo::run(address) {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("moat demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_ping(args: &[String]) -> ExitCode {
    let (addr, timeout) = match args {
        [addr] => (addr, 10),
        [addr, flag, secs] if flag == "--timeout" => match secs.parse() {
            Ok(s) => (addr, s),
            Err(_) => {
                eprintln!("moat ping: --timeout takes whole seconds, not {secs:?}");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let addr = match AgentAddress::parse(addr) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("moat ping: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moat ping: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let start = Instant::now();
    let res = rt.block_on(async {
        let client = connect(&addr, Duration::from_secs(timeout)).await?;
        let v = client
            .version(
                context::with_timeout(Duration::from_secs(timeout).as_nanos() as i64),
                &VersionRequest::new(),
            )
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(v)
    });
    match res {
        Ok(v) => {
            println!(
                "agent {} (protocol {}) answered in {} ms",
                v.agent_version,
                v.protocol_version,
                start.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("moat ping: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
