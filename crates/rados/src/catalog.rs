//! The store's catalog: what the host serving a store publishes for every other host.
//!
//! While a daemon holds a store's lease, no other host can open the store, even to read it
//! (readers take the lease shared). So the daemon writes a small object, [`CATALOG_OBJECT`],
//! listing the store's VDIs and which clients it serves each to, and replaces it whole (one
//! atomic `write_full`) whenever that changes. `vdi list` on any other host reads it and names
//! the host serving the store (from the lease itself, not from the catalog). The object is
//! written by the lease holder's own RADOS client, so a writer that was fenced cannot replace
//! it any more than it can write the store.
//!
//! The format is text, one record per line, fields separated by one space, the free-text
//! field last (docs/format.md §1.1 has the grammar). VDI names are printable by construction;
//! client descriptions have control characters replaced. A reader ignores lines of kinds it
//! does not know, so later versions may add kinds without breaking older readers.

use std::fmt::Write as _;

use crate::client::Pool;
use crate::error::{RadosError, Result};

/// The object holding the catalog, beside the header object.
pub const CATALOG_OBJECT: &str = "parallax.catalog";
/// The pool's directory of stores, in the pool's default namespace: an empty object with one
/// extended attribute per store, [`STORE_PREFIX`] + the store's namespace (nothing after the
/// prefix for the default namespace).
pub const DIRECTORY_OBJECT: &str = "parallax.directory";
/// Prefix of the directory's attributes naming stores.
pub const STORE_PREFIX: &str = "parallax.store.";
/// First line of a catalog of the version this build writes.
const MAGIC: &str = "parallax-catalog 1";
/// Largest catalog read (about 10,000 VDIs with a few clients each); a longer one is refused.
const MAX_CATALOG: usize = 4 << 20;

/// One VDI as the serving host lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogVdi {
    /// The VDI's id.
    pub id: u32,
    /// Its name.
    pub name: String,
    /// Virtual size in bytes (0: not set yet).
    pub size: u64,
    /// Snapshots not deleted.
    pub snapshots: u64,
    /// The snapshot it was cloned from.
    pub parent: Option<u64>,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

/// One client the serving host has a VDI or snapshot open for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogClient {
    /// The VDI (a snapshot's VDI for a snapshot).
    pub vdi: u32,
    /// True if the client may write (the VDI itself, not a snapshot).
    pub writable: bool,
    /// When it attached, seconds since the Unix epoch.
    pub opened_unix: u64,
    /// How it reached the daemon (`nbd 10.0.0.5:41234 export vm1`, `vhost-user:/run/vm1.sock`).
    pub client: String,
}

/// Everything the serving host publishes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Catalog {
    /// The host that wrote it (`--host`).
    pub host: String,
    /// The RADOS client that wrote it (`client.N`): the lease holder's, so a reader can tell a
    /// catalog of the current holder from one an earlier holder left.
    pub writer: String,
    /// When it was written, milliseconds since the Unix epoch.
    pub published_ms: u64,
    /// Every VDI of the store, by id.
    pub vdis: Vec<CatalogVdi>,
    /// Every open VDI or snapshot handle.
    pub clients: Vec<CatalogClient>,
}

/// `s` with what must not reach a terminal or break a record replaced by `?`: control
/// characters (a newline would end the record, an escape would drive the reader's terminal) and
/// the characters that reorder text (U+202A–U+202E, U+2066–U+2069).
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') { '?' } else { c })
        .collect()
}

