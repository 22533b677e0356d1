//! The handshake phase (proto.md "Handshake"): fixed newstyle negotiation only, then option
//! haggling until the client picks the export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or
//! leaves (`NBD_OPT_ABORT`, or a close).
//!
//! Served options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (with `NBD_INFO_EXPORT`,
//! `NBD_INFO_BLOCK_SIZE`, and `NBD_INFO_NAME`/`NBD_INFO_DESCRIPTION` when asked),
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation`). Any
//! other option is answered `NBD_REP_ERR_UNSUP` (so `STARTTLS`: the server runs in NOTLS
//! mode, proto.md "NOTLS mode").

use std::time::Duration;

use log::debug;

use super::proto::{self, Fields, OptionHeader};
use super::wire::{Wire, WireError};
use super::{ConnError, Export, WriterGuard};

/// How many options one connection may send before it is deemed a denial of service
/// (proto.md "Termination of the session during option haggling").
const MAX_OPTIONS: usize = 256;

/// The metadata context id given to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// How long `NBD_OPT_GO` waits for the previous writer to finish leaving (its close and the
/// commit after it) before the export is called busy.
const WRITER_WAIT: Duration = Duration::from_secs(2);

/// What the handshake settled, for the transmission phase.
#[derive(Debug)]
pub struct Session<'a> {
    /// Structured replies were negotiated (`NBD_OPT_STRUCTURED_REPLY`).
    pub structured: bool,
    /// The context id of `base:allocation`, if the client selected it for this export.
    pub base_allocation: Option<u32>,
    /// The transmission flags sent to the client.
    pub flags: u16,
    /// A writable export's one-client slot, held until the connection ends.
    pub _writer: Option<WriterGuard<'a>>,
}

/// The state option haggling builds up.
#[derive(Debug, Default)]
struct Haggle {
    no_zeroes: bool,
    structured: bool,
    base_allocation: Option<u32>,
}

/// What one option led to.
enum Next<'a> {
    /// More options.
    Continue,
    /// Transmission starts.
    Transmit(Session<'a>),
    /// The client aborted.
    Abort,
}

/// Runs the handshake; `None` when the client left without choosing the export.
pub fn negotiate<'a>(
    wire: &mut Wire,
    export: &'a Export,
) -> Result<Option<Session<'a>>, ConnError> {
    // "Newstyle negotiation": the greeting, then the client's flags.
    wire.write(&[&proto::greeting(
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
    )])?;
    let mut flags = [0u8; 4];
    wire.read(&mut flags, true)?;
    let flags = u32::from_be_bytes(flags);
    // "Client flags": "the server MUST drop the TCP connection if the client sets an unknown
    // flag". A client without NBD_FLAG_C_FIXED_NEWSTYLE is honoured as fixed newstyle all
    // the same (allowed there).
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if flags & !known != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {flags:#x} in the handshake"
        )));
    }
    let mut state = Haggle {
        no_zeroes: flags & proto::FLAG_C_NO_ZEROES != 0,
        ..Haggle::default()
    };
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; 16];
        wire.read(&mut header, true)?;
        let header = OptionHeader::decode(&header);
        if header.magic != proto::IHAVEOPT {
            return Err(ConnError::Protocol(format!(
                "option magic {:#x} is not IHAVEOPT",
                header.magic
            )));
        }
        if header.len > proto::MAX_OPTION_LEN {
            return Err(ConnError::Protocol(format!(
                "option {} carries {} bytes, more than the {} this server reads",
                header.option,
                header.len,
                proto::MAX_OPTION_LEN
            )));
        }
        let mut data = vec![0u8; header.len as usize];
        wire.read(&mut data, false)?;
        debug!(
            "NBD option {} with {} bytes of data",
            header.option, header.len
        );
        if wire.stopping() && header.option != proto::OPT_ABORT {
            // "If the server is in the process of being shut down it ... SHOULD error
            // further options received (other than an NBD_OPT_ABORT) with
            // NBD_REP_ERR_SHUTDOWN."
            reply_error(
                wire,
                header.option,
                proto::REP_ERR_SHUTDOWN,
                "the server is shutting down",
            )?;
            return Ok(None);
        }
        match option(wire, export, &mut state, header.option, &data)? {
            Next::Continue => {}
            Next::Transmit(session) => return Ok(Some(session)),
            Next::Abort => return Ok(None),
        }
    }
    Err(ConnError::Protocol(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

fn option<'a>(
    wire: &mut Wire,
    export: &'a Export,
    state: &mut Haggle,
    option: u32,
    data: &[u8],
) -> Result<Next<'a>, ConnError> {
    match option {
        proto::OPT_EXPORT_NAME => export_name(wire, export, state, data).map(Next::Transmit),
        proto::OPT_ABORT => {
            // "The server MUST reply with NBD_REP_ACK"; the client may already be gone.
            let _ = reply(wire, option, proto::REP_ACK, &[]);
            Ok(Next::Abort)
        }
        proto::OPT_LIST => {
            if data.is_empty() {
                reply(
                    wire,
                    option,
                    proto::REP_SERVER,
                    &proto::rep_server(&export.opts.export_name, &export.opts.description),
                )?;
                reply(wire, option, proto::REP_ACK, &[])?;
            } else {
                reply_error(
                    wire,
                    option,
                    proto::REP_ERR_INVALID,
                    "NBD_OPT_LIST takes no data",
                )?;
            }
            Ok(Next::Continue)
        }
        proto::OPT_INFO | proto::OPT_GO => info_or_go(wire, export, state, option, data),
        proto::OPT_STRUCTURED_REPLY => {
            if data.is_empty() {
                state.structured = true;
                reply(wire, option, proto::REP_ACK, &[])?;
            } else {
                reply_error(
                    wire,
                    option,
                    proto::REP_ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                )?;
            }
            Ok(Next::Continue)
        }
        proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
            meta_context(wire, export, state, option, data)?;
            Ok(Next::Continue)
        }
        _ => {
            let why = match option {
                proto::OPT_STARTTLS => "TLS is not supported: the export is on a local socket",
                proto::OPT_EXTENDED_HEADERS => "extended headers are not supported",
                _ => "this option is not supported by this server",
            };
            reply_error(wire, option, proto::REP_ERR_UNSUP, why)?;
            Ok(Next::Continue)
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: cannot return an error, so an unknown name or a busy export ends
/// the session ("the server MUST terminate the session").
fn export_name<'a>(
    wire: &mut Wire,
    export: &'a Export,
    state: &Haggle,
    name: &[u8],
) -> Result<Session<'a>, ConnError> {
    if !export.matches(name) {
        return Err(ConnError::Protocol(format!(
            "NBD_OPT_EXPORT_NAME asked for export {:?}, which does not exist",
            String::from_utf8_lossy(name)
        )));
    }
    let writer = claim_writer(export)?;
    let flags = export.transmission_flags(state.structured);
    wire.write(&[&proto::export_name_reply(
        export.size,
        flags,
        !state.no_zeroes,
    )])?;
    Ok(Session {
        structured: state.structured,
        base_allocation: state.base_allocation,
        flags,
        _writer: writer,
    })
}

/// A writable export's slot, or an error that ends the session.
fn claim_writer(export: &Export) -> Result<Option<WriterGuard<'_>>, ConnError> {
    if export.opts.read_only {
        return Ok(None);
    }
    export
        .writer
        .claim(WRITER_WAIT)
        .map(Some)
        .ok_or_else(|| ConnError::Protocol(super::BUSY.to_string()))
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO` (proto.md "Option types"): name, then the list of
/// information requests.
fn info_or_go<'a>(
    wire: &mut Wire,
    export: &'a Export,
    state: &Haggle,
    option: u32,
    data: &[u8],
) -> Result<Next<'a>, ConnError> {
    let mut f = Fields::new(data);
    let parsed = f.string32().and_then(|name| {
        let n = f.u16()?;
        let requests: Option<Vec<u16>> = (0..n).map(|_| f.u16()).collect();
        Some((name, requests?))
    });
    let Some((name, requests)) = parsed.filter(|_| f.is_empty()) else {
        reply_error(
            wire,
            option,
            proto::REP_ERR_INVALID,
            "malformed NBD_OPT_INFO/NBD_OPT_GO data",
        )?;
        return Ok(Next::Continue);
    };
    if !export.matches(name) {
        reply_error(
            wire,
            option,
            proto::REP_ERR_UNKNOWN,
            &format!(
                "no export named {:?} here (this server has {:?})",
                String::from_utf8_lossy(name),
                export.opts.export_name
            ),
        )?;
        return Ok(Next::Continue);
    }
    // A writable export serves one client: a second one is refused here, with a reason.
    let writer = match option {
        proto::OPT_GO => claim_writer(export).ok(),
        _ if export.opts.read_only || export.writer.free_within(WRITER_WAIT) => Some(None),
        _ => None,
    };
    let Some(writer) = writer else {
        reply_error(wire, option, proto::REP_ERR_POLICY, super::BUSY)?;
        return Ok(Next::Continue);
    };
    let flags = export.transmission_flags(state.structured);
    reply(
        wire,
        option,
        proto::REP_INFO,
        &proto::info_export(export.size, flags),
    )?;
    // Sent whether asked or not: the server enforces a 512-byte minimum, not the default
    // of 1 ("Size constraints"); clients ignore information they did not ask for.
    reply(
        wire,
        option,
        proto::REP_INFO,
        &proto::info_block_size(proto::MIN_BLOCK, proto::PREFERRED_BLOCK, proto::MAX_PAYLOAD),
    )?;
    if requests.contains(&proto::INFO_NAME) {
        reply(
            wire,
            option,
            proto::REP_INFO,
            &proto::info_string(proto::INFO_NAME, &export.opts.export_name),
        )?;
    }
    if requests.contains(&proto::INFO_DESCRIPTION) && !export.opts.description.is_empty() {
        reply(
            wire,
            option,
            proto::REP_INFO,
            &proto::info_string(proto::INFO_DESCRIPTION, &export.opts.description),
        )?;
    }
    reply(wire, option, proto::REP_ACK, &[])?;
    if option == proto::OPT_INFO {
        return Ok(Next::Continue);
    }
    Ok(Next::Transmit(Session {
        structured: state.structured,
        base_allocation: state.base_allocation,
        flags,
        _writer: writer,
    }))
}

/// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: export name, then queries.
/// Only `base:allocation` exists ("The `base:` metadata namespace").
fn meta_context(
    wire: &mut Wire,
    export: &Export,
    state: &mut Haggle,
    option: u32,
    data: &[u8],
) -> Result<(), ConnError> {
    let set = option == proto::OPT_SET_META_CONTEXT;
    if set {
        // "Issuing this command replaces all previously-set metadata contexts (including
        // when this command fails)".
        state.base_allocation = None;
    }
    if !state.structured {
        return reply_error(
            wire,
            option,
            proto::REP_ERR_INVALID,
            "negotiate structured replies (NBD_OPT_STRUCTURED_REPLY) before metadata contexts",
        );
    }
    let mut f = Fields::new(data);
    let parsed = f.string32().and_then(|name| {
        let n = f.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(f.string32()?);
        }
        Some((name, queries))
    });
    let Some((name, queries)) = parsed.filter(|_| f.is_empty()) else {
        return reply_error(
            wire,
            option,
            proto::REP_ERR_INVALID,
            "malformed metadata context request",
        );
    };
    if !export.matches(name) {
        return reply_error(
            wire,
            option,
            proto::REP_ERR_UNKNOWN,
            &format!("no export named {:?} here", String::from_utf8_lossy(name)),
        );
    }
    let wanted = |q: &[u8]| {
        q == proto::BASE_ALLOCATION.as_bytes()
            // "`base:` ... MUST support this as a wildcard during NBD_OPT_LIST_META_CONTEXT",
            // and "MUST ignore this form during NBD_OPT_SET_META_CONTEXT".
            || (!set && q == proto::BASE_NAMESPACE.as_bytes())
    };
    // "If zero queries are sent, then the server MUST return all the metadata contexts"
    // (list), or "MUST select no metadata contexts" (set).
    let selected = if queries.is_empty() {
        !set
    } else {
        queries.iter().any(|q| wanted(q))
    };
    if selected {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        reply(
            wire,
            option,
            proto::REP_META_CONTEXT,
            &proto::rep_meta_context(id, proto::BASE_ALLOCATION),
        )?;
        if set {
            state.base_allocation = Some(BASE_ALLOCATION_ID);
        }
    }
    reply(wire, option, proto::REP_ACK, &[])
}

