//! `qvol check IMAGE [--json] [--salvage OUT.raw]`: verifies every node MAC and data tag of
//! the live disk and of every snapshot, and the space accounting (`Volume::check`), without
//! writing anything. Exit status 0 when clean, 1 when damaged (each damage listed: which
//! tree, which logical range, what). A served image is checked by its daemon (control
//! command `check`): a scrub while the VM runs. `--salvage` writes the live disk as a raw
//! file: every block that reads, unreadable ones as zeros (listed), holes as holes.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use qvol_core::{Volume, BLOCK_SIZE};
use serde_json::{json, Value};
use vhost_qvol::describe::check_json;
use vhost_qvol::open::read_image_header;
use vhost_qvol::size::format_size;
use vhost_qvol::text::escape_untrusted;
use vhost_qvol::volume_disk::error_chain;

use crate::access::{open_to_read, Handle, UnlockArgs};
use crate::keystore::KeystoreArgs;
use crate::progress::Bar;

/// Blocks whose allocation is asked at once while salvaging (a damaged map node fails only
/// its window, whose blocks are then read one by one).
const WINDOW_BLOCKS: u64 = 256;

/// `qvol check`
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The image.
    pub image: PathBuf,
    /// Print one JSON object: `clean`, `nodes`, `data_blocks`, `snapshots`,
    /// `leaked_blocks`, `damage` (each: `tree`, `offset`, `length`, `first_block`,
    /// `blocks`, `what`), and `salvage` with --salvage.
    #[arg(long)]
    pub json: bool,
    /// Also write the live disk to OUT (a new sparse raw file): every readable block as
    /// read, unreadable ones as zeros (listed). Not for a served image.
    #[arg(long, value_name = "OUT")]
    pub salvage: Option<PathBuf>,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

/// Runs `qvol check`.
pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let image = &args.image;
    read_image_header(image)?;
    if let Some(out) = &args.salvage {
        if out.symlink_metadata().is_ok() {
            bail!(
                "{} exists; --salvage writes a new file and never over one",
                out.display()
            );
        }
    }
    let mut report = match open_to_read(image, &args.keystore, &args.unlock)? {
        Handle::Served(mut client) => {
            if args.salvage.is_some() {
                bail!(
                    "{} is served by a vhost-qvol: --salvage needs it stopped (a check without \
                     --salvage runs through the daemon)",
                    image.display()
                );
            }
            client.set_reply_timeout(None)?;
            let mut r = client.execute("check", Value::Null)?;
            r["served"] = json!(true);
            r
        }
        Handle::Local(opened) => {
            let vol = &opened.volume;
            let mut bar = Bar::new("checking");
            let checked = vol
                .check(&mut |done, total| bar.set(done, total))
                .map_err(|e| anyhow!("cannot check {}: {}", image.display(), error_chain(&e)))?;
            bar.finish();
            let mut r = check_json(&checked);
            if let Some(out) = &args.salvage {
                r["salvage"] = salvage(vol, out)?;
            }
            r
        }
    };
    report["image"] = json!(image.display().to_string());
    if args.json {
        println!("{report}");
    } else {
        print_report(&report);
    }
    let damaged = report["damage"].as_array().map_or(0, Vec::len);
    let leaked = report["leaked_blocks"].as_u64().unwrap_or(0);
    let unreadable = report["salvage"]["unreadable"]
        .as_array()
        .map_or(0, Vec::len);
    if damaged > 0 || leaked > 0 || unreadable > 0 || report["clean"] != json!(true) {
        bail!(
            "{} is damaged: {damaged} damaged range(s), {leaked} leaked block(s)",
            image.display()
        );
    }
    Ok(())
}

