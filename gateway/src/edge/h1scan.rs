//! What hyper's HTTP/1.1 server reads but does not pass on, recovered from the bytes themselves.
//!
//! Three facts about a request head never reach the service, and the gateway must refuse on
//! each of them:
//!
//! - a `#` in the request-target: the `http` crate ends the URI at the `#`, so
//!   `GET /x#y?operation=Evil` arrives as `GET /x`;
//! - a `Content-Length` next to a `Transfer-Encoding`: hyper drops the length and keeps chunked,
//!   so the pair (the classic smuggling vector) looks like chunked alone;
//! - a `Content-Length` of at least `u64::MAX - 1`: hyper answers it with 431, a head problem,
//!   where the client is owed a 413.
//!
//! [`HeadScan`] sees every plaintext byte hyper reads, in reads cut anywhere, and keeps under a
//! kilobyte of state, allocated with it. It follows the connection's framing the way hyper does (request line,
//! header lines, then a body of `Content-Length` bytes or of chunks) so that it knows where each
//! request line starts, even when a body does not end in a line feed (a binary SCEP body almost
//! never does, and the next request's line would otherwise be glued to its last bytes). Body
//! bytes are counted, not searched: a fake request line inside a body is never taken for a
//! head, and a body costs nothing to scan.
//!
//! When the bytes stop following a framing hyper accepts (hyper then answers 400 or 431 and
//! closes the connection), the scanner is lost: from there on it goes line by line, takes any
//! line that looks like a request line (`METHOD target HTTP/1.x`, the method 1 to 20 uppercase
//! letters) for the start of a head, scans bodies like heads, and pairs records with requests by
//! key only. Lost, it misses a request line glued to the end of a body.
//!
//! A clean connection costs one `memchr2` pass over each head, a few comparisons at each line
//! end, and nothing per body byte: no allocation, and no per-byte loop but over a Content-Length
//! value and the digits of a chunk size.

use memchr::memchr2_iter;

/// The first bytes of a line kept across reads: the longest method the lost rule takes (20) and
/// its space, or a header name up to its colon (`transfer-encoding`, 17, has room for 14 spaces
/// before the colon; hyper refuses even one). Values are parsed as they stream past, so no line
/// needs more. Small enough for `Default` to be derived.
const HEAD_CAP: usize = 32;
/// The last bytes of a line kept across reads: ` HTTP/1.1` and a CR.
const TAIL_CAP: usize = 10;
/// ` HTTP/1.1`, the end of a request line.
const VERSION_LEN: usize = 9;
/// The longest method the lost rule takes for one.
const MAX_METHOD: usize = 20;
/// Records kept for requests hyper has not handed over yet. Only a client pipelining suspicious
/// requests fills it.
const QUEUE_CAP: usize = 16;
/// hyper's largest body length is `u64::MAX - 2`; one more is a 431 from hyper.
const ABSURD_LENGTH: u64 = u64::MAX - 1;

/// What the scanner saw of one request's head that hyper does not show.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Suspicion {
    /// The request-target had a `#`: hyper's URI ends before it.
    pub fragment: bool,
    /// The head had both a `Content-Length` and a `Transfer-Encoding` (any order, any case).
    pub length_and_chunked: bool,
}

impl Suspicion {
    fn any(self) -> bool {
        self.fragment || self.length_and_chunked
    }

    fn or(self, other: Suspicion) -> Suspicion {
        Suspicion {
            fragment: self.fragment || other.fragment,
            length_and_chunked: self.length_and_chunked || other.length_and_chunked,
        }
    }
}

/// Scans the bytes of an HTTP/1.1 connection as they are read.
///
/// Feed it every byte hyper reads, in order, once ([`feed`](Self::feed)); call
/// [`take`](Self::take) exactly once for every request hyper hands the service, whatever then
/// becomes of the request. hyper's HTTP/1.1 dispatches one request at a time, in order, so the
/// n-th call is about the n-th head: that pairing is what tells a clean `GET /a` from the
/// `GET /a#b` pipelined behind it, which have the same key. The key checks the pairing, and
/// is all there is to go by for heads read after the scanner lost the framing.
#[derive(Debug, Default)]
pub struct HeadScan {
    /// Where in the connection's framing the next byte is.
    mode: Mode,
    /// The line being read, as far as it has come.
    line: Line,
    /// The value being parsed out of that line.
    field: Field,
    /// The head being read.
    head: Head,
    /// Heads read in step, and records of the suspicious ones not yet taken.
    queue: Queue,
    /// Calls to `take` so far: the number of the request the next call is about.
    taken: u64,
    /// A `Content-Length` of at least `u64::MAX - 1` since the last `take_absurd_length`.
    absurd: bool,
}