impl Catalog {
    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{MAGIC}");
        let _ = writeln!(s, "host {}", printable(&self.host));
        let _ = writeln!(s, "writer {}", printable(&self.writer));
        let _ = writeln!(s, "published_ms {}", self.published_ms);
        for v in &self.vdis {
            let parent = v.parent.map_or_else(|| "-".to_string(), |p| p.to_string());
            let _ =
                writeln!(s, "vdi {} {} {} {parent} {} {}", v.id, v.size, v.snapshots, v.created_ns, printable(&v.name));
        }
        for c in &self.clients {
            let mode = if c.writable { "rw" } else { "ro" };
            let _ = writeln!(s, "client {} {mode} {} {}", c.vdi, c.opened_unix, printable(&c.client));
        }
        // The last record: a catalog without it was cut short.
        let _ = writeln!(s, "end");
        s.into_bytes()
    }

    /// Parses a catalog's bytes; says what is wrong with them rather than guess.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Catalog, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
        let mut lines = text.lines();
        match lines.next() {
            Some(MAGIC) => {}
            Some(other) if other.starts_with("parallax-catalog ") => {
                return Err(format!("written by a newer Parallax ({other:?}); this build reads {MAGIC:?}"));
            }
            _ => return Err("not a Parallax catalog".into()),
        }
        let mut cat = Catalog::default();
        let mut ended = false;
        for (i, line) in lines.enumerate() {
            let bad = |why: &str| format!("line {}: {why}: {line:?}", i + 2);
            if ended {
                return Err(bad("a record after the end"));
            }
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            // Free text is made printable here too: the object may have been written by anyone
            // with access to the pool.
            let rest = printable(rest);
            let rest = rest.as_str();
            match kind {
                "end" => ended = true,
                "host" => cat.host = rest.to_string(),
                "writer" => cat.writer = rest.to_string(),
                "published_ms" => cat.published_ms = rest.parse().map_err(|_| bad("bad time"))?,
                "vdi" => {
                    let f: Vec<&str> = rest.splitn(6, ' ').collect();
                    let [id, size, snaps, parent, created, name] = f[..] else { return Err(bad("short VDI record")) };
                    let num = |s: &str| s.parse::<u64>().map_err(|_| bad("bad number"));
                    cat.vdis.push(CatalogVdi {
                        id: id.parse().map_err(|_| bad("bad VDI id"))?,
                        name: name.to_string(),
                        size: num(size)?,
                        snapshots: num(snaps)?,
                        parent: if parent == "-" { None } else { Some(num(parent)?) },
                        created_ns: num(created)?,
                    });
                }
                "client" => {
                    let f: Vec<&str> = rest.splitn(4, ' ').collect();
                    let [vdi, mode, opened, client] = f[..] else { return Err(bad("short client record")) };
                    let writable = match mode {
                        "rw" => true,
                        "ro" => false,
                        _ => return Err(bad("mode is neither rw nor ro")),
                    };
                    cat.clients.push(CatalogClient {
                        vdi: vdi.parse().map_err(|_| bad("bad VDI id"))?,
                        writable,
                        opened_unix: opened.parse().map_err(|_| bad("bad time"))?,
                        client: client.to_string(),
                    });
                }
                // A kind a later version added.
                _ => {}
            }
        }
        if !ended {
            return Err("cut short (no end record)".into());
        }
        Ok(cat)
    }

    /// Replaces the catalog of the store in `pool` with this one, atomically. One that readers
    /// would refuse as too long is not written.
    pub fn publish(&self, pool: &Pool) -> Result<()> {
        let bytes = self.encode();
        if bytes.len() >= MAX_CATALOG {
            return Err(RadosError::BadCatalog(format!(
                "{} VDIs and {} clients take {} bytes, over the {MAX_CATALOG} a reader takes",
                self.vdis.len(),
                self.clients.len(),
                bytes.len()
            )));
        }
        pool.write_full(CATALOG_OBJECT, &bytes)
    }

    /// The catalog of the store in `pool`; `None` if none was ever published. One read, so
    /// one version: the object is only ever replaced whole.
    pub fn read(pool: &Pool) -> Result<Option<Catalog>> {
        let mut buf = vec![0u8; MAX_CATALOG];
        let len = pool.read(CATALOG_OBJECT, 0, &mut buf)?;
        if len == 0 {
            return Ok(None);
        }
        if len >= MAX_CATALOG {
            return Err(RadosError::BadCatalog(format!("{CATALOG_OBJECT} is {MAX_CATALOG} bytes or more")));
        }
        Catalog::decode(&buf[..len]).map(Some).map_err(|why| RadosError::BadCatalog(format!("{CATALOG_OBJECT}: {why}")))
    }
}

