//! `qvol keystore init`, and unlocking a keystore for the other subcommands.

use std::path::PathBuf;

use anyhow::anyhow;
use qvol_keys::{KdfParams, Keystore, SecretBytes, UnlockedKeystore};
pub use vhost_qvol::open::read_passphrase;
use vhost_qvol::open::KeySource;
use vhost_qvol::paths;

/// Where the keystore is and how to unlock it (shared by the subcommands that need keys).
#[derive(Debug, Clone, clap::Args)]
pub struct KeystoreArgs {
    /// Keystore directory [default: $QVOL_KEYSTORE, then $XDG_DATA_HOME/qvol/keystore].
    #[arg(long, value_name = "DIR")]
    pub keystore: Option<PathBuf>,
    /// File holding the keystore passphrase (trailing newline ignored)
    /// [default: $QVOL_PASSPHRASE_FILE, then $CREDENTIALS_DIRECTORY/qvol-passphrase].
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

impl KeystoreArgs {
    /// The flags resolved against the environment and the defaults.
    pub fn source(&self) -> KeySource {
        KeySource::from_flags(self.keystore.as_deref(), self.passphrase_file.as_deref())
    }

    /// Opens and unlocks the keystore, reading the passphrase file only if one is needed.
    pub fn unlock(&self) -> anyhow::Result<UnlockedKeystore> {
        self.source().unlock()
    }
}

/// `qvol keystore ...`
#[derive(Debug, clap::Subcommand)]
pub enum KeystoreCommand {
    /// Create a keystore: a random master seed, sealed under a passphrase (argon2id).
    Init(InitArgs),
    /// Change the keystore passphrase (or remove it); keys and volumes are unchanged.
    Passwd(PasswdArgs),
    /// Convert a version-1 keystore in place to version 2 (MACed manifest); crash-safe.
    Upgrade(KeystoreArgs),
    /// Verify every key and volume record against the manifest; exit 1 if any is damaged.
    Check {
        /// Print JSON: `{"keystore": DIR, "damaged": [sentence, ...]}`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// `qvol keystore passwd`
#[derive(Debug, clap::Args)]
pub struct PasswdArgs {
    #[command(flatten)]
    pub keystore: KeystoreArgs,
    /// File holding the new passphrase.
    #[arg(long, value_name = "FILE", required_unless_present = "no_passphrase")]
    pub new_passphrase_file: Option<PathBuf>,
    /// Store the master seed unencrypted from now on.
    #[arg(long, conflicts_with = "new_passphrase_file")]
    pub no_passphrase: bool,
}

/// `qvol keystore init`
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Keystore directory [default: $QVOL_KEYSTORE, then $XDG_DATA_HOME/qvol/keystore].
    #[arg(long, value_name = "DIR")]
    pub keystore: Option<PathBuf>,
    /// File holding the new passphrase (trailing newline ignored)
    /// [default: $QVOL_PASSPHRASE_FILE, then $CREDENTIALS_DIRECTORY/qvol-passphrase].
    #[arg(long, value_name = "FILE", conflicts_with = "no_passphrase")]
    pub passphrase_file: Option<PathBuf>,
    /// Store the master seed unencrypted (anyone who can read the keystore can open every
    /// volume).
    #[arg(long)]
    pub no_passphrase: bool,
    /// argon2id memory in MiB [default: 256].
    #[arg(long, value_name = "MIB", conflicts_with = "no_passphrase")]
    pub argon2_memory: Option<u32>,
    /// argon2id passes over memory [default: 3].
    #[arg(long, value_name = "N", conflicts_with = "no_passphrase")]
    pub argon2_passes: Option<u32>,
    /// argon2id lanes [default: 4].
    #[arg(long, value_name = "N", conflicts_with = "no_passphrase")]
    pub argon2_lanes: Option<u32>,
}

/// Runs `qvol keystore ...`.
pub fn run(command: KeystoreCommand) -> anyhow::Result<()> {
    match command {
        KeystoreCommand::Init(args) => init(args),
        KeystoreCommand::Passwd(args) => passwd(args),
        KeystoreCommand::Upgrade(args) => upgrade(&args),
        KeystoreCommand::Check { json, keystore } => check(json, &keystore),
    }
}

/// `qvol keystore check`: what unlocking found damaged (each entry fails only the
/// operations that touch it; the repair is in the sentence).
fn check(json: bool, args: &KeystoreArgs) -> anyhow::Result<()> {
    let unlocked = args.unlock()?;
    let damaged = unlocked.damaged_entries();
    if json {
        println!(
            "{}",
            serde_json::json!({"keystore": unlocked.dir().display().to_string(), "damaged": damaged})
        );
    } else if damaged.is_empty() {
        println!(
            "Keystore {}: every record verifies.",
            unlocked.dir().display()
        );
    } else {
        for sentence in &damaged {
            println!("damaged: {sentence}");
        }
    }
    if damaged.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "{} damaged record(s) in keystore {}",
            damaged.len(),
            unlocked.dir().display()
        ))
    }
}

