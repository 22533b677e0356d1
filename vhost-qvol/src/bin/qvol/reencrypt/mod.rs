//! `qvol reencrypt IMAGE`: a new, random volume key replaces the old one (docs/FORMAT.md
//! §17, docs/KEYS.md §5.3). The start switches the map, the superblocks and the keyslots to
//! the new key in one crash-safe change (every keyslot is made again around it, or dropped:
//! `slots.rs`); the data of the disk and of every snapshot is then re-sealed a range at a
//! time, each step one commit, so an interrupted run (Ctrl-C, kill, power loss) leaves a
//! consistent volume that `--resume` finishes. On an image this command opened it steps
//! itself; a served image is switched by its daemon (control command `reencrypt-start`,
//! the new key sealed under the current one), which steps in the background while this
//! command follows its progress. `--status` says how far it is.

mod report;
mod slots;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use qvol_core::{CipherSuite, VolumeKey};
use serde_json::{json, Value};
use vhost_qvol::control::ControlClient;
use vhost_qvol::describe::{percent, reencryption_json};
use vhost_qvol::open::{read_image_header, OpenedVolume};
use vhost_qvol::reencryptor::{step_until_done, OFFLINE_LEAVES};
use vhost_qvol::signals;
use vhost_qvol::unlock::Unlock;
use vhost_qvol::volume_disk::error_chain;

use self::report::Progress;
use self::slots::{parse_slot_path, Planned, Secrets, SlotPath};
use crate::access::{open_for_change, open_to_read, record_wraps, Change, Handle, UnlockArgs};
use crate::keystore::KeystoreArgs;

/// How often a served re-encryption's progress is asked for.
const POLL: Duration = Duration::from_millis(200);

/// `qvol reencrypt`
#[derive(Debug, clap::Args)]
pub struct ReencryptArgs {
    /// The image.
    pub image: PathBuf,
    /// The cipher suite of the new key: xchacha20-poly1305 or aegis-256 [default: the
    /// volume's current one].
    #[arg(long, value_name = "SUITE", conflicts_with_all = ["resume", "status"])]
    pub cipher: Option<String>,
    /// Re-seal at most this many MiB of data a second (ranges without data are passed over
    /// at once; 0: no limit) [default: no limit; a served image: the daemon's
    /// --reencrypt-rate, 32 unless set].
    #[arg(long, value_name = "MIB_PER_S", conflicts_with = "status")]
    pub rate: Option<u64>,
    /// Continue an interrupted re-encryption.
    #[arg(long, conflicts_with = "status")]
    pub resume: bool,
    /// Say how far a re-encryption is (exit 0 also when there is none).
    #[arg(long)]
    pub status: bool,
    /// The passphrase of passphrase keyslot SLOT wrapping the new key, read from FILE (the
    /// old one or a new one); repeat per slot. A passphrase slot not named here is dropped
    /// (unless it is the one --unlock-passphrase-file opened).
    #[arg(long, value_name = "SLOT=FILE", value_parser = parse_slot_path,
          conflicts_with_all = ["resume", "status"])]
    pub slot_passphrase_file: Vec<SlotPath>,
    /// Make recovery keyslot SLOT again with a new set of shares (same K of N), written to
    /// DIR; repeat per slot. A recovery slot not named here is dropped.
    #[arg(long, value_name = "SLOT=DIR", value_parser = parse_slot_path,
          conflicts_with_all = ["resume", "status"])]
    pub shares_dir: Vec<SlotPath>,
    /// The public key file (`qvol key export-public`) of a recipient keyslot of another
    /// keystore's key, to wrap the new key for it; repeat per key. A slot of a key neither
    /// in the keystore nor given here is dropped.
    #[arg(long, value_name = "PUBKEY_FILE", conflicts_with_all = ["resume", "status"])]
    pub recipient: Vec<PathBuf>,
    /// Print JSON: a progress line a second (`done_bytes`, `total_bytes`,
    /// `rate_bytes_per_s`), then one object at the end.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

/// Runs `qvol reencrypt`.
pub fn run(args: ReencryptArgs) -> anyhow::Result<()> {
    if args.status {
        return show_status(&args);
    }
    let stop = stop_on_signal()?;
    let done = if args.resume {
        resume(&args, &stop)?
    } else {
        start(&args, &stop)?
    };
    report::finished(&done, args.json);
    Ok(())
}

