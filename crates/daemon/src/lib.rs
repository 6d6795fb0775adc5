//! `parallaxd`: owns a Parallax block store and serves its VDIs to virtual machines over NBD,
//! takes scheduled snapshots, and runs `vdi` commands sent to its control socket.

pub mod config;
pub mod exports;
pub mod schedule;
pub mod service;

pub use config::Config;
pub use service::run;