/// Records the store at `loc` in its pool's directory (idempotent: a writer does it each time it
/// opens the store, so stores made before the directory existed are found once served again).
pub fn register(cluster: &std::sync::Arc<crate::Cluster>, loc: &crate::RadosLocation) -> Result<()> {
    let pool = cluster.pool(&loc.pool, None)?;
    let name = format!("{STORE_PREFIX}{}", loc.namespace.as_deref().unwrap_or(""));
    pool.set_xattr(DIRECTORY_OBJECT, &name, b"")
}

/// Every store the directory of `pool` records, in name order.
pub fn stores(cluster: &std::sync::Arc<crate::Cluster>, pool: &str) -> Result<Vec<crate::RadosLocation>> {
    let dir = cluster.pool(pool, None)?;
    let mut out: Vec<crate::RadosLocation> = dir
        .xattrs_with_prefix(DIRECTORY_OBJECT, STORE_PREFIX)?
        .into_iter()
        .filter_map(|(name, _)| {
            let ns = name.strip_prefix(STORE_PREFIX)?;
            Some(crate::RadosLocation { pool: pool.to_string(), namespace: (!ns.is_empty()).then(|| ns.to_string()) })
        })
        .collect();
    out.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Catalog {
        Catalog {
            host: "rack1-h2".into(),
            writer: "client.4144".into(),
            published_ms: 1_764_800_000_123,
            vdis: vec![
                CatalogVdi {
                    id: 1,
                    name: "golden image".into(),
                    size: 1 << 30,
                    snapshots: 2,
                    parent: None,
                    created_ns: 5,
                },
                CatalogVdi { id: 7, name: "vm-7".into(), size: 0, snapshots: 0, parent: Some(3), created_ns: 9 },
            ],
            clients: vec![CatalogClient {
                vdi: 7,
                writable: true,
                opened_unix: 1_764_800_000,
                client: "nbd 10.0.0.5:41234 export vm-7".into(),
            }],
        }
    }

    #[test]
    fn a_catalog_reads_back_as_written() {
        let c = sample();
        assert_eq!(Catalog::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn a_client_description_cannot_break_the_format() {
        let mut c = sample();
        c.clients[0].client = "evil\nvdi 99 1 1 - 1 injected".into();
        let back = Catalog::decode(&c.encode()).unwrap();
        assert_eq!(back.vdis.len(), 2, "no record was injected");
        assert_eq!(back.clients[0].client, "evil?vdi 99 1 1 - 1 injected");
    }

    #[test]
    fn text_from_the_pool_cannot_drive_a_terminal() {
        let good = String::from_utf8(sample().encode()).unwrap();
        let evil = good.replace("golden image", "golden\u{1b}[2J\u{202e}gami");
        let back = Catalog::decode(evil.as_bytes()).unwrap();
        assert_eq!(back.vdis[0].name, "golden?[2J?gami");
    }

    #[test]
    fn damaged_or_foreign_catalogs_are_refused_with_the_reason() {
        let good = String::from_utf8(sample().encode()).unwrap();
        for (bytes, why) in [
            (b"hello".to_vec(), "not a Parallax catalog"),
            (b"parallax-catalog 2\n".to_vec(), "newer Parallax"),
            (vec![0xff, 0xfe], "not UTF-8"),
            (good.replace("vdi 7 0 0 3 9 vm-7", "vdi 7 0").into_bytes(), "short VDI record"),
            (good.replace("vdi 7 0 0 3", "vdi x 0 0 3").into_bytes(), "bad VDI id"),
            (good.replace(" rw ", " rx ").into_bytes(), "neither rw nor ro"),
            (good.replace("end\n", "").into_bytes(), "cut short"),
            (good.as_bytes()[..good.find("client ").unwrap()].to_vec(), "cut short"),
            (format!("{good}vdi 1 1 1 - 1 late\n").into_bytes(), "after the end"),
            (good.replace("published_ms 1", "published_ms x").into_bytes(), "bad time"),
        ] {
            let e = Catalog::decode(&bytes).unwrap_err();
            assert!(e.contains(why), "{e:?} should say {why:?}");
        }
        let later = good.replace("end\n", "pool_quota 123\nend\n");
        assert_eq!(Catalog::decode(later.as_bytes()).unwrap(), sample(), "kinds added later are skipped");
    }
}
