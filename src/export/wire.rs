//! The OTLP request the agent sends, with staleness markers.
//!
//! The SDK's collection holds the live points only: an attribute set that left the gauge (VM
//! stopped or migrated away, labels changed, connection or pod removed) is simply absent. A
//! pull exporter's series then goes stale at the next scrape; a pushed series would stay in
//! every Prometheus instant query for the 5-minute lookback. OTLP's answer is a data point
//! flagged `DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK`, which the collector's remote-write
//! translator and Prometheus's own OTLP receiver both turn into a stale NaN, ending the series
//! at once. The SDK's data points cannot carry flags, so [`Staleness`] adds them here, where the
//! protobuf request is built from the collection (`opentelemetry-proto`'s own transform).
//!
//! The rule, per number series (metric + attribute set, gauges and sums alike):
//! - a series present in the previous request and absent from this collection gets one flagged
//!   point, stamped with the time it was first found missing;
//! - that marker is sent with every request until one is delivered ([`Staleness::delivered`]),
//!   so an outage delays it but does not lose it; the markers held are never more than the
//!   series that left since the last delivered request (and at most `limit`, oldest dropped);
//! - a series that comes back before its marker was delivered is live again: no marker;
//! - the final export at shutdown adds no new markers (the VMs still run).
//!
//! An attribute set is one series however many domains map to it, so it is marked only when
//! the last of them goes away.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, DataPointFlags, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_sdk::metrics::data::ResourceMetrics as SdkResourceMetrics;
use prost::Message;

/// The flag that makes a data point a staleness marker.
pub const NO_RECORDED_VALUE: u32 = DataPointFlags::NoRecordedValueMask as u32;

/// One number series: (scope, metric name), shared by all of the metric's series, and the
/// encoded (sorted) attribute set, which is also where a marker's attributes are decoded from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SeriesKey {
    metric: Arc<(String, String)>,
    attrs: Box<[u8]>,
}

/// `None` for a gauge; a sum's aggregation temporality and monotonicity otherwise.
type SumKind = Option<(i32, bool)>;

/// The metric a marker belongs to, as it must appear in the request.
#[derive(Clone, Debug, PartialEq)]
struct Shape {
    scope: InstrumentationScope,
    name: String,
    description: String,
    unit: String,
    sum: SumKind,
}

#[derive(Clone, Debug)]
struct Series {
    /// Shared by all of the metric's series.
    shape: Arc<Shape>,
    start_time_unix_nano: u64,
}

#[derive(Clone, Debug)]
struct Marker {
    series: Series,
    /// When the series was first found missing: the marker's timestamp.
    since: u64,
}

/// Tracks which series the receiver may hold as live and which still need a staleness marker.
#[derive(Debug)]
pub struct Staleness {
    /// Series of the previous request.
    live: HashMap<SeriesKey, Series>,
    /// Series that left and whose marker no delivered request carried yet.
    pending: BTreeMap<SeriesKey, Marker>,
    /// Most markers held; past it the oldest are dropped (their series then lingers for the
    /// receiver's lookback, as without markers).
    limit: usize,
    /// The resource of the last collection, for a request that carries markers only.
    resource: Option<Resource>,
    dropped: u64,
}

impl Staleness {
    pub fn new(limit: usize) -> Self {
        Self {
            live: HashMap::new(),
            pending: BTreeMap::new(),
            limit: limit.max(1),
            resource: None,
            dropped: 0,
        }
    }

