//! Log setup, and escaping for every value the agent writes as text.
//!
//! Domain names, URIs and libvirt error messages come from whoever can define a domain or run
//! a daemon: on a plain libvirt host, any user of the daemon. Written as they are, a name like
//! `vm\n2026-… INFO virt_hypervisor_agent: FORGED` ends a log line and starts one of the
//! attacker's choosing, and an escape sequence can rewrite a terminal. In text form, every
//! field value and message therefore goes through [`escape_control`]: control characters
//! (including newlines, carriage returns, escape, and the C1 range), the Unicode line and
//! paragraph separators, and the bidirectional overrides become Rust-style escapes (`\n`,
//! `\u{1b}`), so one event is always one line and reads as what it is. JSON logs are already
//! escaped by the JSON encoder.

use std::borrow::Cow;
use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::EnvFilter;

use crate::config::{check_log_level, AgentConfig, LogFormat};

/// Whether `c` would break a line, move the cursor or reorder the text when printed.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with control characters, line separators and bidi overrides written as escapes
/// (`\n`, `\r`, `\t`, `\u{1b}`); borrowed when there is nothing to escape.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Text-format field formatter: like tracing-subscriber's default (`message key=value …`), with
/// every value passed through [`escape_control`].
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapingFields;

impl<'w> FormatFields<'w> for EscapingFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let value = escape_control(value);
        self.result = if field.name() == "message" {
            write!(self.writer, "{sep}{value}")
        } else {
            let name = field.name();
            write!(
                self.writer,
                "{sep}{}={value}",
                name.strip_prefix("r#").unwrap_or(name)
            )
        };
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value);
        } else {
            // Plain `&str` fields are quoted, as tracing-subscriber's default does.
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

/// Install the global subscriber (text or JSON on stderr), then log what was wrong with
/// `RUST_LOG`, if anything.
pub fn init(cfg: &AgentConfig) {
    // RUST_LOG, when set, replaces log.level, but only when it is a filter: a typo must not
    // silently become "log target `junk` at TRACE" or fall back without a word.
    let mut warnings = Vec::new();
    let level = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => match check_log_level(&v) {
            Ok(()) => v,
            Err(why) => {
                warnings.push(format!(
                    "RUST_LOG={:?} ignored, not a log filter ({why}); using log.level {:?}",
                    v, cfg.log.level
                ));
                cfg.log.level.clone()
            }
        },
        _ => cfg.log.level.clone(),
    };
    // The SDK logs every failed export attempt; the agent reports failures itself, rate
    // limited (export::reporting), so opentelemetry's own logs are off unless the filter
    // names them.
    let filter = if level.contains("opentelemetry") {
        EnvFilter::try_new(&level)
    } else {
        EnvFilter::try_new(format!("{level},opentelemetry=off"))
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    // A closed stderr (the reader of a pipe gone) must not turn every log line into a panic:
    // tracing-subscriber reports its own write failures with `eprintln!`, which panics then.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match cfg.log.format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.fmt_fields(EscapingFields).with_ansi(ansi).init(),
    }
    for w in warnings {
        tracing::warn!("{w}");
    }
}

/// An error and its sources, on one line (`outer: inner: root`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn control_characters_become_escapes_and_plain_text_is_borrowed() {
        assert!(matches!(escape_control("web-frontend_ü"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("vm\nINFO forged\r\t\u{1b}[2J\u{0}\u{85}\u{2028}\u{202e}"),
            "vm\\nINFO forged\\r\\t\\u{1b}[2J\\u{0}\\u{85}\\u{2028}\\u{202e}"
        );
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_forged_line_in_a_field_or_message_stays_on_one_line() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapingFields)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let evil = "vm\n2026-12-01T00:00:00Z  INFO virt_hypervisor_agent: FORGED LINE";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(domain = %evil, quoted = evil, count = 2, "about {evil}");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.ends_with('\n'), "{out}");
        assert!(
            out.contains(
                "about vm\\n2026-12-01T00:00:00Z  INFO virt_hypervisor_agent: FORGED LINE domain=vm\\n2026"
            ),
            "{out}"
        );
        assert!(out.contains("quoted=\"vm\\n2026"), "{out}");
        assert!(out.contains(" count=2"), "{out}");
    }
}
