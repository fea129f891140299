#!/usr/bin/env python3
"""Count OTLP data points in the log of an OpenTelemetry Collector `debug` exporter (verbosity
detailed; Rotel's --debug-log prints the same format).

    otlp_debug.py LOG [--from-byte N] --metric NAME [--attr KEY=VALUE]... [--resource KEY=VALUE]...
                  [--value V]

Prints `<matching points> <export requests seen>` for the part of LOG after byte N. A data point
matches when its metric name is NAME, each --attr is one of its attributes with that exact value
(KEY=! means: the attribute is absent), each --resource is an attribute of its resource, and
--value (when given) is its value.
"""
import argparse
import re
import sys

ATTR = re.compile(r'^\s*-> ([^:]+): (?:Str|Int|Bool|Double)\((.*)\)\s*$')


def points(lines):
    resource, metric, attrs, section = {}, None, {}, None
    for line in lines:
        s = line.strip()
        if s.startswith('ResourceMetrics #'):
            resource, metric, section = {}, None, None
        elif s == 'Resource attributes:':
            section = 'resource'
        elif s.startswith('-> Name: '):
            metric, section = s[len('-> Name: '):], None
        elif s.startswith('NumberDataPoints #'):
            attrs, section = {}, None
        elif s == 'Data point attributes:':
            section = 'point'
        elif s.startswith('Value: ') and metric is not None:
            yield metric, dict(attrs), dict(resource), s[len('Value: '):]
            section = None
        else:
            m = ATTR.match(line)
            if m and section == 'resource':
                resource[m.group(1)] = m.group(2)
            elif m and section == 'point':
                attrs[m.group(1)] = m.group(2)
            elif s.startswith(('StartTimestamp', 'Timestamp', 'ScopeMetrics', 'Metric #', 'Descriptor')):
                section = None

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('log')
    ap.add_argument('--from-byte', type=int, default=0)
    ap.add_argument('--metric', required=True)
    ap.add_argument('--attr', action='append', default=[])
    ap.add_argument('--resource', action='append', default=[])
    ap.add_argument('--value')
    a = ap.parse_args()
    want = [kv.split('=', 1) for kv in a.attr]
    want_res = [kv.split('=', 1) for kv in a.resource]
    with open(a.log, 'rb') as f:
        f.seek(a.from_byte)
        text = f.read().decode('utf-8', 'replace')
    lines = text.splitlines()
    requests = sum(1 for l in lines if l.strip().startswith('ResourceMetrics #0'))
    n = 0
    for metric, attrs, res, value in points(lines):
        if metric != a.metric:
            continue
        if any((attrs.get(k) is not None) if v == '!' else attrs.get(k) != v for k, v in want):
            continue
        if any(res.get(k) != v for k, v in want_res):
            continue
        if a.value is not None and value != a.value:
            continue
        n += 1
    print(n, requests)


if __name__ == '__main__':
    sys.exit(main())