    /// The request for `rm`: every collected point, plus a marker for each series that left.
    /// `mark` false (the final export at shutdown) adds no new markers but still carries the
    /// undelivered ones. `now` (Unix nanoseconds) stamps new markers.
    pub fn request(
        &mut self,
        rm: &SdkResourceMetrics,
        now: u64,
        mark: bool,
    ) -> ExportMetricsServiceRequest {
        let mut req = ExportMetricsServiceRequest::from(rm);
        if let Some(res) = req
            .resource_metrics
            .first()
            .and_then(|r| r.resource.clone())
        {
            self.resource = Some(res);
        }
        let current = series_of(&req);
        if mark {
            for (key, series) in self.live.drain() {
                if !current.contains_key(&key) {
                    self.pending
                        .entry(key)
                        .or_insert(Marker { series, since: now });
                }
            }
        }
        self.pending.retain(|key, _| !current.contains_key(key));
        self.enforce_limit();
        self.live = current;
        self.add_markers(&mut req);
        req
    }

    /// The last request reached the receiver: its markers need not be sent again.
    pub fn delivered(&mut self) {
        self.pending.clear();
    }

    /// Markers waiting to be delivered.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Markers dropped because more than `limit` were waiting.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn enforce_limit(&mut self) {
        let excess = self.pending.len().saturating_sub(self.limit);
        if excess == 0 {
            return;
        }
        let mut by_age: Vec<(u64, SeriesKey)> = self
            .pending
            .iter()
            .map(|(k, m)| (m.since, k.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, key) in by_age.into_iter().take(excess) {
            self.pending.remove(&key);
        }
        self.dropped += excess as u64;
        tracing::warn!(
            dropped = excess,
            limit = self.limit,
            "too many staleness markers waiting for a successful export; dropped the oldest (their series stay visible until the receiver's lookback ends)"
        );
    }

    fn add_markers(&self, req: &mut ExportMetricsServiceRequest) {
        if self.pending.is_empty() {
            return;
        }
        if req.resource_metrics.is_empty() {
            req.resource_metrics.push(ResourceMetrics {
                resource: self.resource.clone(),
                scope_metrics: Vec::new(),
                schema_url: String::new(),
            });
        }
        let rm = &mut req.resource_metrics[0];
        for (key, marker) in &self.pending {
            let s = &marker.series;
            let point = NumberDataPoint {
                attributes: decode_attributes(&key.attrs),
                start_time_unix_nano: s.start_time_unix_nano,
                time_unix_nano: marker.since,
                exemplars: Vec::new(),
                flags: NO_RECORDED_VALUE,
                value: None,
            };
            metric_for(rm, &s.shape).push(point);
        }
    }
}

/// The data points of `shape`'s metric in `rm`, adding the scope and metric when missing.
fn metric_for<'a>(rm: &'a mut ResourceMetrics, shape: &Shape) -> &'a mut Vec<NumberDataPoint> {
    let si =
        match rm.scope_metrics.iter().position(|s| {
            s.scope.as_ref().map(|s| s.name.as_str()) == Some(shape.scope.name.as_str())
        }) {
            Some(i) => i,
            None => {
                rm.scope_metrics.push(ScopeMetrics {
                    scope: Some(shape.scope.clone()),
                    metrics: Vec::new(),
                    schema_url: String::new(),
                });
                rm.scope_metrics.len() - 1
            }
        };
    let metrics = &mut rm.scope_metrics[si].metrics;
    let mi = match metrics
        .iter()
        .position(|m| m.name == shape.name && same_kind(m, shape))
    {
        Some(i) => i,
        None => {
            let data = match shape.sum {
                None => Data::Gauge(Gauge {
                    data_points: Vec::new(),
                }),
                Some((temporality, monotonic)) => Data::Sum(Sum {
                    data_points: Vec::new(),
                    aggregation_temporality: temporality,
                    is_monotonic: monotonic,
                }),
            };
            metrics.push(Metric {
                name: shape.name.clone(),
                description: shape.description.clone(),
                unit: shape.unit.clone(),
                metadata: Vec::new(),
                data: Some(data),
            });
            metrics.len() - 1
        }
    };
    match &mut metrics[mi].data {
        Some(Data::Gauge(g)) => &mut g.data_points,
        Some(Data::Sum(s)) => &mut s.data_points,
        // same_kind() or the push above guarantees a gauge or a sum.
        _ => unreachable!("metric_for found a metric that is neither gauge nor sum"),
    }
}

