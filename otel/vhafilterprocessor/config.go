package vhafilterprocessor

import (
	"errors"
	"fmt"
)

// Config is the allowlist: a metric is forwarded when its OTLP name is one of MetricNames or starts
// with one of MetricNamePrefixes, and its resource carries every attribute of ResourceAttributes
// with that exact string value. Everything else is dropped and counted.
type Config struct {
	MetricNames        []string          `mapstructure:"metric_names"`
	MetricNamePrefixes []string          `mapstructure:"metric_name_prefixes"`
	ResourceAttributes map[string]string `mapstructure:"resource_attributes"`
}

// Validate refuses an allowlist that would forward nothing, and empty entries (an empty prefix
// would forward everything).
func (c *Config) Validate() error {
	if len(c.MetricNames) == 0 && len(c.MetricNamePrefixes) == 0 {
		return errors.New("metric_names and metric_name_prefixes are both empty: nothing would be forwarded")
	}
	for _, n := range c.MetricNames {
		if n == "" {
			return errors.New("metric_names: empty name")
		}
	}
	for _, p := range c.MetricNamePrefixes {
		if p == "" {
			return errors.New("metric_name_prefixes: an empty prefix would forward every metric")
		}
	}
	for k := range c.ResourceAttributes {
		if k == "" {
			return fmt.Errorf("resource_attributes: empty key")
		}
	}
	return nil
}
