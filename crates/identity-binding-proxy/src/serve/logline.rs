//! The log's JSON line, written field by field into the formatter's reused buffer: no
//! serializer, no per-event allocation (the request line is written once per request, so its
//! cost is a cost of every request). The shape is `tracing_subscriber`'s flattened JSON:
//! `{"timestamp":…,"level":…,<fields>,"target":…}`; spans are not written (the proxy logs
//! none of its own).

use std::cell::{Cell, RefCell};
use std::fmt::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The JSON event format of `serve` (and of `dev --log-format json`).
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonLine;

thread_local! {
    /// The line being written, reused: written into directly (no call through the
    /// formatter's `dyn Write` per piece), then handed over whole.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    /// The current second as its timestamp's first 20 bytes (`2026-12-06T21:44:16.`): a
    /// second's lines differ only in their microseconds.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    /// The callsite (its metadata's address) whose field names were last found to need no
    /// escape: the request line's are checked once per thread, not at each line.
    static PLAIN_NAMES: Cell<usize> = const { Cell::new(0) };
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                write_line(&mut line, event)?;
                writer.write_str(&line)
            }
            // An event logged while formatting one (none is today): its own buffer.
            Err(_) => {
                let mut line = String::new();
                write_line(&mut line, event)?;
                writer.write_str(&line)
            }
        })
    }
}

/// The whole line of `event`, newline included.
fn write_line(out: &mut String, event: &Event<'_>) -> fmt::Result {
    let meta = event.metadata();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    out.push_str("{\"timestamp\":\"");
    write_timestamp(out, now)?;
    out.push_str("\",\"level\":\"");
    out.push_str(meta.level().as_str());
    out.push('"');
    let mut fields = Fields {
        out: &mut *out,
        result: Ok(()),
        plain_names: plain_names(meta),
    };
    event.record(&mut fields);
    fields.result?;
    out.push_str(",\"target\":\"");
    Escaped(&mut *out).write_str(meta.target())?;
    out.push_str("\"}\n");
    Ok(())
}

/// Whether no field name of `meta`'s callsite needs a JSON escape (they are source text:
/// almost always so).
fn plain_names(meta: &'static tracing::Metadata<'static>) -> bool {
    let id = std::ptr::from_ref(meta) as usize;
    if PLAIN_NAMES.get() == id {
        return true;
    }
    let plain = meta
        .fields()
        .iter()
        .all(|f| first_to_escape(f.name().as_bytes()) == f.name().len());
    if plain {
        PLAIN_NAMES.set(id);
    }
    plain
}

