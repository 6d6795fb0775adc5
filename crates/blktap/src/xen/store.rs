//! Access to xenstore behind a small trait, so the handshake can run against the real
//! xenstore ([`xenstore_rs::unix::XsUnix`]) or an in-memory one ([`MemStore`]).

use std::collections::BTreeMap;
use std::io::ErrorKind;

use parking_lot::Mutex;
use xenstore_rs::Xs;
use xenstore_rs::unix::XsUnix;

use crate::{Error, Result};

/// The xenstore operations the backend needs. Paths are absolute.
pub trait XenStore {
    /// The value of `path`, or `None` if the node does not exist.
    fn read(&self, path: &str) -> Result<Option<String>>;
    /// Writes `value` to `path`, creating missing parent nodes.
    fn write(&self, path: &str, value: &str) -> Result<()>;
    /// The names of the children of `path` (empty if it does not exist).
    fn directory(&self, path: &str) -> Result<Vec<String>>;
    /// Removes `path` and everything below it (not an error if it does not exist).
    fn rm(&self, path: &str) -> Result<()>;
}

fn store_error(op: &str, path: &str, e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(e.kind(), format!("xenstore {op} {path}: {e}")))
}

impl XenStore for XsUnix {
    fn read(&self, path: &str) -> Result<Option<String>> {
        match Xs::read(self, path) {
            Ok(v) => Ok(Some(v.into())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_error("read", path, e)),
        }
    }

    fn write(&self, path: &str, value: &str) -> Result<()> {
        Xs::write(self, path, value).map_err(|e| store_error("write", path, e))
    }

    fn directory(&self, path: &str) -> Result<Vec<String>> {
        match Xs::directory(self, path) {
            Ok(v) => Ok(v.into_iter().map(String::from).collect()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(store_error("directory", path, e)),
        }
    }

    fn rm(&self, path: &str) -> Result<()> {
        match Xs::rm(self, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(store_error("rm", path, e)),
        }
    }
}

/// An in-memory xenstore for tests and simulations: a tree of nodes, each with a value.
/// Like xenstored, writing a node creates its missing parents with empty values.
#[derive(Debug, Default)]
pub struct MemStore {
    nodes: Mutex<BTreeMap<String, String>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
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
        let path = normalize(path);
        if !path.starts_with('/') || path.split('/').skip(1).any(str::is_empty) {
            return Err(Error::Io(std::io::Error::new(ErrorKind::InvalidInput, format!("bad xenstore path {path}"))));
        }
        let mut nodes = self.nodes.lock();
        let mut at = 0;
        while let Some(i) = path[at + 1..].find('/') {
            at += 1 + i;
            nodes.entry(path[..at].to_string()).or_default();
        }
        nodes.insert(path, value.to_string());
        Ok(())
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
        self.nodes.lock().retain(|k, _| !is_below(k, &path));
        Ok(())
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
