//! The family tree of a store's VDIs: each VDI with its snapshots, and each clone nested under
//! the snapshot it was made from. Rendered as indented text or as Graphviz DOT.

use std::collections::{BTreeMap, BTreeSet};

use vdi::{SnapshotId, SnapshotInfo, VdiId, VdiInfo};

use crate::format;

/// VDIs and snapshots arranged for drawing.
#[derive(Debug)]
pub struct Forest {
    vdis: BTreeMap<VdiId, VdiInfo>,
    /// Used bytes per VDI, where known.
    used: BTreeMap<VdiId, u64>,
    /// Snapshots of each VDI, oldest first.
    snaps: BTreeMap<VdiId, Vec<SnapshotInfo>>,
    /// Clones made from each snapshot.
    clones: BTreeMap<SnapshotId, Vec<VdiId>>,
    /// VDIs drawn at the top level: not clones, or clones whose origin is gone.
    roots: Vec<VdiId>,
    /// Also show deleted snapshots nothing was cloned from.
    show_deleted: bool,
}

impl Forest {
    /// Arranges `vdis` and `snaps` (deleted snapshots included); `used` gives bytes used.
    pub fn new(vdis: Vec<VdiInfo>, snaps: Vec<SnapshotInfo>, used: BTreeMap<VdiId, u64>, show_deleted: bool) -> Self {
        let vdis: BTreeMap<VdiId, VdiInfo> = vdis.into_iter().map(|v| (v.id, v)).collect();
        let mut by_vdi: BTreeMap<VdiId, Vec<SnapshotInfo>> = BTreeMap::new();
        let mut known: BTreeSet<SnapshotId> = BTreeSet::new();
        for s in snaps {
            if vdis.contains_key(&s.vdi) {
                known.insert(s.id);
                by_vdi.entry(s.vdi).or_default().push(s);
            }
        }
        for list in by_vdi.values_mut() {
            list.sort_by_key(|s| s.id);
        }
        let mut clones: BTreeMap<SnapshotId, Vec<VdiId>> = BTreeMap::new();
        let mut roots = Vec::new();
        for v in vdis.values() {
            match v.parent {
                // A clone hangs under its snapshot while that snapshot's VDI still exists.
                Some(p) if known.contains(&p) => clones.entry(p).or_default().push(v.id),
                _ => roots.push(v.id),
            }
        }
        let mut forest = Forest { vdis, used, snaps: by_vdi, clones, roots, show_deleted };
        forest.adopt_unreachable();
        forest
    }

    /// Damaged data could make clones point at each other in a ring; draw such VDIs as roots.
    fn adopt_unreachable(&mut self) {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<VdiId> = self.roots.clone();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            for s in self.snaps.get(&v).into_iter().flatten() {
                stack.extend(self.clones.get(&s.id).into_iter().flatten());
            }
        }
        let lost: Vec<VdiId> = self.vdis.keys().filter(|v| !seen.contains(v)).copied().collect();
        for v in lost {
            for list in self.clones.values_mut() {
                list.retain(|c| *c != v);
            }
            self.roots.push(v);
        }
    }

    fn visible_snaps(&self, v: VdiId) -> impl Iterator<Item = &SnapshotInfo> {
        self.snaps
            .get(&v)
            .into_iter()
            .flatten()
            .filter(move |s| !s.deleted || self.show_deleted || self.clones.contains_key(&s.id))
    }

    fn vdi_label(&self, v: &VdiInfo, exact: bool) -> String {
        let size = if v.size == 0 { "no size yet".to_string() } else { format::size(v.size, exact) };
        let used = self.used.get(&v.id).map(|u| format!(", {} used", format::size(*u, exact))).unwrap_or_default();
        let origin = match v.parent {
            Some(p) if !self.roots.contains(&v.id) => format!(", clone of snapshot {p}"),
            Some(p) => format!(", clone of snapshot {p} (gone)"),
            None => String::new(),
        };
        format!("VDI {} '{}' ({size}{used}{origin})", v.id, v.name)
    }

    fn snap_label(s: &SnapshotInfo) -> String {
        let deleted = if s.deleted { " (deleted)" } else { "" };
        let auto = if s.automatic { " (scheduled)" } else { "" };
        format!("snapshot {} {}{auto}{deleted}", s.id, format::local_time(s.time_ns))
    }

    /// The tree as indented text, one VDI or snapshot per line.
    pub fn render_text(&self, exact: bool) -> String {
        let mut out = String::new();
        if self.vdis.is_empty() {
            out.push_str("(no VDIs; create one with `vdi create NAME`)\n");
            return out;
        }
        let mut drawn = BTreeSet::new();
        for r in &self.roots {
            self.text_vdi(*r, "", "", exact, &mut out, &mut drawn);
        }
        out
    }

    fn text_vdi(&self, id: VdiId, first: &str, rest: &str, exact: bool, out: &mut String, drawn: &mut BTreeSet<VdiId>) {
        let Some(v) = self.vdis.get(&id) else { return };
        if !drawn.insert(id) {
            return;
        }
        out.push_str(&format!("{first}{}\n", self.vdi_label(v, exact)));
        let snaps: Vec<&SnapshotInfo> = self.visible_snaps(id).collect();
        for (i, s) in snaps.iter().enumerate() {
            let last = i + 1 == snaps.len();
            let (branch, cont) = if last { ("└── ", "    ") } else { ("├── ", "│   ") };
            out.push_str(&format!("{rest}{branch}{}\n", Self::snap_label(s)));
            let kids = self.clones.get(&s.id).cloned().unwrap_or_default();
            for (j, c) in kids.iter().enumerate() {
                let klast = j + 1 == kids.len();
                let (kb, kc) = if klast { ("└── ", "    ") } else { ("├── ", "│   ") };
                self.text_vdi(*c, &format!("{rest}{cont}{kb}"), &format!("{rest}{cont}{kc}"), exact, out, drawn);
            }
        }
    }

    /// The tree as a Graphviz digraph: VDIs are boxes, snapshots ellipses, clones dashed edges.
    pub fn render_dot(&self, exact: bool) -> String {
        let mut out = String::from(
            "digraph parallax {\n  rankdir=LR;\n  node [fontname=\"Helvetica\", fontsize=10];\n  \
             edge [fontname=\"Helvetica\", fontsize=9];\n",
        );
        for v in self.vdis.values() {
            let size = if v.size == 0 { "no size yet".to_string() } else { format::size(v.size, exact) };
            let used = self.used.get(&v.id).map(|u| format!("\n{} used", format::size(*u, exact))).unwrap_or_default();
            let label = format!("VDI {}\n{}\n{size}{used}", v.id, v.name);
            out.push_str(&format!(
                "  \"vdi{}\" [shape=box, style=\"rounded,filled\", fillcolor=\"#dde8f8\", label=\"{}\"];\n",
                v.id,
                dot_escape(&label)
            ));
            for s in self.visible_snaps(v.id) {
                let label = format!(
                    "snapshot {}\n{}{}",
                    s.id,
                    format::local_time(s.time_ns),
                    if s.deleted { "\n(deleted)" } else { "" }
                );
                let style = if s.deleted { ", style=dotted" } else { "" };
                out.push_str(&format!(
                    "  \"snap{}\" [shape=ellipse{style}, label=\"{}\"];\n  \"vdi{}\" -> \"snap{}\";\n",
                    s.id,
                    dot_escape(&label),
                    v.id,
                    s.id
                ));
                for c in self.clones.get(&s.id).into_iter().flatten() {
                    out.push_str(&format!("  \"snap{}\" -> \"vdi{c}\" [style=dashed, label=\"clone\"];\n", s.id));
                }
            }
        }
        out.push_str("}\n");
        out
    }
}

