//! `qvol snapshot create|list|revert|delete`: named, read-only points in time of a volume's
//! disk (FORMAT.md §8.1; O(1) to take, blocks shared with the live disk). The changes unlock
//! and open like every changing command (`access.rs`): a refused request (an unknown or
//! duplicate name, an older format) is judged on a read-only open and writes nothing. On a
//! served image, create, list and delete go through the daemon's control socket; a revert
//! needs the VM stopped (the guest would see its disk change under it).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use serde_json::{json, Value};
use vhost_qvol::describe::{snapshot_json, usage_json};
use vhost_qvol::open::{read_image_header, OpenedVolume};
use vhost_qvol::size::format_size;
use vhost_qvol::text::escape_untrusted;
use vhost_qvol::volume_disk::error_chain;

use crate::access::{open_for_change, open_to_read, Handle, UnlockArgs};
use crate::keystore::KeystoreArgs;

/// The first format version with snapshots.
const SNAPSHOT_VERSION: u32 = 4;

/// `qvol snapshot ...`
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of the disk as it is now (through the daemon if it is served).
    Create {
        #[command(flatten)]
        target: Target,
        /// Its name (1 to 255 bytes, no control characters, unique in the volume).
        name: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the snapshots: name, creation time, generation, and the space only each holds.
    List {
        #[command(flatten)]
        target: Target,
        /// Print one JSON object: `{"snapshots": [{name, guid, created, generation,
        /// unique_bytes}, ...]}`.
        #[arg(long)]
        json: bool,
    },
    /// Make the disk the snapshot's content again; the current state is discarded unless
    /// --keep-current names a snapshot to keep it as. The VM must be stopped.
    Revert {
        #[command(flatten)]
        target: Target,
        /// The snapshot to go back to (it stays).
        name: String,
        /// Keep the current state as a new snapshot of this name.
        #[arg(long, value_name = "NAME")]
        keep_current: Option<String>,
    },
    /// Delete a snapshot and free the space only it held (through the daemon if served).
    Delete {
        #[command(flatten)]
        target: Target,
        /// The snapshot.
        name: String,
        /// Print one JSON object: `{"freed_bytes": N}`.
        #[arg(long)]
        json: bool,
    },
}

/// The image and how to unlock it.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The image.
    pub image: PathBuf,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

/// Runs `qvol snapshot ...`.
pub fn run(command: SnapshotCommand) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Create { target, name, json } => create(&target, &name, json),
        SnapshotCommand::List { target, json } => list(&target, json),
        SnapshotCommand::Revert {
            target,
            name,
            keep_current,
        } => revert(&target, &name, keep_current.as_deref()),
        SnapshotCommand::Delete { target, name, json } => delete(&target, &name, json),
    }
}

fn create(t: &Target, name: &str, json: bool) -> anyhow::Result<()> {
    let image = &t.image;
    check_name(name)?;
    let handle = open_judged(t, |vol| {
        if vol.snapshots().iter().any(|s| s.name == name) {
            bail!(
                "{} already has a snapshot named {name:?}; nothing was changed",
                image.display()
            );
        }
        full(vol, image)
    })?;
    let made = match handle {
        Handle::Served(mut client) => client.execute("snapshot-create", json!({"name": name}))?,
        Handle::Local(opened) => {
            let snap = opened
                .volume
                .create_snapshot(name)
                .map_err(|e| failed(image, "create a snapshot of", &e))?;
            close(image, *opened)?;
            snapshot_json(&snap)
        }
    };
    if json {
        println!("{made}");
    } else {
        println!(
            "Created snapshot {} of {} (generation {}).",
            shown(&made["name"]),
            image.display(),
            made["generation"]
        );
    }
    Ok(())
}

fn list(t: &Target, json: bool) -> anyhow::Result<()> {
    let image = &t.image;
    require_version(image, "snapshots need")?;
    let listed = match open_to_read(image, &t.keystore, &t.unlock)? {
        Handle::Served(mut client) => client.execute("snapshot-list", Value::Null)?,
        Handle::Local(opened) => {
            let usage = opened
                .volume
                .snapshot_usage()
                .map_err(|e| failed(image, "list the snapshots of", &e))?;
            json!({"snapshots": usage.iter().map(usage_json).collect::<Vec<_>>()})
        }
    };
    if json {
        println!("{listed}");
        return Ok(());
    }
    let snaps = listed["snapshots"].as_array().cloned().unwrap_or_default();
    if snaps.is_empty() {
        println!("{} has no snapshots.", image.display());
        return Ok(());
    }
    println!(
        "{:<24} {:<23} {:>10} {:>10}",
        "NAME", "CREATED", "GENERATION", "UNIQUE"
    );
    for s in &snaps {
        println!(
            "{:<24} {:<23} {:>10} {:>10}",
            shown(&s["name"]),
            utc(s["created"].as_u64().unwrap_or(0)),
            s["generation"].as_u64().unwrap_or(0),
            format_size(s["unique_bytes"].as_u64().unwrap_or(0))
        );
    }
    Ok(())
}

