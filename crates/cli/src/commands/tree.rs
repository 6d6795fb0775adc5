//! `vdi tree`: the family tree of VDIs, snapshots and clones, as text, DOT, SVG or PNG.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

use vdi::Source;

use super::{Ctx, output_error, used_bytes_of};
use crate::args::{TreeArgs, TreeFormat};
use crate::error::{CmdResult, Failure};
use crate::tree::Forest;

/// `vdi tree`.
pub fn tree(ctx: &mut Ctx<'_>, a: &TreeArgs) -> CmdResult {
    let vdis = ctx.reg.list();
    let sources: Vec<Source> = vdis.iter().map(|v| Source::Vdi(v.id)).collect();
    let used: BTreeMap<_, _> = vdis.iter().map(|v| v.id).zip(used_bytes_of(ctx.reg, &sources)?).collect();
    let forest = Forest::new(vdis, ctx.reg.all_snapshots(), used, a.all);
    let bytes = match a.format {
        TreeFormat::Text => forest.render_text(ctx.exact).into_bytes(),
        TreeFormat::Dot => forest.render_dot(ctx.exact).into_bytes(),
        TreeFormat::Svg => run_dot("svg", &forest.render_dot(ctx.exact))?,
        TreeFormat::Png => run_dot("png", &forest.render_dot(ctx.exact))?,
    };
    match &a.output {
        Some(path) => {
            std::fs::write(path, &bytes).map_err(|e| Failure::user(format!("cannot write {}: {e}", path.display())))?
        }
        None => ctx.out.write_all(&bytes).map_err(output_error)?,
    }
    Ok(0)
}

/// Renders DOT source with Graphviz's `dot -T<format>`.
fn run_dot(format: &str, source: &str) -> Result<Vec<u8>, Failure> {
    let mut child = Command::new("dot")
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Failure::user(format!(
                    "--format {format} needs Graphviz's `dot`, which is not installed (not on PATH); install it \
                     with `apt-get install graphviz` (Debian/Ubuntu) or `dnf install graphviz` (Fedora), or use \
                     `--format dot` and render the file elsewhere"
                ))
            } else {
                Failure::system(format!("cannot run `dot`: {e}"))
            }
        })?;
    let mut stdin = child.stdin.take().ok_or_else(|| Failure::system("no pipe to `dot`"))?;
    let input = source.as_bytes().to_vec();
    // Feed dot from another thread so a large output cannot deadlock against our input.
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let mut out = Vec::new();
    let mut errs = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_end(&mut out).map_err(|e| Failure::system(format!("reading from `dot`: {e}")))?;
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut errs);
    }
    let _ = feeder.join();
    let status = child.wait().map_err(|e| Failure::system(format!("waiting for `dot`: {e}")))?;
    if !status.success() {
        return Err(Failure::system(format!("`dot` failed ({status}): {}", String::from_utf8_lossy(&errs).trim())));
    }
    Ok(out)
}