impl HeadScan {
    /// Feeds bytes just read (any split).
    ///
    /// One `memchr2` pass for line feeds and `#` over head bytes (a record of the first `#` of a
    /// line at a hit, a few comparisons at a line end); body bytes are counted and skipped.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            rest = match self.mode {
                Mode::Body(left) | Mode::ChunkData(left) => {
                    // n <= rest.len(), and n <= left (when left does not fit a usize, rest.len()
                    // is below it).
                    let n = usize::try_from(left).map_or(rest.len(), |l| l.min(rest.len()));
                    let left = left.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX));
                    self.mode = match (self.mode, left) {
                        (Mode::Body(_), 0) => Mode::Boundary,
                        (Mode::Body(_), left) => Mode::Body(left),
                        (_, 0) => Mode::ChunkEnd,
                        (_, left) => Mode::ChunkData(left),
                    };
                    rest.get(n..).unwrap_or_default()
                }
                _ => {
                    let used = self.scan(rest);
                    rest.get(used..).unwrap_or_default()
                }
            };
        }
    }

    /// Called by the service for each request hyper parsed, with `key` = method length + 1 +
    /// length of the request-target up to (not including) any `#`. Returns what the scanner
    /// recorded for that request's head, and forgets that record.
    ///
    /// This is the n-th call, so it is about the n-th head: when the scanner read that head in
    /// step with the framing and its key is `key`, the answer is that head's record or nothing,
    /// which tells a clean `GET /a` from the `GET /a#b` pipelined behind it (same key). Otherwise
    /// (a head read after the scanner lost the framing, a call skipped, a key the scanner
    /// computed otherwise) any record that may be this request's answers: the n-th head's, one
    /// read while lost with this key (forgotten), or a later head's with this key (kept, as it
    /// may still be asked for): a refusal too many rather than a `#` let through.
    ///
    /// On a clean connection the queue is empty and this is one comparison.
    pub fn take(&mut self, key: usize) -> Suspicion {
        let number = self.taken;
        self.taken = self.taken.wrapping_add(1);
        self.queue.take(number, key)
    }

    /// True when a Content-Length value of at least `u64::MAX - 1` (or past `u64::MAX`) was seen
    /// in a head since the last call (cleared by the call): hyper's 431 for it is a 413.
    pub fn take_absurd_length(&mut self) -> bool {
        std::mem::take(&mut self.absurd)
    }

    /// Scans lines until the bytes run out or a body starts; returns the bytes used.
    fn scan(&mut self, bytes: &[u8]) -> usize {
        let mut start = 0;
        for at in memchr2_iter(b'\n', b'#', bytes) {
            // Hits come in order, each at or after `start` (the byte after the last line feed).
            let into_line = at.saturating_sub(start);
            if bytes.get(at) == Some(&b'#') {
                if self.line.hash.is_none() {
                    self.line.hash = Some(self.line.len.saturating_add(into_line));
                }
                continue;
            }
            self.end_line(bytes.get(start..at).unwrap_or_default());
            start = at.saturating_add(1);
            if matches!(self.mode, Mode::Body(_) | Mode::ChunkData(_)) {
                return start;
            }
        }
        let rest = bytes.get(start..).unwrap_or_default();
        if !rest.is_empty() {
            let before = self.line.len;
            self.line.append(rest);
            let head = &mut self.head;
            advance_field(&mut self.field, head, self.line.first(), rest, before);
        }
        bytes.len()
    }

    /// The line whose last bytes (without the line feed) are `seg` is complete.
    fn end_line(&mut self, seg: &[u8]) {
        // Only between requests, or lost, can a line be a request line.
        let request = matches!(self.mode, Mode::Boundary | Mode::Lost { .. });
        let facts = if self.line.len == 0 {
            // The whole line is in this read: looked at where it is, nothing copied.
            let first = seg.get(..HEAD_CAP).unwrap_or(seg);
            let last = seg.get(seg.len().saturating_sub(TAIL_CAP)..).unwrap_or(seg);
            advance_field(&mut self.field, &mut self.head, first, seg, 0);
            Facts::of(first, last, seg.len(), self.line.hash, request)
        } else {
            let before = self.line.len;
            self.line.append(seg);
            let line = &self.line;
            advance_field(&mut self.field, &mut self.head, line.first(), seg, before);
            Facts::of(line.first(), line.last(), line.len, line.hash, request)
        };
        self.on_line(facts);
        self.line.len = 0;
        self.line.hash = None;
        self.field = Field::for_mode(self.mode);
    }

    fn on_line(&mut self, line: Facts) {
        let field = std::mem::take(&mut self.field);
        match self.mode {
            // hyper skips empty lines before a request line; whatever else comes first is one,
            // whatever its method (hyper takes any token): were it not, hyper would refuse it.
            Mode::Boundary => {
                if line.content != 0 {
                    match line.key {
                        Some(key) => self.open_head(key, line.fragment, true),
                        None => self.mode = Mode::Lost { in_head: false },
                    }
                }
            }
            Mode::Head => {
                if line.content == 0 {
                    self.close_head();
                } else {
                    self.end_header(field);
                }
            }
            // hyper's chunked decoder: hex size, optional spaces or extension, CR LF; then the
            // data, CR LF; after the last (size 0) chunk, trailer lines and an empty line.
            Mode::ChunkSize => {
                self.mode = match field {
                    Field::Hex(hex) if line.has_cr => match hex.size() {
                        Some(0) => Mode::Trailers { fresh: true },
                        Some(size) => Mode::ChunkData(size),
                        None => Mode::LOST,
                    },
                    _ => Mode::LOST,
                };
            }
            Mode::ChunkEnd => {
                self.mode = if line.is_bare_cr() {
                    Mode::ChunkSize
                } else {
                    Mode::LOST
                };
            }
            // hyper reads a trailer line to its CR LF (a bare LF is part of it) and ends the
            // trailers at a CR LF right after the size line's or a trailer's.
            Mode::Trailers { fresh } => {
                self.mode = if fresh && line.is_bare_cr() {
                    Mode::Boundary
                } else {
                    Mode::Trailers { fresh: line.has_cr }
                };
            }
            // Lost: any line that looks like a request line starts a head (a fake one in a body
            // included: it may push a record no request will ask for, which the key keeps
            // apart and the queue's bound ages out).
            Mode::Lost { in_head } => match line.key {
                Some(key) if line.strict => self.open_head(key, line.fragment, false),
                _ if !in_head => {}
                _ if line.content == 0 => self.close_head(),
                _ => self.end_header(field),
            },
            // These bytes are counted in `feed`, never scanned.
            Mode::Body(_) | Mode::ChunkData(_) => {}
        }
    }

    fn open_head(&mut self, key: usize, fragment: bool, in_step: bool) {
        let number = in_step.then(|| self.queue.open(key));
        self.head = Head {
            key,
            fragment,
            number,
            ..Head::default()
        };
        self.mode = if in_step {
            Mode::Head
        } else {
            Mode::Lost { in_head: true }
        };
    }

    fn end_header(&mut self, field: Field) {
        if let Field::Length(value) = field {
            self.absurd |= value.is_absurd();
            self.head.length = self.head.length.and(value.length());
        }
    }

    /// The empty line after a head: records it if it hid anything, and finds its body as hyper
    /// does (Transfer-Encoding wins; then one Content-Length, repeated or not; then none).
    fn close_head(&mut self) {
        let head = std::mem::take(&mut self.head);
        let found = Suspicion {
            fragment: head.fragment,
            length_and_chunked: head.length_seen && head.chunked,
        };
        if found.any() {
            self.queue.push(Record {
                number: head.number,
                key: head.key,
                found,
            });
        }
        self.mode = match self.mode {
            Mode::Head if head.chunked => Mode::ChunkSize,
            Mode::Head => match head.length {
                Length::Absent | Length::Valid(0) => Mode::Boundary,
                Length::Valid(n) => Mode::Body(n),
                // hyper answers 400 or 431 and closes.
                Length::Invalid => Mode::LOST,
            },
            _ => Mode::LOST,
        };
    }
}

