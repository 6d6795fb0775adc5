//! Running fio with its nbd engine and reading its JSON report.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::sys;

/// Direction of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Reads only.
    Read,
    /// Writes only.
    Write,
}

/// One fio workload.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Row title in the report.
    pub title: &'static str,
    /// fio `--rw=` value.
    pub rw: &'static str,
    /// Block size in bytes.
    pub bs: u64,
    /// fio `--iodepth=`.
    pub iodepth: u32,
    /// Which side of fio's report to read.
    pub dir: Dir,
    /// fio `--fsync=`: an NBD FLUSH after every this many writes (0: never).
    pub fsync: u32,
}

impl Workload {
    /// True for the large sequential rows, which also report MiB/s.
    pub fn sequential(&self) -> bool {
        !self.rw.starts_with("rand")
    }
}

/// The measured workloads, in table order.
pub const WORKLOADS: [Workload; 8] = [
    Workload { title: "4 KiB random read, QD1", rw: "randread", bs: 4096, iodepth: 1, dir: Dir::Read, fsync: 0 },
    Workload { title: "4 KiB random read, QD16", rw: "randread", bs: 4096, iodepth: 16, dir: Dir::Read, fsync: 0 },
    Workload { title: "4 KiB random write, QD1", rw: "randwrite", bs: 4096, iodepth: 1, dir: Dir::Write, fsync: 0 },
    Workload { title: "4 KiB random write, QD16", rw: "randwrite", bs: 4096, iodepth: 16, dir: Dir::Write, fsync: 0 },
    Workload {
        title: "4 KiB random write, QD16, FLUSH every 32",
        rw: "randwrite",
        bs: 4096,
        iodepth: 16,
        dir: Dir::Write,
        fsync: 32,
    },
    Workload {
        title: "4 KiB random write, QD1, FLUSH every 4",
        rw: "randwrite",
        bs: 4096,
        iodepth: 1,
        dir: Dir::Write,
        fsync: 4,
    },
    Workload { title: "1 MiB sequential read, QD4", rw: "read", bs: 1 << 20, iodepth: 4, dir: Dir::Read, fsync: 0 },
    Workload { title: "1 MiB sequential write, QD4", rw: "write", bs: 1 << 20, iodepth: 4, dir: Dir::Write, fsync: 0 },
];

/// The sequential write that fills a disk before it is measured (also the RSS workload).
pub const FILL: Workload = Workload { title: "fill", rw: "write", bs: 1 << 20, iodepth: 4, dir: Dir::Write, fsync: 0 };

/// What one fio run measured.
#[derive(Debug, Clone, Copy)]
pub struct Result1 {
    /// I/O operations per second.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// Completion latency of the measured side, if fio reported it.
    pub latency: Option<Latency>,
}

/// Completion latency percentiles of one fio run (fio's `clat_ns`), in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// The slowest request.
    pub max: f64,
}

impl Latency {
    /// Reads `clat_ns` of one side of a job; `None` if any figure is missing.
    fn from_side(side: &Value) -> Option<Latency> {
        let clat = side.get("clat_ns")?;
        let pct = |k: &str| clat.get("percentile")?.get(k)?.as_f64().map(|ns| ns / 1000.0);
        Some(Latency {
            p50: pct("50.000000")?,
            p99: pct("99.000000")?,
            p999: pct("99.900000")?,
            max: clat.get("max")?.as_f64()? / 1000.0,
        })
    }
}

/// How long to run a workload.
#[derive(Debug, Clone, Copy)]
pub enum Span {
    /// Time-based: run for this many seconds (after `ramp` seconds not counted) over `size` bytes.
    Time { size: u64, runtime: u64, ramp: u64 },
    /// Size-based: do this many bytes once (for filling).
    Bytes(u64),
}

/// Runs `w` against the NBD `uri` and returns what fio measured.
pub fn run(uri: &str, w: &Workload, span: Span) -> Result<Result1> {
    run_with(uri, w, span, &[])
}

/// [`run`] with extra fio arguments (`--random_distribution=zipf:1.2`, say).
pub fn run_with(uri: &str, w: &Workload, span: Span, extra: &[String]) -> Result<Result1> {
    let out_dir = tempfile::tempdir().context("cannot create a temp dir for fio's report")?;
    let out = out_dir.path().join("fio.json");
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={}", w.rw),
        &format!("--bs={}", w.bs),
        &format!("--iodepth={}", w.iodepth),
        "--numjobs=1",
        "--output-format=json",
    ]);
    cmd.arg(format!("--output={}", out.display()));
    if w.fsync > 0 {
        cmd.arg(format!("--fsync={}", w.fsync));
    }
    match span {
        Span::Time { size, runtime, ramp } => {
            cmd.args([format!("--size={size}"), "--time_based".into(), format!("--runtime={runtime}")]);
            if ramp > 0 {
                cmd.arg(format!("--ramp_time={ramp}"));
            }
        }
        Span::Bytes(size) => {
            cmd.arg(format!("--size={size}"));
        }
    }
    cmd.args(extra);
    let what = sys::describe(&cmd);
    sys::run(&mut cmd)?;
    let text = std::fs::read_to_string(&out).with_context(|| format!("`{what}` wrote no report"))?;
    parse(&text, w.dir).with_context(|| format!("cannot read the JSON report of `{what}`"))
}

/// Reads IOPS and bandwidth of the first job from fio's `--output-format=json` text.
pub fn parse(text: &str, dir: Dir) -> Result<Result1> {
    // fio may print notes before the JSON object.
    let start = text.find('{').context("no JSON object in fio's output")?;
    let v: Value = serde_json::from_str(&text[start..]).context("fio's output is not valid JSON")?;
    let job = v.get("jobs").and_then(|j| j.get(0)).context("no jobs[0] in fio's report")?;
    if let Some(e) = job.get("error").and_then(Value::as_i64)
        && e != 0
    {
        bail!("fio reports error {e} for the job");
    }
    let side = match dir {
        Dir::Read => "read",
        Dir::Write => "write",
    };
    let s = job.get(side).with_context(|| format!("no jobs[0].{side} in fio's report"))?;
    let num = |k: &str| {
        s.get(k).and_then(Value::as_f64).with_context(|| format!("no number jobs[0].{side}.{k} in fio's report"))
    };
    let r = Result1 { iops: num("iops")?, bw_bytes: num("bw_bytes")?, latency: Latency::from_side(s) };
    if num("io_bytes")? <= 0.0 {
        bail!("fio did no {side} I/O");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let text = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version":"fio-3.33","jobs":[{"jobname":"bench","error":0,
 "read":{"io_bytes":4096000,"bw_bytes":2048000,"iops":500.25,
  "clat_ns":{"min":1000,"max":9000000,"percentile":{"50.000000":20000,"99.000000":150000,"99.900000":2500000}}},
 "write":{"io_bytes":0,"bw_bytes":0,"iops":0.0}}]}"#;
        let r = parse(text, Dir::Read).expect("parse");
        assert_eq!(r.iops, 500.25);
        assert_eq!(r.bw_bytes, 2048000.0);
        let lat = r.latency.expect("latency");
        assert_eq!((lat.p50, lat.p99, lat.p999, lat.max), (20.0, 150.0, 2500.0, 9000.0));
        assert!(parse(text, Dir::Write).is_err());
        assert!(parse("garbage", Dir::Read).is_err());
        assert!(parse("{\"jobs\":[]}", Dir::Read).is_err());
    }
}
