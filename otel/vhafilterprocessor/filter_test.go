package vhafilterprocessor

import (
	"context"
	"sort"
	"testing"

	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/pdata/pmetric"
	"go.opentelemetry.io/collector/processor/processortest"
)

// request builds one resource with service.name = service and one gauge point per metric name.
func request(service string, names ...string) pmetric.Metrics {
	md := pmetric.NewMetrics()
	rm := md.ResourceMetrics().AppendEmpty()
	rm.Resource().Attributes().PutStr("service.name", service)
	sm := rm.ScopeMetrics().AppendEmpty()
	for _, n := range names {
		m := sm.Metrics().AppendEmpty()
		m.SetName(n)
		m.SetEmptyGauge().DataPoints().AppendEmpty().SetIntValue(1)
	}
	return md
}

func received(sink *consumertest.MetricsSink) []string {
	var out []string
	for _, md := range sink.AllMetrics() {
		rms := md.ResourceMetrics()
		for i := 0; i < rms.Len(); i++ {
			sms := rms.At(i).ScopeMetrics()
			for j := 0; j < sms.Len(); j++ {
				ms := sms.At(j).Metrics()
				for k := 0; k < ms.Len(); k++ {
					out = append(out, ms.At(k).Name())
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

func run(t *testing.T, cfg *Config, reqs ...pmetric.Metrics) *consumertest.MetricsSink {
	t.Helper()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("config: %v", err)
	}
	f := NewFactory()
	sink := new(consumertest.MetricsSink)
	p, err := f.CreateMetrics(context.Background(), processortest.NewNopSettings(Type), cfg, sink)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	for _, md := range reqs {
		if err := p.ConsumeMetrics(context.Background(), md); err != nil {
			t.Fatalf("consume: %v", err)
		}
	}
	return sink
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestForeignMetricDroppedAgentMetricsKept(t *testing.T) {
	cfg := createDefaultConfig().(*Config)
	sink := run(t, cfg, request("virt-hypervisor-agent",
		"kubevirt_vmi_hypervisor_info",
		"node_cpu_seconds_total",
		"virt_hypervisor_agent_connection_up",
		"virt_hypervisor_agent_node_kvm_available",
		"kubevirt_vmi_hypervisor_info_extra",
		"virt_hypervisor_agent", // the prefix with its underscore only
	))
	want := []string{
		"kubevirt_vmi_hypervisor_info",
		"virt_hypervisor_agent_connection_up",
		"virt_hypervisor_agent_node_kvm_available",
	}
	if got := received(sink); !equal(got, want) {
		t.Fatalf("forwarded %v, want %v", got, want)
	}
}

func TestOnlyForeignMetricsForwardNothing(t *testing.T) {
	sink := run(t, createDefaultConfig().(*Config), request("evil", "node_cpu_seconds_total", "up"))
	if n := len(sink.AllMetrics()); n != 0 {
		t.Fatalf("%d requests forwarded, want none (not even an empty resource: it would write target_info)", n)
	}
}

func TestResourceAttributesMustMatch(t *testing.T) {
	cfg := createDefaultConfig().(*Config)
	cfg.ResourceAttributes = map[string]string{"service.name": "virt-hypervisor-agent"}
	sink := run(t, cfg,
		request("impostor", "kubevirt_vmi_hypervisor_info"),
		request("virt-hypervisor-agent", "kubevirt_vmi_hypervisor_info"),
	)
	if got, want := received(sink), []string{"kubevirt_vmi_hypervisor_info"}; !equal(got, want) {
		t.Fatalf("forwarded %v, want %v (only the matching resource)", got, want)
	}
	rs := sink.AllMetrics()[0].ResourceMetrics()
	if v, _ := rs.At(0).Resource().Attributes().Get("service.name"); rs.Len() != 1 || v.Str() != "virt-hypervisor-agent" {
		t.Fatalf("the impostor's resource was forwarded")
	}
}

func TestValidateRefusesAnAllowlistThatAllowsNothingOrEverything(t *testing.T) {
	for name, cfg := range map[string]*Config{
		"empty":        {},
		"empty prefix": {MetricNamePrefixes: []string{""}},
		"empty name":   {MetricNames: []string{""}},
	} {
		if cfg.Validate() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
