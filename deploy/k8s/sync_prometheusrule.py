#!/usr/bin/env python3
"""Write deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yml.

The alert rules have one source, alerts.yml (loaded by the docker-compose Prometheus and unit
tested with promtool); Kubernetes gets the same groups wrapped in a PrometheusRule.
tests/test_deploy.py fails when the two differ.

    python3 deploy/k8s/sync_prometheusrule.py           # rewrite prometheusrule.yaml
    python3 deploy/k8s/sync_prometheusrule.py --check   # exit 1 if it is out of date

Needs PyYAML (in the dev extra).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
SOURCE = DEPLOY / "prometheus" / "alerts.yml"
TARGET = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/k8s/sync_prometheusrule.py: edit the
# source and re-run the script; tests/test_deploy.py checks the two are identical.
# kube-prometheus-stack only loads rules matching its ruleSelector (by default the label
# release: <helm release name>); add that label in an overlay if yours requires it.
"""


class _Dumper(yaml.SafeDumper):
    """Block styles as in the source, so the output stays reviewable: literal for multi-line
    strings (PromQL), folded for long prose (annotations)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else ">" if len(value) > 80 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(source: Path = SOURCE) -> str:
    groups = yaml.safe_load(source.read_text(encoding="utf-8"))["groups"]
    rule: dict[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "liqmon",
            "labels": {
                "app.kubernetes.io/name": "liqmon",
                "app.kubernetes.io/component": "monitor",
            },
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=88, allow_unicode=True)
    return HEADER + body


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date: run {Path(argv[0]).as_posix()}", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
