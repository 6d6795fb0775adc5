//! Access to xenstore behind a small trait, so the handshake can run against the real
//! xenstore ([`super::wire::XsClient`]) or an in-memory one ([`MemStore`]).

use std::collections::{BTreeMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsFd, BorrowedFd};

use parking_lot::Mutex;

use super::wakeup::Wakeup;
use crate::{Error, Result};

/// The xenstore operations the backend needs. Paths are absolute.
pub trait XenStore {
    /// The value of `path`, or `None` if the node does not exist.
    fn read(&self, path: &str) -> Result<Option<String>>;
    /// Writes `value` to `path`, creating missing parent nodes.
    fn write(&self, path: &str, value: &str) -> Result<()>;
    /// Writes every `(path, value)` in one transaction — a reader sees all of them or none
    /// (features and the state that announces them, say) — if the node `dir` exists; returns
    /// false, having written nothing, if it does not.
    fn write_all_in(&self, dir: &str, writes: &[(&str, &str)]) -> Result<bool>;
    /// The names of the children of `path` (empty if it does not exist).
    fn directory(&self, path: &str) -> Result<Vec<String>>;
    /// Removes `path` and everything below it (not an error if it does not exist).
    fn rm(&self, path: &str) -> Result<()>;
    /// Sets a watch: a change to `path` or anything below it queues an event. As in xenstored,
    /// setting it also queues one event at once.
    fn watch(&self, path: &str) -> Result<()>;
    /// Removes the watch on `path` (not an error if there is none).
    fn unwatch(&self, path: &str) -> Result<()>;
    /// A descriptor that is readable while watch events are queued (for `poll(2)`).
    fn events(&self) -> BorrowedFd<'_>;
    /// Takes the queued events (the paths that changed) and lowers [`XenStore::events`]. An
    /// event queued after this call raises it again.
    fn take_events(&self) -> Vec<String>;
}

/// An in-memory xenstore for tests and simulations: a tree of nodes, each with a value.
/// Like xenstored, writing a node creates its missing parents with empty values.
#[derive(Debug)]
pub struct MemStore {
    nodes: Mutex<BTreeMap<String, String>>,
    watches: Mutex<Vec<String>>,
    events: Mutex<VecDeque<String>>,
    ready: Wakeup,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        let ready = Wakeup::new().expect("an eventfd for the in-memory xenstore");
        Self { nodes: Mutex::default(), watches: Mutex::default(), events: Mutex::default(), ready }
    }

    /// Queues an event if a watch is at or above `path` (or, for a removal, below it: its
    /// node went with it).
    fn fire(&self, path: &str, removal: bool) {
        let fired = self.watches.lock().iter().any(|w| is_below(path, w) || (removal && is_below(w, path)));
        if fired {
            self.events.lock().push_back(path.to_string());
            self.ready.signal();
        }
    }

    fn write_locked(nodes: &mut BTreeMap<String, String>, path: &str, value: &str) -> Result<String> {
        let path = normalize(path);
        if !path.starts_with('/') || path.split('/').skip(1).any(str::is_empty) {
            return Err(Error::Io(std::io::Error::new(ErrorKind::InvalidInput, format!("bad xenstore path {path}"))));
        }
        let mut at = 0;
        while let Some(i) = path[at + 1..].find('/') {
            at += 1 + i;
            nodes.entry(path[..at].to_string()).or_default();
        }
        nodes.insert(path.clone(), value.to_string());
        Ok(path)
    }

    /// Every node below `prefix` (inclusive) with its value, in path order.
    pub fn dump(&self, prefix: &str) -> Vec<(String, String)> {
        let prefix = prefix.trim_end_matches('/');
        self.nodes.lock().iter().filter(|(k, _)| is_below(k, prefix)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

fn normalize(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() { "/".into() } else { trimmed.into() }
}

/// True if `path` is `prefix` or a descendant of it.
fn is_below(path: &str, prefix: &str) -> bool {
    path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

impl XenStore for MemStore {
    fn read(&self, path: &str) -> Result<Option<String>> {
        Ok(self.nodes.lock().get(&normalize(path)).cloned())
    }

    fn write(&self, path: &str, value: &str) -> Result<()> {
        let path = Self::write_locked(&mut self.nodes.lock(), path, value)?;
        self.fire(&path, false);
        Ok(())
    }

    fn write_all_in(&self, dir: &str, writes: &[(&str, &str)]) -> Result<bool> {
        let mut written = Vec::new();
        {
            let mut nodes = self.nodes.lock();
            if !nodes.contains_key(&normalize(dir)) {
                return Ok(false);
            }
            let mut staged = nodes.clone();
            for (path, value) in writes {
                written.push(Self::write_locked(&mut staged, path, value)?);
            }
            *nodes = staged;
        }
        for path in written {
            self.fire(&path, false);
        }
        Ok(true)
    }

    fn directory(&self, path: &str) -> Result<Vec<String>> {
        let path = normalize(path);
        let nodes = self.nodes.lock();
        let mut out: Vec<String> = Vec::new();
        let start = if path == "/" { "/".to_string() } else { format!("{path}/") };
        for key in nodes.range(start.clone()..).map(|(k, _)| k).take_while(|k| k.starts_with(&start)) {
            let child = key[start.len()..].split('/').next().unwrap_or_default();
            if !child.is_empty() && out.last().map(String::as_str) != Some(child) {
                out.push(child.to_string());
            }
        }
        Ok(out)
    }

    fn rm(&self, path: &str) -> Result<()> {
        let path = normalize(path);
        let removed = {
            let mut nodes = self.nodes.lock();
            let before = nodes.len();
            nodes.retain(|k, _| !is_below(k, &path));
            nodes.len() != before
        };
        if removed {
            self.fire(&path, true);
        }
        Ok(())
    }

    fn watch(&self, path: &str) -> Result<()> {
        let path = normalize(path);
        self.watches.lock().push(path.clone());
        self.events.lock().push_back(path);
        self.ready.signal();
        Ok(())
    }

    fn unwatch(&self, path: &str) -> Result<()> {
        let path = normalize(path);
        self.watches.lock().retain(|w| *w != path);
        Ok(())
    }

    fn events(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    fn take_events(&self) -> Vec<String> {
        self.ready.clear();
        self.events.lock().drain(..).collect()
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_store_behaves_like_a_tree() {
        let s = MemStore::new();
        s.write("/local/domain/0/backend/vbd/5/768/state", "1").unwrap();
        s.write("/local/domain/0/backend/vbd/5/832/params", "x").unwrap();
        s.write("/local/domain/0/backend/vbd/50/768/state", "1").unwrap();
        assert_eq!(s.read("/local/domain/0/backend/vbd/5/768/state").unwrap().as_deref(), Some("1"));
        assert_eq!(s.read("/local/domain/0/backend/vbd/5").unwrap().as_deref(), Some(""));
        assert_eq!(s.read("/nope").unwrap(), None);
        assert_eq!(s.directory("/local/domain/0/backend/vbd").unwrap(), ["5", "50"]);
        assert_eq!(s.directory("/local/domain/0/backend/vbd/5/").unwrap(), ["768", "832"]);
        assert!(s.directory("/nope").unwrap().is_empty());
        s.rm("/local/domain/0/backend/vbd/5").unwrap();
        assert_eq!(s.directory("/local/domain/0/backend/vbd").unwrap(), ["50"]);
        assert!(s.write("relative", "x").is_err());
        assert!(s.write("/a//b", "x").is_err());
    }
}