/// Where the next byte stands in the connection's framing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between requests: empty lines, then a request line.
    #[default]
    Boundary,
    /// Header lines of a head whose request line came at a boundary.
    Head,
    /// A Content-Length body: bytes still to come.
    Body(u64),
    /// A chunked body: a chunk-size line next.
    ChunkSize,
    /// A chunk's data: bytes still to come.
    ChunkData(u64),
    /// The CR LF after a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk, to an empty line; `fresh` after a CR LF.
    Trailers { fresh: bool },
    /// The framing is no longer followed: heads are found by the look of their request line.
    Lost { in_head: bool },
}

impl Mode {
    const LOST: Mode = Mode::Lost { in_head: false };
}

/// The line being read: its length, the first and last few bytes, and where its first `#` is.
#[derive(Debug, Default)]
struct Line {
    /// Bytes so far, a CR included, the LF not.
    len: usize,
    first: [u8; HEAD_CAP],
    /// The last `min(len, TAIL_CAP)` bytes, at the end of the array.
    last: [u8; TAIL_CAP],
    hash: Option<usize>,
}

impl Line {
    fn append(&mut self, seg: &[u8]) {
        if let Some(room) = self.first.get_mut(self.len..) {
            let n = room.len().min(seg.len());
            if let (Some(dst), Some(src)) = (room.get_mut(..n), seg.get(..n)) {
                dst.copy_from_slice(src);
            }
        }
        if let Some(from) = seg.len().checked_sub(TAIL_CAP) {
            if let Some(src) = seg.get(from..) {
                self.last.copy_from_slice(src);
            }
        } else {
            // Shift left by seg.len() (< TAIL_CAP), then put seg at the end.
            self.last.rotate_left(seg.len());
            if let Some(dst) = self.last.get_mut(TAIL_CAP - seg.len()..) {
                dst.copy_from_slice(seg);
            }
        }
        self.len = self.len.saturating_add(seg.len());
    }

    fn first(&self) -> &[u8] {
        self.first.get(..self.len.min(HEAD_CAP)).unwrap_or_default()
    }

    fn last(&self) -> &[u8] {
        self.last
            .get(TAIL_CAP - self.len.min(TAIL_CAP)..)
            .unwrap_or_default()
    }
}

/// What a complete line is, from its first and last bytes.
#[derive(Debug, Clone, Copy)]
struct Facts {
    /// Length without a CR at the end.
    content: usize,
    has_cr: bool,
    /// Ends in ` HTTP/1.1` or ` HTTP/1.0` with room for a method and a space before: the key
    /// (offset of the first `#`, else the length before the version).
    key: Option<usize>,
    fragment: bool,
    /// And begins with 1..=20 uppercase letters and a space: the look of a request line.
    strict: bool,
}

impl Facts {
    fn of(first: &[u8], last: &[u8], len: usize, hash: Option<usize>, request: bool) -> Facts {
        let has_cr = last.last() == Some(&b'\r');
        // A CR at the end means len >= 1.
        let content = len.saturating_sub(usize::from(has_cr));
        let versioned = request && content >= VERSION_LEN + 2 && {
            let end = last.len().saturating_sub(usize::from(has_cr));
            let version = end
                .checked_sub(VERSION_LEN)
                .and_then(|start| last.get(start..end));
            matches!(version, Some(b" HTTP/1.1" | b" HTTP/1.0"))
        };
        let key = versioned.then(|| hash.unwrap_or(content - VERSION_LEN));
        let strict = key.is_some() && {
            let method = first
                .iter()
                .take(MAX_METHOD + 1)
                .take_while(|b| b.is_ascii_uppercase())
                .count();
            (1..=MAX_METHOD).contains(&method)
                && first.get(method) == Some(&b' ')
                && method + 1 + VERSION_LEN <= content
        };
        Facts {
            content,
            has_cr,
            key,
            fragment: hash.is_some(),
            strict,
        }
    }

    /// CR LF and nothing else.
    fn is_bare_cr(&self) -> bool {
        self.has_cr && self.content == 0
    }
}

/// The head being read.
#[derive(Debug, Default)]
struct Head {
    key: usize,
    fragment: bool,
    /// Its number among the heads read in step with the framing; none once lost.
    number: Option<u64>,
    /// A header named content-length (whatever its value).
    length_seen: bool,
    /// A header named transfer-encoding.
    chunked: bool,
    length: Length,
}

/// The body length the head's Content-Length headers give, as hyper reads them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Length {
    #[default]
    Absent,
    Valid(u64),
    /// Not digits, differing values, or too large: hyper refuses the request.
    Invalid,
}

impl Length {
    fn and(self, next: Option<u64>) -> Length {
        match (self, next) {
            (Length::Absent, Some(n)) => Length::Valid(n),
            (Length::Valid(a), Some(b)) if a == b => Length::Valid(a),
            _ => Length::Invalid,
        }
    }
}

/// A value parsed out of a line as its bytes arrive, whatever the reads' cuts.
#[derive(Debug, Default, Clone, Copy)]
enum Field {
    #[default]
    Idle,
    /// A header line whose name has not reached its colon yet.
    Name,
    /// A Content-Length value.
    Length(Decimal),
    /// A chunk-size line.
    Hex(Hex),
}

impl Field {
    fn for_mode(mode: Mode) -> Field {
        match mode {
            Mode::Head | Mode::Lost { in_head: true } => Field::Name,
            Mode::ChunkSize => Field::Hex(Hex::default()),
            _ => Field::Idle,
        }
    }
}

/// Moves `field` on over `seg`, the bytes of the line from offset `before`; `first` is the
/// line's first bytes so far (`seg` included).
fn advance_field(field: &mut Field, head: &mut Head, first: &[u8], seg: &[u8], before: usize) {
    match field {
        Field::Idle => {}
        Field::Name => match name_of(first) {
            Name::Pending => {}
            Name::Other => *field = Field::Idle,
            Name::Chunked => {
                head.chunked = true;
                *field = Field::Idle;
            }
            Name::Length { colon } => {
                head.length_seen = true;
                // The name was pending until now, so the colon is not in the first `before`
                // bytes: the value so far is all in `seg`.
                let value = colon
                    .checked_sub(before)
                    .and_then(|at| seg.get(at + 1..))
                    .unwrap_or_default();
                let mut decimal = Decimal::default();
                decimal.feed(value);
                *field = Field::Length(decimal);
            }
        },
        Field::Length(decimal) => decimal.feed(seg),
        Field::Hex(hex) => hex.feed(seg),
    }
}