fn revert(t: &Target, name: &str, keep: Option<&str>) -> anyhow::Result<()> {
    let image = &t.image;
    if let Some(keep) = keep {
        check_name(keep)?;
    }
    // A daemon holding the image (even read-only) means a guest may be using it.
    if let Err(vhost_qvol::lock::LockError::Busy { .. }) =
        vhost_qvol::lock::ImageLock::acquire(image, true)
    {
        bail!("{}", served_revert(image));
    }
    let handle = open_judged(t, |vol| {
        let snaps = vol.snapshots();
        if !snaps.iter().any(|s| s.name == name) {
            bail!("{}", unknown(image, name));
        }
        if let Some(keep) = keep.filter(|k| snaps.iter().any(|s| s.name == *k)) {
            bail!(
                "{} already has a snapshot named {keep:?} (--keep-current); nothing was changed",
                image.display()
            );
        }
        if keep.is_some() {
            full(vol, image)?;
        }
        Ok(())
    })?;
    let Handle::Local(opened) = handle else {
        bail!("{}", served_revert(image));
    };
    opened
        .volume
        .revert_to_snapshot(name, keep)
        .map_err(|e| failed(image, "revert", &e))?;
    close(image, *opened)?;
    match keep {
        Some(k) => println!(
            "Reverted {} to snapshot {name:?}; its previous state is snapshot {k:?}.",
            image.display()
        ),
        None => println!("Reverted {} to snapshot {name:?}.", image.display()),
    }
    Ok(())
}

fn delete(t: &Target, name: &str, json: bool) -> anyhow::Result<()> {
    let image = &t.image;
    let handle = open_judged(t, |vol| {
        if !vol.snapshots().iter().any(|s| s.name == name) {
            bail!("{}", unknown(image, name));
        }
        Ok(())
    })?;
    let freed = match handle {
        Handle::Served(mut client) => client.execute("snapshot-delete", json!({"name": name}))?
            ["freed_bytes"]
            .as_u64()
            .ok_or_else(|| anyhow!("the daemon's snapshot-delete reply has no freed_bytes"))?,
        Handle::Local(opened) => {
            let freed = opened
                .volume
                .delete_snapshot(name)
                .map_err(|e| failed(image, "delete a snapshot of", &e))?;
            close(image, *opened)?;
            freed
        }
    };
    if json {
        println!("{}", json!({ "freed_bytes": freed }));
    } else {
        println!(
            "Deleted snapshot {name:?} of {}; {} freed.",
            image.display(),
            format_size(freed)
        );
    }
    Ok(())
}

/// Opens `t` for a change of its snapshots once `judge` accepts the request on a read-only
/// view of the volume (a served image is judged by its daemon). A format older than 4 is
/// refused before anything is unlocked.
fn open_judged(
    t: &Target,
    judge: impl Fn(&qvol_core::Volume) -> anyhow::Result<()>,
) -> anyhow::Result<Handle> {
    require_version(&t.image, "snapshots need")?;
    let change = open_for_change(&t.image, &t.keystore, &t.unlock, false, |change| {
        if let Some(vol) = change.volume() {
            judge(vol)?;
        }
        Ok(true)
    })?
    .ok_or_else(|| anyhow!("internal: the change was judged unnecessary"))?;
    Ok(change.into_handle())
}

/// Commits and closes a volume this process changed, and waits for the keystore to record
/// the last commit.
pub fn close(image: &Path, opened: OpenedVolume) -> anyhow::Result<()> {
    let recorder = opened.recorder.clone();
    opened
        .volume
        .close()
        .map_err(|e| anyhow!("cannot close {}: {}", image.display(), error_chain(&e)))?;
    if let Some(recorder) = recorder {
        recorder.flush(std::time::Duration::from_secs(15));
    }
    Ok(())
}

/// Snapshots (and re-encryption, `needs`: "re-encryption needs") need format version 4:
/// an older image names `qvol upgrade`.
pub fn require_version(image: &Path, needs: &str) -> anyhow::Result<()> {
    let (_, header) = read_image_header(image)?;
    if header.format_version < SNAPSHOT_VERSION {
        bail!(
            "{} has format version {}, and {needs} version {SNAPSHOT_VERSION}: run \
             `qvol upgrade {}` first (in place, crash-safe)",
            image.display(),
            header.format_version,
            image.display()
        );
    }
    Ok(())
}

/// Refuses a new snapshot of a volume that has the most it can.
fn full(vol: &qvol_core::Volume, image: &Path) -> anyhow::Result<()> {
    if vol.snapshots().len() >= qvol_core::MAX_SNAPSHOTS {
        bail!(
            "{} has {} snapshots, the most a volume can have: delete one first; nothing was \
             changed",
            image.display(),
            qvol_core::MAX_SNAPSHOTS
        );
    }
    Ok(())
}

fn check_name(name: &str) -> anyhow::Result<()> {
    qvol_core::validate_snapshot_name(name)
        .map_err(|e| anyhow!("{name:?} cannot be a snapshot name: {}", error_chain(&e)))
}

fn unknown(image: &Path, name: &str) -> String {
    format!(
        "{} has no snapshot named {name:?} (`qvol snapshot list {}` lists them); nothing was \
         changed",
        image.display(),
        image.display()
    )
}

/// The sentence refusing to revert a served image.
pub fn served_revert(image: &Path) -> String {
    format!(
        "{} is served by a vhost-qvol: stop the VM first (its disk cannot change under a \
         running guest), then revert",
        image.display()
    )
}

fn failed(image: &Path, what: &str, e: &qvol_core::Error) -> anyhow::Error {
    anyhow!("cannot {what} {}: {}", image.display(), error_chain(e))
}

/// A name from JSON, quoted and escaped (a daemon's reply is not trusted to be printable).
fn shown(v: &Value) -> String {
    format!("{:?}", escape_untrusted(v.as_str().unwrap_or("?")))
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_798_680_715), "2026-12-31 01:31:55 UTC");
    }
}
