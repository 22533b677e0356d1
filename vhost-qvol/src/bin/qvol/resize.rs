//! `qvol resize IMAGE SIZE [--shrink [--yes]]`: grow or shrink a volume's disk (FORMAT.md
//! §16; crash-safe). SIZE is absolute (`qvol create --size`'s syntax) or `+DELTA`. A shrink
//! drops the data past the new end: it needs `--shrink`, says how much it drops, and needs
//! `--yes` before it does so; it is refused while a snapshot holds data there. Everything is
//! judged on a read-only view first (`access.rs`), so a refused request writes nothing.
//!
//! A served image grows online through the daemon's control socket (`resize`), which then
//! tells the frontend (QEMU raises the guest's config interrupt: the guest sees the new
//! capacity without a reboot); a served image cannot shrink.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use qvol_core::{ResizePlan, Volume};
use serde_json::{json, Value};
use vhost_qvol::size::{format_size, parse_size};
use vhost_qvol::volume_disk::error_chain;

use crate::access::{open_for_change, Handle, UnlockArgs};
use crate::keystore::KeystoreArgs;

/// `qvol resize`
#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    /// The image.
    pub image: PathBuf,
    /// The new size (bytes, or with a K, M, G or T suffix: powers of 1024), or `+DELTA` to
    /// grow by DELTA. A multiple of 4 KiB.
    #[arg(value_name = "SIZE", allow_hyphen_values = true)]
    pub size: String,
    /// Allow a smaller size: the data past the new end is dropped.
    #[arg(long)]
    pub shrink: bool,
    /// With --shrink: do it (without, the command only says what it would drop).
    #[arg(long)]
    pub yes: bool,
    /// Print one JSON object: `{"old_size": N, "new_size": N, "dropped_bytes": N,
    /// "online": BOOL, "notified": BOOL}`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

/// The size asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wanted {
    /// This many bytes.
    Absolute(u64),
    /// The current size plus this many bytes.
    Grow(u64),
}

impl Wanted {
    /// Parses `SIZE` or `+DELTA` (a non-zero multiple of 4 KiB).
    fn parse(text: &str) -> anyhow::Result<Wanted> {
        let (delta, number) = match text.trim().strip_prefix('+') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if text.trim().starts_with('-') {
            bail!(
                "{text:?} is not a size: give the smaller size itself (with --shrink), not a \
                 negative change"
            );
        }
        let bytes = parse_size(number).map_err(|e| anyhow!(e))?;
        if bytes == 0 || bytes % 4096 != 0 {
            bail!(
                "the {} must be a non-zero multiple of 4 KiB, not {bytes} bytes; nothing was \
                 changed",
                if delta { "growth" } else { "size" }
            );
        }
        Ok(if delta {
            Wanted::Grow(bytes)
        } else {
            Wanted::Absolute(bytes)
        })
    }

    /// The new size of a disk of `old` bytes.
    fn resolve(self, old: u64) -> anyhow::Result<u64> {
        match self {
            Wanted::Absolute(n) => Ok(n),
            Wanted::Grow(d) => old
                .checked_add(d)
                .filter(|&n| n <= qvol_core::MAX_VOLUME_SIZE)
                .ok_or_else(|| too_large(old.saturating_add(d))),
        }
    }
}

fn too_large(size: u64) -> anyhow::Error {
    anyhow!(
        "{size} bytes is larger than a volume can be ({}); nothing was changed",
        format_size(qvol_core::MAX_VOLUME_SIZE)
    )
}

