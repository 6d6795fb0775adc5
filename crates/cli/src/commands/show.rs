//! `vdi list` and `vdi info`: what is in the store. JSON field names are documented in
//! docs/cli.md and kept stable.

use serde::Serialize;
use vdi::{Registry, Source, VdiId, VdiInfo};

use super::{Ctx, parse_source, used_bytes, used_bytes_of};
use crate::args::InfoArgs;
use crate::error::{CmdResult, Failure};
use crate::format::{self, Align, Table};
use crate::room::Asker;

/// One VDI in `list --json` and `info --json`.
#[derive(Debug, Serialize)]
pub struct VdiJson {
    /// Id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Virtual size in bytes; null until the first fill of a VDI created without a size.
    pub size: Option<u64>,
    /// Bytes of data mapped (blocks shared with snapshots and clones included).
    pub used: u64,
    /// Snapshots not deleted.
    pub snapshots: usize,
    /// Snapshot the VDI was cloned from, or null.
    pub parent: Option<u64>,
    /// Creation time, RFC 3339 local time.
    pub created: String,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

fn vdi_json(reg: &Registry, v: &VdiInfo) -> Result<VdiJson, Failure> {
    Ok(vdi_json_used(v, used_bytes(reg, Source::Vdi(v.id))?))
}

fn vdi_json_used(v: &VdiInfo, used: u64) -> VdiJson {
    VdiJson {
        id: v.id.0,
        name: v.name.clone(),
        size: (v.size != 0).then_some(v.size),
        used,
        snapshots: v.snapshots,
        parent: v.parent.map(|p| p.0),
        created: format::rfc3339(v.created_ns),
        created_ns: v.created_ns,
    }
}

fn size_cell(size: Option<u64>, exact: bool) -> String {
    size.map_or_else(|| "-".to_string(), |s| format::size(s, exact))
}

/// `vdi list`.
pub fn list(ctx: &mut Ctx<'_>, json: bool) -> CmdResult {
    let vdis = ctx.reg.list();
    let used = used_bytes_of(ctx.reg, &vdis.iter().map(|v| Source::Vdi(v.id)).collect::<Vec<_>>())?;
    let rows: Vec<VdiJson> = vdis.iter().zip(used).map(|(v, u)| vdi_json_used(v, u)).collect();
    for (id, why) in ctx.reg.damaged() {
        let _ = writeln!(ctx.err, "vdi: VDI {id} is damaged and not listed: {why}; run `vdi check`");
    }
    if json {
        ctx.print_json(&rows)?;
        return Ok(0);
    }
    if rows.is_empty() {
        ctx.print("no VDIs yet; create one with `vdi create NAME`\n")?;
        return Ok(0);
    }
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("NAME", Align::Left),
        ("SIZE", Align::Right),
        ("USED", Align::Right),
        ("SNAPSHOTS", Align::Right),
        ("PARENT", Align::Right),
        ("CREATED", Align::Left),
    ]);
    for r in &rows {
        t.row(vec![
            r.id.to_string(),
            r.name.clone(),
            size_cell(r.size, ctx.exact),
            format::size(r.used, ctx.exact),
            r.snapshots.to_string(),
            r.parent.map_or_else(|| "-".to_string(), |p| p.to_string()),
            format::local_time(r.created_ns),
        ]);
    }
    ctx.print(&t.render())?;
    Ok(0)
}

/// The exit code when a store's status or catalog could not be read: an I/O failure.
const FAILED: i32 = 3;