/// SIGINT and SIGTERM end the run after the step in progress (the volume is consistent
/// after every step, but a clean close spares the next open its log replay).
fn stop_on_signal() -> anyhow::Result<Arc<AtomicBool>> {
    signals::block_termination_signals().context("cannot block SIGTERM and SIGINT")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    signals::on_termination(move |_| flag.store(true, Ordering::Release))
        .context("cannot start the signal thread")?;
    Ok(stop)
}

/// The suite `--cipher` names.
fn parse_cipher(name: &str) -> anyhow::Result<CipherSuite> {
    name.parse().map_err(|_| {
        anyhow!(
            "unknown cipher suite {name:?}: --cipher takes {}",
            CipherSuite::ALL.map(CipherSuite::name).join(" or ")
        )
    })
}

/// `--rate` in bytes a second (0: no limit).
fn rate_bytes(args: &ReencryptArgs) -> u64 {
    args.rate.map_or(0, |mib| mib.saturating_mul(1 << 20))
}

fn already(image: &Path, percent: u64) -> anyhow::Error {
    anyhow!(
        "{} is already being re-encrypted ({percent}% done); use --resume",
        image.display()
    )
}

fn nothing_to_resume(image: &Path) -> anyhow::Error {
    anyhow!(
        "{} is not being re-encrypted; there is nothing to resume",
        image.display()
    )
}

/// Starts a re-encryption and sees it through.
fn start(args: &ReencryptArgs, stop: &AtomicBool) -> anyhow::Result<Value> {
    let image = &args.image;
    let suite = args.cipher.as_deref().map(parse_cipher).transpose()?;
    crate::snapshot::require_version(image, "re-encryption needs")?;
    let secrets = Secrets::load(
        &args.slot_passphrase_file,
        &args.shares_dir,
        &args.recipient,
    )?;
    let mut planned = Vec::new();
    let mut change = open_for_change(image, &args.keystore, &args.unlock, false, |c| {
        if let Some(r) = c.volume().and_then(qvol_core::Volume::reencryption) {
            return Err(already(image, percent(&r)));
        }
        planned = plan(c, &secrets)?;
        Ok(true)
    })?
    .ok_or_else(|| anyhow!("internal: nothing to re-encrypt"))?;
    let new_key = VolumeKey::generate();
    let (slots, share_files) = slots::make(&planned, &change, &secrets, &new_key)?;
    let keystore = change.keystore.take();
    let (id, binding) = (change.volume_id, change.binding.clone());
    let current = change.key().clone();
    let served = change.served_nonce();
    let (to, online) = match (change.into_handle(), served) {
        (Handle::Local(opened), _) => {
            warn_dropped(&planned);
            let vol = &opened.volume;
            let suite = suite.unwrap_or_else(|| vol.data_suite());
            let started = vol
                .start_reencryption(&new_key, suite, &slots, &vol.keyslots_hash())
                .map_err(|e| {
                    anyhow!("cannot re-encrypt {}: {}", image.display(), error_chain(&e))
                })?;
            log::info!(
                "started re-encrypting {} ({} bytes of disk to re-seal)",
                image.display(),
                started.total_bytes()
            );
            (Target::Local(opened), false)
        }
        (Handle::Served(mut client), Some((hash, nonce))) => {
            let status = client.execute("reencrypt-status", Value::Null)?;
            if let Some(p) = status["reencryption"]["percent"].as_u64() {
                return Err(already(image, p));
            }
            let suite = match suite {
                Some(s) => s,
                None => parse_cipher(status["cipher"].as_str().unwrap_or_default())?,
            };
            warn_dropped(&planned);
            let sealed =
                qvol_core::seal_key_for_reencryption(&current, id, &nonce, &slots, &new_key)
                    .map_err(|e| {
                        anyhow!("cannot re-encrypt {}: {}", image.display(), error_chain(&e))
                    })?;
            client
                .execute(
                    "reencrypt-start",
                    json!({"suite": suite.name(),
                           "keyslots": slots.iter().map(hex::encode).collect::<Vec<_>>(),
                           "expected": hex::encode(hash), "sealed": hex::encode(sealed),
                           "rate_bytes_per_s": args.rate.map(|_| rate_bytes(args))}),
                )
                .with_context(|| format!("cannot re-encrypt {}", image.display()))?;
            check_slots_written(image, &slots)?;
            (Target::Served(client), true)
        }
        (Handle::Served(_), None) => bail!("internal: a served change without a nonce"),
    };
    let share_files = share_files.keep();
    if let (Some(ks), Some(b)) = (&keystore, &binding) {
        if let Err(e) = record_wraps(ks, &id, &b.key_id, &slots) {
            eprintln!("qvol: warning: {e:#}");
        }
    }
    drop(keystore);
    let mut done = match to {
        Target::Local(opened) => step_here(image, *opened, rate_bytes(args), args.json, stop)?,
        Target::Served(client) => follow(client, image, args.json, stop)?,
    };
    done["online"] = json!(online);
    done["keyslots"] = json!(planned.iter().map(Planned::json).collect::<Vec<_>>());
    done["share_files"] = json!(share_files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>());
    Ok(done)
}

