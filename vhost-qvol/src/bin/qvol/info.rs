//! `qvol info IMAGE [--json]`: what the header says (no key needed: the compression unit
//! among it) and, when the keystore can unlock the volume, its generation, whether it is as
//! fresh as the keystore's record, space used, and the compression of new writes and what
//! it achieves on the data stored. Header text is unauthenticated: the text output escapes
//! control characters in it (a hostile image must not drive the terminal).

use std::path::PathBuf;

use qvol_core::CompressionUsage;
use qvol_keys::keyslot;
use serde_json::{json, Value};
use vhost_qvol::compression;
use vhost_qvol::open::{open_unrecorded, read_image_header, state_of, volume_id_hex, KeySource};
use vhost_qvol::size::format_size;
use vhost_qvol::text::escape_untrusted;
use vhost_qvol::volume_disk::error_chain;

use crate::access::UnlockArgs;
use crate::keystore::KeystoreArgs;

/// `qvol info`
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The image to describe.
    pub image: PathBuf,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keys: KeystoreArgs,
}

/// What only the volume key reveals.
struct Unlocked {
    generation: u64,
    /// The keystore's verdict: `None` if it has no record of the volume, else `Ok` when
    /// the image is as fresh as the record, or why not.
    freshness: Option<Result<(), String>>,
    /// The key and VM the keystore binds the volume to.
    binding: Option<qvol_keys::VolumeBinding>,
    allocated: u64,
    slot: usize,
    /// The re-encryption in progress, if any.
    reencryption: Option<qvol_core::Reencryption>,
    /// Bytes of a compression unit as the open volume has it (0: none).
    unit_bytes: u32,
    /// The zstd level of new writes (`None`: off, or no compression units).
    compress_level: Option<i8>,
    /// What compression achieves (`None` without compression units), or why it is unknown.
    compression_usage: Option<Result<CompressionUsage, String>>,
}

/// Runs `qvol info`.
pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let (_, header) = read_image_header(&args.image)?;
    let keys = KeySource::from_flags(
        args.keys.keystore.as_deref(),
        args.keys.passphrase_file.as_deref(),
    );
    let unlocked = unlock(&args, &keys, &header);
    let slots: Vec<Value> = header
        .keyslots
        .iter()
        .enumerate()
        .filter(|(_, blob)| !blob.is_empty())
        .map(|(i, blob)| match keyslot::describe(blob) {
            Ok(info) => json!({"index": i, "kind": info.kind, "key_id": info.key_id,
                "generation": info.generation, "kem": info.kem,
                "fingerprint": info.fingerprint, "description": info.to_string()}),
            Err(e) => json!({"index": i, "kind": "unreadable", "description": e.to_string()}),
        })
        .collect();
    let suite = header.suite;
    let mut doc = json!({
        "image": args.image.display().to_string(),
        "name": header.name,
        "format_version": header.format_version,
        "log_bytes": header.log_len,
        "volume_id": volume_id_hex(&header.volume_id),
        "size": header.size,
        "cipher": suite.name(),
        "implementation": suite.implementation(),
        "key_epoch": header.key_epoch,
        "keyslots": slots,
        "compression_unit_bytes": header.unit_bytes,
    });
    match &unlocked {
        Ok(u) => {
            doc["generation"] = json!(u.generation);
            doc["allocated_bytes"] = json!(u.allocated);
            doc["compress_level"] = json!(u.compress_level);
            match &u.compression_usage {
                Some(Ok(usage)) => vhost_qvol::describe::add_compression_usage(&mut doc, usage),
                Some(Err(why)) => doc["compression_error"] = json!(why),
                None => {}
            }
            doc["opened_with_keyslot"] = json!(u.slot);
            doc["reencryption"] = u.reencryption.as_ref().map_or(
                serde_json::Value::Null,
                vhost_qvol::describe::reencryption_json,
            );
            doc["recorded"] = json!(u.freshness.is_some());
            if let Some(b) = &u.binding {
                doc["recorded_key_id"] = json!(b.key_id);
                doc["recorded_vm"] = json!(b.vm);
            }
            doc["rolled_back"] = json!(matches!(u.freshness, Some(Err(_))));
            if let Some(Err(why)) = &u.freshness {
                doc["freshness_error"] = json!(why);
            }
        }
        Err(reason) => doc["locked"] = json!(reason),
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("image:          {}", args.image.display());
    println!("name:           {}", escape_untrusted(&header.name));
    println!(
        "format:         version {}, {} log (room for {} block writes between commits)",
        header.format_version,
        format_size(header.log_len),
        header.log_len / 128
    );
    println!("volume id:      {}", volume_id_hex(&header.volume_id));
    println!(
        "size:           {} ({} bytes)",
        format_size(header.size),
        header.size
    );
    println!(
        "cipher:         {suite} ({} on this CPU)",
        suite.implementation()
    );
    let rekeying = unlocked.as_ref().ok().and_then(|u| u.reencryption.as_ref());
    if let Some(r) = rekeying {
        println!(
            "volume key:     epoch {}, re-encryption to it {}% done ({} to {}): `qvol \
             reencrypt {} --resume` finishes it",
            r.to_epoch,
            vhost_qvol::describe::percent(r),
            r.from_suite,
            r.to_suite,
            args.image.display()
        );
    } else if header.key_epoch > 0 {
        let times = match header.key_epoch {
            1 => "once".to_string(),
            2 => "twice".to_string(),
            n => format!("{n} times"),
        };
        println!(
            "volume key:     epoch {} (re-encrypted {times})",
            header.key_epoch
        );
    }
    match &unlocked {
        Ok(u) => {
            let freshness = match &u.freshness {
                Some(Err(why)) => format!("ROLLED BACK: {why}"),
                Some(Ok(())) => "as fresh as the keystore's record".to_string(),
                None => "not recorded in this keystore: `qvol volume adopt` adopts it".to_string(),
            };
            println!("generation:     {} ({freshness})", u.generation);
            if let Some(b) = &u.binding {
                println!("recorded for:   key {} of VM {}", b.key_id, b.vm);
            }
            println!(
                "space used:     {} ({} bytes)",
                format_size(u.allocated),
                u.allocated
            );
            let achieved = match &u.compression_usage {
                Some(Ok(usage)) => format!("; {}", compression::describe_usage(usage)),
                Some(Err(why)) => format!("; ratio unknown: {why}"),
                None => String::new(),
            };
            println!(
                "compression:    {}{achieved}",
                compression::describe(u.unit_bytes, u.compress_level)
            );
        }
        Err(reason) => {
            println!("generation:     unknown (needs the volume key: {reason})");
            println!("space used:     unknown (needs the volume key)");
            match header.unit_bytes {
                0 => println!("compression:    {}", compression::describe(0, None)),
                unit => println!(
                    "compression:    {} units (the level and ratio need the volume key)",
                    format_size(u64::from(unit))
                ),
            }
        }
    }
    println!(
        "keyslots:       {} of {}",
        doc["keyslots"].as_array().map_or(0, Vec::len),
        header.keyslots.len()
    );
    for slot in doc["keyslots"].as_array().into_iter().flatten() {
        println!(
            "  slot {}: {}",
            slot["index"],
            escape_untrusted(slot["description"].as_str().unwrap_or_default())
        );
    }
    Ok(())
}

