//! `moat`: the operator's command.
//!
//! - `moat check [--config PATH]`: host readiness, one line per item, non-zero exit when the host
//!   cannot run moat pods (see [`check`]).
//! - `moat ping ADDRESS [--timeout SECS]`: connects to a moat agent (`unix:///PATH` or
//!   `hvsock:///VMM_SOCKET:PORT`), asks its version and prints it; used to see that a pod VM's
//!   agent answers, and by the benchmarks to time boot-to-agent-ready.
//! - `moat demo [--address SOCKET]`: runs a busybox container in a moat microVM through
//!   containerd and prints its output (see [`demo`]).
//! - `moat install [--containerd-config PATH] [--runtime-name NAME] [--dry-run] [--uninstall]
//!   [--restart]`: adds moat's runtime to the containerd config containerd runs with, or takes it
//!   out again (see [`moat_cli::install`]).
//! - `moat ps [--json]`: the pods on this host and their VMs (see [`moat_cli::ps`]).
//! - `moat logs POD [--namespace NS] [--json]`: the VMM, console and agent logs of one pod (see
//!   [`moat_cli::logs`]).
//! - `moat metrics serve [--listen ADDR:PORT] [--config PATH]`, `moat metrics dump [--config
//!   PATH]`: the node's Prometheus endpoint for every pod's VMM and shim, or one scrape on
//!   stdout (see [`moat_cli::metrics`]).

mod check;
mod demo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use moat_cli::{install, logs, metrics, ps};
use moat_protocol::agent::VersionRequest;
use moat_protocol::connect::{connect, AgentAddress};
use moat_protocol::ttrpc::context;
use moat_shim::config::Config;

const USAGE: &str = "usage: moat check [--config PATH]
       moat install [--containerd-config PATH] [--runtime-name NAME] [--dry-run] [--uninstall] [--restart]
       moat ps [--json]
       moat logs POD [--namespace NS] [--json]
       moat metrics serve [--listen ADDR:PORT] [--config PATH]
       moat metrics dump [--config PATH]
       moat ping ADDRESS [--timeout SECS]
       moat demo [--address CONTAINERD_SOCKET]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() > 1 && args[1..].iter().any(|a| a == "-h" || a == "--help") {
        match args[0].as_str() {
            "install" => println!("usage: {}", install::USAGE),
            _ => println!("{USAGE}"),
        }
        return ExitCode::SUCCESS;
    }
    match args.first().map(String::as_str) {
        Some("check") => cmd_check(&args[1..]),
        Some("ping") => cmd_ping(&args[1..]),
        Some("demo") => cmd_demo(&args[1..]),
        Some("install") => cmd_install(&args[1..]),
        Some("ps") => cmd_ps(&args[1..]),
        Some("logs") => cmd_logs(&args[1..]),
        Some("metrics") => cmd_metrics(&args[1..]),
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

fn cmd_install(args: &[String]) -> ExitCode {
    let opts = match install::parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("moat install: {e}\nusage: {}", install::USAGE);
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    match install::run(&opts, &install::Host::default(), &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat install: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The moat config's state directory, or the error line to print.
fn state_dir(cmd: &str) -> Result<PathBuf, ExitCode> {
    Config::load(None).map(|c| c.state_dir).map_err(|e| {
        eprintln!("moat {cmd}: {e}");
        ExitCode::FAILURE
    })
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
fn emit(cmd: &str, text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat {cmd}: cannot print: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(cmd: &str, value: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => emit(cmd, &(text + "\n")),
        Err(e) => {
            eprintln!("moat {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_ps(args: &[String]) -> ExitCode {
    let json = match args {
        [] => false,
        [flag] if flag == "--json" => true,
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let state_dir = match state_dir("ps") {
        Ok(d) => d,
        Err(code) => return code,
    };
    let pods = match ps::list(&state_dir, Path::new("/proc")) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("moat ps: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        return print_json("ps", &pods);
    }
    if pods.is_empty() {
        let why = if state_dir.exists() {
            "is empty"
        } else {
            "does not exist: no pod has started since boot"
        };
        emit(
            "ps",
            &format!("no moat pods ({} {why})\n", state_dir.display()),
        )
    } else {
        emit("ps", &ps::table(&pods))
    }
}

fn cmd_logs(args: &[String]) -> ExitCode {
    let mut pod = None;
    let mut namespace = None;
    let mut json = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--namespace" | "-n" => match it.next() {
                Some(ns) => namespace = Some(ns.clone()),
                None => {
                    eprintln!("moat logs: --namespace needs a namespace");
                    return ExitCode::from(2);
                }
            },
            a if !a.starts_with('-') && pod.is_none() => pod = Some(a.to_owned()),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(pod) = pod else {
        eprintln!("moat logs: which pod? (moat ps lists them)\n{USAGE}");
        return ExitCode::from(2);
    };
    let state_dir = match state_dir("logs") {
        Ok(d) => d,
        Err(code) => return code,
    };
    match logs::collect(&state_dir, &pod, namespace.as_deref()) {
        Ok(l) if json => print_json("logs", &l),
        Ok(l) => emit("logs", &logs::render(&l)),
        Err(e) => {
            eprintln!("moat logs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_metrics(args: &[String]) -> ExitCode {
    let opts = match metrics::parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("moat metrics: {e}");
            return ExitCode::from(2);
        }
    };
    let state_dir = match Config::load(opts.config.as_deref()) {
        Ok(c) => c.state_dir,
        Err(e) => {
            eprintln!("moat metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exporter =
        metrics::Exporter::new(state_dir, PathBuf::from("/proc"), metrics::SOCKET_TIMEOUT);
    match opts.action {
        metrics::Action::Dump => emit("metrics", &exporter.scrape()),
        metrics::Action::Serve { listen } => match metrics::listen(&listen) {
            Ok(l) => {
                eprintln!("moat metrics: serving http://{listen}/metrics");
                metrics::serve(l, std::sync::Arc::new(exporter));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("moat metrics: {e}");
                ExitCode::FAILURE
            }
        },
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
