//! Raw images: `vdi fill` (import), `vdi validate` (compare) and `vdi export`.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use vdi::{ExportStats, Source};

use super::{Ctx, describe, output_error, parse_source, resolve_vdi};
use crate::args::{ExportArgs, ExportDiffArgs, FillArgs, ImportDiffArgs, ValidateArgs};
use crate::error::{CmdResult, EXIT_NO, Failure};
use crate::format;
use crate::progress::Progress;
use crate::qemu::{self, ImageFormat};

/// `vdi fill VDI IMAGE`: a raw image read directly (a file at offsets, `-` or a pipe in
/// order), any other format through `qemu-img convert`.
pub fn fill(ctx: &mut Ctx<'_>, a: &FillArgs) -> CmdResult {
    let id = resolve_vdi(ctx.reg, &a.vdi)?;
    let what = describe(ctx.reg, Source::Vdi(id));
    let from_stdin = a.image == Path::new("-");
    let image = if from_stdin { "standard input".to_string() } else { a.image.display().to_string() };
    let unchanged = |e: Failure| e.context(format!("cannot fill {what} from {image} (the VDI is unchanged)"));
    let stats = if from_stdin {
        let stdin = ctx.stdin.take().ok_or_else(|| Failure::user("this command has no standard input to read"))?;
        fill_from_stream(ctx, id, stdin, a.format, &image).map_err(unchanged)?
    } else {
        let meta =
            std::fs::metadata(&a.image).map_err(|e| unchanged(Failure::user(format!("cannot open {image}: {e}"))))?;
        let seekable = meta.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
        if !seekable {
            // A FIFO or /dev/stdin on a pipe: read it in order.
            let f = File::open(&a.image).map_err(|e| unchanged(Failure::user(format!("cannot open {image}: {e}"))))?;
            fill_from_stream(ctx, id, f, a.format, &image).map_err(unchanged)?
        } else {
            let format = match a.format {
                Some(f) => f,
                None => {
                    let found = qemu::sniff_file(&a.image).map_err(unchanged)?;
                    if found != ImageFormat::Raw {
                        qemu::refuse_external_files(&a.image, found).map_err(unchanged)?;
                    }
                    found
                }
            };
            if format == ImageFormat::Raw {
                let progress = Progress::new(ctx.err_is_terminal, ctx.term_width, "importing", meta.len());
                let err = &mut *ctx.err;
                let result = ctx.reg.fill(id, &a.image, &mut |done, total| progress.update(done, total, err));
                progress.finish(ctx.err);
                result.map_err(|e| unchanged(e.into()))?
            } else {
                qemu::import(ctx.reg, id, &a.image, format).map_err(unchanged)?
            }
        }
    };
    let e = ctx.exact;
    let bs = blockstore::BLOCK_SIZE as u64;
    ctx.print(&format!(
        "filled {what} from {image} ({}): wrote {} ({} blocks), {} already held the same data, \
         cleared {} blocks, skipped {} zero blocks and {} of holes\n",
        format::size(stats.image_bytes, e),
        format::size(stats.blocks_written * bs, e),
        stats.blocks_written,
        format::size(stats.blocks_unchanged * bs, e),
        stats.blocks_cleared,
        stats.zero_blocks,
        format::size(stats.hole_bytes, e),
    ))?;
    Ok(0)
}

