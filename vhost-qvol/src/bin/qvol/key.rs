//! `qvol key new|list|show|rotate|remove-generation|delete|export|import|export-public`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use qvol_keys::{KdfParams, KeyInfo};

use crate::access::UnlockArgs;
use crate::keystore::{read_passphrase, KeystoreArgs};

/// `qvol key ...`
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Create a key for VM; prints the new key id (and nothing else) on stdout.
    New {
        /// VM name: letters, digits, '.', '_', '-' (at most 48).
        vm: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// List the keys of the keystore.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Show a key's public fingerprint and metadata (never a secret).
    Show {
        /// Key id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Start a new generation of a key; older generations still open existing volumes
    /// until they are rewrapped (`--rewrap`, or `qvol rekey IMAGE` later).
    Rotate {
        /// Key id.
        id: String,
        /// Rewrap the keyslots of these images for the new generation (each must not be
        /// served).
        #[arg(long, value_name = "IMAGE", num_args = 1..)]
        rewrap: Vec<PathBuf>,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Write the current public key of a key to a file, for someone else's
    /// `qvol keyslot add IMAGE --recipient FILE`.
    ExportPublic {
        /// Key id.
        id: String,
        /// Output file (must not exist).
        #[arg(long, short, value_name = "PUBKEY_FILE")]
        output: PathBuf,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Forget an old generation of a key (volumes wrapped only for it stop opening).
    RemoveGeneration {
        /// Key id.
        id: String,
        /// Generation number.
        generation: u32,
        /// Remove it even though volumes recorded in this keystore are bound to the key
        /// (those wrapped only for this generation stop opening).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Delete a key and all its generations.
    Delete {
        /// Key id.
        id: String,
        /// Confirm: volumes wrapped only for this key will no longer open.
        #[arg(long)]
        yes: bool,
        /// Delete it even though volumes recorded in this keystore are bound to it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Export a key (all generations) to a file sealed under a passphrase.
    Export {
        /// Key id.
        id: String,
        /// Output file (created with mode 0600; must not exist).
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
        /// File holding the export passphrase.
        #[arg(long, value_name = "FILE")]
        export_passphrase_file: PathBuf,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Import a key exported with `qvol key export`; prints its key id.
    Import {
        /// Export file.
        file: PathBuf,
        /// File holding the export passphrase.
        #[arg(long, value_name = "FILE")]
        export_passphrase_file: PathBuf,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// Runs `qvol key ...`.
pub fn run(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::New { vm, keystore } => {
            let info = keystore.unlock()?.new_key(&vm)?;
            println!("{}", info.key_id);
        }
        KeyCommand::List { json, keystore } => {
            let keys = keystore.unlock()?.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                print_table(&keys);
            }
        }
        KeyCommand::Show { id, json, keystore } => {
            let info = keystore.unlock()?.show(&id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_info(&info);
            }
        }
        KeyCommand::Rotate {
            id,
            rewrap,
            keystore,
        } => {
            let info = keystore.unlock()?.rotate(&id)?;
            println!("{} is now at generation {}", info.key_id, info.generation);
            for image in &rewrap {
                let done = crate::rekey::rekey_image(image, &keystore, &UnlockArgs::default())
                    .with_context(|| {
                        format!(
                            "key {id} was rotated, but {} was not rewrapped (run `qvol rekey {}`)",
                            image.display(),
                            image.display()
                        )
                    })?;
                crate::rekey::report(image, &done, false);
            }
        }
        KeyCommand::ExportPublic {
            id,
            output,
            keystore,
        } => {
            let file = keystore.unlock()?.export_public(&id)?;
            crate::files::write_new(&output, file.to_json().as_bytes(), 0o644)?;
            println!(
                "Wrote the public key of {} (generation {}, fingerprint {}) to {}.",
                file.key_id,
                file.generation,
                file.public_key.fingerprint_hex(),
                output.display()
            );
        }
        KeyCommand::RemoveGeneration {
            id,
            generation,
            force,
            keystore,
        } => {
            keystore
                .unlock()?
                .remove_generation_checked(&id, generation, force)?;
            println!("Removed generation {generation} of {id}");
        }
        KeyCommand::Delete {
            id,
            yes,
            force,
            keystore,
        } => {
            if !yes {
                bail!("deleting key {id} makes volumes wrapped only for it unreadable; confirm with --yes");
            }
            keystore.unlock()?.delete_checked(&id, force)?;
            println!("Deleted key {id}");
        }
        KeyCommand::Export {
            id,
            output,
            export_passphrase_file,
            keystore,
        } => {
            let pass = read_passphrase(&export_passphrase_file)?;
            let ks = keystore.unlock()?;
            let data = ks.export_key(&id, pass.expose(), KdfParams::from_env())?;
            crate::files::write_new(&output, &data, 0o600)?;
        }
        KeyCommand::Import {
            file,
            export_passphrase_file,
            keystore,
        } => {
            let pass = read_passphrase(&export_passphrase_file)?;
            let data = std::fs::read(&file)
                .with_context(|| format!("cannot read the export file {}", file.display()))?;
            let info = keystore.unlock()?.import_key(&data, pass.expose())?;
            println!("{}", info.key_id);
        }
    }
    Ok(())
}

fn short(fp: &str) -> &str {
    fp.get(..16).unwrap_or(fp)
}

fn print_table(keys: &[KeyInfo]) {
    println!(
        "{:<40} {:<24} {:>4}  {:<20}  FINGERPRINT",
        "KEY ID", "VM", "GEN", "CREATED"
    );
    for k in keys {
        println!(
            "{:<40} {:<24} {:>4}  {:<20}  {}",
            k.key_id,
            k.vm,
            k.generation,
            k.created,
            short(&k.fingerprint)
        );
    }
}

fn print_info(k: &KeyInfo) {
    println!("key id:         {}", k.key_id);
    println!("vm:             {}", k.vm);
    println!("key type:       {}", k.key_type);
    println!("fingerprint:    {}", k.fingerprint);
    println!("created:        {}", k.created);
    println!(
        "last rotated:   {}",
        k.last_rotated.as_deref().unwrap_or("never")
    );
    println!("rotation count: {}", k.rotation_count);
    println!("generation:     {}", k.generation);
    for g in &k.generations {
        println!(
            "  generation {:>3}: {}  created {}{}",
            g.generation,
            g.fingerprint,
            g.created,
            if g.imported { "  (imported)" } else { "" }
        );
    }
}
