//! The control protocol: how `vdi` commands reach a store that parallaxd holds open.
//!
//! - [`path`]: where the socket of a store lives (a pure function of the store's path).
//! - [`wire`]: the versioned request and reply frames, and the descriptors sent with them.
//! - [`server`]: parallaxd's side — an accept loop that waits on the socket and a
//!   [`shutdown::Shutdown`] together, one thread per request, one INFO line per command.
//! - [`client`]: `vdi`'s side — send a command line with stdin, stdout and stderr, get the
//!   exit code.
//!
//! The command itself runs in the daemon with the client's own descriptors, so its output,
//! progress bars and prompts reach the client's terminal exactly as if it ran there.

#![forbid(unsafe_code)]

pub mod client;
pub mod path;
pub mod server;
pub mod wire;

pub use client::forward;
pub use path::{bind_control_socket, bind_control_socket_in, control_socket_path, control_socket_path_in, run_dir};
pub use server::{Handler, Request, serve};
pub use wire::{EXIT_FAILURE, EXIT_USER, MAX_ARGS, MAX_REQUEST, VERSION};
