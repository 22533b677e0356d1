//! `qvol stats IMAGE [--json]`: the request statistics and state of a served image, from the
//! serving daemon's control socket (found from the image, or named with --control-socket).

use std::path::PathBuf;

use serde_json::Value;
use vhost_qvol::compression;
use vhost_qvol::control::{connect_to_server, ControlClient};
use vhost_qvol::size::format_size;

/// `qvol stats`
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The served image.
    pub image: PathBuf,
    /// The daemon's control socket [default: found from the process serving IMAGE].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `qvol stats`.
pub fn run(args: StatsArgs) -> anyhow::Result<()> {
    let mut client = match &args.control_socket {
        Some(path) => ControlClient::connect(path)?,
        None => connect_to_server(&args.image)?,
    };
    let s = client.execute("stats", Value::Null)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let v = &s["volume"];
    println!("image:        {}", args.image.display());
    println!("volume id:    {}", v["volume_id"].as_str().unwrap_or("?"));
    println!(
        "state:        generation {}, {} commits since the daemon started, {} log records pending",
        v["generation"], v["commits"], v["log_records"]
    );
    println!(
        "space used:   {} of {}",
        format_size(v["allocated_bytes"].as_u64().unwrap_or(0)),
        format_size(v["size"].as_u64().unwrap_or(0))
    );
    // (A daemon older than compression says nothing of it.)
    if let Some(unit) = v["compression_unit_bytes"].as_u64() {
        let level = v["compress_level"]
            .as_i64()
            .and_then(|l| i8::try_from(l).ok());
        let ratio = match (
            v["compression_ratio"].as_f64(),
            v["compression_error"].as_str(),
        ) {
            (Some(ratio), _) => format!("; ratio {ratio:.2}"),
            (None, Some(why)) => format!("; ratio unknown: {why}"),
            (None, None) => String::new(),
        };
        println!(
            "compression:  {}{ratio}",
            compression::describe(u32::try_from(unit).unwrap_or(0), level)
        );
    }
    let snapshots: Vec<&str> = v["snapshots"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!(
        "snapshots:    {}{}",
        snapshots.len(),
        if snapshots.is_empty() {
            String::new()
        } else {
            format!(" ({})", snapshots.join(", "))
        }
    );
    println!("uptime:       {} s, {} errors", s["uptime_s"], s["errors"]);
    println!(
        "{:<13} {:>10} {:>12} {:>7} {:>9} {:>9} {:>9}",
        "requests", "count", "bytes", "errors", "p50 µs", "p99 µs", "max µs"
    );
    if let Some(reqs) = s["requests"].as_object() {
        for (name, r) in reqs {
            let n = |v: &Value| v.as_u64().unwrap_or(0).to_string();
            let below = |v: &Value| match v.as_u64().unwrap_or(0) {
                0 => "-".to_string(),
                us => format!("<{us}"),
            };
            println!(
                "{name:<13} {:>10} {:>12} {:>7} {:>9} {:>9} {:>9}",
                n(&r["count"]),
                format_size(r["bytes"].as_u64().unwrap_or(0)),
                n(&r["errors"]),
                below(&r["latency_us"]["p50"]),
                below(&r["latency_us"]["p99"]),
                n(&r["latency_us"]["max"])
            );
        }
    }
    Ok(())
}