fn upgrade(args: &KeystoreArgs) -> anyhow::Result<()> {
    let source = args.source();
    let dir = source.keystore_dir()?;
    let keystore = Keystore::open(dir)?;
    let was = keystore.version();
    let pass = match (&source.passphrase_file, keystore.needs_passphrase()) {
        (Some(file), true) => Some(read_passphrase(file)?),
        (None, true) => {
            return Err(anyhow!(
                "the keystore {} is protected by a passphrase: pass --passphrase-file FILE or \
                 set QVOL_PASSPHRASE_FILE",
                dir.display()
            ))
        }
        _ => None,
    };
    keystore.upgrade(pass.as_ref().map(SecretBytes::expose))?;
    if was < 2 {
        println!(
            "Upgraded keystore {} from version {was} to version 2.",
            dir.display()
        );
    } else {
        println!("Keystore {} is already at version 2.", dir.display());
    }
    Ok(())
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let dir = paths::keystore_dir(args.keystore.as_deref()).ok_or_else(|| {
        anyhow!("no keystore directory: pass --keystore DIR or set QVOL_KEYSTORE")
    })?;
    let mut kdf = KdfParams::from_env();
    if let Some(mib) = args.argon2_memory {
        kdf.m_cost_kib = mib
            .checked_mul(1024)
            .ok_or_else(|| anyhow!("--argon2-memory {mib} MiB is too large"))?;
    }
    kdf.t_cost = args.argon2_passes.unwrap_or(kdf.t_cost);
    kdf.p_cost = args.argon2_lanes.unwrap_or(kdf.p_cost);
    kdf.validate()?;
    if args.no_passphrase {
        let keystore = Keystore::init(&dir, None, kdf)?;
        eprintln!(
            "qvol: warning: the master seed is stored unencrypted in {}; anyone who can read \
             it can open every volume of this keystore",
            keystore.dir().join(qvol_keys::KEYSTORE_FILE).display()
        );
        println!("Created keystore {} without a passphrase.", dir.display());
        return Ok(());
    }
    let file = paths::passphrase_file(args.passphrase_file.as_deref()).ok_or_else(|| {
        anyhow!("no passphrase given: pass --passphrase-file FILE, or --no-passphrase")
    })?;
    let pass = read_passphrase(&file)?;
    if kdf.m_cost_kib < KdfParams::default().m_cost_kib / 4 {
        eprintln!(
            "qvol: warning: argon2id with {} of memory is weak against passphrase guessing",
            memory(kdf.m_cost_kib)
        );
    }
    let keystore = Keystore::init(&dir, Some(pass.expose()), kdf)?;
    let took = keystore.kdf_duration().unwrap_or_default();
    println!(
        "Created keystore {}; unlock takes {:.2} s (argon2id, {}, {} passes, {} lanes).",
        dir.display(),
        took.as_secs_f64(),
        memory(kdf.m_cost_kib),
        kdf.t_cost,
        kdf.p_cost
    );
    Ok(())
}

fn passwd(args: PasswdArgs) -> anyhow::Result<()> {
    let new_pass = match &args.new_passphrase_file {
        Some(file) if !args.no_passphrase => Some(read_passphrase(file)?),
        _ => None,
    };
    let unlocked = args.keystore.unlock()?;
    let kdf = Keystore::open(unlocked.dir())?
        .kdf_params()
        .unwrap_or_else(KdfParams::from_env);
    let took = unlocked.change_passphrase(new_pass.as_ref().map(SecretBytes::expose), kdf)?;
    match took {
        Some(t) => println!(
            "Changed the passphrase of {}; unlock takes {:.2} s.",
            unlocked.dir().display(),
            t.as_secs_f64()
        ),
        None => {
            eprintln!(
                "qvol: warning: the master seed of {} is now stored unencrypted",
                unlocked.dir().display()
            );
            println!("Removed the passphrase of {}.", unlocked.dir().display());
        }
    }
    Ok(())
}

fn memory(kib: u32) -> String {
    if kib % 1024 == 0 {
        format!("{} MiB", kib / 1024)
    } else {
        format!("{kib} KiB")
    }
}