/// Escapes text for a double-quoted DOT string (newlines become line breaks).
pub fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vdi(id: u32, name: &str, parent: Option<u64>) -> VdiInfo {
        VdiInfo {
            id: VdiId(id),
            name: name.into(),
            size: 1 << 30,
            created_ns: 0,
            parent: parent.map(SnapshotId),
            snapshots: 0,
            root: 0,
        }
    }

    fn snap(id: u64, of: u32, deleted: bool) -> SnapshotInfo {
        SnapshotInfo {
            id: SnapshotId(id),
            vdi: VdiId(of),
            time_ns: 0,
            root: 0,
            size: 1 << 30,
            deleted,
            automatic: false,
            protected: false,
            name: None,
        }
    }

    #[test]
    fn clones_nest_under_their_snapshot() {
        let f = Forest::new(
            vec![vdi(0, "golden", None), vdi(1, "copy \"1\"", Some(1)), vdi(2, "copy 2", Some(1))],
            vec![snap(1, 0, false), snap(2, 0, false), snap(3, 1, false)],
            BTreeMap::new(),
            false,
        );
        let t = f.render_text(false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("VDI 0 'golden'"), "{t}");
        assert!(lines[1].starts_with("├── snapshot 1"), "{t}");
        assert!(lines[2].starts_with("│   ├── VDI 1 'copy \"1\"'"), "{t}");
        assert!(lines[3].starts_with("│   │   └── snapshot 3"), "{t}");
        assert!(lines[4].starts_with("│   └── VDI 2 'copy 2'"), "{t}");
        assert!(lines[5].starts_with("└── snapshot 2"), "{t}");
        let d = f.render_dot(false);
        assert!(d.contains("\"snap1\" -> \"vdi1\" [style=dashed"), "{d}");
        assert!(d.contains("copy \\\"1\\\""), "{d}");
    }

    #[test]
    fn deleted_snapshots_show_only_with_clones() {
        let f = Forest::new(
            vec![vdi(0, "a", None), vdi(1, "b", Some(1))],
            vec![snap(1, 0, true), snap(2, 0, true)],
            BTreeMap::new(),
            false,
        );
        let t = f.render_text(false);
        assert!(t.contains("snapshot 1") && t.contains("(deleted)"), "{t}");
        assert!(!t.contains("snapshot 2"), "{t}");
    }

    #[test]
    fn rings_in_damaged_data_still_draw_everything() {
        let f = Forest::new(
            vec![vdi(0, "a", Some(2)), vdi(1, "b", Some(1))],
            vec![snap(1, 0, false), snap(2, 1, false)],
            BTreeMap::new(),
            false,
        );
        let t = f.render_text(false);
        assert!(t.contains("VDI 0") && t.contains("VDI 1"), "{t}");
    }
}
