//! Raw images: `vdi fill` (import), `vdi validate` (compare) and `vdi export`.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use vdi::{ExportStats, Source};

use super::{Ctx, describe, output_error, parse_source, resolve_vdi};
use crate::args::{ExportArgs, FillArgs, ValidateArgs};
use crate::error::{CmdResult, EXIT_NO, Failure};
use crate::format;
use crate::progress::Progress;

/// `vdi fill VDI IMAGE`.
pub fn fill(ctx: &mut Ctx<'_>, a: &FillArgs) -> CmdResult {
    let id = resolve_vdi(ctx.reg, &a.vdi)?;
    let what = describe(ctx.reg, Source::Vdi(id));
    let image = a.image.display().to_string();
    let hint = std::fs::metadata(&a.image).map(|m| m.len()).unwrap_or(0);
    let progress = Progress::new(ctx.err_is_terminal, ctx.term_width, "importing", hint);
    let err = &mut *ctx.err;
    let result = ctx.reg.fill(id, &a.image, &mut |done, total| progress.update(done, total, err));
    progress.finish(ctx.err);
    let stats = result
        .map_err(|e| Failure::from(e).context(format!("cannot fill {what} from {image} (the VDI is unchanged)")))?;
    let e = ctx.exact;
    let stored = stats.blocks_written * blockstore::BLOCK_SIZE as u64;
    ctx.print(&format!(
        "filled {what} from {image} ({}): stored {} ({} blocks), skipped {} zero blocks and {} of holes\n",
        format::size(stats.image_bytes, e),
        format::size(stored, e),
        stats.blocks_written,
        stats.zero_blocks,
        format::size(stats.hole_bytes, e),
    ))?;
    Ok(0)
}

/// `vdi validate SOURCE IMAGE`: exit 0 if identical, 1 with the first differing offset if not.
pub fn validate(ctx: &mut Ctx<'_>, a: &ValidateArgs) -> CmdResult {
    let src = parse_source(ctx.reg, &a.source, a.snapshot)?;
    let what = describe(ctx.reg, src);
    let image = a.image.display().to_string();
    let c = ctx.reg.compare(src, &a.image)?;
    let e = ctx.exact;
    match c.first_difference {
        None => {
            let note = if c.source_size == c.image_size {
                String::new()
            } else {
                format!(
                    " (sizes differ: {} vs {}; the extra part is all zeros)",
                    format::size(c.source_size, e),
                    format::size(c.image_size, e)
                )
            };
            ctx.print(&format!("identical: {what} and {image} ({}){note}\n", format::size(c.image_size, e)))?;
            Ok(0)
        }
        Some(off) => {
            ctx.print(&format!(
                "different: {what} and {image} first differ at byte offset {off} (0x{off:x}, block {}); \
                 sizes {} and {}\n",
                off / blockstore::BLOCK_SIZE as u64,
                format::size(c.source_size, e),
                format::size(c.image_size, e)
            ))?;
            Ok(EXIT_NO)
        }
    }
}

/// `vdi export SOURCE OUTPUT`: a sparse file, or every byte to stdout with `-`.
pub fn export(ctx: &mut Ctx<'_>, a: &ExportArgs) -> CmdResult {
    let src = parse_source(ctx.reg, &a.source, a.snapshot)?;
    let what = describe(ctx.reg, src);
    let size = ctx.reg.size_of(src)?;
    if size == 0 {
        return Err(Failure::user(format!("{what} has no size yet: fill it from an image first")));
    }
    if a.output == Path::new("-") && ctx.out_is_terminal {
        return Err(Failure::user(format!(
            "not writing {what}'s {size} bytes of disk image to a terminal: redirect the output \
             (`vdi export {} - > image.raw`, or `| ...`) or give a file name",
            a.source
        )));
    }
    let progress = Progress::new(ctx.err_is_terminal, ctx.term_width, "exporting", size);
    if a.output == Path::new("-") {
        let r = export_to_stream(ctx, src, size, &progress);
        progress.finish(ctx.err);
        r?;
        return Ok(0);
    }
    let out = a.output.display().to_string();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&a.output)
        .map_err(|e| Failure::user(format!("cannot create {out}: {e}")))?;
    let err = &mut *ctx.err;
    let result = ctx.reg.export(src, &mut file, &mut |done, total| progress.update(done, total, err));
    progress.finish(ctx.err);
    let stats = result.map_err(|e| Failure::from(e).context(format!("exporting {what} to {out}")))?;
    file.sync_all().map_err(|e| Failure::system(format!("syncing {out}: {e}")))?;
    ctx.print(&format!(
        "exported {what} to {out}: {} ({} of data)\n",
        format::size(stats.bytes, ctx.exact),
        format::size(stats.data_bytes, ctx.exact)
    ))?;
    Ok(0)
}

/// Exports through a pipe, copying what arrives to the command's output: the registry
/// exports to files only, and the output may be any writer (a client's stdout in the daemon).
fn export_to_stream(ctx: &mut Ctx<'_>, src: Source, size: u64, progress: &Progress) -> Result<(), Failure> {
    let (mut reader, writer) = std::io::pipe().map_err(|e| Failure::system(format!("creating a pipe: {e}")))?;
    let reg = ctx.reg.clone();
    std::thread::scope(|s| {
        let worker = s.spawn(move || -> Result<ExportStats, vdi::VdiError> {
            let mut file = File::from(OwnedFd::from(writer));
            reg.export(src, &mut file, &mut |_, _| {})
        });
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        let copied: Result<(), Failure> = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = ctx.out.write_all(&buf[..n]) {
                        break Err(output_error(e));
                    }
                    done += n as u64;
                    progress.update(done, size, ctx.err);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(Failure::system(format!("reading the export pipe: {e}"))),
            }
        };
        // Closing our end makes a still-writing exporter fail instead of blocking.
        drop(reader);
        let exported = match worker.join() {
            Ok(r) => r.map_err(Failure::from),
            Err(_) => Err(Failure::system("the export thread panicked")),
        };
        copied?;
        exported?;
        ctx.out.flush().map_err(output_error)
    })
}