/// Where a started re-encryption goes on.
enum Target {
    Local(Box<OpenedVolume>),
    Served(ControlClient),
}

/// The plan of the new keyslots of the volume `c` is about to re-encrypt.
fn plan(c: &Change, secrets: &Secrets) -> anyhow::Result<Vec<Planned>> {
    let own = |slot: usize, info: &qvol_keys::SlotInfo| {
        c.keystore
            .as_ref()
            .and_then(|ks| crate::rekey::own_key(ks, slot, info))
            .map(|r| (r.key_id, r.to))
    };
    let unlocked = matches!(c.unlock, Unlock::Passphrase(_)).then_some(c.unlocked_slot);
    slots::plan(&c.image, &c.slots, &own, unlocked, secrets)
}

fn warn_dropped(planned: &[Planned]) {
    for warning in planned.iter().filter_map(Planned::warning) {
        eprintln!("qvol: warning: {warning}");
    }
}

/// The daemon wrote the new keyslot area before it answered: the image must show it (a
/// daemon that only says so changed nothing).
fn check_slots_written(image: &Path, slots: &[Vec<u8>]) -> anyhow::Result<()> {
    let (_, now) = read_image_header(image)?;
    if now.keyslots != slots {
        bail!(
            "the daemon serving {} reported the re-encryption started, but the image does not \
             show the new keyslots",
            image.display()
        );
    }
    Ok(())
}

/// Continues a re-encryption.
fn resume(args: &ReencryptArgs, stop: &AtomicBool) -> anyhow::Result<Value> {
    let image = &args.image;
    let change = open_for_change(image, &args.keystore, &args.unlock, false, |c| {
        match c.volume() {
            Some(vol) if vol.reencryption().is_none() => Err(nothing_to_resume(image)),
            _ => Ok(true),
        }
    })?
    .ok_or_else(|| anyhow!("internal: nothing to resume"))?;
    let done = match change.into_handle() {
        Handle::Local(opened) => step_here(image, *opened, rate_bytes(args), args.json, stop)?,
        Handle::Served(mut client) => {
            let status = client.execute("reencrypt-status", Value::Null)?;
            if status["reencryption"].is_null() {
                return Err(nothing_to_resume(image));
            }
            client.execute(
                "reencrypt-resume",
                json!({"rate_bytes_per_s": args.rate.map(|_| rate_bytes(args))}),
            )?;
            follow(client, image, args.json, stop)?
        }
    };
    Ok(done)
}

/// Steps the re-encryption of a volume this process opened until it is done (then closes
/// it), or until `stop`.
fn step_here(
    image: &Path,
    opened: OpenedVolume,
    rate: u64,
    json: bool,
    stop: &AtomicBool,
) -> anyhow::Result<Value> {
    let vol = &opened.volume;
    let first = vol.reencryption().ok_or_else(|| nothing_to_resume(image))?;
    let mut progress = Progress::new(json);
    progress.update(first.done_bytes(), first.total_bytes());
    let outcome = step_until_done(vol, OFFLINE_LEAVES, &AtomicU64::new(rate), stop, |p| {
        progress.update(p.done_bytes(), p.total_bytes())
    });
    progress.finish();
    let closed = crate::snapshot::close(image, opened);
    let resume_hint = format!("`qvol reencrypt {} --resume` continues", image.display());
    match outcome {
        Ok(None) => closed.map(|()| {
            json!({"image": image.display().to_string(), "finished": true, "online": false,
                   "cipher": first.to_suite.name(), "total_bytes": first.total_bytes(),
                   "seconds": progress.seconds()})
        }),
        Ok(Some(p)) => {
            closed?;
            bail!(
                "interrupted with {}% of {} re-encrypted (the volume is consistent); \
                 {resume_hint}",
                percent(&p),
                image.display()
            )
        }
        Err(e) => bail!(
            "re-encrypting {} stopped at {}%: {}; {resume_hint}",
            image.display(),
            progress.percent(),
            error_chain(&e)
        ),
    }
}