/// Runs `qvol resize`.
pub fn run(args: ResizeArgs) -> anyhow::Result<()> {
    let wanted = Wanted::parse(&args.size)?;
    if let Wanted::Absolute(n) = wanted {
        if n > qvol_core::MAX_VOLUME_SIZE {
            return Err(too_large(n));
        }
    }
    let image = &args.image;
    // The plan as the last judgement saw it (the writable open judges again).
    let judged: RefCell<Option<ResizePlan>> = RefCell::new(None);
    let change = open_for_change(image, &args.keystore, &args.unlock, false, |change| {
        let Some(vol) = change.volume() else {
            return Ok(true);
        };
        let plan = judge(vol, image, wanted, &args)?;
        let changes = plan.new_size != plan.old_size;
        *judged.borrow_mut() = Some(plan);
        Ok(changes)
    })?;
    let Some(change) = change else {
        let size = judged.borrow().as_ref().map_or(0, |p| p.old_size);
        return report(
            &args,
            &json!({"old_size": size, "new_size": size, "dropped_bytes": 0,
                                     "online": false, "notified": false}),
        );
    };
    let done = match change.into_handle() {
        Handle::Local(opened) => {
            let plan = opened
                .volume
                .resize(judged.borrow().as_ref().map_or(0, |p| p.new_size))
                .map_err(|e| anyhow!("cannot resize {}: {}", image.display(), error_chain(&e)))?;
            crate::snapshot::close(image, *opened)?;
            json!({"old_size": plan.old_size, "new_size": plan.new_size,
                   "dropped_bytes": plan.dropped_bytes, "online": false, "notified": false})
        }
        Handle::Served(mut client) => {
            let status = client.execute("query-status", Value::Null)?;
            let old = status["size"]
                .as_u64()
                .ok_or_else(|| anyhow!("the daemon's query-status reply has no size"))?;
            let new = wanted.resolve(old)?;
            if new < old {
                bail!(
                    "{} is served by a vhost-qvol: stop the VM first (a disk cannot shrink \
                     under a running guest), then resize it with --shrink; nothing was changed",
                    image.display()
                );
            }
            let mut reply = client.execute("resize", json!({ "size": new }))?;
            reply["dropped_bytes"] = json!(0);
            reply["online"] = json!(true);
            reply
        }
    };
    report(&args, &done)
}

/// Judges the request on `vol`: the plan, or the one sentence refusing it.
fn judge(
    vol: &Volume,
    image: &Path,
    wanted: Wanted,
    args: &ResizeArgs,
) -> anyhow::Result<ResizePlan> {
    let old = vol.size();
    let new = wanted.resolve(old)?;
    let plan = vol.resize_plan(new).map_err(|e| {
        anyhow!(
            "cannot resize {}: {}; nothing was changed",
            image.display(),
            error_chain(&e)
        )
    })?;
    if new >= old {
        return Ok(plan);
    }
    if !args.shrink {
        bail!(
            "{} is {}; {} is smaller, and shrinking drops the data past the new end: add \
             --shrink to see how much; nothing was changed",
            image.display(),
            format_size(old),
            format_size(new)
        );
    }
    if let Some(name) = plan.snapshots_past_end.first() {
        bail!(
            "snapshot {name:?} of {} holds data past {}: delete it first (`qvol snapshot delete \
             {} {name:?}`); nothing was changed",
            image.display(),
            format_size(new),
            image.display()
        );
    }
    if !args.yes {
        bail!(
            "shrinking {} from {} to {} drops {} of data past the new end: add --yes to do it; \
             nothing was changed",
            image.display(),
            format_size(old),
            format_size(new),
            dropped(plan.dropped_bytes)
        );
    }
    Ok(plan)
}

fn dropped(bytes: u64) -> String {
    if bytes == 0 {
        "no".to_string()
    } else {
        format_size(bytes)
    }
}

fn report(args: &ResizeArgs, done: &Value) -> anyhow::Result<()> {
    if args.json {
        println!("{done}");
        return Ok(());
    }
    let image = args.image.display();
    let old = done["old_size"].as_u64().unwrap_or(0);
    let new = done["new_size"].as_u64().unwrap_or(0);
    if old == new {
        println!(
            "{image} is already {}; nothing was changed.",
            format_size(new)
        );
        return Ok(());
    }
    if new < old {
        println!(
            "Shrank {image} from {} to {} ({} of data dropped).",
            format_size(old),
            format_size(new),
            dropped(done["dropped_bytes"].as_u64().unwrap_or(0))
        );
        return Ok(());
    }
    println!(
        "Grew {image} from {} to {}{}.",
        format_size(old),
        format_size(new),
        match (done["online"].as_bool(), done["notified"].as_bool()) {
            (Some(true), Some(true)) => "; the VM was told of its new size",
            (Some(true), _) =>
                "; no VM is connected to be told (it reads the size when it connects)",
            _ => "",
        }
    );
    if let Some(e) = done["notify_error"].as_str() {
        eprintln!("qvol: warning: {}", vhost_qvol::text::escape_untrusted(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_absolute_or_a_growth() {
        assert_eq!(Wanted::parse("128M").unwrap(), Wanted::Absolute(128 << 20));
        assert_eq!(Wanted::parse("+64M").unwrap(), Wanted::Grow(64 << 20));
        assert_eq!(Wanted::parse("8192").unwrap(), Wanted::Absolute(8192));
        for bad in ["", "+", "-64M", "4097", "+100", "0", "+0", "lots", "1.5G"] {
            assert!(Wanted::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Wanted::Grow(4096).resolve(8192).unwrap(), 12288);
        assert!(Wanted::Grow(qvol_core::MAX_VOLUME_SIZE)
            .resolve(4096)
            .is_err());
    }
}