/// Fills from a stream read in order. Only raw images can come this way: its first bytes are
/// looked at, and a qcow2 (or other) header is refused rather than imported as raw bytes.
fn fill_from_stream(
    ctx: &mut Ctx<'_>,
    id: vdi::VdiId,
    mut input: File,
    format: Option<ImageFormat>,
    image: &str,
) -> Result<vdi::ImportStats, Failure> {
    let head = qemu::read_head(&mut input).map_err(|e| Failure::user(format!("cannot read {image}: {e}")))?;
    let format = format.unwrap_or_else(|| qemu::sniff(&head, None));
    if format != ImageFormat::Raw {
        return Err(Failure::user(format!(
            "{image} is a {} image, which qemu-img can only convert from a file: save it to a file \
             first, or convert it to raw on the way in (`--format raw` imports the bytes as they are)",
            format.qemu_name()
        )));
    }
    let progress = Progress::new(ctx.err_is_terminal, ctx.term_width, "importing", 0);
    let err = &mut *ctx.err;
    let mut reader = std::io::Cursor::new(head).chain(input);
    let result = ctx.reg.fill_stream(id, &mut reader, image, &mut |done, total| progress.update(done, total, err));
    progress.finish(ctx.err);
    Ok(result?)
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
    if a.format != ImageFormat::Raw {
        if a.output == Path::new("-") {
            return Err(Failure::user(format!(
                "a {} image cannot be written to a stream; give a file name",
                a.format.qemu_name()
            )));
        }
        let out = a.output.display().to_string();
        let dev: std::sync::Arc<dyn blockdev::BlockDevice> = std::sync::Arc::from(ctx.reg.open_source(src)?);
        qemu::export(dev, &a.output, a.format).map_err(|e| e.context(format!("exporting {what} to {out}")))?;
        ctx.print(&format!(
            "exported {what} to {out} as {}: {}\n",
            a.format.qemu_name(),
            format::size(size, ctx.exact)
        ))?;
        return Ok(0);
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
    sync_output(&file, &out)?;
    let summary = format!(
        "exported {what} to {out}: {} ({} of data)\n",
        format::size(stats.bytes, ctx.exact),
        format::size(stats.data_bytes, ctx.exact)
    );
    // Written to a path that is our own output (`/dev/stdout` on a pipe): the summary must not
    // land inside the image.
    if file.metadata().is_ok_and(|m| m.is_file()) {
        ctx.print(&summary)?;
    } else {
        let _ = ctx.err.write_all(summary.as_bytes());
    }
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

/// `vdi export-diff SOURCE OUTPUT [--from SNAPSHOT]`.
pub fn export_diff(ctx: &mut Ctx<'_>, a: &ExportDiffArgs) -> CmdResult {
    let to = parse_source(ctx.reg, &a.source, false)?;
    let from = a.from.as_deref().map(|f| super::live_snapshot(ctx.reg, f)).transpose()?;
    let what = describe(ctx.reg, to);
    let reg = ctx.reg.clone();
    let stats = if a.output == Path::new("-") {
        if ctx.out_is_terminal {
            return Err(Failure::user(
                "not writing a binary diff stream to a terminal: redirect it or give a file name",
            ));
        }
        reg.export_diff(from, to, &mut *ctx.out).map_err(|e| match e {
            vdi::VdiError::File { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe => {
                output_error(source)
            }
            other => Failure::from(other),
        })?
    } else {
        let out = a.output.display().to_string();
        let mut file = File::create(&a.output).map_err(|e| Failure::user(format!("cannot create {out}: {e}")))?;
        let stats =
            reg.export_diff(from, to, &mut file).map_err(|e| Failure::from(e).context(format!("writing {out}")))?;
        sync_output(&file, &out)?;
        stats
    };
    // The summary goes to stderr: stdout may be the stream itself.
    let e = ctx.exact;
    let _ = writeln!(
        ctx.err,
        "exported {} of {what}{}: {} of data, {} of zeros",
        if from.is_some() { "the changes" } else { "all" },
        from.map(|f| format!(" since snapshot {f}")).unwrap_or_default(),
        format::size(stats.data_bytes, e),
        format::size(stats.zero_bytes, e)
    );
    Ok(0)
}

/// `vdi import-diff INPUT VDI`.
pub fn import_diff(ctx: &mut Ctx<'_>, a: &ImportDiffArgs) -> CmdResult {
    let id = resolve_vdi(ctx.reg, &a.vdi)?;
    let what = describe(ctx.reg, Source::Vdi(id));
    let (mut input, name) = if a.input == Path::new("-") {
        (
            ctx.stdin.take().ok_or_else(|| Failure::user("this command has no standard input to read"))?,
            "standard input".to_string(),
        )
    } else {
        let name = a.input.display().to_string();
        (File::open(&a.input).map_err(|e| Failure::user(format!("cannot open {name}: {e}")))?, name)
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut input);
    let stats = ctx
        .reg
        .import_diff(id, &mut reader)
        .map_err(|e| Failure::from(e).context(format!("cannot apply {name} to {what} (the VDI is unchanged)")))?;
    let e = ctx.exact;
    ctx.print(&format!(
        "applied {name} to {what}: {} of data, {} of zeros, size {}{}\n",
        format::size(stats.data_bytes, e),
        format::size(stats.zero_bytes, e),
        format::size(stats.size, e),
        stats.to_name.map(|n| format!("; took snapshot '{n}'")).unwrap_or_default()
    ))?;
    Ok(0)
}

/// Makes a written file durable; a pipe or terminal named as a path (`/dev/stdout`) has nothing
/// to sync.
fn sync_output(file: &File, name: &str) -> Result<(), Failure> {
    match file.metadata() {
        Ok(m) if m.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => {
            file.sync_all().map_err(|e| Failure::system(format!("syncing {name}: {e}")))
        }
        _ => Ok(()),
    }
}