fn same_kind(m: &Metric, shape: &Shape) -> bool {
    match (&m.data, shape.sum) {
        (Some(Data::Gauge(_)), None) => true,
        (Some(Data::Sum(s)), Some((t, mono))) => {
            s.aggregation_temporality == t && s.is_monotonic == mono
        }
        _ => false,
    }
}

/// A gauge's or sum's data points, with the sum's temporality and monotonicity (`None` for a
/// gauge); `None` for any other kind of metric.
fn number_points(m: &Metric) -> Option<(&[NumberDataPoint], SumKind)> {
    match &m.data {
        Some(Data::Gauge(g)) => Some((&g.data_points, None)),
        Some(Data::Sum(s)) => Some((
            &s.data_points,
            Some((s.aggregation_temporality, s.is_monotonic)),
        )),
        _ => None,
    }
}

/// Every number series in `req` with what a marker for it needs.
fn series_of(req: &ExportMetricsServiceRequest) -> HashMap<SeriesKey, Series> {
    let mut out = HashMap::new();
    for rm in &req.resource_metrics {
        for sm in &rm.scope_metrics {
            let scope = sm.scope.clone().unwrap_or_default();
            for m in &sm.metrics {
                let Some((points, sum)) = number_points(m) else {
                    continue;
                };
                let metric = Arc::new((scope.name.clone(), m.name.clone()));
                let shape = Arc::new(Shape {
                    scope: InstrumentationScope {
                        name: scope.name.clone(),
                        version: scope.version.clone(),
                        attributes: Vec::new(),
                        dropped_attributes_count: 0,
                    },
                    name: m.name.clone(),
                    description: m.description.clone(),
                    unit: m.unit.clone(),
                    sum,
                });
                for p in points {
                    if p.flags & NO_RECORDED_VALUE != 0 {
                        continue;
                    }
                    let key = SeriesKey {
                        metric: Arc::clone(&metric),
                        attrs: encode_attributes(&p.attributes).into_boxed_slice(),
                    };
                    out.insert(
                        key,
                        Series {
                            shape: Arc::clone(&shape),
                            start_time_unix_nano: p.start_time_unix_nano,
                        },
                    );
                }
            }
        }
    }
    out
}

/// An attribute set as bytes, independent of the order the points list them in.
fn encode_attributes(attrs: &[KeyValue]) -> Vec<u8> {
    let mut sorted: Vec<&KeyValue> = attrs.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out = Vec::new();
    for kv in sorted {
        // Length-delimited, so that no two different sets encode alike.
        kv.encode_length_delimited(&mut out)
            .unwrap_or_else(|_| unreachable!("a Vec<u8> grows as needed"));
    }
    out
}

/// The attributes [`encode_attributes`] wrote (in key order).
fn decode_attributes(mut bytes: &[u8]) -> Vec<KeyValue> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        match KeyValue::decode_length_delimited(&mut bytes) {
            Ok(kv) => out.push(kv),
            // Our own encoding: cannot fail; stop rather than loop if it ever did.
            Err(_) => break,
        }
    }
    out
}

/// Every number point of `req` as (metric, sorted `key=value` attributes, flagged) — for tests
/// and the stdout exporter.
pub fn points(req: &ExportMetricsServiceRequest) -> Vec<PointView> {
    let mut out = Vec::new();
    for rm in &req.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let Some((points, _)) = number_points(m) else {
                    continue;
                };
                for p in points {
                    let mut attrs: Vec<(String, String)> = p
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), any_value_text(kv)))
                        .collect();
                    attrs.sort();
                    out.push(PointView {
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        attrs,
                        value: p.value.as_ref().map(|v| match v {
                            opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i) => i.to_string(),
                            opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(d) => d.to_string(),
                        }),
                        stale: p.flags & NO_RECORDED_VALUE != 0,
                        time_unix_nano: p.time_unix_nano,
                    });
                }
            }
        }
    }
    out
}