/// What a header line's first bytes say of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    /// Could still be content-length or transfer-encoding: more bytes needed.
    Pending,
    Other,
    Length {
        colon: usize,
    },
    Chunked,
}

/// Most names are told apart by their first byte. Spaces or tabs before the colon still name
/// the header (`Content-Length : 5`), for safety: hyper refuses them, and the head with them.
fn name_of(first: &[u8]) -> Name {
    let (name, length): (&[u8], bool) = match first.first() {
        None => return Name::Pending,
        Some(b'c' | b'C') => (b"content-length", true),
        Some(b't' | b'T') => (b"transfer-encoding", false),
        Some(_) => return Name::Other,
    };
    let seen = first.len().min(name.len());
    let (first_seen, name_seen) = (first.get(..seen), name.get(..seen));
    if !first_seen.is_some_and(|f| name_seen.is_some_and(|n| f.eq_ignore_ascii_case(n))) {
        return Name::Other;
    }
    let after = first.get(name.len()..).unwrap_or_default();
    match after.iter().position(|b| !matches!(b, b' ' | b'\t')) {
        Some(i) if after.get(i) == Some(&b':') => {
            if length {
                Name::Length {
                    colon: name.len() + i,
                }
            } else {
                Name::Chunked
            }
        }
        Some(_) => Name::Other,
        // A name padded that far is neither (hyper refuses even one space).
        None if first.len() >= HEAD_CAP => Name::Other,
        None => Name::Pending,
    }
}

/// A Content-Length value: optional spaces, digits, optional spaces (and the line's CR). Read as
/// hyper does, checked arithmetic and all: leading zeros are fine (hyper reads 0005 as 5), more
/// than 20 significant digits always overflow.
#[derive(Debug, Default, Clone, Copy)]
struct Decimal {
    state: DecimalState,
    digits: bool,
    value: u64,
    overflow: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum DecimalState {
    #[default]
    Before,
    Digits,
    After,
    Bad,
}

impl Decimal {
    /// Per byte, but only over a Content-Length value, and it stops at the first byte that
    /// spoils it.
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.state = match (self.state, b) {
                (DecimalState::Bad, _) => return,
                (DecimalState::Before, b' ' | b'\t') => DecimalState::Before,
                (DecimalState::Before | DecimalState::Digits, b'0'..=b'9') => {
                    self.digits = true;
                    if !self.overflow {
                        match self
                            .value
                            .checked_mul(10)
                            .and_then(|v| v.checked_add(u64::from(b - b'0')))
                        {
                            Some(v) => self.value = v,
                            None => self.overflow = true,
                        }
                    }
                    DecimalState::Digits
                }
                (DecimalState::Digits | DecimalState::After, b' ' | b'\t' | b'\r') => {
                    DecimalState::After
                }
                _ => DecimalState::Bad,
            };
        }
    }

    /// The digits after the spaces are at least `u64::MAX - 1`, or past `u64::MAX`.
    fn is_absurd(&self) -> bool {
        self.digits && (self.overflow || self.value >= ABSURD_LENGTH)
    }

    /// The body length hyper would read, if it would.
    fn length(&self) -> Option<u64> {
        let clean = matches!(self.state, DecimalState::Digits | DecimalState::After);
        (clean && !self.is_absurd()).then_some(self.value)
    }
}

/// A chunk size: the hex digits a chunk-size line begins with.
#[derive(Debug, Default, Clone, Copy)]
struct Hex {
    digits: bool,
    value: u64,
    overflow: bool,
    done: bool,
}

impl Hex {
    /// Per byte, but only over the leading digits of a chunk-size line.
    fn feed(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        for &b in bytes {
            let Some(d) = char::from(b).to_digit(16) else {
                self.done = true;
                return;
            };
            self.digits = true;
            if !self.overflow {
                match self
                    .value
                    .checked_mul(16)
                    .and_then(|v| v.checked_add(u64::from(d)))
                {
                    Some(v) => self.value = v,
                    None => self.overflow = true,
                }
            }
        }
    }

    /// hyper refuses a line without a digit first, and a size past `u64::MAX`.
    fn size(&self) -> Option<u64> {
        (self.digits && !self.overflow).then_some(self.value)
    }
}

fn ring_slot(number: u64) -> usize {
    // Below QUEUE_CAP, so it fits.
    usize::try_from(number % QUEUE_CAP as u64).unwrap_or_default()
}

/// A suspicious head, waiting for its request.
#[derive(Debug, Default, Clone, Copy)]
struct Record {
    number: Option<u64>,
    key: usize,
    found: Suspicion,
}

/// The heads read in step (their number and the keys of the last few), and the records of the
/// suspicious ones in the order they ended, at most [`QUEUE_CAP`].
#[derive(Debug, Default)]
struct Queue {
    /// Heads read in step: the next one's number.
    heads: u64,
    /// The keys of the last [`QUEUE_CAP`] heads read in step, at their number modulo the size.
    keys: [usize; QUEUE_CAP],
    items: [Record; QUEUE_CAP],
    len: usize,
    /// Records pushed out by a full queue: the highest head number among them, and what they
    /// held together. Those requests are owed a refusal the queue can no longer tell apart.
    evicted: Option<(u64, Suspicion)>,
}

impl Queue {
    /// A head read in step begins: its number.
    fn open(&mut self, key: usize) -> u64 {
        let number = self.heads;
        if let Some(slot) = self.keys.get_mut(ring_slot(number)) {
            *slot = key;
        }
        self.heads = self.heads.wrapping_add(1);
        number
    }

    /// The key of head `number`, if it is one of the last few read in step.
    fn key_of(&self, number: u64) -> Option<usize> {
        let behind = self.heads.checked_sub(number)?;
        let recent = (1..=QUEUE_CAP as u64).contains(&behind);
        recent.then(|| self.keys.get(ring_slot(number)).copied())?
    }

    fn live(&self) -> &[Record] {
        self.items.get(..self.len).unwrap_or_default()
    }

    fn remove(&mut self, i: usize) -> Record {
        let Some(record) = self.live().get(i).copied() else {
            return Record::default();
        };
        // i < len <= QUEUE_CAP: a non-empty range, rotated by one.
        if let Some(tail) = self.items.get_mut(i..self.len) {
            tail.rotate_left(1);
        }
        self.len -= 1;
        record
    }

