//! Values in the formats of the OpenTelemetry environment variables, each parsed in one place
//! for every reader: the `k=v,k2=v2` header list of `OTEL_EXPORTER_OTLP_HEADERS`, which
//! `export.headers` also takes from the environment and flags, and
//! `OTEL_METRIC_EXPORT_INTERVAL`, which the export task uses and the binary warns about.

use std::fmt;
use std::time::Duration;

use super::{DEFAULT_EXPORT_INTERVAL, MAX_EXPORT_INTERVAL, MIN_EXPORT_INTERVAL};

/// Why one pair of a `k=v,k2=v2` header list is malformed. It names the pair by its position
/// (from 1, counting every `,`) or by its key, never by its value: a header value is a credential
/// as often as not.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderPairError {
    #[error("pair {0} has no `=`")]
    NoEquals(usize),
    #[error("pair {0} has an empty key")]
    EmptyKey(usize),
    #[error("the value of {0:?} has a `%` not followed by two hex digits")]
    BadEscape(String),
    #[error("the value of {0:?} is not UTF-8 once %-decoded")]
    NotUtf8(String),
}

/// The pairs of a `k=v,k2=v2` header list, as `OTEL_EXPORTER_OTLP_HEADERS` writes them: split at
/// `,` (empty pieces skipped) and at the first `=`, key and value trimmed, the value
/// percent-decoded (`%20` is a space; a `%` must start an escape). Each pair comes on its own, so
/// a reader can refuse the list at the first malformed one (the configuration) or skip it (the
/// exporter, for the standard variable).
pub fn header_pairs(
    text: &str,
) -> impl Iterator<Item = Result<(String, String), HeaderPairError>> + '_ {
    text.split(',')
        .enumerate()
        .map(|(i, pair)| (i + 1, pair.trim()))
        .filter(|(_, pair)| !pair.is_empty())
        .map(|(n, pair)| {
            let (key, value) = pair.split_once('=').ok_or(HeaderPairError::NoEquals(n))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(HeaderPairError::EmptyKey(n));
            }
            let value = value.trim();
            // percent-encoding passes a stray `%` through; the list is stricter, as a lone `%`
            // is more likely a mistake than a value.
            let escapes_ok = value.split('%').skip(1).all(|after| {
                after.len() >= 2 && after.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit)
            });
            if !escapes_ok {
                return Err(HeaderPairError::BadEscape(key.to_string()));
            }
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| HeaderPairError::NotUtf8(key.to_string()))?;
            Ok((key.to_string(), value.into_owned()))
        })
}

/// The periodic export interval when `export.interval` is unset: whole milliseconds, as the
/// OpenTelemetry SDKs read it.
pub const EXPORT_INTERVAL_VAR: &str = "OTEL_METRIC_EXPORT_INTERVAL";

/// Why a set [`EXPORT_INTERVAL_VAR`] was not used as it is. Displays as the warning for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntervalEnvProblem {
    /// Not a whole number of milliseconds: the default interval applies.
    Ignored { raw: String },
    /// A number outside [`MIN_EXPORT_INTERVAL`] ..= [`MAX_EXPORT_INTERVAL`] (a larger one
    /// overflows the first deadline): clamped into that range.
    Clamped { raw: String },
}

impl fmt::Display for IntervalEnvProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |d| humantime::format_duration(d);
        match self {
            Self::Ignored { raw } => write!(
                f,
                "{EXPORT_INTERVAL_VAR}={raw:?} ignored, not a whole number of milliseconds; \
                 exporting every {}",
                show(DEFAULT_EXPORT_INTERVAL)
            ),
            Self::Clamped { raw } => write!(
                f,
                "{EXPORT_INTERVAL_VAR}={raw:?} is out of range, clamped to {} .. {} \
                 (export.interval sets it in the config)",
                show(MIN_EXPORT_INTERVAL),
                show(MAX_EXPORT_INTERVAL)
            ),
        }
    }
}

/// The periodic export interval: `configured` (`export.interval`), else
/// [`EXPORT_INTERVAL_VAR`] from the environment, else [`DEFAULT_EXPORT_INTERVAL`]; with why the
/// variable was ignored or clamped, when it was.
pub fn export_interval(configured: Option<Duration>) -> (Duration, Option<IntervalEnvProblem>) {
    let raw = std::env::var_os(EXPORT_INTERVAL_VAR);
    let raw = raw.as_deref().map(|r| r.to_string_lossy());
    export_interval_from(configured, raw.as_deref())
}

