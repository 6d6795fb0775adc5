//! What an operator watches: the Prometheus endpoint scraped while fio writes, `vdi stats`
//! through the daemon (per VDI and per client), and attach/detach log lines with totals.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// GET http://127.0.0.1:PORT/PATH: the status line and the body.
fn get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of the sample `name{labels}` in an OpenMetrics text, labels given in order.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[test]
fn metrics_stats_and_logs_follow_a_client_doing_io() {
    need("fio");
    let (dir, store) = Daemon::prepare(64 * MIB);
    let d = Daemon::start_logged(dir, store, &["--metrics", "127.0.0.1:0"]);
    let port = logged_port(&d.log(), "serving Prometheus metrics on http://").expect("the metrics port logged");
    let uri = format!("--uri={}", d.uri("disk"));
    // fio writes (with flushes) for a while; the endpoint is scraped while it runs.
    let mut fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=16M",
            "--time_based",
            "--runtime=4",
            "--fsync=64",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio");
    let labels = "{vdi=\"0\",name=\"disk\"}";
    let mut during = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let (status, body) = get(port, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        during.push(sample(&body, &format!("parallax_vdi_writes_total{labels}")).unwrap_or(0.0));
        // A scrape while the client is attached sees it.
        if sample(&body, "parallax_clients").unwrap_or(0.0) >= 1.0 {
            assert_eq!(sample(&body, &format!("parallax_vdi_open_handles{labels}")), Some(1.0), "{body}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // `vdi stats` through the daemon sees the client while it writes.
    let (code, out, err) = d.vdi(&["stats", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
    assert_eq!(v["daemon"], true, "{out}");
    let clients = v["clients"].as_array().unwrap();
    assert!(
        clients
            .iter()
            .any(|c| c["client"].as_str().unwrap_or("").starts_with("tcp:127.0.0.1:") && c["writable"] == true),
        "{out}"
    );
    let status = fio.wait().unwrap();
    assert!(status.success(), "fio failed");
    assert!(during.windows(2).any(|w| w[1] > w[0]), "writes did not grow between scrapes: {during:?}");

    let (_, body) = get(port, "/metrics");
    let writes = sample(&body, &format!("parallax_vdi_writes_total{labels}")).expect(&body);
    let written = sample(&body, &format!("parallax_vdi_written_bytes_total{labels}")).expect(&body);
    let flushes = sample(&body, &format!("parallax_vdi_flushes_total{labels}")).expect(&body);
    let count = sample(&body, &format!("parallax_vdi_latency_seconds_count{labels}")).expect(&body);
    assert!(writes > 100.0, "{body}");
    assert_eq!(written, writes * 4096.0, "4 KiB writes");
    assert!(flushes >= writes / 64.0 - 1.0, "fio's fsync=64: {flushes} flushes for {writes} writes");
    assert!(count >= writes + flushes, "every operation is in the histogram");
    assert_eq!(sample(&body, "parallax_clients"), Some(0.0), "{body}");
    assert!(body.contains("parallax_store_blocks{state=\"allocated\"}"), "{body}");
    // The file system under the store, as df sees it (its size does not move while we look).
    let df = run_ok("df", &["-B1", "--output=size", d.dir.path().to_str().unwrap()]);
    let size: f64 = df.lines().nth(1).and_then(|l| l.trim().parse().ok()).expect(&df);
    assert_eq!(sample(&body, "parallax_medium_bytes{state=\"limit\"}"), Some(size), "{body}");
    let available = sample(&body, "parallax_medium_bytes{state=\"available\"}").expect(&body);
    assert!(available > 0.0 && available < size, "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
    assert_eq!(get(port, "/nope").0, "HTTP/1.1 404 Not Found");

    // The same figures in `vdi stats`, and the detach logged with the client's totals.
    let (_, out, _) = d.vdi(&["stats", "disk", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vdis"][0]["io"]["writes"].as_f64(), Some(writes), "{out}");
    let (code, table, _) = d.vdi(&["stats"]);
    assert_eq!(code, 0);
    assert!(table.contains("disk") && table.contains("P99"), "{table}");
    let (code, watch, err) = d.vdi(&["stats", "--watch", "0.2", "--count", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(watch.matches("WRITE/S").count(), 2, "{watch}");
    let log = d.log();
    assert!(log.contains("client attached") && log.contains("client=\"tcp:127.0.0.1:"), "{log}");
    // fio probes the export first (a detach with no I/O), then writes.
    assert!(
        log.lines().any(|l| l.contains("client detached") && l.contains("writes=") && !l.contains("writes=0 ")),
        "a detach line carries the writer's totals: {log}"
    );
    d.stop();
}
