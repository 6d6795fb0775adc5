//! Crash-state testing for the Parallax store (test support; not shipped).
//!
//! A SIGKILL keeps the page cache, so killing a process can never show what a power cut does
//! to writes that were not synced. This crate does: [`Recorder`] is a store backend that logs
//! every write, sync and size change in order; [`states`] builds the media a power cut could
//! leave — everything before sync k plus any subset of the changes issued between sync k and
//! sync k+1, in any order, each write torn at 512-byte sectors — exactly the model of
//! docs/format.md §1; [`workload`] runs scripted VDI workloads against a recorder while keeping
//! a model of what was acknowledged, and checks every crash state against it. [`pause`] holds
//! threads at named points for deterministic race tests.

#![forbid(unsafe_code)]

pub mod pause;
mod recorder;
pub mod states;
pub mod workload;

pub use recorder::{Op, Recorder, Stamp};
