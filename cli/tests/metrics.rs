//! `moat metrics serve` end to end without KVM: a fabricated shim state directory whose running
//! pod's `vmm.pid` is this test process and whose `api.sock` is served by a fake VMM thread;
//! the exporter's HTTP server is scraped over TCP and the body parsed by a Prometheus
//! text-format parser.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use moat_cli::metrics::{listen, serve, Exporter, CONTENT_TYPE};
use moat_test_support::TempDir;
use prometheus_parse::{Scrape, Value};

const METRICS: &str = r#"{"vcpus":2,"mem_bytes":268435456,"boot_ms":1234,"devices":[
 {"device":"vsock0","kind":"vsock","counters":{"rx_bytes":10,"rx_packets":3,"tx_bytes":20,"tx_packets":4}},
 {"device":"blk0","kind":"blk","counters":{"read_bytes":4096,"read_requests":1,"write_bytes":512,"write_requests":1,"flush_requests":0,"errors":0}},
 {"device":"mem0","kind":"mem","counters":{"region_bytes":1073741824,"requested_bytes":268435456,"plugged_bytes":134217728}},
 {"device":"net0","kind":"net","counters":{"rx_bytes":1500,"rx_packets":1,"rx_dropped":0,"tx_bytes":60,"tx_packets":1,"tx_dropped":0}}]}"#;

/// A fake moat-vmm control socket at `path` answering `status` and `metrics`, forever.
fn fake_vmm(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    let metrics: String = METRICS.split('\n').collect();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut out = conn.try_clone().unwrap();
            let metrics = metrics.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { return };
                    let answer = if line.contains("\"status\"") {
                        r#"{"ok":true,"state":"running","boot_ms":1234}"#.to_owned()
                    } else if line.contains("\"metrics\"") {
                        format!(r#"{{"ok":true,"metrics":{metrics}}}"#)
                    } else {
                        r#"{"ok":false,"error":"bad request"}"#.to_owned()
                    };
                    if out.write_all(format!("{answer}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn pod_dir(state: &Path, ns: &str, id: &str, pid: Option<u32>) -> std::path::PathBuf {
    let dir = state.join(ns).join(id);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(pid) = pid {
        std::fs::write(dir.join("vmm.pid"), pid.to_string()).unwrap();
    }
    dir
}

/// A pid that is certainly not running: above the kernel's maximum.
fn dead_pid() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(4_194_304)
        + 1
}

/// One HTTP/1.1 request; returns (status line, headers, body).
fn http(addr: std::net::SocketAddr, request: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

fn scrape(addr: std::net::SocketAddr) -> Scrape {
    let (status, headers, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains(&format!("Content-Type: {CONTENT_TYPE}")),
        "{headers}"
    );
    assert!(headers.contains(&format!("Content-Length: {}", body.len())));
    let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    // The parser skips lines it cannot read: every sample line must have become a sample.
    let sample_lines = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    assert_eq!(parsed.samples.len(), sample_lines, "{body}");
    // Every family has HELP text.
    for s in &parsed.samples {
        assert!(
            parsed.docs.contains_key(&s.metric),
            "no HELP for {}",
            s.metric
        );
    }
    parsed
}

/// The value of the one sample of `metric` whose labels include `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Value {
    let found: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .collect();
    assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
    found[0].value.clone()
}

#[test]
fn serve_scrapes_running_pods_and_skips_broken_ones() {
    let state = TempDir::new("metrics-serve");
    let me = std::process::id();
    let live = pod_dir(state.path(), "k8s.io", "pod-live", Some(me));
    fake_vmm(&live.join("api.sock"));
    // VMM gone, VMM alive but its socket missing, and a pod still starting (no error).
    pod_dir(state.path(), "k8s.io", "pod-dead", Some(dead_pid()));
    pod_dir(state.path(), "default", "pod-mute", Some(me));
    pod_dir(state.path(), "moby", "pod-new", None);

    let exporter = Exporter::new(
        state.path().to_owned(),
        "/proc".into(),
        Duration::from_secs(2),
    );
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || serve(listener, Arc::new(exporter)));

    let s = scrape(addr);
    let pod = [
        ("namespace", "k8s.io"),
        ("sandbox_id", "pod-live"),
        ("pod", "pod-live"),
    ];
    assert_eq!(value(&s, "moat_vm_vcpus", &pod), Value::Gauge(2.0));
    assert_eq!(
        value(&s, "moat_vm_memory_bytes", &pod),
        Value::Gauge(268435456.0)
    );
    assert_eq!(value(&s, "moat_vm_boot_seconds", &pod), Value::Gauge(1.234));
    let dev = |d: &'static str| {
        let mut l = pod.to_vec();
        l.push(("device", d));
        l
    };
    assert_eq!(
        value(&s, "moat_net_rx_bytes_total", &dev("net0")),
        Value::Counter(1500.0)
    );
    assert_eq!(
        value(&s, "moat_net_tx_packets_total", &dev("net0")),
        Value::Counter(1.0)
    );
    assert_eq!(
        value(&s, "moat_blk_read_bytes_total", &dev("blk0")),
        Value::Counter(4096.0)
    );
    assert_eq!(
        value(&s, "moat_vsock_tx_bytes_total", &dev("vsock0")),
        Value::Counter(20.0)
    );
    assert_eq!(
        value(&s, "moat_mem_hotplug_plugged_bytes", &dev("mem0")),
        Value::Gauge(134217728.0)
    );
    // The "VMM" is this test process: real /proc readings.
    match value(&s, "moat_vmm_rss_bytes", &pod) {
        Value::Gauge(v) => assert!(v > 0.0),
        other => panic!("moat_vmm_rss_bytes is {other:?}"),
    }
    assert!(matches!(
        value(&s, "moat_vmm_cpu_seconds_total", &pod),
        Value::Counter(v) if v >= 0.0
    ));
    // Broken pods are left out and counted; a starting pod is neither.
    for id in ["pod-dead", "pod-mute", "pod-new"] {
        assert!(
            !s.samples
                .iter()
                .any(|x| x.labels.get("sandbox_id") == Some(id)),
            "{id} should be skipped"
        );
    }
    assert_eq!(
        value(&s, "moat_scrape_errors_total", &[]),
        Value::Counter(2.0)
    );
    assert_eq!(
        value(&s, "moat_pods", &[("state", "running")]),
        Value::Gauge(2.0)
    );
    assert_eq!(
        value(&s, "moat_pods", &[("state", "vmm-gone")]),
        Value::Gauge(1.0)
    );
    assert_eq!(
        value(&s, "moat_pods", &[("state", "no-vmm")]),
        Value::Gauge(1.0)
    );

    // The error counter is a counter: it grows with each scrape that meets the broken pods.
    let s = scrape(addr);
    assert_eq!(
        value(&s, "moat_scrape_errors_total", &[]),
        Value::Counter(4.0)
    );

    // Anything but GET /metrics.
    let (status, _, _) = http(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
}

#[test]
fn an_empty_or_missing_state_dir_scrapes_cleanly() {
    let state = TempDir::new("metrics-empty");
    let exporter = Exporter::new(
        state.path().join("absent"),
        "/proc".into(),
        Duration::from_secs(1),
    );
    let body = exporter.scrape();
    let s = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert_eq!(
        value(&s, "moat_scrape_errors_total", &[]),
        Value::Counter(0.0)
    );
    assert_eq!(
        value(&s, "moat_pods", &[("state", "running")]),
        Value::Gauge(0.0)
    );
}
