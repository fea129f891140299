package vhafilterprocessor

import (
	"context"
	"strings"

	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/pmetric"
	"go.opentelemetry.io/collector/processor"
	"go.opentelemetry.io/collector/processor/processorhelper"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.uber.org/zap"
)

type filter struct {
	names    map[string]struct{}
	prefixes []string
	resource map[string]string
	dropped  metric.Int64Counter
	attrs    metric.MeasurementOption
	logger   *zap.Logger
}

func newFilter(cfg *Config, set processor.Settings) (*filter, error) {
	names := make(map[string]struct{}, len(cfg.MetricNames))
	for _, n := range cfg.MetricNames {
		names[n] = struct{}{}
	}
	dropped, err := set.MeterProvider.Meter("vha.local/otel/vhafilterprocessor").Int64Counter(
		"otelcol_vhafilter_dropped_data_points",
		metric.WithDescription("Data points dropped because their metric name or resource is not in the allowlist"),
		metric.WithUnit("{datapoints}"),
	)
	if err != nil {
		return nil, err
	}
	return &filter{
		names:    names,
		prefixes: append([]string(nil), cfg.MetricNamePrefixes...),
		resource: cfg.ResourceAttributes,
		dropped:  dropped,
		attrs:    metric.WithAttributes(attribute.String("processor", set.ID.String())),
		logger:   set.Logger,
	}, nil
}

func (f *filter) nameAllowed(name string) bool {
	if _, ok := f.names[name]; ok {
		return true
	}
	for _, p := range f.prefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

func (f *filter) resourceAllowed(attrs pcommon.Map) bool {
	for k, want := range f.resource {
		v, ok := attrs.Get(k)
		if !ok || v.Type() != pcommon.ValueTypeStr || v.Str() != want {
			return false
		}
	}
	return true
}

// process keeps the allowed metrics, removes scopes and resources left empty (so no target_info is
// written for a resource that sent nothing allowed) and skips the request when nothing is left.
func (f *filter) process(ctx context.Context, md pmetric.Metrics) (pmetric.Metrics, error) {
	var dropped int
	firstDropped := ""
	md.ResourceMetrics().RemoveIf(func(rm pmetric.ResourceMetrics) bool {
		if !f.resourceAllowed(rm.Resource().Attributes()) {
			dropped += resourcePoints(rm)
			if firstDropped == "" {
				firstDropped = "(resource not allowed)"
			}
			return true
		}
		rm.ScopeMetrics().RemoveIf(func(sm pmetric.ScopeMetrics) bool {
			sm.Metrics().RemoveIf(func(m pmetric.Metric) bool {
				if f.nameAllowed(m.Name()) {
					return false
				}
				dropped += points(m)
				if firstDropped == "" {
					firstDropped = m.Name()
				}
				return true
			})
			return sm.Metrics().Len() == 0
		})
		return rm.ScopeMetrics().Len() == 0
	})
	if dropped > 0 {
		f.dropped.Add(ctx, int64(dropped), f.attrs)
		// Debug, not warn: a client must not be able to fill the collector's log.
		f.logger.Debug("dropped data points not in the allowlist",
			zap.Int("data_points", dropped), zap.String("first", firstDropped))
	}
	if md.ResourceMetrics().Len() == 0 {
		return md, processorhelper.ErrSkipProcessingData
	}
	return md, nil
}

func resourcePoints(rm pmetric.ResourceMetrics) int {
	n := 0
	for i := 0; i < rm.ScopeMetrics().Len(); i++ {
		ms := rm.ScopeMetrics().At(i).Metrics()
		for j := 0; j < ms.Len(); j++ {
			n += points(ms.At(j))
		}
	}
	return n
}

func points(m pmetric.Metric) int {
	switch m.Type() {
	case pmetric.MetricTypeGauge:
		return m.Gauge().DataPoints().Len()
	case pmetric.MetricTypeSum:
		return m.Sum().DataPoints().Len()
	case pmetric.MetricTypeHistogram:
		return m.Histogram().DataPoints().Len()
	case pmetric.MetricTypeExponentialHistogram:
		return m.ExponentialHistogram().DataPoints().Len()
	case pmetric.MetricTypeSummary:
		return m.Summary().DataPoints().Len()
	default:
		return 0
	}
}
