//! A disposable libblkio client for tests that kill a client mid-I/O: writes pattern
//! blocks (`integration::pattern`, seed from the command line) round-robin over a range
//! with several requests in flight, and prints `done OFFSET` for every completed write,
//! until killed.
//!
//! Usage: `blkio-load SOCKET SEED BLOCKS`

use std::io::Write;

use integration::client::{describe, BlkioClient};
use integration::pattern;

const BLOCK: usize = 4096;
const DEPTH: usize = 16;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, seed, blocks] = &args[..] else {
        eprintln!("usage: blkio-load SOCKET SEED BLOCKS");
        std::process::exit(2);
    };
    let (Ok(seed), Ok(blocks)) = (seed.parse::<u64>(), blocks.parse::<u64>()) else {
        eprintln!("blkio-load: SEED and BLOCKS are numbers");
        std::process::exit(2);
    };
    let mut client =
        BlkioClient::connect(socket.as_ref(), 1, false, BLOCK * DEPTH).unwrap_or_else(|e| {
            eprintln!("blkio-load: cannot connect: {}", describe(&e));
            std::process::exit(1);
        });
    let offsets: Vec<u64> = (0..blocks).map(|b| b * BLOCK as u64).collect();
    let stdout = std::io::stdout();
    loop {
        let result = client.queue(0).run_batch(
            &offsets,
            BLOCK,
            DEPTH,
            true,
            |i, buf| pattern::fill(buf, offsets[i], seed),
            |i, _, r| {
                if r.is_ok() {
                    let mut out = stdout.lock();
                    let _ = writeln!(out, "done {}", offsets[i]);
                    let _ = out.flush();
                }
                true
            },
        );
        if let Err(e) = result {
            eprintln!("blkio-load: {e}");
            std::process::exit(1);
        }
    }
}