/// RFC 3339 in UTC with microseconds, as `tracing_subscriber` writes it: the date and time
/// of the second computed once a second per thread, the microseconds written each time.
fn write_timestamp(out: &mut String, since_epoch: Duration) -> fmt::Result {
    let secs = since_epoch.as_secs();
    let prefix = SECOND.with(|second| {
        let (cached, prefix) = second.get();
        if cached == secs {
            return prefix;
        }
        let prefix = second_prefix(secs);
        second.set((secs, prefix));
        prefix
    });
    let mut ts = [0u8; 27];
    ts[..20].copy_from_slice(&prefix);
    write_digits(&mut ts[20..26], since_epoch.subsec_micros());
    ts[26] = b'Z';
    out.push_str(std::str::from_utf8(&ts).map_err(|_| fmt::Error)?);
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.` of the second `secs` after the epoch (UTC).
fn second_prefix(secs: u64) -> [u8; 20] {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut p = *b"0000-00-00T00:00:00.";
    write_digits(&mut p[0..4], t.year().unsigned_abs());
    write_digits(&mut p[5..7], u8::from(t.month()).into());
    write_digits(&mut p[8..10], t.day().into());
    write_digits(&mut p[11..13], t.hour().into());
    write_digits(&mut p[14..16], t.minute().into());
    write_digits(&mut p[17..19], t.second().into());
    p
}

/// `n` in decimal, zero-padded to fill `out` (its lowest digits, when it has more).
fn write_digits(out: &mut [u8], mut n: u32) {
    for d in out.iter_mut().rev() {
        // A digit: `n % 10` is below 10.
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// A peer's address as the log shows it (`SocketAddr`'s `Display`), written without the
/// formatting machinery for IPv4, the common case.
pub struct Addr {
    text: [u8; 72],
    len: usize,
}

impl Addr {
    pub fn of(addr: &SocketAddr) -> Self {
        let mut out = Addr {
            text: [0; 72],
            len: 0,
        };
        match addr {
            SocketAddr::V4(v4) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b".");
                    }
                    out.push(itoa::Buffer::new().format(octet).as_bytes());
                }
                out.push(b":");
                out.push(itoa::Buffer::new().format(v4.port()).as_bytes());
            }
            // At most 64 bytes: `[` 45 `%` 10 `]:` 5.
            SocketAddr::V6(_) => {
                let _ = write!(out, "{addr}");
            }
        }
        out
    }

    fn push(&mut self, bytes: &[u8]) -> bool {
        match self.text.get_mut(self.len..self.len + bytes.len()) {
            Some(room) => {
                room.copy_from_slice(bytes);
                self.len += bytes.len();
                true
            }
            None => false,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text[..self.len]).unwrap_or("")
    }
}

impl Write for Addr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match self.push(s.as_bytes()) {
            true => Ok(()),
            false => Err(fmt::Error),
        }
    }
}

/// Each field as `,"name":value`, straight into the line.
struct Fields<'a> {
    out: &'a mut String,
    result: fmt::Result,
    /// The names need no escape ([`plain_names`]).
    plain_names: bool,
}

impl Fields<'_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut String) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.out.push_str(",\"");
        self.result = match self.plain_names {
            true => {
                self.out.push_str(field.name());
                Ok(())
            }
            false => Escaped(&mut *self.out).write_str(field.name()),
        }
        .and_then(|()| {
            self.out.push_str("\":");
            value(self.out)
        });
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| {
            out.push('"');
            Escaped(&mut *out).write_str(value)?;
            out.push('"');
            Ok(())
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| {
            out.push_str(itoa::Buffer::new().format(value));
            Ok(())
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| {
            out.push_str(itoa::Buffer::new().format(value));
            Ok(())
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.push_str(if value { "true" } else { "false" });
            Ok(())
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out| match value.is_finite() {
            true => write!(out, "{value}"),
            false => {
                out.push_str("null");
                Ok(())
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.push('"');
            write!(Escaped(&mut *out), "{value:?}")?;
            out.push('"');
            Ok(())
        });
    }
}

/// Writes what it is given as the inside of a JSON string.
struct Escaped<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Escaped<'_, W> {
    /// Most text needs no escape: found 8 bytes at a time, written in one piece.
    #[inline]
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match first_to_escape(s.as_bytes()) {
            first if first == s.len() => self.0.write_str(s),
            first => write_escaped(self.0, s, first),
        }
    }
}

/// `s` with its escapes, the first at `first`.
#[cold]
fn write_escaped(out: &mut impl Write, s: &str, first: usize) -> fmt::Result {
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate().skip(first) {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f | 0x7f => "",
            _ => continue,
        };
        out.write_str(&s[plain..i])?;
        match escape {
            "" => write!(out, "\\u{b:04x}")?,
            e => out.write_str(e)?,
        }
        plain = i + 1;
    }
    out.write_str(&s[plain..])
}

/// Whether JSON needs `b` escaped inside a string.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f
}

/// Where the first byte needing an escape is (`bytes.len()` when none is).
#[inline]
fn first_to_escape(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Some byte of `x` below `n` (n ≤ 0x80), or equal to `b`: the classic bit tricks.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH != 0;
    let has = |x: u64, b: u8| below(x ^ (ONES * u64::from(b)), 1);
    let mut chunks = bytes.chunks_exact(8);
    let mut start = 0;
    for chunk in chunks.by_ref() {
        let Ok(eight) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let x = u64::from_le_bytes(eight);
        if below(x, 0x20) || has(x, b'"') || has(x, b'\\') || has(x, 0x7f) {
            break;
        }
        start += 8;
    }
    bytes[start..]
        .iter()
        .position(|&b| needs_escape(b))
        .map_or(bytes.len(), |i| start + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testlog::Capture;

    #[test]
    fn every_field_kind_is_valid_json_and_hostile_text_stays_inside_its_string() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLine)
            .finish();
        let hostile = "a\"b\\c\nd\re\tf\u{1}g\u{7f}h é ✓";
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                text = hostile,
                shown = %hostile,
                count = 7u64,
                delta = -3i64,
                yes = true,
                ratio = 0.5f64,
                nan = f64::NAN,
                "odd \"name\"" = 1u64,
                "token request"
            );
        });
        let out = capture.text();
        assert_eq!(out.lines().count(), 1, "one line: {out}");
        assert!(out.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["message"], "token request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["text"], hostile);
        assert_eq!(v["shown"], hostile);
        assert_eq!(v["count"], 7);
        assert_eq!(v["delta"], -3);
        assert_eq!(v["yes"], true);
        assert_eq!(v["ratio"], 0.5);
        assert!(v["nan"].is_null());
        assert_eq!(v["odd \"name\""], 1, "a name is escaped where it needs it");
        assert_eq!(v["target"], "identity_binding_proxy::serve::logline::tests");
        // RFC 3339, UTC, microseconds: 2026-12-06T21:44:16.123456Z.
        let ts = v["timestamp"].as_str().unwrap();
        let digits = |r: std::ops::Range<usize>| ts[r].bytes().all(|b| b.is_ascii_digit());
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(
            digits(0..4) && digits(5..7) && digits(8..10) && digits(20..26),
            "{ts}"
        );
        assert_eq!(
            (&ts[10..11], &ts[19..20], &ts[26..]),
            ("T", ".", "Z"),
            "{ts}"
        );
    }
    #[test]
    fn the_timestamp_of_each_instant_is_time_s_rfc_3339_with_microseconds_cached_or_not() {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        // Through second, minute, day and year boundaries, each second met twice (the
        // second time from the thread's cache) and out of order.
        let starts = [
            0u64,
            951_782_399,
            1_798_761_599,
            1_796_593_456,
            4_102_444_799,
        ];
        for start in starts {
            for step in [0u64, 1, 0, 2, 1, 1] {
                for micros in [0u32, 1, 999_999, 123_456] {
                    let at = Duration::new(start + step, micros * 1000 + 999);
                    let mut got = String::new();
                    write_timestamp(&mut got, at).unwrap();
                    let nanos = i128::try_from(at.as_nanos()).unwrap();
                    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap();
                    assert_eq!(got, t.format(&format).unwrap(), "{at:?}");
                }
            }
        }
    }

    #[test]
    fn a_peer_address_reads_as_its_display() {
        let peers = [
            "127.0.0.1:40000",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.1.20.3:8",
            "[::1]:443",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[::ffff:255.255.255.255]:1",
        ];
        for peer in peers {
            let addr: SocketAddr = peer.parse().unwrap();
            assert_eq!(Addr::of(&addr).as_str(), addr.to_string());
        }
        let v6 = std::net::SocketAddrV6::new(
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
            65535,
            0,
            u32::MAX,
        );
        let addr = SocketAddr::V6(v6);
        assert_eq!(Addr::of(&addr).as_str(), addr.to_string());
    }

    #[test]
    fn the_first_byte_to_escape_is_found_wherever_it_is() {
        for len in 0..24 {
            for at in 0..len {
                for b in 0u8..=0x80 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let want = bytes.iter().position(|&b| needs_escape(b)).unwrap_or(len);
                    assert_eq!(first_to_escape(&bytes), want, "{bytes:?}");
                }
            }
        }
        let text = "é ✓ ok".repeat(5);
        assert_eq!(first_to_escape(text.as_bytes()), text.len());
    }
}
