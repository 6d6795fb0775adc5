//! The Prometheus endpoint (`--metrics ADDR`): per-VDI I/O counters and latency, clients and
//! space, encoded by `prometheus-client` (the Prometheus project's Rust client) on each scrape
//! from the registry's counters. The HTTP side is one GET on one path, so it is a few lines
//! here rather than an HTTP stack: each scrape is read, answered and closed on this thread.
//! The room on the medium under the store is the one figure that needs the medium (on RADOS,
//! round trips to the monitors and the manager that a sick cluster can hold for the op
//! timeout): a thread of its own asks it every [`ROOM_REFRESH`], and a scrape shows the last
//! answer, so a scrape never waits on the cluster.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use blockstore::{MediumRoom, RoomSource};
use parking_lot::Mutex;

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use shutdown::{Ready, Shutdown};
use vdi::Registry;

/// Longest request head accepted.
const MAX_REQUEST: usize = 8 << 10;
/// Time a scraper has to send its request and take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the medium's room is asked again for the metrics.
const ROOM_REFRESH: Duration = Duration::from_secs(15);

/// The medium's room as last asked (`None`: the medium cannot tell, or the last asking failed).
type LatestRoom = Arc<Mutex<Option<MediumRoom>>>;

/// Asks the medium's room now and every [`ROOM_REFRESH`] on a thread of its own until `stop`
/// is raised. The thread holds the medium, not the store, and is not joined: a stop never
/// waits for a round trip to a sick cluster.
fn spawn_room_refresher(source: RoomSource, stop: Shutdown) -> Result<LatestRoom> {
    let latest = LatestRoom::default();
    let shown = latest.clone();
    std::thread::Builder::new().name("medium-room".into()).spawn(move || {
        let mut failing = false;
        loop {
            let room = source.room();
            match &room {
                Err(e) if !failing => tracing::warn!(
                    "metrics: the medium's room is unknown ({e}); asked again every {}s",
                    ROOM_REFRESH.as_secs()
                ),
                Ok(_) if failing => tracing::info!("metrics: the medium's room is known again"),
                _ => {}
            }
            failing = room.is_err();
            *latest.lock() = room.ok().flatten();
            if stop.wait_timeout(ROOM_REFRESH) {
                break;
            }
        }
    })?;
    Ok(shown)
}

/// Binds `addr` and serves scrapes on a new thread until `stop` is raised.
pub fn spawn(addr: SocketAddr, reg: Arc<Registry>, stop: Shutdown) -> Result<std::thread::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).with_context(|| format!("serving metrics on {addr}"))?;
    listener.set_nonblocking(true)?;
    tracing::info!("serving Prometheus metrics on http://{}/metrics", listener.local_addr()?);
    let room = spawn_room_refresher(reg.store().room_source(), stop.clone())?;
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(StoreCollector { reg, room }));
    let readable = OwnedFd::from(listener.try_clone()?);
    Ok(std::thread::Builder::new().name("metrics".into()).spawn(move || {
        loop {
            match stop.wait_readable(&readable, None) {
                Ok(Ready::Readable) => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::error!("metrics endpoint: {e}; it stops");
                    break;
                }
            }
            match listener.accept() {
                Ok((s, _)) => {
                    if let Err(e) = answer(s, &registry) {
                        tracing::debug!("metrics scrape: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!("metrics endpoint: accept: {e}"),
            }
        }
    })?)
}

fn answer(mut s: TcpStream, registry: &prometheus_client::registry::Registry) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = std::str::from_utf8(line).unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        ("405 Method Not Allowed", "text/plain", "GET /metrics only\n".to_string())
    } else if path != "/metrics" && !path.starts_with("/metrics?") {
        ("404 Not Found", "text/plain", "metrics are at /metrics\n".to_string())
    } else {
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, registry) {
            Ok(()) => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
            Err(_) => ("500 Internal Server Error", "text/plain", "encoding the metrics failed\n".to_string()),
        }
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body.as_bytes())
}

/// A counter of the per-VDI family: name, help, and how to read it from the counters.
type CounterDef = (&'static str, &'static str, fn(&vdi::IoSnapshot) -> u64);
/// A gauge of the per-VDI family.
type GaugeDef = (&'static str, &'static str, fn(&vdi::VdiIoReport) -> i64);

