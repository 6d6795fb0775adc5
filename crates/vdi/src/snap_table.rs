//! The registry's snapshots in memory, with an undo journal: a registry operation that is
//! rolled back puts back only the entries it changed, so taking a snapshot costs the same with
//! one existing snapshot or a hundred thousand (a copy of the table per operation did not).

use std::collections::BTreeMap;

use crate::SnapshotId;
use crate::registry::SnapEntry;

/// Snapshots by id, and while an operation runs, what it changed.
#[derive(Default)]
pub(crate) struct SnapTable {
    map: BTreeMap<SnapshotId, SnapEntry>,
    /// Each key's value before its first change since [`SnapTable::begin`], in change order.
    journal: Option<Vec<(SnapshotId, Option<SnapEntry>)>>,
}

impl SnapTable {
    /// Starts recording changes (an operation begins). A journal left from an operation that
    /// neither kept nor rolled back is dropped.
    pub(crate) fn begin(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// Keeps the changes made since [`SnapTable::begin`].
    pub(crate) fn keep(&mut self) {
        self.journal = None;
    }

    /// Puts back every entry changed since [`SnapTable::begin`].
    pub(crate) fn roll_back(&mut self) {
        let Some(journal) = self.journal.take() else { return };
        for (k, old) in journal.into_iter().rev() {
            match old {
                Some(v) => self.map.insert(k, v),
                None => self.map.remove(&k),
            };
        }
    }

    fn note(&mut self, k: SnapshotId) {
        if let Some(j) = self.journal.as_mut() {
            j.push((k, self.map.get(&k).cloned()));
        }
    }

    /// The snapshot `k`.
    pub(crate) fn get(&self, k: &SnapshotId) -> Option<&SnapEntry> {
        self.map.get(k)
    }

    /// The snapshot `k`, to change.
    pub(crate) fn get_mut(&mut self, k: &SnapshotId) -> Option<&mut SnapEntry> {
        if self.map.contains_key(k) {
            self.note(*k);
        }
        self.map.get_mut(k)
    }

    /// Adds or replaces snapshot `k`.
    pub(crate) fn insert(&mut self, k: SnapshotId, v: SnapEntry) {
        self.note(k);
        self.map.insert(k, v);
    }

    /// Removes snapshot `k`.
    pub(crate) fn remove(&mut self, k: &SnapshotId) -> Option<SnapEntry> {
        if self.map.contains_key(k) {
            self.note(*k);
        }
        self.map.remove(k)
    }

    /// Keeps only the snapshots `keep` accepts.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&SnapshotId, &SnapEntry) -> bool) {
        let gone: Vec<SnapshotId> = self.map.iter().filter(|(k, v)| !keep(k, v)).map(|(k, _)| *k).collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// Every snapshot, by id.
    pub(crate) fn iter(&self) -> std::collections::btree_map::Iter<'_, SnapshotId, SnapEntry> {
        self.map.iter()
    }

    /// Every snapshot's entry, by id.
    pub(crate) fn values(&self) -> std::collections::btree_map::Values<'_, SnapshotId, SnapEntry> {
        self.map.values()
    }
}

impl<'a> IntoIterator for &'a SnapTable {
    type Item = (&'a SnapshotId, &'a SnapEntry);
    type IntoIter = std::collections::btree_map::Iter<'a, SnapshotId, SnapEntry>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}