    /// Full, a queue makes room by dropping the oldest record of a head read while lost (most
    /// likely a fake in a body), else the oldest record, whose request is then refused blind.
    fn push(&mut self, record: Record) {
        if self.len >= QUEUE_CAP {
            let oldest_lost = self.live().iter().position(|r| r.number.is_none());
            let gone = self.remove(oldest_lost.unwrap_or(0));
            if let Some(number) = gone.number {
                self.evicted = Some(match self.evicted {
                    Some((upto, found)) => (upto.max(number), found.or(gone.found)),
                    None => (number, gone.found),
                });
            }
        }
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = record;
            self.len += 1;
        }
    }

    fn take(&mut self, number: u64, key: usize) -> Suspicion {
        if self.len == 0 && self.evicted.is_none() {
            return Suspicion::default();
        }
        // Records of earlier requests, left when a call was skipped.
        while let Some(i) = self
            .live()
            .iter()
            .position(|r| r.number.is_some_and(|n| n < number))
        {
            self.remove(i);
        }
        let live = self.live();
        let own = live.iter().position(|r| r.number == Some(number));
        if self.key_of(number) == Some(key) {
            // In step, and the key agrees: head `number` is this request, and only its record
            // counts (a later head with the same key is a later request).
            if let Some(i) = own {
                return self.remove(i).found;
            }
        } else {
            // A head read while lost, a call skipped, or a key computed otherwise: whatever
            // record may be this request's, refused rather than let through.
            let lost = || live.iter().position(|r| r.number.is_none() && r.key == key);
            if let Some(i) = own.or_else(lost) {
                return self.remove(i).found;
            }
            if let Some(later) = live.iter().find(|r| r.key == key) {
                return later.found;
            }
        }
        match self.evicted {
            Some((upto, found)) if number <= upto => found,
            _ => {
                self.evicted = None;
                Suspicion::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLEAN: Suspicion = Suspicion {
        fragment: false,
        length_and_chunked: false,
    };
    const FRAGMENT: Suspicion = Suspicion {
        fragment: true,
        length_and_chunked: false,
    };
    const PAIR: Suspicion = Suspicion {
        fragment: false,
        length_and_chunked: true,
    };
    const BOTH: Suspicion = Suspicion {
        fragment: true,
        length_and_chunked: true,
    };

    /// The key the service computes: method, space, request-target up to any `#`.
    fn key(request_line: &str) -> usize {
        let (method, rest) = request_line.split_once(' ').unwrap();
        let target = rest.rsplit_once(' ').unwrap().0;
        method.len() + 1 + target.find('#').unwrap_or(target.len())
    }

    /// The cuts every input is fed in: whole, a byte at a time, a few chunk sizes, in two at
    /// every position (at the ends and every 997th byte for long inputs), and in three at every
    /// pair of positions for very short ones.
    fn cuts(input: &[u8]) -> Vec<Vec<&[u8]>> {
        let n = input.len();
        let mut all: Vec<Vec<&[u8]>> = vec![vec![input], input.chunks(1).collect()];
        for size in [2, 3, 7, 16, 61, 4096] {
            if size < n {
                all.push(input.chunks(size).collect());
            }
        }
        for i in 1..n {
            if n <= 2048 || i < 80 || n - i < 80 || i % 997 == 0 {
                let (a, b) = input.split_at(i);
                all.push(vec![a, b]);
            }
        }
        if n <= 96 {
            for i in 1..n {
                for j in i + 1..n {
                    all.push(vec![&input[..i], &input[i..j], &input[j..]]);
                }
            }
        }
        all
    }

    fn fed(pieces: &[&[u8]]) -> HeadScan {
        let mut scan = HeadScan::default();
        for piece in pieces {
            scan.feed(piece);
        }
        scan
    }

    /// Feeds `input` in every cut, then takes each request's key in order: each must give its
    /// suspicion, the absurd flag must be `absurd`, and no record may be left over.
    fn check(input: &[u8], requests: &[(usize, Suspicion)], absurd: bool) {
        for pieces in cuts(input) {
            let mut scan = fed(&pieces);
            let sizes: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
            for (i, &(key, want)) in requests.iter().enumerate() {
                assert_eq!(
                    scan.take(key),
                    want,
                    "request {i}, key {key}, cut {sizes:?}"
                );
            }
            assert_eq!(scan.take_absurd_length(), absurd, "absurd, cut {sizes:?}");
            assert!(
                !scan.take_absurd_length(),
                "the flag is cleared by the call"
            );
            assert_eq!(scan.queue.live().len(), 0, "records left, cut {sizes:?}");
        }
    }

    fn request(line: &str, headers: &[&str]) -> String {
        let mut head = format!("{line}\r\n");
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head
    }

    #[test]
    fn fragment_in_the_target_is_recorded_under_the_uri_hyper_keeps() {
        let line = "GET /x#y?operation=Evil HTTP/1.1";
        assert_eq!(key(line), 6);
        check(
            request(line, &["Host: a"]).as_bytes(),
            &[(6, FRAGMENT)],
            false,
        );
        for line in [
            "GET /cgi-bin/pkiclient.exe?#operation=GetCACert HTTP/1.1",
            "GET /cgi-bin/pkiclient.exe#?operation=GetCACert HTTP/1.1",
            "GET /# HTTP/1.1",
            "POST /p?operation=PKIOperation# HTTP/1.1",
            "GET http://host/x#y HTTP/1.1",
            "GET /x#y#z HTTP/1.0",
        ] {
            check(
                request(line, &[]).as_bytes(),
                &[(key(line), FRAGMENT)],
                false,
            );
        }
    }

    #[test]
    fn clean_requests_record_nothing() {
        for line in [
            "GET /cgi-bin/pkiclient.exe?operation=GetCACert&message=ca HTTP/1.1",
            "GET / HTTP/1.0",
            "OPTIONS * HTTP/1.1",
            "GET http://host:443/x?y HTTP/1.1",
        ] {
            let input = request(line, &["Host: a", "X-Note: has a # in it", "Accept: */*"]);
            check(input.as_bytes(), &[(key(line), CLEAN)], false);
            let scan = fed(&[input.as_bytes()]);
            assert_eq!(scan.queue.live().len(), 0);
            assert_eq!(scan.mode, Mode::Boundary);
        }
    }

    #[test]
    fn length_and_chunked_in_either_order_and_any_case() {
        let line = "POST /p HTTP/1.1";
        let lengths = ["Content-Length: 5", "content-length: 5", "CONTENT-LENGTH:5"];
        let chunked = [
            "Transfer-Encoding: chunked",
            "transfer-encoding: chunked",
            "TRANSFER-encoding:\tchunked",
        ];
        for cl in lengths {
            for te in chunked {
                for headers in [[cl, te], [te, cl]] {
                    let mut input = request(line, &["Host: a", headers[0], headers[1]]);
                    input.push_str("0\r\n\r\n");
                    check(input.as_bytes(), &[(key(line), PAIR)], false);
                }
            }
        }
    }

    #[test]
    fn a_space_before_the_colon_still_names_the_header() {
        let line = "POST /p HTTP/1.1";
        let mut input = request(
            line,
            &["Content-Length : 5", "Transfer-Encoding\t: chunked"],
        );
        input.push_str("0\r\n\r\n");
        check(input.as_bytes(), &[(key(line), PAIR)], false);
    }

    #[test]
    fn chunked_alone_and_length_alone_are_clean() {
        let line = "POST /p HTTP/1.1";
        let after = "GET /next#x HTTP/1.1";
        let mut te = request(line, &["Transfer-Encoding: chunked"]);
        te.push_str("5\r\nhello\r\n0\r\n\r\n");
        te.push_str(&request(after, &[]));
        check(
            te.as_bytes(),
            &[(key(line), CLEAN), (key(after), FRAGMENT)],
            false,
        );

        let mut cl = request(line, &["Content-Length: 5"]);
        cl.push_str("hello");
        cl.push_str(&request(after, &[]));
        check(
            cl.as_bytes(),
            &[(key(line), CLEAN), (key(after), FRAGMENT)],
            false,
        );
    }

    #[test]
    fn fragment_and_pair_together() {
        let line = "POST /p#q HTTP/1.1";
        let mut input = request(line, &["Transfer-Encoding: chunked", "Content-Length: 3"]);
        input.push_str("0\r\n\r\n");
        check(input.as_bytes(), &[(key(line), BOTH)], false);
    }

    #[test]
    fn pipelined_clean_then_suspicious() {
        let clean = "GET /cgi-bin/pkiclient.exe?operation=GetCACaps HTTP/1.1";
        let evil = "GET /cgi-bin/pkiclient.exe#?operation=Evil HTTP/1.1";
        let input = request(clean, &["Host: a"]) + &request(evil, &["Host: a"]);
        check(
            input.as_bytes(),
            &[(key(clean), CLEAN), (key(evil), FRAGMENT)],
            false,
        );
    }

    #[test]
    fn pipelined_requests_with_the_same_key_are_told_apart_by_order() {
        // Both keys are 6: only the order says which head had the `#`.
        let input = request("GET /a HTTP/1.1", &[]) + &request("GET /a#b HTTP/1.1", &[]);
        check(input.as_bytes(), &[(6, CLEAN), (6, FRAGMENT)], false);
        let input = request("GET /a#b HTTP/1.1", &[]) + &request("GET /a HTTP/1.1", &[]);
        check(input.as_bytes(), &[(6, FRAGMENT), (6, CLEAN)], false);
    }

    #[test]
    fn a_fake_request_line_in_a_body_disturbs_nothing() {
        let post = "POST /cgi-bin/pkiclient.exe?operation=PKIOperation HTTP/1.1";
        let body = "GET /evil#x HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\
                    Transfer-Encoding: chunked\r\n\r\nGET /a#b HTTP/1.1\r\n\r\n";
        let real = "GET /cgi-bin/pkiclient.exe?operation=GetCACert HTTP/1.1";
        let evil = "GET /z#q HTTP/1.1";
        let mut input = request(post, &[&format!("Content-Length: {}", body.len())]);
        input.push_str(body);
        input.push_str(&request(real, &[]));
        input.push_str(&request(evil, &[]));
        check(
            input.as_bytes(),
            &[
                (key(post), CLEAN),
                (key(real), CLEAN),
                (key(evil), FRAGMENT),
            ],
            false,
        );
        // Nor does anyone ask for the fake's key and get an answer.
        let mut scan = fed(&[input.as_bytes()]);
        assert_eq!(scan.take(key("GET /evil#x HTTP/1.1")), CLEAN);
    }

    #[test]
    fn a_body_without_a_final_line_feed_does_not_hide_the_next_request_line() {
        let post = "POST /p HTTP/1.1";
        let evil = "GET /x#y HTTP/1.1";
        for body in [
            &b"abc"[..],
            b"ABC",
            b"\r",
            b"x\r\nGET /",
            b"\x00\xff#\n\x30\x82",
        ] {
            let mut input =
                request(post, &[&format!("Content-Length: {}", body.len())]).into_bytes();
            input.extend_from_slice(body);
            input.extend_from_slice(request(evil, &[]).as_bytes());
            check(&input, &[(key(post), CLEAN), (key(evil), FRAGMENT)], false);
        }
    }

    #[test]
    fn any_method_hyper_takes_keeps_the_framing() {
        let odd = "get /x HTTP/1.1";
        let evil = "GET /y#z HTTP/1.1";
        let mut input = request(odd, &["Content-Length: 2"]);
        input.push_str("ab");
        input.push_str(&request(evil, &[]));
        check(
            input.as_bytes(),
            &[(key(odd), CLEAN), (key(evil), FRAGMENT)],
            false,
        );
    }

    #[test]
    fn empty_lines_before_a_request_and_bare_line_feeds() {
        let line = "GET /x#y HTTP/1.1";
        let input = format!("\r\n\n{line}\nHost: a\n\n");
        check(input.as_bytes(), &[(key(line), FRAGMENT)], false);
        let clean = "POST /p HTTP/1.0";
        let input = format!("{clean}\ncontent-length: 1\n\nz\r\n{line}\r\n\r\n");
        check(
            input.as_bytes(),
            &[(key(clean), CLEAN), (key(line), FRAGMENT)],
            false,
        );
    }

    #[test]
    fn a_long_content_length_line_is_read_whole() {
        // The value starts past the bytes kept of a line: parsed as it streams past.
        let post = "POST /p HTTP/1.1";
        let evil = "GET /x#y HTTP/1.1";
        let pad = " ".repeat(60);
        let mut input = request(post, &[&format!("Content-Length:{pad}3{pad}")]);
        input.push_str("abc");
        input.push_str(&request(evil, &[]));
        check(
            input.as_bytes(),
            &[(key(post), CLEAN), (key(evil), FRAGMENT)],
            false,
        );
        let mut input = request(post, &[&format!("Content-Length: {}3", "0".repeat(70))]);
        input.push_str("abc");
        input.push_str(&request(evil, &[]));
        check(
            input.as_bytes(),
            &[(key(post), CLEAN), (key(evil), FRAGMENT)],
            false,
        );
    }

    #[test]
    fn a_chunked_body_is_followed_to_its_end() {
        let post = "POST /p HTTP/1.1";
        let evil = "GET /x#y HTTP/1.1";
        let fake = "GET /f#g HTTP/1.1\r\nContent-Length: 100\r\n\r\n";
        let mut input = request(post, &["Transfer-Encoding: chunked"]);
        input.push_str(&format!("{:x}\r\n{fake}\r\n", fake.len()));
        input.push_str("3;name=value\r\nab#\r\n");
        input.push_str(&format!("{}5 \r\nhello\r\n", "0".repeat(40)));
        input.push_str("0\r\nX-Trailer: 1\r\nX-Bare: 1\n\r\nX-Lf: 2\r\n\r\n");
        input.push_str(&request(evil, &[]));
        check(
            input.as_bytes(),
            &[(key(post), CLEAN), (key(evil), FRAGMENT)],
            false,
        );
        let mut scan = fed(&[input.as_bytes()]);
        assert_eq!(scan.mode, Mode::Boundary);
        assert_eq!(scan.take(key(post)), CLEAN);
    }

    #[test]
    fn request_lines_of_65534_byte_targets() {
        const TARGET: usize = 65534;
        let end = format!("/{}#", "a".repeat(TARGET - 2));
        let prefix = "/cgi-bin/pkiclient.exe";
        let query = format!("?operation=GetCACert&message={}", "A".repeat(TARGET));
        let at_query = format!("{prefix}#{}", &query[..TARGET - prefix.len() - 1]);
        let clean = format!("{prefix}{}", &query[..TARGET - prefix.len()]);
        for (target, want) in [(end, FRAGMENT), (at_query, FRAGMENT), (clean, CLEAN)] {
            assert_eq!(target.len(), TARGET);
            let line = format!("GET {target} HTTP/1.1");
            let input = request(&line, &["Host: a"]) + &request("GET /b#c HTTP/1.1", &[]);
            check(
                input.as_bytes(),
                &[(key(&line), want), (6, FRAGMENT)],
                false,
            );
        }
    }

    #[test]
    fn absurd_content_lengths() {
        let pad = " ".repeat(40);
        for (value, absurd) in [
            ("18446744073709551615".to_owned(), true),
            ("18446744073709551614".to_owned(), true),
            ("99999999999999999999".to_owned(), true),
            ("184467440737095516150".to_owned(), true),
            ("1844674407370955161500000000000".to_owned(), true),
            (format!("{pad}18446744073709551615"), true),
            ("18446744073709551615x".to_owned(), true),
            ("18446744073709551613".to_owned(), false),
            ("65536".to_owned(), false),
            ("0000000000000000000000000000065536".to_owned(), false),
            ("x18446744073709551615".to_owned(), false),
        ] {
            let line = "POST /p HTTP/1.1";
            let input = request(line, &[&format!("Content-Length: {value}")]);
            check(input.as_bytes(), &[(key(line), CLEAN)], absurd);
        }
    }

    #[test]
    fn the_absurd_flag_is_set_by_heads_only() {
        let line = "POST /p HTTP/1.1";
        let body = "Content-Length: 18446744073709551615\r\n";
        let mut input = request(line, &[&format!("Content-Length: {}", body.len())]);
        input.push_str(body);
        check(input.as_bytes(), &[(key(line), CLEAN)], false);
    }

    #[test]
    fn lost_the_scanner_still_finds_request_lines_by_their_look() {
        // A first line hyper refuses: from there on, heads by the look of their request line.
        let evil = "GET /x#y HTTP/1.1";
        let input = format!("hello\r\n{}", request(evil, &["Content-Length: 1"]));
        check(input.as_bytes(), &[(key(evil), FRAGMENT)], false);
        let scan = fed(&[input.as_bytes()]);
        assert_eq!(scan.mode, Mode::LOST);

        // Lost, a fake request line in a body pushes a record nobody asks for: the key keeps
        // it apart from the real one.
        let real = "POST /real#2345 HTTP/1.1";
        let mut input = request("POST /p HTTP/1.1", &["Content-Length: x"]);
        input.push_str("GET /fake#1 HTTP/1.1\r\n\r\n");
        input.push_str(&request(
            real,
            &["Content-Length: 1", "Transfer-Encoding: chunked"],
        ));
        for pieces in cuts(input.as_bytes()) {
            let mut scan = fed(&pieces);
            assert_eq!(scan.take(key("POST /p HTTP/1.1")), CLEAN);
            assert_eq!(scan.take(key(real)), BOTH);
            assert_eq!(scan.take(key("GET /other HTTP/1.1")), CLEAN);
        }
    }

    #[test]
    fn the_queue_is_bounded_and_fails_closed() {
        let evil = request("GET /a#b HTTP/1.1", &[]);
        let input = evil.repeat(20) + &request("GET /a HTTP/1.1", &[]);
        let mut scan = fed(&[input.as_bytes()]);
        assert_eq!(scan.queue.live().len(), QUEUE_CAP);
        for i in 0..20 {
            assert_eq!(scan.take(6), FRAGMENT, "request {i}");
        }
        assert_eq!(scan.take(6), CLEAN);
        assert!(scan.queue.evicted.is_none());

        // Lost, fakes push out each other before a record of a head read in step.
        let real = "GET /real#x HTTP/1.1";
        let mut input = request(real, &["Content-Length: abc"]);
        for i in 0..40 {
            input.push_str(&request(&format!("GET /f#{i} HTTP/1.1"), &[]));
        }
        let mut scan = fed(&[input.as_bytes()]);
        assert_eq!(scan.queue.live().len(), QUEUE_CAP);
        assert_eq!(scan.take(key(real)), FRAGMENT);
    }

    #[test]
    fn a_skipped_take_fails_closed() {
        let input = request("GET /cc HTTP/1.1", &[]) + &request("GET /a#b HTTP/1.1", &[]);
        let mut scan = fed(&[input.as_bytes()]);
        // The call for `GET /cc` never came: the one for `GET /a#b` does not match head 0's
        // key, and finds the record of head 1 (and leaves it).
        assert_eq!(scan.take(6), FRAGMENT);
        assert_eq!(scan.take(6), FRAGMENT);
        assert_eq!(scan.take(6), CLEAN);
    }

    #[test]
    fn empty_and_odd_input_never_panics() {
        let mut scan = HeadScan::default();
        scan.feed(b"");
        assert_eq!(scan.take(0), CLEAN);
        for input in [
            &b"\n\n\n"[..],
            b"\r\r\r\n",
            b" HTTP/1.1\r\n",
            b"A HTTP/1.1\r\n\r\n",
            b"GET  HTTP/1.1\r\n\r\n",
            b"#\n#\n##",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nGET /#",
        ] {
            for pieces in cuts(input) {
                let mut scan = fed(&pieces);
                let _ = scan.take(4);
                let _ = scan.take_absurd_length();
            }
        }
    }

    // The cost, checked once by hand (no timing in tests: shared machines are too noisy).
    // Release build, instructions counted by cachegrind (deterministic where wall time is not),
    // each figure against `memchr::memchr2_iter(b'\n', b'#', bytes).count()` over the same bytes:
    //
    //     let mut s = HeadScan::default();
    //     for read in input.chunks(16_384) { s.feed(black_box(read)); }
    //     black_box(s.take(key));
    //
    //     one 60 KiB request line (a SCEP GET):    15.1 k instructions, memchr2 alone 14.4 k (+5%)
    //     200 pipelined 290-byte heads, 11 lines:  513 k, memchr2 alone 139 k: ~170 a line end
    //     a 1 MiB POST body after its head:        ~27 k in all: counted, not searched
    //     lost, 1 MiB of random bytes:             1.6 M, memchr2 alone 0.84 M (a hit every ~128 B)

    /// Input for the properties: pieces of HTTP and of noise.
    fn soup() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(&b"GET "[..]),
            Just(&b"POST "[..]),
            Just(&b"get "[..]),
            Just(&b"/x"[..]),
            Just(&b"#"[..]),
            Just(&b"?a=b"[..]),
            Just(&b" HTTP/1.1"[..]),
            Just(&b" HTTP/1.0"[..]),
            Just(&b"\r\n"[..]),
            Just(&b"\n"[..]),
            Just(&b"\r"[..]),
            Just(&b"Content-Length: "[..]),
            Just(&b"content-length :"[..]),
            Just(&b"Transfer-Encoding: chunked"[..]),
            Just(&b"1"[..]),
            Just(&b"0"[..]),
            Just(&b"18446744073709551615"[..]),
            Just(&b"a"[..]),
            Just(&b";e"[..]),
            Just(&b"Host: h"[..]),
            Just(&b" "[..]),
        ];
        prop::collection::vec(piece, 0..120).prop_map(|pieces| pieces.concat())
    }

    /// What a scanner shows: the answers to a fixed run of takes, and the absurd flag.
    fn observe(mut scan: HeadScan) -> (Vec<Suspicion>, bool) {
        let takes = (0..24).map(|i| scan.take(4 + i % 8)).collect();
        (takes, scan.take_absurd_length())
    }

    /// A request hyper accepts, with the suspicion it hides.
    fn pipeline_request() -> impl Strategy<Value = (Vec<u8>, usize, Suspicion)> {
        (
            prop::sample::select(vec!["GET", "POST", "PUT", "get", "M-SEARCH"]),
            "/[a-z0-9/._-]{0,12}(\\?[a-z0-9=&%]{0,12})?",
            prop::option::of("[a-z0-9?#=&]{0,8}"),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..80),
            prop::sample::select(vec![1usize, 2, 7, 100]),
            any::<bool>(),
            0usize..3,
        )
            .prop_map(
                |(method, path, fragment, length, chunked, crlf, body, chunk, ext, blanks)| {
                    let target = match &fragment {
                        Some(f) => format!("{path}#{f}"),
                        None => path,
                    };
                    let eol = if crlf { "\r\n" } else { "\n" };
                    let mut bytes = "\r\n".repeat(blanks).into_bytes();
                    let line = format!("{method} {target} HTTP/1.1");
                    let key = key(&line);
                    bytes.extend_from_slice(format!("{line}{eol}Host: a{eol}").as_bytes());
                    if chunked {
                        bytes.extend_from_slice(
                            format!("transfer-Encoding: chunked{eol}").as_bytes(),
                        );
                    }
                    if length || (!chunked && !body.is_empty()) {
                        bytes.extend_from_slice(
                            format!("Content-Length: {}{eol}", body.len()).as_bytes(),
                        );
                    }
                    bytes.extend_from_slice(format!("X-Hash: #{eol}{eol}").as_bytes());
                    if chunked {
                        for part in body.chunks(chunk) {
                            let e = if ext { ";a=b" } else { "" };
                            bytes.extend_from_slice(format!("{:X}{e}\r\n", part.len()).as_bytes());
                            bytes.extend_from_slice(part);
                            bytes.extend_from_slice(b"\r\n");
                        }
                        bytes.extend_from_slice(b"0\r\n");
                        if ext {
                            bytes.extend_from_slice(b"Trailer-Field: #\r\n");
                        }
                        bytes.extend_from_slice(b"\r\n");
                    } else {
                        bytes.extend_from_slice(&body);
                    }
                    let found = Suspicion {
                        fragment: fragment.is_some(),
                        length_and_chunked: length && chunked,
                    };
                    (bytes, key, found)
                },
            )
    }

    proptest! {
        #[test]
        fn any_cut_gives_what_the_whole_gives(
            input in prop_oneof![soup(), prop::collection::vec(any::<u8>(), 0..300)],
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            at.sort_unstable();
            let mut pieces = Vec::new();
            let mut from = 0;
            for to in at {
                pieces.push(&input[from..to]);
                from = to;
            }
            pieces.push(&input[from..]);
            prop_assert_eq!(observe(fed(&pieces)), observe(fed(&[&input[..]])));
        }

        #[test]
        fn every_request_of_a_pipeline_gets_its_own_suspicion(
            requests in prop::collection::vec(pipeline_request(), 1..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let input: Vec<u8> = requests.iter().flat_map(|(b, _, _)| b.clone()).collect();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            at.sort_unstable();
            let mut scan = HeadScan::default();
            let mut from = 0;
            for to in at {
                scan.feed(&input[from..to]);
                from = to;
            }
            scan.feed(&input[from..]);
            prop_assert_eq!(scan.mode, Mode::Boundary);
            for (i, (_, key, want)) in requests.iter().enumerate() {
                prop_assert_eq!(scan.take(*key), *want, "request {}", i);
            }
            prop_assert_eq!(scan.queue.live().len(), 0);
            prop_assert!(!scan.take_absurd_length());
        }
    }
}