/// [`export_interval`] with the variable's value given (`None`: unset).
fn export_interval_from(
    configured: Option<Duration>,
    raw: Option<&str>,
) -> (Duration, Option<IntervalEnvProblem>) {
    if let Some(interval) = configured {
        return (interval, None);
    }
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return (DEFAULT_EXPORT_INTERVAL, None);
    };
    match raw.trim().parse::<u64>() {
        Ok(ms) => {
            let asked = Duration::from_millis(ms);
            let interval = asked.clamp(MIN_EXPORT_INTERVAL, MAX_EXPORT_INTERVAL);
            let problem = (interval != asked).then(|| IntervalEnvProblem::Clamped {
                raw: raw.to_string(),
            });
            (interval, problem)
        }
        Err(_) => (
            DEFAULT_EXPORT_INTERVAL,
            Some(IntervalEnvProblem::Ignored {
                raw: raw.to_string(),
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Result<Vec<(String, String)>, HeaderPairError> {
        header_pairs(text).collect()
    }

    fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pairs_are_percent_decoded() {
        assert_eq!(
            pairs("a=b%3Dc, x = y=z ,").expect("valid"),
            owned(&[("a", "b=c"), ("x", "y=z")])
        );
        assert!(pairs("novalue").is_err());
        assert!(pairs("=v").is_err());
        assert!(pairs("a=%zz").is_err());
    }

    #[test]
    fn the_sdk_format_with_empty_pieces_and_values() {
        assert_eq!(
            pairs(" a = 1 ,b=x%20y,,c= ,authorization=Bearer%20t%C3%A9").expect("valid"),
            owned(&[
                ("a", "1"),
                ("b", "x y"),
                ("c", ""),
                ("authorization", "Bearer té")
            ])
        );
        assert_eq!(pairs("").expect("valid"), owned(&[]));
        assert_eq!(pairs(" , ,").expect("valid"), owned(&[]));
    }

    #[test]
    fn each_malformed_pair_is_named_by_position_or_key_never_by_value() {
        let all: Vec<_> = header_pairs("a=1,,s3cret,=s3cret,k=s3cret%4,u=%FF,ok=%41").collect();
        assert_eq!(
            all,
            [
                Ok(("a".to_string(), "1".to_string())),
                Err(HeaderPairError::NoEquals(3)),
                Err(HeaderPairError::EmptyKey(4)),
                Err(HeaderPairError::BadEscape("k".into())),
                Err(HeaderPairError::NotUtf8("u".into())),
                Ok(("ok".to_string(), "A".to_string())),
            ]
        );
        for e in all.iter().filter_map(|r| r.as_ref().err()) {
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn an_escape_is_a_percent_and_two_hex_digits_exactly() {
        // `u8::from_str_radix`, which the configuration once decoded with, took `%+1` for 0x01.
        for bad in ["a=%", "a=%4", "a=%+1", "a=%%41", "a=50%", "a=%g0"] {
            assert_eq!(
                pairs(bad),
                Err(HeaderPairError::BadEscape("a".into())),
                "{bad}"
            );
        }
        assert_eq!(pairs("a=%25%2c%2C").expect("valid"), owned(&[("a", "%,,")]));
    }

    fn clamped(raw: &str) -> Option<IntervalEnvProblem> {
        Some(IntervalEnvProblem::Clamped {
            raw: raw.to_string(),
        })
    }

    fn ignored(raw: &str) -> Option<IntervalEnvProblem> {
        Some(IntervalEnvProblem::Ignored {
            raw: raw.to_string(),
        })
    }

    #[test]
    fn the_configured_interval_wins_and_the_variable_is_not_judged() {
        let ten = Duration::from_secs(10);
        assert_eq!(export_interval_from(Some(ten), Some("junk")), (ten, None));
        assert_eq!(export_interval_from(Some(ten), Some("1")), (ten, None));
    }

    #[test]
    fn unset_or_blank_is_the_default_without_a_word() {
        for raw in [None, Some(""), Some("  ")] {
            assert_eq!(
                export_interval_from(None, raw),
                (DEFAULT_EXPORT_INTERVAL, None),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn whole_milliseconds_in_range_are_used() {
        for (raw, ms) in [
            ("60000", 60_000),
            (" 60000 ", 60_000),
            ("100", 100),
            ("86400000", 86_400_000),
        ] {
            assert_eq!(
                export_interval_from(None, Some(raw)),
                (Duration::from_millis(ms), None),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn numbers_out_of_range_are_clamped_and_say_so() {
        assert_eq!(
            export_interval_from(None, Some("99")),
            (MIN_EXPORT_INTERVAL, clamped("99"))
        );
        assert_eq!(
            export_interval_from(None, Some("0")),
            (MIN_EXPORT_INTERVAL, clamped("0"))
        );
        assert_eq!(
            export_interval_from(None, Some("86400001")),
            (MAX_EXPORT_INTERVAL, clamped("86400001"))
        );
    }

    #[test]
    fn anything_else_is_ignored_for_the_default_and_says_so() {
        // Beyond u64 is not a number either, as before: ignored, not clamped.
        for raw in ["junk", "30s", "-5", "1.5", "99999999999999999999999"] {
            assert_eq!(
                export_interval_from(None, Some(raw)),
                (DEFAULT_EXPORT_INTERVAL, ignored(raw)),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn the_warnings_name_the_variable_and_its_value() {
        assert_eq!(
            ignored("junk").map(|p| p.to_string()).as_deref(),
            Some(
                "OTEL_METRIC_EXPORT_INTERVAL=\"junk\" ignored, not a whole number of \
                 milliseconds; exporting every 30s"
            )
        );
        assert_eq!(
            clamped("1").map(|p| p.to_string()).as_deref(),
            Some(
                "OTEL_METRIC_EXPORT_INTERVAL=\"1\" is out of range, clamped to 100ms .. 1day \
                 (export.interval sets it in the config)"
            )
        );
    }
}