fn print_report(r: &Value) {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    println!(
        "{}: {} map and space nodes, {} data blocks, {} snapshot(s) verified{}",
        r["image"].as_str().unwrap_or("?"),
        n("nodes"),
        n("data_blocks"),
        n("snapshots"),
        if r["served"] == json!(true) {
            " (by the serving daemon)"
        } else {
            ""
        }
    );
    for d in r["damage"].as_array().into_iter().flatten() {
        let what = escape_untrusted(d["what"].as_str().unwrap_or("?"));
        let tree = escape_untrusted(d["tree"].as_str().unwrap_or("?"));
        match (d["offset"].as_u64(), d["length"].as_u64()) {
            (Some(off), Some(len)) => println!(
                "damaged: {tree}, bytes {off}..{} (blocks {}..{}): {what}",
                off + len,
                off / BLOCK_SIZE,
                (off + len) / BLOCK_SIZE
            ),
            _ => println!("damaged: {tree}: {what}"),
        }
    }
    if n("leaked_blocks") > 0 {
        println!(
            "leaked: {} blocks ({}) are marked in use but nothing references them",
            n("leaked_blocks"),
            format_size(n("leaked_blocks") * BLOCK_SIZE)
        );
    }
    let s = &r["salvage"];
    if !s.is_null() {
        println!(
            "salvaged: {} ({} written)",
            s["path"].as_str().unwrap_or("?"),
            format_size(s["written_bytes"].as_u64().unwrap_or(0))
        );
        for u in s["unreadable"].as_array().into_iter().flatten() {
            let off = u["offset"].as_u64().unwrap_or(0);
            let len = u["length"].as_u64().unwrap_or(0);
            println!("unreadable, written as zeros: bytes {off}..{}", off + len);
        }
    }
    if r["clean"] == json!(true) {
        println!("No damage found.");
    }
}

/// Writes the live disk of `vol` to the new file `out` (see [`CheckArgs::salvage`]);
/// returns `path`, `written_bytes` and the `unreadable` ranges (`offset`, `length`).
fn salvage(vol: &Volume, out: &Path) -> anyhow::Result<Value> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (it must not exist)", out.display()))?;
    match write_salvage(vol, &file) {
        Ok((written, unreadable)) => Ok(json!({
            "path": out.display().to_string(),
            "written_bytes": written,
            "unreadable": unreadable.iter()
                .map(|(first, n)| json!({"offset": first * BLOCK_SIZE, "length": n * BLOCK_SIZE}))
                .collect::<Vec<_>>(),
        })),
        Err(e) => {
            let _ = std::fs::remove_file(out);
            Err(e.context(format!("cannot write {}", out.display())))
        }
    }
}

/// The bytes written and the unreadable runs of blocks (first, count).
fn write_salvage(vol: &Volume, file: &File) -> anyhow::Result<(u64, Vec<(u64, u64)>)> {
    let size = vol.info().size;
    file.set_len(size)?;
    let blocks = size.div_ceil(BLOCK_SIZE);
    let mut bar = Bar::new("salvaging");
    let mut unreadable: Vec<(u64, u64)> = Vec::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut copy = |lbn: u64, unreadable: &mut Vec<(u64, u64)>| -> anyhow::Result<()> {
        let off = lbn * BLOCK_SIZE;
        let len = (size - off).min(BLOCK_SIZE) as usize;
        match vol.read_at(off, &mut buf[..len]) {
            Ok(()) if buf[..len].iter().all(|&b| b == 0) => {}
            Ok(()) => {
                file.write_all_at(&buf[..len], off)?;
                written += len as u64;
            }
            Err(_) => match unreadable.last_mut() {
                Some((first, n)) if *first + *n == lbn => *n += 1,
                _ => unreadable.push((lbn, 1)),
            },
        }
        Ok(())
    };
    let mut lbn = 0;
    while lbn < blocks {
        let count = WINDOW_BLOCKS.min(blocks - lbn);
        let start = lbn * BLOCK_SIZE;
        let len = (count * BLOCK_SIZE).min(size - start);
        match vol.allocation(start, len, usize::MAX) {
            Ok(extents) => {
                let mut at = lbn;
                for e in extents {
                    let n = e.len.div_ceil(BLOCK_SIZE);
                    if e.allocated {
                        for b in at..at + n {
                            copy(b, &mut unreadable)?;
                        }
                    }
                    at += n;
                }
            }
            // The map cannot say what this window holds: read each block.
            Err(_) => {
                for b in lbn..lbn + count {
                    copy(b, &mut unreadable)?;
                }
            }
        }
        lbn += count;
        bar.set(lbn, blocks);
    }
    file.sync_all()?;
    Ok((written, unreadable))
}
