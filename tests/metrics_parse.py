"""Parses the tracer's metrics text with the Prometheus Python client.

Usage: metrics_parse.py FORMAT FILE, FORMAT being `prometheus` (the
Prometheus text format, read by `prometheus_client.parser`) or
`openmetrics` (read by `prometheus_client.openmetrics.parser`, which also
checks the OpenMetrics rules: `# EOF`, counter suffixes, bucket order).

Prints one line per sample, tab-separated: the family's name, its type,
the sample's name, its labels as `key=value` joined by commas (sorted),
and its value. Exits non-zero when the text does not parse.
"""

import sys


def main():
    fmt, path = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if fmt == "prometheus":
        from prometheus_client.parser import text_string_to_metric_families
    elif fmt == "openmetrics":
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        sys.exit(f"unknown format {fmt!r}")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            print(f"{family.name}\t{family.type}\t{sample.name}\t{labels}\t{sample.value!r}")


if __name__ == "__main__":
    main()
