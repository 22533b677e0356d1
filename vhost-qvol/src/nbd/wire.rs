//! One client's socket: whole messages in and out, and a way out when the server stops.
//!
//! Reads wake up every [`POLL`] to look at the server's stop flag: a connection waiting
//! for its next message ends at once when the server stops; one in the middle of a message
//! gets [`GRACE`] more to finish it (proto.md "Terminating the transmission phase": "the
//! server SHOULD wait for inflight requests to be serviced").

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a blocked read looks at the stop flag.
pub const POLL: Duration = Duration::from_millis(100);
/// How long a message already begun may take to arrive once the server stops.
pub const GRACE: Duration = Duration::from_secs(2);
/// How long a reply may wait for a client that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection cannot go on reading or writing.
#[derive(Debug)]
pub enum WireError {
    /// The client closed the connection between messages.
    Closed,
    /// The client closed the connection in the middle of a message.
    Truncated,
    /// The server is stopping.
    Stopped,
    /// The socket failed (a reset, a write timeout, ...).
    Io(io::Error),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Closed => f.write_str("the client closed the connection"),
            WireError::Truncated => {
                f.write_str("the client closed the connection in the middle of a message")
            }
            WireError::Stopped => f.write_str("the server is stopping"),
            WireError::Io(e) => write!(f, "the connection failed: {e}"),
        }
    }
}

/// A client connection.
#[derive(Debug)]
pub struct Wire {
    stream: UnixStream,
    stop: Arc<AtomicBool>,
}

impl Wire {
    /// Wraps an accepted stream: blocking, with a read timeout of [`POLL`] and a write
    /// timeout of [`WRITE_TIMEOUT`].
    pub fn new(stream: UnixStream, stop: Arc<AtomicBool>) -> io::Result<Self> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Self { stream, stop })
    }

    /// Fills `buf`. `starts_message`: nothing of the message has been read yet, so an end
    /// of file here is a clean close and a stop ends the wait at once.
    pub fn read(&mut self, buf: &mut [u8], starts_message: bool) -> Result<(), WireError> {
        let mut got = 0;
        let mut deadline: Option<Instant> = None;
        while got < buf.len() {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) if got == 0 && starts_message => return Err(WireError::Closed),
                Ok(0) => return Err(WireError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if !self.stop.load(Ordering::Acquire) {
                        continue;
                    }
                    if got == 0 && starts_message {
                        return Err(WireError::Stopped);
                    }
                    let end = *deadline.get_or_insert_with(|| Instant::now() + GRACE);
                    if Instant::now() >= end {
                        return Err(WireError::Stopped);
                    }
                }
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        Ok(())
    }

    /// Reads and drops `len` bytes (the payload of a refused write, an unknown option's
    /// data), a small buffer at a time.
    pub fn skip(&mut self, mut len: u64) -> Result<(), WireError> {
        let mut scratch = [0u8; 8192];
        while len > 0 {
            let n = usize::try_from(len).map_or(scratch.len(), |l| l.min(scratch.len()));
            self.read(&mut scratch[..n], false)?;
            len -= n as u64;
        }
        Ok(())
    }

    /// Sends all of `parts`, in order.
    pub fn write(&mut self, parts: &[&[u8]]) -> Result<(), WireError> {
        for part in parts {
            self.stream.write_all(part).map_err(WireError::Io)?;
        }
        Ok(())
    }

    /// Ends the connection (both directions), whoever else holds a descriptor of it.
    pub fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Whether the server is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Wire, UnixStream, Arc<AtomicBool>) {
        let (a, b) = UnixStream::pair().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        (Wire::new(a, Arc::clone(&stop)).unwrap(), b, stop)
    }

    #[test]
    fn reads_whole_messages_across_partial_writes() {
        let (mut wire, mut peer, _) = pair();
        let writer = std::thread::spawn(move || {
            peer.write_all(b"ab").unwrap();
            std::thread::sleep(Duration::from_millis(150));
            peer.write_all(b"cd").unwrap();
            peer
        });
        let mut buf = [0u8; 4];
        wire.read(&mut buf, true).unwrap();
        assert_eq!(&buf, b"abcd");
        drop(writer.join().unwrap());
        assert!(matches!(wire.read(&mut buf, true), Err(WireError::Closed)));
    }

    #[test]
    fn a_close_inside_a_message_is_truncation() {
        let (mut wire, mut peer, _) = pair();
        peer.write_all(b"ab").unwrap();
        drop(peer);
        let mut buf = [0u8; 4];
        assert!(matches!(
            wire.read(&mut buf, true),
            Err(WireError::Truncated)
        ));
    }

    #[test]
    fn stop_ends_an_idle_wait_at_once_and_a_partial_message_after_the_grace() {
        let (mut wire, mut peer, stop) = pair();
        stop.store(true, Ordering::Release);
        let started = Instant::now();
        let mut buf = [0u8; 4];
        assert!(matches!(wire.read(&mut buf, true), Err(WireError::Stopped)));
        assert!(started.elapsed() < GRACE);
        peer.write_all(b"a").unwrap();
        let started = Instant::now();
        assert!(matches!(wire.read(&mut buf, true), Err(WireError::Stopped)));
        assert!(started.elapsed() >= GRACE);
    }

    #[test]
    fn skip_drops_exactly_what_it_is_asked() {
        let (mut wire, mut peer, _) = pair();
        peer.write_all(&[1u8; 10_000]).unwrap();
        peer.write_all(b"next").unwrap();
        wire.skip(10_000).unwrap();
        let mut buf = [0u8; 4];
        wire.read(&mut buf, true).unwrap();
        assert_eq!(&buf, b"next");
    }
}
