//! Values in the formats of the OpenTelemetry environment variables, each parsed in one place
//! for every reader: `OTEL_METRIC_EXPORT_INTERVAL`, which the export task uses and the binary
//! warns about.

use std::fmt;
use std::time::Duration;

use super::{DEFAULT_EXPORT_INTERVAL, MAX_EXPORT_INTERVAL, MIN_EXPORT_INTERVAL};

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
