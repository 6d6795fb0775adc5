//! The room on the medium under a file store: `df`'s figures, and a `RoomSource` that does not
//! keep the store (or its lock) after it is closed.

use blockstore::{BlockStore, CreateOptions, OpenOptions};

#[test]
fn a_room_source_answers_while_the_store_is_open_and_lets_its_lock_go() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let create = CreateOptions { journal_slot_blocks: 64, max_blocks: 0 };
    let store = BlockStore::open_path(&path, &OpenOptions::default(), Some(&create)).unwrap();
    let source = store.room_source();
    let room = source.room().unwrap().expect("a file system tells its room");
    assert_eq!(room.medium, format!("file system of {}", path.display()));
    let limit = room.limit.expect("a file system has a size");
    assert!(room.used <= limit && room.available <= limit - room.used.min(limit), "{room:?}");
    drop(store);
    assert_eq!(source.room().unwrap(), None, "the store is closed");
    // The source held no copy of the store's descriptor: its lock is free.
    let again = BlockStore::open_path(&path, &OpenOptions::default(), None);
    assert!(again.is_ok(), "the closed store's lock is still held: {:?}", again.err());
}
