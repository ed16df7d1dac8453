//! The log's JSON line, written field by field into the formatter's reused buffer: no
//! serializer, no per-event allocation (the request line is written once per request, so its
//! cost is a cost of every request). The shape is `tracing_subscriber`'s flattened JSON:
//! `{"timestamp":…,"level":…,<fields>,"target":…}`; spans are not written (the proxy logs
//! none of its own).

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The JSON event format of `serve` (and of `dev --log-format json`).
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonLine;

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
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, time::OffsetDateTime::now_utc())?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = Fields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":\"")?;
        Escaped(&mut writer).write_str(meta.target())?;
        writer.write_str("\"}\n")
    }
}

/// RFC 3339 in UTC with microseconds, as `tracing_subscriber` writes it.
fn write_timestamp(out: &mut impl Write, t: time::OffsetDateTime) -> fmt::Result {
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Each field as `,"name":value`, straight into the line.
struct Fields<'a, W: Write> {
    out: &'a mut W,
    result: fmt::Result,
}

impl<W: Write> Fields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.out.write_str(",\"")?;
            Escaped(&mut *self.out).write_str(field.name())?;
            self.out.write_str("\":")?;
            value(self.out)
        })();
    }
}

impl<W: Write> Visit for Fields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| {
            out.write_char('"')?;
            Escaped(&mut *out).write_str(value)?;
            out.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out| match value.is_finite() {
            true => write!(out, "{value}"),
            false => out.write_str("null"),
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(Escaped(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// Writes what it is given as the inside of a JSON string.
struct Escaped<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f | 0x7f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            match escape {
                "" => write!(self.0, "\\u{b:04x}")?,
                e => self.0.write_str(e)?,
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
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
}
