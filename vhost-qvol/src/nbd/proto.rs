//! The NBD wire format: every constant and every byte layout the server uses, in one place.
//! All integers are big-endian ("network byte order", proto.md "Conventions"). Section
//! names in comments are those of the NBD protocol document, `doc/proto.md` of
//! <https://github.com/NetworkBlockDevice/nbd>.

// --- Magic numbers -------------------------------------------------------------------------

/// "Newstyle negotiation": the first 64 bits the server sends, ASCII `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "Newstyle negotiation": the second 64 bits the server sends, and the first 64 bits of
/// every option the client sends, ASCII `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// "Fixed newstyle negotiation": the magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// "Request message": `NBD_REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// "Simple reply message": `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// "Structured reply chunk message": `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// --- "Handshake flags" and "Client flags" ----------------------------------------------------

/// `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// --- "Transmission flags" ------------------------------------------------------------------

/// `NBD_FLAG_HAS_FLAGS`: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_SEND_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`: only once structured replies are negotiated.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_CACHE`.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// --- "Option types" ------------------------------------------------------------------------

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS` (answered `NBD_REP_ERR_UNSUP`: the server runs in NOTLS mode).
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS` (experimental; answered `NBD_REP_ERR_UNSUP`).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// --- "Option reply types" ------------------------------------------------------------------

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

/// `NBD_INFO_EXPORT` (`NBD_REP_INFO`).
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- "Request types", "Command flags" --------------------------------------------------------

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// --- "Structured reply flags", "Structured reply types" --------------------------------------

/// `NBD_REPLY_FLAG_DONE`.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// --- "Metadata querying" -------------------------------------------------------------------

/// The one metadata context served ("`base:allocation` metadata context").
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The `base:` namespace as a `NBD_OPT_LIST_META_CONTEXT` wildcard.
pub const BASE_NAMESPACE: &str = "base:";
/// `NBD_STATE_HOLE`.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO`.
pub const STATE_ZERO: u32 = 1 << 1;

// --- "Error values" ------------------------------------------------------------------------

/// `NBD_EPERM`.
pub const EPERM: u32 = 1;
/// `NBD_EIO`.
pub const EIO: u32 = 5;
/// `NBD_EINVAL`.
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`.
pub const ENOTSUP: u32 = 95;

// --- "Size constraints" (advertised with `NBD_INFO_BLOCK_SIZE`) ------------------------------

/// Minimum block size: requests are whole 512-byte sectors, as the disk wants them.
pub const MIN_BLOCK: u32 = 512;
/// Preferred block size: the volume's block (smaller writes read, modify and write it).
pub const PREFERRED_BLOCK: u32 = 4096;
/// Maximum payload of a read or write: 2^25, which "SHOULD NOT be considered a denial of
/// service attack" by either side.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The longest option the server reads (export names and error strings "MUST be no longer
/// than 4096 bytes"; a meta context request holds a few of them): a longer one ends the
/// connection instead of being read into memory.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The longest string the server sends (proto.md "Conventions").
pub const MAX_STRING: usize = 4096;

// --- Encoding --------------------------------------------------------------------------------

/// The server's greeting ("Newstyle negotiation"): `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting(handshake_flags: u16) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// The header of a client option: magic, option, length of its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Must be [`IHAVEOPT`].
    pub magic: u64,
    /// Which option.
    pub option: u32,
    /// How many bytes of data follow.
    pub len: u32,
}

impl OptionHeader {
    /// Decodes the 16 bytes of an option header.
    pub fn decode(bytes: &[u8; 16]) -> Self {
        let mut f = Fields::new(bytes);
        Self {
            magic: f.u64().unwrap_or_default(),
            option: f.u32().unwrap_or_default(),
            len: f.u32().unwrap_or_default(),
        }
    }
}

/// An option reply ("Fixed newstyle negotiation"): magic, option, reply type, length, data.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// What `NBD_OPT_EXPORT_NAME` answers: export size, transmission flags, and 124 zero bytes
/// unless the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if zeroes {
        out.resize(out.len() + 124, 0);
    }
    out
}

/// `NBD_REP_INFO` data for `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = INFO_EXPORT.to_be_bytes().to_vec();
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// `NBD_REP_INFO` data for `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut out = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// `NBD_REP_INFO` data for a string item (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn info_string(info: u16, text: &str) -> Vec<u8> {
    let mut out = info.to_be_bytes().to_vec();
    out.extend_from_slice(clip(text).as_bytes());
    out
}

/// `NBD_REP_SERVER` data: name length, name, then a description for humans.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let name = clip(name);
    let mut out = len32(name.len()).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(clip(description).as_bytes());
    out
}

/// `NBD_REP_META_CONTEXT` data: context id and name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// A request of the transmission phase ("Request message").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`NBD_CMD_*`).
    pub kind: u16,
    /// Opaque to the server; echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte length (of the payload, for a write).
    pub len: u32,
}