/// One number data point, flattened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointView {
    pub metric: String,
    pub unit: String,
    pub attrs: Vec<(String, String)>,
    pub value: Option<String>,
    pub stale: bool,
    pub time_unix_nano: u64,
}

/// A string form of an attribute value.
pub fn any_value_text(kv: &KeyValue) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(V::StringValue(s)) => s.clone(),
        Some(V::BoolValue(b)) => b.to_string(),
        Some(V::IntValue(i)) => i.to_string(),
        Some(V::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::KeyValue as SdkKeyValue;
    use opentelemetry_sdk::metrics::reader::MetricReader;
    use opentelemetry_sdk::metrics::{SdkMeterProvider, Temporality};

    use super::*;
    use crate::export::SharedReader;

    /// A provider whose info-like gauge observes the names in `live`, and a counter per name.
    struct Harness {
        reader: SharedReader,
        _provider: SdkMeterProvider,
        live: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Harness {
        fn new() -> Self {
            let reader = SharedReader::new(Temporality::Cumulative);
            let provider = SdkMeterProvider::builder()
                .with_reader(reader.clone())
                .build();
            let meter = provider.meter("test");
            let live = Arc::new(Mutex::new(Vec::new()));
            let l = Arc::clone(&live);
            let _g = meter
                .i64_observable_gauge("info")
                .with_callback(move |obs| {
                    for n in l.lock().unwrap().iter() {
                        obs.observe(
                            1,
                            &[SdkKeyValue::new("name", *n), SdkKeyValue::new("node", "n")],
                        );
                    }
                })
                .build();
            let l = Arc::clone(&live);
            let _c = meter
                .u64_observable_counter("per_name")
                .with_callback(move |obs| {
                    for n in l.lock().unwrap().iter() {
                        obs.observe(7, &[SdkKeyValue::new("name", *n)]);
                    }
                })
                .build();
            Self {
                reader,
                _provider: provider,
                live,
            }
        }

        fn set(&self, names: &[&'static str]) {
            *self.live.lock().unwrap() = names.to_vec();
        }

        fn collect(&self) -> SdkResourceMetrics {
            let mut rm = SdkResourceMetrics::default();
            self.reader.collect(&mut rm).unwrap();
            rm
        }
    }

    /// (metric, name attribute, stale) of every point, sorted.
    fn view(req: &ExportMetricsServiceRequest) -> Vec<(String, String, bool)> {
        let mut v: Vec<_> = points(req)
            .into_iter()
            .map(|p| {
                let name = p
                    .attrs
                    .iter()
                    .find(|(k, _)| k == "name")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                (p.metric, name, p.stale)
            })
            .collect();
        v.sort();
        v
    }

    fn row(metric: &str, name: &str, stale: bool) -> (String, String, bool) {
        (metric.into(), name.into(), stale)
    }

    #[test]
    fn a_series_that_leaves_gets_one_marker_until_delivered() {
        let h = Harness::new();
        let mut s = Staleness::new(100);
        h.set(&["a", "b"]);
        let r = s.request(&h.collect(), 10, true);
        assert_eq!(
            view(&r),
            [
                row("info", "a", false),
                row("info", "b", false),
                row("per_name", "a", false),
                row("per_name", "b", false)
            ]
        );
        s.delivered();

        h.set(&["b"]);
        let r = s.request(&h.collect(), 20, true);
        assert_eq!(
            view(&r),
            [
                row("info", "a", true),
                row("info", "b", false),
                row("per_name", "a", true),
                row("per_name", "b", false)
            ]
        );
        // The marker has no value, the flag, and the time the series was found missing.
        let stale: Vec<_> = points(&r).into_iter().filter(|p| p.stale).collect();
        assert!(stale
            .iter()
            .all(|p| p.value.is_none() && p.time_unix_nano == 20));
        // Not delivered: carried again, with its first timestamp.
        let r = s.request(&h.collect(), 30, true);
        assert_eq!(view(&r).iter().filter(|p| p.2).count(), 2);
        assert!(points(&r)
            .iter()
            .filter(|p| p.stale)
            .all(|p| p.time_unix_nano == 20));
        s.delivered();
        // Delivered: gone for good.
        let r = s.request(&h.collect(), 40, true);
        assert_eq!(
            view(&r),
            [row("info", "b", false), row("per_name", "b", false)]
        );
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn markers_alone_make_a_request_with_the_resource_and_metric_shape() {
        let h = Harness::new();
        let mut s = Staleness::new(100);
        h.set(&["a"]);
        s.request(&h.collect(), 1, true);
        s.delivered();
        h.set(&[]);
        let r = s.request(&h.collect(), 2, true);
        assert_eq!(
            view(&r),
            [row("info", "a", true), row("per_name", "a", true)]
        );
        let rm = &r.resource_metrics[0];
        assert!(rm
            .resource
            .as_ref()
            .is_some_and(|r| !r.attributes.is_empty()));
        let metrics = &rm.scope_metrics[0].metrics;
        let sum = metrics.iter().find(|m| m.name == "per_name").unwrap();
        match &sum.data {
            Some(Data::Sum(s)) => assert!(s.is_monotonic),
            other => panic!("expected a sum, got {other:?}"),
        }
    }

    #[test]
    fn a_series_back_before_delivery_needs_no_marker() {
        let h = Harness::new();
        let mut s = Staleness::new(100);
        h.set(&["a"]);
        s.request(&h.collect(), 1, true);
        h.set(&[]);
        let r = s.request(&h.collect(), 2, true);
        assert_eq!(view(&r).len(), 2);
        // The export failed; the VM came back before the next one.
        h.set(&["a"]);
        let r = s.request(&h.collect(), 3, true);
        assert_eq!(
            view(&r),
            [row("info", "a", false), row("per_name", "a", false)]
        );
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn markers_survive_failed_exports_and_stay_bounded() {
        let h = Harness::new();
        let mut s = Staleness::new(3);
        let names = ["a", "b", "c", "d", "e"];
        h.set(&names);
        s.request(&h.collect(), 1, true);
        // Nothing delivered from here on: each removal adds markers (2 per name), up to 3.
        for (i, _) in names.iter().enumerate() {
            h.set(&names[i + 1..]);
            s.request(&h.collect(), 2 + i as u64, true);
            assert!(s.pending() <= 3);
        }
        assert_eq!(s.pending(), 3);
        assert_eq!(s.dropped(), 7);
        // The newest removals are the ones kept.
        let r = s.request(&h.collect(), 100, true);
        assert!(view(&r)
            .iter()
            .all(|(_, n, stale)| *stale && (n == "d" || n == "e")));
    }

    #[test]
    fn the_final_export_marks_nothing_new_but_carries_what_is_owed() {
        let h = Harness::new();
        let mut s = Staleness::new(100);
        h.set(&["a", "b"]);
        s.request(&h.collect(), 1, true);
        h.set(&["b"]);
        s.request(&h.collect(), 2, true); // marker for a, not delivered
        h.set(&[]);
        let r = s.request(&h.collect(), 3, false);
        assert_eq!(
            view(&r),
            [row("info", "a", true), row("per_name", "a", true)]
        );
    }

    #[test]
    fn attribute_order_does_not_make_a_new_series() {
        let kv = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                value: Some(
                    opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(v.into()),
                ),
            }),
            ..Default::default()
        };
        assert_eq!(
            encode_attributes(&[kv("a", "1"), kv("b", "2")]),
            encode_attributes(&[kv("b", "2"), kv("a", "1")])
        );
        assert_ne!(
            encode_attributes(&[kv("a", "1b"), kv("c", "2")]),
            encode_attributes(&[kv("a", "1"), kv("bc", "2")])
        );
    }
}
