//! The `vdi` side of the control socket, and the handler parallaxd runs requests with.
//!
//! The protocol itself (socket location, versioned frames, descriptor passing, the server's
//! accept loop and the client) is the `control` crate's; this module adds what needs the
//! command line: making path arguments absolute before a request leaves the client, and
//! running a request's command on the daemon's registry.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use clap::ValueHint;
pub use control::{
    Handler, Request, bind_control_socket, bind_control_socket_in, control_socket_path, control_socket_path_in,
    forward, run_dir, serve,
};

/// For the daemon, all in one: binds the control socket of `store` ([`bind_control_socket`])
/// and serves `vdi` commands on `reg` ([`registry_handler`]) in a new thread until `stop` is
/// raised; the thread then waits for running commands and removes the socket file.
pub fn spawn_control(
    store: &Path,
    reg: Arc<vdi::Registry>,
    stop: shutdown::Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let listener = bind_control_socket(store)?;
    let path = control_socket_path(store);
    tracing::info!("serving vdi commands on {}", path.display());
    std::thread::Builder::new().name("vdi-control-accept".into()).spawn(move || {
        if let Err(e) = serve(listener, registry_handler(reg, stop.clone()), &stop) {
            tracing::error!("control socket {}: {e}", path.display());
        }
        let _ = std::fs::remove_file(&path);
    })
}

/// A [`Handler`] that runs each request with [`crate::execute`] on `reg`. A command that runs
/// until told otherwise (`vdi stats --watch`) ends when `stop` is raised, so it never holds up
/// the daemon's shutdown.
pub fn registry_handler(reg: Arc<vdi::Registry>, stop: shutdown::Shutdown) -> Handler {
    Arc::new(move |req: &Request, stdin: File, mut stdout: File, mut stderr: File| {
        use std::io::IsTerminal;
        let term = crate::Terminals {
            stdout: stdout.is_terminal(),
            stderr: stderr.is_terminal(),
            width: crate::terminal_width(&stderr),
        };
        crate::execute_on(&reg, req.args.clone(), Some(stdin), Some(stop.clone()), &mut stdout, &mut stderr, term)
    })
}

fn is_path(arg: &clap::Arg) -> bool {
    matches!(arg.get_value_hint(), ValueHint::FilePath | ValueHint::AnyPath | ValueHint::DirPath)
}

fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_action().takes_values()
}

/// `args` (after the program name) with every path argument of the `vdi` command line made
/// absolute against `cwd`; `-` and absolute paths are left as they are.
pub fn absolutize_args(args: &[String], cwd: &Path) -> Vec<String> {
    let root = crate::args::command();
    let abs = |v: &str| -> String {
        if v == "-" || v.is_empty() || Path::new(v).is_absolute() {
            v.to_string()
        } else {
            cwd.join(v).to_string_lossy().into_owned()
        }
    };
    let mut cur: &clap::Command = &root;
    let mut out = Vec::with_capacity(args.len());
    let mut positional = 0usize;
    let mut only_positional = false;
    let mut i = 0;
    while i < args.len() {
        let tok = &args[i];
        i += 1;
        if !only_positional && tok == "--" {
            only_positional = true;
            out.push(tok.clone());
        } else if !only_positional && let Some(body) = tok.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let arg = cur
                .get_arguments()
                .find(|a| a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|al| al.contains(&name)));
            match (arg, inline) {
                (Some(a), Some(v)) if takes_value(a) && is_path(a) => out.push(format!("--{name}={}", abs(v))),
                (Some(a), None) if takes_value(a) => {
                    out.push(tok.clone());
                    if let Some(v) = args.get(i) {
                        out.push(if is_path(a) { abs(v) } else { v.clone() });
                        i += 1;
                    }
                }
                _ => out.push(tok.clone()),
            }
        } else if !only_positional && tok.len() > 1 && tok.starts_with('-') {
            // A cluster of short flags; the first one that takes a value takes the rest of the
            // token, or the next token.
            let mut rewritten = String::from("-");
            let mut next_is_value: Option<bool> = None;
            for (at, c) in tok[1..].char_indices() {
                rewritten.push(c);
                if let Some(a) = cur.get_arguments().find(|a| a.get_short() == Some(c))
                    && takes_value(a)
                {
                    let rest = &tok[1 + at + c.len_utf8()..];
                    if rest.is_empty() {
                        next_is_value = Some(is_path(a));
                    } else {
                        let rest = rest.strip_prefix('=').unwrap_or(rest);
                        let value = if is_path(a) { abs(rest) } else { rest.to_string() };
                        rewritten.push_str(&value);
                    }
                    break;
                }
            }
            out.push(rewritten);
            if let Some(path) = next_is_value
                && let Some(v) = args.get(i)
            {
                out.push(if path { abs(v) } else { v.clone() });
                i += 1;
            }
        } else if positional == 0 && cur.has_subcommands() {
            if let Some(sub) = cur.find_subcommand(tok) {
                cur = sub;
            }
            out.push(tok.clone());
        } else {
            let pos: Vec<&clap::Arg> = cur.get_positionals().collect();
            let arg =
                pos.get(positional).or(pos.last().filter(|a| a.get_num_args().is_some_and(|n| n.max_values() > 1)));
            out.push(if arg.is_some_and(|a| is_path(a)) { abs(tok) } else { tok.clone() });
            positional += 1;
        }
    }
    out
}