/// Follows the re-encryption a daemon runs until it is done. When interrupted, or when the
/// daemon goes away, the daemon's work is not lost: it goes on, or resumes at its next start.
fn follow(
    mut client: ControlClient,
    image: &Path,
    json: bool,
    stop: &AtomicBool,
) -> anyhow::Result<Value> {
    let mut progress = Progress::new(json);
    let mut cipher = Value::Null;
    loop {
        let status = client
            .execute("reencrypt-status", Value::Null)
            .with_context(|| {
                format!(
                    "lost the daemon serving {} with {}% re-encrypted (it resumes when it \
                     serves the image again)",
                    image.display(),
                    progress.percent()
                )
            })?;
        let r = &status["reencryption"];
        if r.is_null() {
            break;
        }
        cipher = r["to_cipher"].clone();
        progress.update(
            r["done_bytes"].as_u64().unwrap_or(0),
            r["total_bytes"].as_u64().unwrap_or(0),
        );
        if status["running"] != json!(true) {
            progress.finish();
            bail!(
                "the daemon serving {} stopped re-encrypting it at {}%{}; `qvol reencrypt {} \
                 --resume` restarts it",
                image.display(),
                progress.percent(),
                status["error"]
                    .as_str()
                    .map(|e| format!(": {}", vhost_qvol::text::escape_untrusted(e)))
                    .unwrap_or_default(),
                image.display()
            );
        }
        if stop.load(Ordering::Acquire) {
            progress.finish();
            bail!(
                "stopped following at {}%: the daemon serving {} goes on re-encrypting it \
                 (`qvol reencrypt {} --status`)",
                progress.percent(),
                image.display(),
                image.display()
            );
        }
        std::thread::sleep(POLL);
    }
    if cipher.is_null() {
        cipher = client.execute("reencrypt-status", Value::Null)?["cipher"].clone();
    }
    progress.update(progress.total, progress.total);
    progress.finish();
    Ok(
        json!({"image": image.display().to_string(), "finished": true, "online": true,
              "cipher": cipher, "total_bytes": progress.total, "seconds": progress.seconds()}),
    )
}

/// `--status`.
fn show_status(args: &ReencryptArgs) -> anyhow::Result<()> {
    let image = &args.image;
    let mut doc = match open_to_read(image, &args.keystore, &args.unlock)? {
        Handle::Local(opened) => json!({
            "reencryption": opened.volume.reencryption().map(|r| reencryption_json(&r)),
            "served": false,
        }),
        Handle::Served(mut client) => {
            let mut status = client.execute("reencrypt-status", Value::Null)?;
            status["served"] = json!(true);
            status
        }
    };
    doc["image"] = json!(image.display().to_string());
    report::status(image, &doc, args.json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReencryptArgs,
    }

    fn parse(argv: &[&str]) -> Result<ReencryptArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("qvol").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn modes_and_their_flags() {
        let a = parse(&[
            "d.qvol",
            "--cipher",
            "aegis-256",
            "--rate",
            "8",
            "--slot-passphrase-file",
            "1=p.txt",
            "--shares-dir",
            "2=shares",
            "--recipient",
            "bob.pub",
        ])
        .unwrap();
        assert_eq!(a.cipher.as_deref(), Some("aegis-256"));
        assert_eq!(rate_bytes(&a), 8 << 20);
        assert_eq!(a.slot_passphrase_file[0].slot, 1);
        assert_eq!(a.shares_dir[0].path, PathBuf::from("shares"));
        assert!(
            parse(&["d.qvol", "--resume", "--rate", "1"])
                .unwrap()
                .resume
        );
        assert!(parse(&["d.qvol", "--status", "--json"]).unwrap().status);
        for bad in [
            &["d.qvol", "--resume", "--status"][..],
            &["d.qvol", "--resume", "--cipher", "aegis-256"],
            &["d.qvol", "--status", "--rate", "3"],
            &["d.qvol", "--resume", "--slot-passphrase-file", "1=p"],
            &["d.qvol", "--rate", "fast"],
            &["d.qvol", "--slot-passphrase-file", "9=p"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(rate_bytes(&parse(&["d.qvol"]).unwrap()), 0);
        // 0 lifts a served image's daemon default.
        assert_eq!(parse(&["d.qvol", "--rate", "0"]).unwrap().rate, Some(0));
    }

    #[test]
    fn an_unknown_cipher_is_one_sentence_naming_the_known_ones() {
        assert_eq!(parse_cipher("aegis-256").unwrap(), CipherSuite::Aegis256);
        let e = parse_cipher("aes-xts").unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown cipher suite \"aes-xts\": --cipher takes xchacha20-poly1305 or aegis-256"
        );
    }
}