/// A store as any host sees it without opening it (`vdi list` of a store served elsewhere,
/// `vdi cluster`).
#[derive(Debug, Default, Serialize)]
pub struct StoreViewJson {
    /// Where it is (`rados:POOL/NAMESPACE`).
    store: String,
    /// False if the directory names a store that is no longer there.
    exists: bool,
    /// The host holding its lease, or null if none does.
    served_by: Option<String>,
    /// The holder's RADOS client and address.
    client: Option<String>,
    address: Option<String>,
    /// When the catalog shown was published (RFC 3339); null if there is none.
    published: Option<String>,
    published_ms: Option<u64>,
    /// The host that wrote it.
    published_by: Option<String>,
    /// True if the catalog is the current holder's; false if an earlier holder left it (the
    /// holder has not published yet, or nobody serves the store: then no clients are shown).
    current: bool,
    /// Why the catalog could not be read, if it could not.
    error: Option<String>,
    /// Why the store's status (its lock, its header) could not be read: then nothing above is
    /// known.
    status_error: Option<String>,
    vdis: Vec<ElsewhereVdiJson>,
}

impl StoreViewJson {
    /// True if something about the store could not be read.
    fn failed(&self) -> bool {
        self.error.is_some() || self.status_error.is_some()
    }

    /// The `vdi: error:` line for stderr when something could not be read.
    fn report(&self, err: &mut dyn std::io::Write) {
        let store = rados::catalog::printable(&self.store);
        if let Some(e) = &self.status_error {
            let _ = writeln!(err, "vdi: error: the status of {store} cannot be read: {e}");
        }
        if let Some(e) = &self.error {
            let _ = writeln!(err, "vdi: error: the catalog of {store} cannot be read: {e}");
        }
    }
}

#[derive(Debug, Serialize)]
struct ElsewhereVdiJson {
    id: u32,
    name: String,
    size: Option<u64>,
    snapshots: u64,
    parent: Option<u64>,
    created: String,
    created_ns: u64,
    /// Who the serving host has it open for.
    clients: Vec<ElsewhereClientJson>,
}

#[derive(Debug, Serialize)]
struct ElsewhereClientJson {
    client: String,
    writable: bool,
    opened_unix: u64,
}

