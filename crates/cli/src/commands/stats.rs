//! `vdi stats`: I/O counters per VDI and per client, as parallaxd keeps them.

use std::time::{Duration, Instant};

use serde::Serialize;
use vdi::{HandleReport, IoSnapshot, VdiIoReport};

use super::{Ctx, resolve_vdi};
use crate::args::StatsArgs;
use crate::error::{CmdResult, Failure};
use crate::format::{self, Align, Table};

/// `vdi stats --json`.
#[derive(Debug, Serialize)]
pub struct StatsJson {
    /// True when the counters are parallaxd's (false: this command opened the store itself
    /// and the counters are all zero).
    pub daemon: bool,
    /// Per VDI, since the daemon started.
    pub vdis: Vec<VdiIoReport>,
    /// Per open handle (NBD connection, ring guest, command reading).
    pub clients: Vec<HandleReport>,
}

fn collect(ctx: &Ctx<'_>, only: Option<vdi::VdiId>) -> StatsJson {
    let wanted = |v: vdi::VdiId| only.is_none_or(|o| o == v);
    let vdis: Vec<VdiIoReport> = ctx.reg.vdi_io().into_iter().filter(|r| wanted(r.vdi)).collect();
    let clients = ctx.reg.handle_io().into_iter().filter(|h| wanted(h.vdi)).collect();
    StatsJson { daemon: ctx.reg.has_reclaimer(), vdis, clients }
}

fn latency(io: &IoSnapshot, q: f64) -> String {
    match io.quantile_us(q) {
        None if io.ops() == 0 => "-".into(),
        None => "> 4 s".into(),
        Some(us) if us < 1000 => format!("≤{us}µs"),
        Some(us) if us < 1_000_000 => format!("≤{}ms", us / 1000),
        Some(us) => format!("≤{}s", us / 1_000_000),
    }
}

/// `vdi stats [VDI] [--json | --watch [SECONDS]]`.
pub fn stats(ctx: &mut Ctx<'_>, a: &StatsArgs) -> CmdResult {
    let only = a.vdi.as_deref().map(|v| resolve_vdi(ctx.reg, v)).transpose()?;
    let first = collect(ctx, only);
    if !first.daemon {
        let _ = writeln!(
            ctx.err,
            "vdi: note: no parallaxd serves this store; counters are kept by the daemon while it runs, so these are zero"
        );
    }
    if a.json {
        ctx.print_json(&first)?;
        return Ok(0);
    }
    let Some(every) = a.watch else {
        print_totals(ctx, &first)?;
        return Ok(0);
    };
    if !(0.1..=3600.0).contains(&every) {
        return Err(Failure::user("--watch takes 0.1 to 3600 seconds"));
    }
    let every = Duration::from_secs_f64(every);
    // The next report is due after `every`, unless the daemon stops first (run by itself, the
    // command ends with the terminal's interrupt).
    let stop = match ctx.stop.clone() {
        Some(s) => s,
        None => shutdown::Shutdown::new().map_err(|e| Failure::system(format!("creating a wait signal: {e}")))?,
    };
    let mut prev = first;
    let mut at = Instant::now();
    let mut reports = 0u64;
    loop {
        if stop.wait_timeout(every) {
            return Ok(0);
        }
        let now = collect(ctx, only);
        let secs = at.elapsed().as_secs_f64();
        at = Instant::now();
        print_rates(ctx, &prev, &now, secs)?;
        ctx.out.flush().map_err(super::output_error)?;
        prev = now;
        reports += 1;
        if a.count.is_some_and(|c| reports >= c) {
            return Ok(0);
        }
    }
}

fn print_totals(ctx: &mut Ctx<'_>, s: &StatsJson) -> Result<(), Failure> {
    let e = ctx.exact;
    let mut t = Table::new(&[
        ("VDI", Align::Right),
        ("NAME", Align::Left),
        ("OPEN", Align::Right),
        ("READS", Align::Right),
        ("WRITES", Align::Right),
        ("FLUSHES", Align::Right),
        ("DISCARDS", Align::Right),
        ("READ", Align::Right),
        ("WRITTEN", Align::Right),
        ("ERRORS", Align::Right),
        ("P50", Align::Right),
        ("P99", Align::Right),
    ]);
    for v in &s.vdis {
        let io = &v.io;
        t.row(vec![
            v.vdi.to_string(),
            v.name.clone(),
            v.open_handles.to_string(),
            io.reads.to_string(),
            io.writes.to_string(),
            io.flushes.to_string(),
            io.discards.to_string(),
            format::size(io.read_bytes, e),
            format::size(io.write_bytes, e),
            io.errors.to_string(),
            latency(io, 0.5),
            latency(io, 0.99),
        ]);
    }
    ctx.print(&t.render())?;
    if s.clients.is_empty() {
        ctx.print("no clients attached\n")?;
        return Ok(());
    }
    let mut t = Table::new(&[
        ("CLIENT", Align::Left),
        ("OPENED", Align::Left),
        ("MODE", Align::Left),
        ("FOR", Align::Right),
        ("READS", Align::Right),
        ("WRITES", Align::Right),
        ("READ", Align::Right),
        ("WRITTEN", Align::Right),
        ("ERRORS", Align::Right),
        ("P99", Align::Right),
    ]);
    for h in &s.clients {
        let io = &h.io;
        t.row(vec![
            h.client.clone(),
            h.source.clone(),
            if h.writable { "rw" } else { "ro" }.into(),
            format!("{:.0}s", h.open_seconds),
            io.reads.to_string(),
            io.writes.to_string(),
            format::size(io.read_bytes, e),
            format::size(io.write_bytes, e),
            io.errors.to_string(),
            latency(io, 0.99),
        ]);
    }
    ctx.print("\n")?;
    ctx.print(&t.render())
}

fn print_rates(ctx: &mut Ctx<'_>, prev: &StatsJson, now: &StatsJson, secs: f64) -> Result<(), Failure> {
    let e = ctx.exact;
    let rate = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / secs.max(1e-3);
    let mut t = Table::new(&[
        ("VDI", Align::Right),
        ("NAME", Align::Left),
        ("READ/S", Align::Right),
        ("WRITE/S", Align::Right),
        ("FLUSH/S", Align::Right),
        ("READ B/S", Align::Right),
        ("WRITE B/S", Align::Right),
        ("ERRORS", Align::Right),
    ]);
    for v in &now.vdis {
        let Some(p) = prev.vdis.iter().find(|p| p.vdi == v.vdi) else { continue };
        let (a, b) = (&p.io, &v.io);
        t.row(vec![
            v.vdi.to_string(),
            v.name.clone(),
            format!("{:.0}", rate(a.reads, b.reads)),
            format!("{:.0}", rate(a.writes, b.writes)),
            format!("{:.0}", rate(a.flushes, b.flushes)),
            format::size(rate(a.read_bytes, b.read_bytes) as u64, e),
            format::size(rate(a.write_bytes, b.write_bytes) as u64, e),
            b.errors.saturating_sub(a.errors).to_string(),
        ]);
    }
    ctx.print(&format!("{} ({} clients)\n", format::local_time(crate::format::now_ns()), now.clients.len()))?;
    ctx.print(&t.render())
}