fn reply(wire: &mut Wire, option: u32, reply_type: u32, data: &[u8]) -> Result<(), ConnError> {
    wire.write(&[&proto::option_reply(option, reply_type, data)])
        .map_err(ConnError::from)
}

fn reply_error(
    wire: &mut Wire,
    option: u32,
    reply_type: u32,
    message: &str,
) -> Result<(), ConnError> {
    reply(wire, option, reply_type, proto::clip(message).as_bytes())
}

impl From<WireError> for ConnError {
    fn from(e: WireError) -> Self {
        ConnError::Wire(e)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::testing::{go_data, meta_data, serve_pair, Client, SparseDisk};
    use super::super::NbdOptions;
    use super::*;
    use crate::disk::Disk;

    const BOTH: u32 = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;

    fn opts(read_only: bool) -> NbdOptions {
        NbdOptions {
            read_only,
            export_name: "vm".into(),
            description: "a test disk".into(),
        }
    }

    fn pair(read_only: bool) -> (Client, std::thread::JoinHandle<()>) {
        let disk: Arc<dyn Disk> = SparseDisk::new(1 << 20);
        serve_pair(disk, opts(read_only))
    }

    /// A FLUSH answered with a simple reply: the connection is in transmission.
    fn transmits(c: &mut Client) {
        c.request(0, proto::CMD_FLUSH, 77, 0, 0);
        assert_eq!(c.simple(), (0, 77));
    }

    #[test]
    fn greeting_offers_fixed_newstyle_and_no_zeroes() {
        let (mut c, _) = pair(false);
        assert_eq!(
            c.greeting(),
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
        );
    }

    #[test]
    fn unknown_client_flags_wrong_magic_and_huge_options_end_the_connection() {
        let (mut c, server) = pair(false);
        c.hello(1 << 5);
        assert!(c.closed());
        server.join().unwrap();

        let (mut c, server) = pair(false);
        c.hello(BOTH);
        c.send(&[0xAB; 16]);
        assert!(c.closed());
        server.join().unwrap();

        let (mut c, server) = pair(false);
        c.hello(BOTH);
        let mut header = proto::IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        c.send(&header);
        assert!(c.closed());
        server.join().unwrap();
    }

    #[test]
    fn unknown_options_are_unsupported_and_negotiation_goes_on() {
        let (mut c, _) = pair(false);
        c.hello(BOTH);
        for option in [proto::OPT_STARTTLS, proto::OPT_EXTENDED_HEADERS, 4242] {
            c.option(option, b"ignored data");
            let r = c.replies(option);
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].0, proto::REP_ERR_UNSUP);
        }
        c.option(proto::OPT_GO, &go_data("", &[]));
        assert_eq!(c.replies(proto::OPT_GO).last().unwrap().0, proto::REP_ACK);
        transmits(&mut c);
    }

    #[test]
    fn list_names_the_export_and_refuses_data() {
        let (mut c, _) = pair(false);
        c.hello(BOTH);
        c.option(proto::OPT_LIST, &[]);
        let r = c.replies(proto::OPT_LIST);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, proto::REP_SERVER);
        assert_eq!(&r[0].1[..4], &2u32.to_be_bytes());
        assert_eq!(&r[0].1[4..6], b"vm");
        assert_eq!(&r[0].1[6..], b"a test disk");
        c.option(proto::OPT_LIST, b"x");
        assert_eq!(c.replies(proto::OPT_LIST)[0].0, proto::REP_ERR_INVALID);
    }

    #[test]
    fn info_describes_the_export_and_its_block_sizes() {
        let (mut c, _) = pair(false);
        c.hello(BOTH);
        c.option(
            proto::OPT_INFO,
            &go_data("vm", &[proto::INFO_NAME, proto::INFO_DESCRIPTION]),
        );
        let r = c.replies(proto::OPT_INFO);
        assert_eq!(r.last().unwrap().0, proto::REP_ACK);
        let info = |t: u16| {
            r.iter()
                .find(|(k, d)| *k == proto::REP_INFO && d[..2] == t.to_be_bytes())
                .map(|(_, d)| d[2..].to_vec())
        };
        let export = info(proto::INFO_EXPORT).unwrap();
        assert_eq!(&export[..8], &(1u64 << 20).to_be_bytes());
        let flags = u16::from_be_bytes([export[8], export[9]]);
        assert_eq!(flags & proto::FLAG_READ_ONLY, 0);
        assert_ne!(flags & proto::FLAG_SEND_WRITE_ZEROES, 0);
        assert_eq!(
            flags & proto::FLAG_SEND_DF,
            0,
            "DF needs structured replies"
        );
        let sizes = info(proto::INFO_BLOCK_SIZE).unwrap();
        let mut f = Fields::new(&sizes);
        assert_eq!(
            (f.u32(), f.u32(), f.u32()),
            (Some(512), Some(4096), Some(32 << 20))
        );
        assert_eq!(info(proto::INFO_NAME).unwrap(), b"vm");
        assert_eq!(info(proto::INFO_DESCRIPTION).unwrap(), b"a test disk");

        c.option(proto::OPT_INFO, &go_data("other", &[]));
        let r = c.replies(proto::OPT_INFO);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, proto::REP_ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&r[0].1).contains("other"));

        // A name length that runs past the option's data.
        let mut lying = go_data("vm", &[]);
        lying[3] = 200;
        c.option(proto::OPT_INFO, &lying);
        assert_eq!(c.replies(proto::OPT_INFO)[0].0, proto::REP_ERR_INVALID);
        // Trailing bytes after the information requests.
        let mut long = go_data("vm", &[]);
        long.push(0);
        c.option(proto::OPT_GO, &long);
        assert_eq!(c.replies(proto::OPT_GO)[0].0, proto::REP_ERR_INVALID);

        c.option(proto::OPT_GO, &go_data("vm", &[]));
        assert_eq!(c.replies(proto::OPT_GO).last().unwrap().0, proto::REP_ACK);
        transmits(&mut c);
    }

    #[test]
    fn read_only_exports_say_so_and_allow_many_connections() {
        let (mut c, _) = pair(true);
        let (_, flags) = c.start(true, false);
        assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
        assert_ne!(flags & proto::FLAG_CAN_MULTI_CONN, 0);
        assert_ne!(flags & proto::FLAG_SEND_DF, 0);
        assert_eq!(
            flags & (proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES),
            0
        );
    }

    #[test]
    fn export_name_sends_zeroes_unless_told_not_to() {
        for (client_flags, reply_len) in [(proto::FLAG_C_FIXED_NEWSTYLE, 134), (BOTH, 10)] {
            let (mut c, _) = pair(false);
            c.hello(client_flags);
            c.option(proto::OPT_EXPORT_NAME, b"vm");
            let reply = c.recv(reply_len);
            assert_eq!(&reply[..8], &(1u64 << 20).to_be_bytes());
            assert!(reply[10..].iter().all(|b| *b == 0));
            transmits(&mut c);
        }
    }

    #[test]
    fn export_name_of_an_unknown_export_ends_the_session() {
        let (mut c, server) = pair(false);
        c.hello(BOTH);
        c.option(proto::OPT_EXPORT_NAME, b"nope");
        assert!(c.closed());
        server.join().unwrap();
    }

    #[test]
    fn abort_is_acknowledged_and_closes() {
        let (mut c, server) = pair(false);
        c.hello(BOTH);
        c.option(proto::OPT_ABORT, &[]);
        assert_eq!(c.replies(proto::OPT_ABORT)[0].0, proto::REP_ACK);
        assert!(c.closed());
        server.join().unwrap();
    }

    #[test]
    fn meta_contexts_follow_the_base_namespace_rules() {
        let (mut c, _) = pair(false);
        c.hello(BOTH);
        let base = &[proto::BASE_ALLOCATION][..];
        c.option(proto::OPT_SET_META_CONTEXT, &meta_data("", base));
        assert_eq!(
            c.replies(proto::OPT_SET_META_CONTEXT)[0].0,
            proto::REP_ERR_INVALID,
            "structured replies come first"
        );
        c.option(proto::OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.replies(proto::OPT_STRUCTURED_REPLY)[0].0, proto::REP_ACK);
        for (option, queries, expect) in [
            (proto::OPT_LIST_META_CONTEXT, &[][..], true),
            (proto::OPT_LIST_META_CONTEXT, &["base:"][..], true),
            (proto::OPT_LIST_META_CONTEXT, &["x-other:thing"][..], false),
            (proto::OPT_SET_META_CONTEXT, &[][..], false),
            (proto::OPT_SET_META_CONTEXT, &["base:"][..], false),
            (
                proto::OPT_SET_META_CONTEXT,
                &["base:nothing", "qemu:x"][..],
                false,
            ),
            (
                proto::OPT_SET_META_CONTEXT,
                &["x-y:z", proto::BASE_ALLOCATION][..],
                true,
            ),
        ] {
            c.option(option, &meta_data("vm", queries));
            let r = c.replies(option);
            assert_eq!(r.last().unwrap().0, proto::REP_ACK, "{queries:?}");
            assert_eq!(r.len(), if expect { 2 } else { 1 }, "{option} {queries:?}");
            if expect {
                assert_eq!(r[0].0, proto::REP_META_CONTEXT);
                assert_eq!(&r[0].1[4..], proto::BASE_ALLOCATION.as_bytes());
                let id = u32::from_be_bytes(r[0].1[..4].try_into().unwrap());
                let want = if option == proto::OPT_SET_META_CONTEXT {
                    1
                } else {
                    0
                };
                assert_eq!(id, want);
            }
        }
        c.option(proto::OPT_SET_META_CONTEXT, &meta_data("nope", base));
        assert_eq!(
            c.replies(proto::OPT_SET_META_CONTEXT)[0].0,
            proto::REP_ERR_UNKNOWN
        );
        let mut truncated = meta_data("vm", base);
        truncated.pop();
        c.option(proto::OPT_LIST_META_CONTEXT, &truncated);
        assert_eq!(
            c.replies(proto::OPT_LIST_META_CONTEXT)[0].0,
            proto::REP_ERR_INVALID
        );
    }

    #[test]
    fn endless_options_are_cut_off() {
        let (mut c, server) = pair(false);
        c.hello(BOTH);
        for _ in 0..MAX_OPTIONS {
            c.option(proto::OPT_STRUCTURED_REPLY, &[]);
            c.replies(proto::OPT_STRUCTURED_REPLY);
        }
        // The last allowed option was answered; the connection ends without another.
        assert!(c.closed());
        server.join().unwrap();
    }

    #[test]
    fn a_client_vanishing_mid_handshake_ends_only_its_thread() {
        let (mut c, server) = pair(false);
        c.hello(BOTH);
        c.send(&proto::IHAVEOPT.to_be_bytes()[..5]);
        drop(c);
        server.join().unwrap();

        let (mut c, server) = pair(false);
        c.hello(BOTH);
        let mut header = proto::IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        header.extend_from_slice(&10u32.to_be_bytes());
        c.send(&header);
        c.send(&[0, 0, 0]);
        drop(c);
        server.join().unwrap();
    }
}
