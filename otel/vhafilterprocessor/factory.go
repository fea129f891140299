// Package vhafilterprocessor is a metrics processor that forwards only an allowlist of metric
// names (and, optionally, only resources with given attributes) and drops everything else. The
// collector of otel/builder-config.yaml uses it so that a client of the OTLP receiver can write
// only the agent's metric families into Prometheus (see otel/collector.yaml).
package vhafilterprocessor

import (
	"context"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/consumer"
	"go.opentelemetry.io/collector/processor"
	"go.opentelemetry.io/collector/processor/processorhelper"
)

// Type is the component name used in the collector configuration.
var Type = component.MustNewType("vhafilter")

// NewFactory returns the factory of the vhafilter processor.
func NewFactory() processor.Factory {
	return processor.NewFactory(
		Type,
		createDefaultConfig,
		processor.WithMetrics(createMetrics, component.StabilityLevelBeta),
	)
}

// The default allowlist is the agent's own families (src/export/mod.rs): the info metric under its
// default name and every self-metric. otel/collector.yaml spells it out anyway.
func createDefaultConfig() component.Config {
	return &Config{
		MetricNames:        []string{"kubevirt_vmi_hypervisor_info"},
		MetricNamePrefixes: []string{"virt_hypervisor_agent_"},
	}
}

func createMetrics(
	ctx context.Context,
	set processor.Settings,
	cfg component.Config,
	next consumer.Metrics,
) (processor.Metrics, error) {
	f, err := newFilter(cfg.(*Config), set)
	if err != nil {
		return nil, err
	}
	return processorhelper.NewMetrics(ctx, set, cfg, next, f.process,
		processorhelper.WithCapabilities(consumer.Capabilities{MutatesData: true}))
}