/// Reads the registry's counters, and the medium's room as last asked, at each scrape.
struct StoreCollector {
    reg: Arc<Registry>,
    room: LatestRoom,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let reg = &self.reg;
        let vdis = reg.vdi_io();
        let labels = |v: &vdi::VdiIoReport| vec![("vdi", v.vdi.to_string()), ("name", v.name.clone())];
        let counters: [CounterDef; 7] = [
            ("parallax_vdi_reads", "Reads of the VDI since parallaxd started.", |io| io.reads),
            ("parallax_vdi_writes", "Writes to the VDI since parallaxd started.", |io| io.writes),
            ("parallax_vdi_flushes", "Flushes of the VDI since parallaxd started.", |io| io.flushes),
            ("parallax_vdi_discards", "Discards and write-zeroes of the VDI.", |io| io.discards),
            ("parallax_vdi_read_bytes", "Bytes read from the VDI.", |io| io.read_bytes),
            ("parallax_vdi_written_bytes", "Bytes written to the VDI.", |io| io.write_bytes),
            ("parallax_vdi_errors", "Operations on the VDI that failed.", |io| io.errors),
        ];
        for (name, help, get) in counters {
            let mut fam = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for v in &vdis {
                let l = labels(v);
                ConstCounter::new(get(&v.io)).encode(fam.encode_family(&l)?)?;
            }
        }
        let mut fam = enc.encode_descriptor(
            "parallax_vdi_latency_seconds",
            "Time each operation on the VDI took.",
            None,
            MetricType::Histogram,
        )?;
        for v in &vdis {
            let l = labels(v);
            let mut buckets: Vec<(f64, u64)> =
                vdi::LATENCY_BOUNDS_US.iter().zip(&v.io.latency_buckets).map(|(b, n)| (*b as f64 / 1e6, *n)).collect();
            buckets.push((f64::INFINITY, v.io.latency_buckets.last().copied().unwrap_or(0)));
            let count = v.io.latency_buckets.iter().sum();
            fam.encode_family(&l)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                v.io.latency_sum_ns as f64 / 1e9,
                count,
                &buckets,
                None,
            )?;
        }
        let gauges: [GaugeDef; 2] = [
            ("parallax_vdi_size_bytes", "Virtual size of the VDI.", |v| v.size as i64),
            ("parallax_vdi_open_handles", "Handles open on the VDI (connections, guests, commands).", |v| {
                v.open_handles as i64
            }),
        ];
        for (name, help, get) in gauges {
            let mut fam = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for v in &vdis {
                let l = labels(v);
                ConstGauge::new(get(v)).encode(fam.encode_family(&l)?)?;
            }
        }
        let clients = reg.handle_io().len() as i64;
        ConstGauge::new(clients).encode(enc.encode_descriptor(
            "parallax_clients",
            "Open handles: NBD connections, ring guests and commands reading.",
            None,
            MetricType::Gauge,
        )?)?;
        let space = reg.store().lock().space();
        let mut fam = enc.encode_descriptor(
            "parallax_store_blocks",
            "4 KiB blocks of the store, by state.",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in
            [("capacity", space.capacity), ("allocated", space.allocated), ("pending_free", space.pending_free)]
        {
            ConstGauge::new(n as i64).encode(fam.encode_family(&[("state", state)])?)?;
        }
        let room = self.room.lock().clone();
        let mut fam = enc.encode_descriptor(
            "parallax_medium_bytes",
            "The file system, device or pool under the store, as last asked (every 15 s): bytes used \
             (by anything), its limit (size or pool quota; absent without one) and bytes available.",
            None,
            MetricType::Gauge,
        )?;
        if let Some(r) = room {
            let limit = r.limit.map(|l| ("limit", l));
            for (state, n) in [("used", r.used), ("available", r.available)].into_iter().chain(limit) {
                let n = i64::try_from(n).unwrap_or(i64::MAX);
                ConstGauge::new(n).encode(fam.encode_family(&[("state", state)])?)?;
            }
        }
        ConstGauge::new(reg.pending_reclaim() as i64).encode(enc.encode_descriptor(
            "parallax_reclaim_queue_entries",
            "Trees and blocks waiting to be freed in the background.",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}