/// For the `vdi` binary: if a daemon serves the store at `store`, runs the command there and
/// returns its exit code; `None` to run it here. Failures after the request was sent are
/// reported on stderr and give exit code 3.
pub fn try_forward(store: &Path, args: &[std::ffi::OsString]) -> Option<i32> {
    let socket = if rados::RadosLocation::names(store) {
        control_socket_path(store)
    } else {
        control_socket_path(&std::fs::canonicalize(store).ok()?)
    };
    if !socket.exists() {
        return None;
    }
    let args: Vec<String> = args.iter().map(|a| a.to_str().map(str::to_string)).collect::<Option<_>>()?;
    let cwd = std::env::current_dir().ok()?;
    match forward(&socket, &absolutize_args(&args, &cwd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vdi: error: forwarding to parallaxd through {}: {e}", socket.display());
            Some(crate::error::EXIT_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn paths_made_absolute_and_nothing_else() {
        let cwd = Path::new("/home/u");
        assert_eq!(absolutize_args(&s(&["fill", "0", "img"]), cwd), s(&["fill", "0", "/home/u/img"]));
        assert_eq!(
            absolutize_args(&s(&["--store", "s.dat", "import", "my disk", "./a/img", "--wait"]), cwd),
            s(&["--store", "/home/u/s.dat", "import", "my disk", "/home/u/./a/img", "--wait"])
        );
        assert_eq!(
            absolutize_args(&s(&["export", "-s", "3", "-", "--store=x"]), cwd),
            s(&["export", "-s", "3", "-", "--store=/home/u/x"])
        );
        assert_eq!(absolutize_args(&s(&["create", "rel", "--size", "1G"]), cwd), s(&["create", "rel", "--size", "1G"]));
        assert_eq!(
            absolutize_args(&s(&["tree", "-o", "t.svg", "--format", "svg"]), cwd),
            s(&["tree", "-o", "/home/u/t.svg", "--format", "svg"])
        );
        assert_eq!(absolutize_args(&s(&["tree", "-ot.svg"]), cwd), s(&["tree", "-o/home/u/t.svg"]));
        assert_eq!(
            absolutize_args(&s(&["validate", "--", "-x", "/abs/img"]), cwd),
            s(&["validate", "--", "-x", "/abs/img"])
        );
        assert_eq!(absolutize_args(&s(&["validate", "vm", "i"]), cwd), s(&["validate", "vm", "/home/u/i"]));
    }
}