/// The size of a request header.
pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Decodes a request header; `Err` holds a magic that is not [`REQUEST_MAGIC`].
    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Result<Self, u32> {
        let mut f = Fields::new(bytes);
        let magic = f.u32().unwrap_or_default();
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Self {
            flags: f.u16().unwrap_or_default(),
            kind: f.u16().unwrap_or_default(),
            cookie: f.u64().unwrap_or_default(),
            offset: f.u64().unwrap_or_default(),
            len: f.u32().unwrap_or_default(),
        })
    }

    /// Encodes the request (the client's side: for tests).
    #[cfg(test)]
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// A simple reply ("Simple reply message"): magic, error, cookie (read data follows).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// The header of a structured reply chunk ("Structured reply chunk message").
pub fn chunk_header(flags: u16, reply_type: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&reply_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..].copy_from_slice(&len.to_be_bytes());
    out
}

/// The payload of an `NBD_REPLY_TYPE_ERROR` chunk (`offset: None`) or an
/// `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: error, message length, message, [offset].
pub fn error_payload(error: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let message = clip(message);
    let mut out = error.to_be_bytes().to_vec();
    // clip() keeps it within MAX_STRING, far below u16::MAX.
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    if let Some(offset) = offset {
        out.extend_from_slice(&offset.to_be_bytes());
    }
    out
}

/// The payload of an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: offset and hole size.
pub fn hole_payload(offset: u64, len: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&offset.to_be_bytes());
    out[8..].copy_from_slice(&len.to_be_bytes());
    out
}

/// The payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: context id, then (length, flags)
/// per extent.
pub fn block_status_payload(context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * extents.len());
    out.extend_from_slice(&context.to_be_bytes());
    for (len, flags) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    out
}

/// A length that the caller has bounded (by [`MAX_OPTION_LEN`], [`MAX_STRING`] or
/// [`MAX_PAYLOAD`]) as the protocol's 32-bit field.
fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// `text` cut to at most [`MAX_STRING`] bytes, at a character boundary.
pub fn clip(text: &str) -> &str {
    if text.len() <= MAX_STRING {
        return text;
    }
    let mut end = MAX_STRING;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

// --- Decoding option data ------------------------------------------------------------------

/// Big-endian fields read one after another from client data; each read is `None` past the
/// end, so a short or lying length field never panics.
#[derive(Debug)]
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    /// Fields over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).and_then(|b| b.try_into().ok())
    }

    /// The next big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    /// The next big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    /// The next big-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string prefixed by its 32-bit length.
    pub fn string32(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.bytes(len)
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_refuses_a_wrong_magic() {
        let req = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let bytes = req.encode();
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&bytes), Ok(req));
        let mut bad = bytes;
        bad[0] = 0x12;
        assert_eq!(Request::decode(&bad), Err(0x1260_9513));
    }

    #[test]
    fn encodings_match_the_protocol_document() {
        // "S: 64 bits, NBDMAGIC; S: 64 bits, IHAVEOPT; S: 16 bits, handshake flags"
        assert_eq!(&greeting(3)[..8], b"NBDMAGIC");
        assert_eq!(&greeting(3)[8..16], b"IHAVEOPT");
        assert_eq!(&greeting(3)[16..], &[0, 3]);
        let reply = option_reply(OPT_GO, REP_ACK, b"");
        assert_eq!(reply.len(), 20);
        assert_eq!(&reply[..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(info_export(1 << 30, 1).len(), 12);
        assert_eq!(info_block_size(512, 4096, MAX_PAYLOAD).len(), 14);
        assert_eq!(export_name_reply(1, 1, true).len(), 134);
        assert_eq!(export_name_reply(1, 1, false).len(), 10);
        assert_eq!(error_payload(EIO, "x", None).len(), 7);
        assert_eq!(error_payload(EIO, "x", Some(9)).len(), 15);
        assert_eq!(block_status_payload(1, &[(512, 3), (512, 0)]).len(), 20);
        assert_eq!(chunk_header(1, 2, 3, 4)[..4], [0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(simple_reply(5, 7)[..4], [0x67, 0x44, 0x66, 0x98]);
    }

    #[test]
    fn fields_stop_at_the_end_instead_of_panicking() {
        let mut f = Fields::new(&[0, 0, 0, 9, b'a']);
        assert_eq!(f.string32(), None);
        let mut f = Fields::new(&[0, 0, 0, 1, b'a', 7]);
        assert_eq!(f.string32(), Some(&b"a"[..]));
        assert_eq!(f.u16(), None);
        assert_eq!(f.bytes(1), Some(&[7][..]));
        assert!(f.is_empty());
    }

    #[test]
    fn long_strings_are_clipped_at_a_character_boundary() {
        let text = "é".repeat(3000);
        let clipped = clip(&text);
        assert!(clipped.len() <= MAX_STRING);
        assert!(clipped.chars().all(|c| c == 'é'));
        assert_eq!(error_payload(EIO, &text, None).len(), 6 + clipped.len());
    }
}
