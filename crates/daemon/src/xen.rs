//! Serving real Xen guests from dom0 (`--xen`, feature `xen`): the blktap crate's xenstore
//! backend, with VDIs opened like every other export (`params` = `parallax:VDI`).

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Result;

use crate::exports::VdiExports;

/// Starts the Xen backend on its own thread; it runs until `stop` is raised.
#[cfg(feature = "xen")]
pub fn spawn(
    exports: Arc<VdiExports>,
    workers: usize,
    max_queues: Option<u32>,
    stop: shutdown::Shutdown,
) -> Result<JoinHandle<()>> {
    use blktap::xen::{DiskOpener, XenBackendOptions, run_dom0};
    let opener: Arc<dyn DiskOpener> = Arc::new(move |target: &str| {
        exports.open_device_for(target, "xen blkback").map_err(|e| e.message().to_string())
    });
    let mut opts = XenBackendOptions::default();
    opts.server.workers = workers;
    if let Some(n) = max_queues {
        opts.max_queues = n;
    }
    let handle = std::thread::Builder::new().name("xen-backend".into()).spawn(move || {
        tracing::info!("serving Xen guests (backend/vbd in xenstore)");
        let mut log = |e: &blktap::xen::BackendEvent| tracing::info!("xen: {e}");
        if let Err(e) = run_dom0(opener, &opts, &stop, &mut log) {
            tracing::error!("the Xen backend stopped: {e}");
        }
    })?;
    Ok(handle)
}

/// Without the `xen` feature the flag is refused when the configuration is read.
#[cfg(not(feature = "xen"))]
pub fn spawn(
    _exports: Arc<VdiExports>,
    _workers: usize,
    _max_queues: Option<u32>,
    _stop: shutdown::Shutdown,
) -> Result<JoinHandle<()>> {
    anyhow::bail!("this parallaxd was built without Xen support (cargo build --release --features xen)")
}