/// What `status` says of the store at `at`.
pub fn store_view(at: &str, status: &rados::StoreStatus) -> StoreViewJson {
    let w = status.writer.as_ref();
    let (cat, error) = match &status.catalog {
        Ok(c) => (c.as_ref(), None),
        Err(e) => (None, Some(e.clone())),
    };
    let current = matches!((w, cat), (Some(w), Some(c)) if c.writer == w.client);
    let vdis = cat
        .map(|c| {
            c.vdis
                .iter()
                .map(|v| ElsewhereVdiJson {
                    id: v.id,
                    name: v.name.clone(),
                    size: (v.size != 0).then_some(v.size),
                    snapshots: v.snapshots,
                    parent: v.parent,
                    created: format::rfc3339(v.created_ns),
                    created_ns: v.created_ns,
                    // Clients are only the current holder's to tell.
                    clients: c
                        .clients
                        .iter()
                        .filter(|k| current && k.vdi == v.id)
                        .map(|k| ElsewhereClientJson {
                            client: k.client.clone(),
                            writable: k.writable,
                            opened_unix: k.opened_unix,
                        })
                        .collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    StoreViewJson {
        store: at.to_string(),
        exists: status.exists,
        served_by: w.map(|w| rados::catalog::printable(w.host())),
        client: w.map(|w| rados::catalog::printable(&w.client)),
        address: w.map(|w| rados::catalog::printable(&w.address)),
        published: cat.map(|c| format::rfc3339(c.published_ms.saturating_mul(1_000_000))),
        published_ms: cat.map(|c| c.published_ms),
        published_by: cat.map(|c| c.host.clone()),
        current,
        error,
        status_error: None,
        vdis,
    }
}

/// A store whose status could not be read, and why.
pub fn view_failed(at: &str, why: String) -> StoreViewJson {
    StoreViewJson { store: at.to_string(), exists: true, status_error: Some(why), ..StoreViewJson::default() }
}

/// `s` as one shell word: unquoted if it is plain, else in single quotes.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-/:@=+,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The view as text: a heading line, then the VDIs' table.
fn render_view(v: &StoreViewJson, exact: bool) -> String {
    // The name comes from the pool's directory, which anyone who may write the pool may write.
    let store = rados::catalog::printable(&v.store);
    if let Some(e) = &v.status_error {
        return format!("the status of {store} cannot be read: {e}\n");
    }
    if !v.exists && v.served_by.is_none() {
        let rest = v.store.strip_prefix("rados:").unwrap_or(&v.store);
        let (pool, ns) = rest.split_once('/').unwrap_or((rest, ""));
        return format!(
            "{store}: recorded in the pool's directory, but there is no store there any more \
             (`rados -p {} rmxattr parallax.directory {}` forgets it)\n",
            rados::catalog::printable(&shell_word(pool)),
            rados::catalog::printable(&shell_word(&format!("parallax.store.{ns}")))
        );
    }
    let mut head = match &v.served_by {
        Some(host) if !v.exists => format!("{store} is being created by host {host}"),
        Some(host) => format!(
            "{store} is served by host {host} ({} at {})",
            v.client.as_deref().unwrap_or("?"),
            v.address.as_deref().unwrap_or("?")
        ),
        None => format!("{store} is served by no host"),
    };
    let read_it = format!("`vdi --store {} list` reads the store", rados::catalog::printable(&shell_word(&v.store)));
    let when = v.published_ms.map(|ms| (format::local_time(ms.saturating_mul(1_000_000)), format::age_since_ms(ms)));
    match (&v.error, &when, &v.published_by) {
        (Some(e), _, _) => head.push_str(&format!("; its catalog cannot be read: {e}")),
        (None, Some((t, age)), Some(by)) if v.current => {
            head.push_str(&format!("; its catalog of {t} ({age}, host {by})"))
        }
        (None, Some((t, age)), Some(by)) if v.served_by.is_some() => head.push_str(&format!(
            "; it has not published its catalog yet: this one of {t} ({age}) is an earlier holder's (host {by}), \
             without clients"
        )),
        (None, Some((t, age)), Some(by)) => {
            head.push_str(&format!("; the last catalog, of {t} ({age}, host {by}), without clients ({read_it})"))
        }
        _ if v.served_by.is_some() => head.push_str("; it has published no catalog yet"),
        _ => head.push_str(&format!("; no catalog has been published ({read_it})")),
    }
    let mut text = head + ":\n";
    if when.is_none() {
        return text;
    }
    if v.vdis.is_empty() {
        text.push_str("no VDIs\n");
        return text;
    }
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("NAME", Align::Left),
        ("SIZE", Align::Right),
        ("SNAPSHOTS", Align::Right),
        ("PARENT", Align::Right),
        ("CREATED", Align::Left),
        ("CLIENTS", Align::Left),
    ]);
    for d in &v.vdis {
        let clients = if d.clients.is_empty() {
            "-".to_string()
        } else {
            d.clients
                .iter()
                .map(|k| format!("{} ({})", k.client, if k.writable { "rw" } else { "ro" }))
                .collect::<Vec<_>>()
                .join(", ")
        };
        t.row(vec![
            d.id.to_string(),
            d.name.clone(),
            size_cell(d.size, exact),
            d.snapshots.to_string(),
            d.parent.map_or_else(|| "-".to_string(), |p| p.to_string()),
            format::local_time(d.created_ns),
            clients,
        ]);
    }
    text.push_str(&t.render());
    text
}

fn write_out(out: &mut dyn std::io::Write, s: &str) -> Result<(), Failure> {
    out.write_all(s.as_bytes()).map_err(super::output_error)
}

/// `vdi list` of a RADOS store while another host's daemon holds it: the store cannot be
/// opened here, so the list is the catalog that host publishes (rados::catalog), headed by who
/// holds the lease now and how old the catalog is. Exit 3 if the catalog cannot be read.
pub fn list_served_elsewhere(
    at: &str,
    status: &rados::StoreStatus,
    json: bool,
    exact: bool,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> Result<i32, Failure> {
    let v = store_view(at, status);
    v.report(err);
    write_out(out, &if json { super::json_text(&v)? } else { render_view(&v, exact) })?;
    Ok(if v.failed() { FAILED } else { 0 })
}

/// `vdi cluster`: each store as [`store_view`] sees it. Exit 3 if any could not be read.
pub fn list_stores(
    views: &[StoreViewJson],
    json: bool,
    exact: bool,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> Result<i32, Failure> {
    for v in views {
        v.report(err);
    }
    let code = if views.iter().any(StoreViewJson::failed) { FAILED } else { 0 };
    if json {
        write_out(out, &super::json_text(&views)?)?;
        return Ok(code);
    }
    let text: Vec<String> = views.iter().map(|v| render_view(v, exact)).collect();
    write_out(out, &text.join("\n"))?;
    Ok(code)
}

/// `info --json` of a VDI.
#[derive(Debug, Serialize)]
struct VdiDetailJson {
    #[serde(flatten)]
    vdi: VdiJson,
    /// Root block of the live tree.
    root: u64,
    /// Ids of its snapshots (not deleted), oldest first.
    snapshot_ids: Vec<u64>,
    /// Ids of VDIs cloned from its snapshots.
    clones: Vec<u32>,
}

/// `info --json` of a snapshot.
#[derive(Debug, Serialize)]
struct SnapshotDetailJson {
    id: u64,
    vdi: u32,
    vdi_name: String,
    time: String,
    time_ns: u64,
    root: u64,
    size: u64,
    used: Option<u64>,
    deleted: bool,
    automatic: bool,
    name: Option<String>,
    protected: bool,
    clones: Vec<u32>,
}

/// `info --json` with no argument: the store.
#[derive(Debug, Serialize)]
struct StoreJson {
    vdis: usize,
    snapshots: usize,
    allocated: u64,
    capacity: u64,
    store_size: u64,
    max_size: Option<u64>,
    pending_free: u64,
    /// Entries in the release queue: deleted trees and blocks not freed yet.
    pending_reclaim: u64,
    /// The room on the medium under the store; `None` if it cannot tell or could not be asked.
    medium: Option<MediumJson>,
    /// Why the medium could not be asked, if it could not.
    medium_error: Option<String>,
}

/// The file system, device or pool under the store, as [`blockstore::MediumRoom`] has it.
#[derive(Debug, Serialize)]
struct MediumJson {
    /// What the figures are of (`pool rbd`, `file system of /srv/vdis.store`).
    name: String,
    /// Bytes it holds now, the store's and anything else's.
    used: u64,
    /// The most it may hold (a file system's size, a pool's quota); `None`: no limit set.
    limit: Option<u64>,
    /// Bytes it can still take.
    available: u64,
}

fn clones_of(reg: &Registry, sids: &[u64]) -> Vec<u32> {
    reg.list().iter().filter(|v| v.parent.is_some_and(|p| sids.contains(&p.0))).map(|v| v.id.0).collect()
}

/// `vdi info [VDI|@SNAP]`.
pub fn info(ctx: &mut Ctx<'_>, a: &InfoArgs) -> CmdResult {
    match &a.source {
        None => store_info(ctx, a.json),
        Some(s) => match parse_source_any(ctx.reg, s, a.snapshot)? {
            Source::Vdi(id) => vdi_info(ctx, id, a.json),
            Source::Snapshot(sid) => snapshot_info(ctx, sid, a.json),
        },
    }
}

/// Like [`parse_source`], but a deleted snapshot is still shown.
fn parse_source_any(reg: &Registry, text: &str, snapshot: bool) -> Result<Source, Failure> {
    if snapshot || text.contains('@') {
        Ok(Source::Snapshot(super::snapshot_ref(reg, text)?))
    } else {
        parse_source(reg, text, false)
    }
}

fn vdi_info(ctx: &mut Ctx<'_>, id: VdiId, json: bool) -> CmdResult {
    let v = ctx.reg.info(id)?;
    let snaps: Vec<u64> = ctx.reg.snapshots(id)?.iter().filter(|s| !s.deleted).map(|s| s.id.0).collect();
    let all_snaps: Vec<u64> = ctx.reg.snapshots(id)?.iter().map(|s| s.id.0).collect();
    let detail = VdiDetailJson {
        vdi: vdi_json(ctx.reg, &v)?,
        root: v.root,
        snapshot_ids: snaps,
        clones: clones_of(ctx.reg, &all_snaps),
    };
    if json {
        ctx.print_json(&detail)?;
        return Ok(0);
    }
    let e = ctx.exact;
    let parent = match v.parent {
        None => "none".to_string(),
        Some(p) => match ctx.reg.snapshot_info(p) {
            Ok(s) => format!("snapshot {p} of VDI {}", s.vdi),
            Err(_) => format!("snapshot {p} (its VDI was deleted)"),
        },
    };
    let list = |ids: &[u64]| ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let clones = detail.clones.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let text = format!(
        "VDI {}: {}\n  size:       {}\n  used:       {}\n  created:    {}\n  parent:     {}\n  \
         snapshots:  {}{}\n  clones:     {}\n  root block: {}\n",
        v.id,
        v.name,
        size_cell(detail.vdi.size, e),
        format::size(detail.vdi.used, e),
        format::local_time(v.created_ns),
        parent,
        detail.snapshot_ids.len(),
        if detail.snapshot_ids.is_empty() { String::new() } else { format!(" ({})", list(&detail.snapshot_ids)) },
        if clones.is_empty() { "none".to_string() } else { clones },
        v.root,
    );
    ctx.print(&text)?;
    Ok(0)
}

fn snapshot_info(ctx: &mut Ctx<'_>, sid: vdi::SnapshotId, json: bool) -> CmdResult {
    let s = ctx.reg.snapshot_info(sid)?;
    let vdi_name = ctx.reg.info(s.vdi).map(|v| v.name).unwrap_or_default();
    let used = if s.deleted { None } else { Some(used_bytes(ctx.reg, Source::Snapshot(sid))?) };
    let d = SnapshotDetailJson {
        id: sid.0,
        vdi: s.vdi.0,
        vdi_name,
        time: format::rfc3339(s.time_ns),
        time_ns: s.time_ns,
        root: s.root,
        size: s.size,
        used,
        deleted: s.deleted,
        automatic: s.automatic,
        name: s.name.clone(),
        protected: s.protected,
        clones: clones_of(ctx.reg, &[sid.0]),
    };
    if json {
        ctx.print_json(&d)?;
        return Ok(0);
    }
    let e = ctx.exact;
    let clones = d.clones.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let text = format!(
        "snapshot {}{}{}\n  of VDI:     {} ('{}')\n  taken:      {}{}\n  size:       {}\n  used:       {}\n  \
         clones:     {}\n  root block: {}\n",
        d.id,
        d.name.as_ref().map(|n| format!(" '{n}'")).unwrap_or_default(),
        if d.deleted {
            " (deleted)"
        } else if d.protected {
            " (protected)"
        } else {
            ""
        },
        d.vdi,
        d.vdi_name,
        format::local_time(d.time_ns),
        if d.automatic { " by parallaxd's schedule" } else { "" },
        format::size(d.size, e),
        d.used.map_or_else(|| "-".to_string(), |u| format::size(u, e)),
        if clones.is_empty() { "none".to_string() } else { clones },
        d.root,
    );
    ctx.print(&text)?;
    Ok(0)
}

/// One line of a medium's room: `NAME: USED used of LIMIT, AVAILABLE available` (`, no
/// quota` for a pool without one).
pub fn room_text(name: &str, used: u64, limit: Option<u64>, available: u64, exact: bool) -> String {
    format!(
        "{name}: {} used{}, {} available",
        format::size(used, exact),
        limit.map_or_else(|| ", no quota".to_string(), |l| format!(" of {}", format::size(l, exact))),
        format::size(available, exact),
    )
}

/// Asks the store's medium how much room it has for `info`, waiting at most
/// [`crate::room::WAIT`] (see [`crate::room`]).
fn medium_room(
    asker: &'static Asker<Option<blockstore::MediumRoom>>,
    source: blockstore::RoomSource,
) -> crate::room::Answer<Option<blockstore::MediumRoom>> {
    asker.ask(crate::room::WAIT, move || source.room().map_err(|e| e.to_string()))
}

/// The one asker of `info`'s question: a process serves one store.
static MEDIUM: Asker<Option<blockstore::MediumRoom>> = Asker::new();

fn store_info(ctx: &mut Ctx<'_>, json: bool) -> CmdResult {
    let space = ctx.reg.store().lock().space();
    let bs = blockstore::BLOCK_SIZE as u64;
    let (medium, medium_error) = match medium_room(&MEDIUM, ctx.reg.store().room_source()) {
        Ok(room) => {
            (room.map(|r| MediumJson { name: r.medium, used: r.used, limit: r.limit, available: r.available }), None)
        }
        Err(why) => (None, Some(why)),
    };
    let d = StoreJson {
        vdis: ctx.reg.list().len(),
        snapshots: ctx.reg.all_snapshots().iter().filter(|s| !s.deleted).count(),
        allocated: space.allocated * bs,
        capacity: space.capacity * bs,
        store_size: space.store_blocks * bs,
        max_size: (space.max_blocks != 0).then_some(space.max_blocks * bs),
        pending_free: space.pending_free * bs,
        pending_reclaim: ctx.reg.pending_reclaim(),
        medium,
        medium_error,
    };
    if json {
        ctx.print_json(&d)?;
        return Ok(0);
    }
    let e = ctx.exact;
    let medium = match (&d.medium, &d.medium_error) {
        (Some(m), _) => room_text(&m.name, m.used, m.limit, m.available, e),
        (None, Some(why)) => format!("unknown ({why})"),
        (None, None) => "not reported (memory)".to_string(),
    };
    let text = format!(
        "store\n  VDIs:        {}\n  snapshots:   {}\n  allocated:   {}\n  store size:  {}\n  size limit:  {}\n  reclaiming:  {}\n  medium:      {}\n",
        d.vdis,
        d.snapshots,
        format::size(d.allocated, e),
        format::size(d.store_size, e),
        d.max_size.map_or_else(|| "none".to_string(), |m| format::size(m, e)),
        if d.pending_reclaim == 0 {
            "nothing".to_string()
        } else {
            format!("{} deleted trees and blocks still being freed", d.pending_reclaim)
        },
        medium,
    );
    ctx.print(&text)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Arc;

    use blockstore::{Backend, BlockStore, CreateOptions, MediumRoom, MemBackend, OpenOptions};

    /// A medium in memory whose `room` never answers, as a sick cluster's monitors may not
    /// for a minute.
    struct Silent(MemBackend);

    impl Backend for Silent {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0.write_at(offset, data)
        }
        fn sync(&self) -> io::Result<()> {
            self.0.sync()
        }
        fn extend(&self, len: u64) -> io::Result<()> {
            self.0.extend(len)
        }
        fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
            self.0.reserve(offset, len)
        }
        fn capacity(&self) -> u64 {
            self.0.capacity()
        }
        fn size(&self) -> io::Result<u64> {
            self.0.size()
        }
        fn room(&self, _store_bytes: u64) -> io::Result<Option<MediumRoom>> {
            loop {
                std::thread::park();
            }
        }
    }

    #[test]
    fn info_answers_without_a_medium_that_does_not() {
        let store = BlockStore::create(
            Arc::new(Silent(MemBackend::new())),
            &CreateOptions { journal_slot_blocks: 64, max_blocks: 0 },
            &OpenOptions::default(),
        )
        .unwrap();
        static ASKER: super::Asker<Option<MediumRoom>> = super::Asker::new();
        let err = super::medium_room(&ASKER, store.room_source()).unwrap_err();
        assert!(err.contains("did not answer within 5 s"), "{err}");
    }
}
