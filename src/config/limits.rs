//! Every bound the configuration enforces, in one place: the schema quotes them in messages,
//! the bounded reader applies the file bounds, validation the rest.

use std::time::Duration;

pub const MAX_FETCH_CONCURRENCY: usize = 1024;
/// Each queued event holds a libvirt domain reference.
pub const MAX_EVENT_BACKLOG: usize = 1_048_576;
/// libvirt takes the count as a C `int`.
pub const MAX_KEEPALIVE_COUNT: u32 = i32::MAX as u32;
pub const MAX_CARDINALITY_LIMIT: usize = 10_000_000;
pub const MIN_EXPORT_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(10);
pub const MAX_METRIC_NAME_LEN: usize = 255;
pub const MAX_NODE_NAME_LEN: usize = 253;

/// `(min, max)` of the durations that have both bounds. The minimums keep a value from being
/// too short to ever succeed (a `1ns` fetch timeout retried forever); the maximums keep every
/// deadline and timer computable (`now + 99999999999h` overflows) and sane.
pub const FETCH_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), MINUTES_10);
pub const RESYNC_INTERVAL_RANGE: (Duration, Duration) = (Duration::from_secs(1), DAY);
pub const BACKOFF_RANGE: (Duration, Duration) = (Duration::from_millis(10), HOUR);
pub const RESCAN_INTERVAL_RANGE: (Duration, Duration) = (Duration::from_millis(100), DAY);
pub const EXPORT_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), MINUTES_10);
pub const SHUTDOWN_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), MINUTES_10);
pub const MAX_EXPORT_INTERVAL: Duration = DAY;
pub const MAX_KEEPALIVE_INTERVAL: Duration = HOUR;
const MINUTES_10: Duration = Duration::from_secs(600);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
/// Bounds on list and map lengths (each is checked item by item).
pub const MAX_URIS: usize = 1024;
pub const MAX_GLOBS: usize = 64;
pub const MAX_SOCKET_OWNERS: usize = 64;
/// `libvirt.discover.max_domains_per_socket`: far above any real launcher, still a bound.
pub const MAX_DOMAINS_PER_SOCKET: usize = 100_000;
pub const MAX_HEADERS: usize = 64;

// The config file and its YAML.

/// Largest config file read (the reference config is about 6 KiB).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Deepest nesting of YAML collections (the schema needs 4).
pub const MAX_YAML_DEPTH: usize = 32;
/// Most YAML values (scalars and collections, counting each alias expansion in full).
pub const MAX_YAML_NODES: u64 = 100_000;