fn unlock(
    args: &InfoArgs,
    keys: &KeySource,
    header: &qvol_core::HeaderInfo,
) -> Result<Unlocked, String> {
    let chain = |e: anyhow::Error| {
        e.chain()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ")
    };
    let how = args.unlock.unlock().map_err(chain)?;
    let keystore = if how.is_keystore() || keys.keystore_exists() {
        Some(keys.unlock().map_err(chain)?)
    } else {
        None
    };
    // The key the keystore binds the volume to, if it knows the volume.
    let guard = match keystore
        .as_ref()
        .map(|ks| ks.volume_guard(&header.volume_id))
    {
        None => None,
        Some(Ok(guard)) => Some(guard),
        Some(Err(e)) if e.kind() == qvol_keys::ErrorKind::NotFound => None,
        Some(Err(e)) => return Err(format!("the keystore's volume record: {}", error_chain(&e))),
    };
    let only_key = guard
        .as_ref()
        .map(|g| g.binding().key_id.clone())
        .filter(|k| !k.is_empty() && how.is_keystore());
    let (slot, volume) = open_unrecorded(
        &args.image,
        header,
        keystore.as_ref(),
        &how,
        only_key.as_deref(),
    )
    .map_err(chain)?;
    drop(keystore);
    let info = volume.info();
    let compression_usage =
        (info.unit_bytes != 0).then(|| volume.compression_usage().map_err(|e| error_chain(&e)));
    let state = state_of(&volume.commit_point());
    let freshness = guard
        .as_ref()
        .map(|g| g.check(&state).map_err(|e| error_chain(&e)));
    Ok(Unlocked {
        generation: info.generation,
        freshness,
        binding: guard.map(|g| g.binding().clone()),
        allocated: info.allocated_bytes,
        reencryption: volume.reencryption(),
        unit_bytes: info.unit_bytes,
        compress_level: info.compress_level,
        compression_usage,
        slot,
    })
}
