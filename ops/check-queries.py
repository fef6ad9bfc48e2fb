#!/usr/bin/env python3
"""Fail when a dashboard or alert queries a series the services do not export.

Reads every PromQL expression of the Grafana dashboard (panel targets'
`expr`, annotation `expr`, query variables' `label_values(…)`) and of the
Prometheus rules file (`expr:`), extracts the metric names they select, and
looks each one up in one or more files of scraped `/metrics` text. Exit
status 1, naming each problem, when:

- a referenced name appears in no scrape (neither as a sample nor declared
  by a `# TYPE` line; histograms declare `_bucket`, `_sum`, `_count`);
- a label matcher (`name{label=…}`) or an aggregation's `by (label)` names a
  label that none of the scraped samples of those metrics carries (`job`,
  `instance` are added by Prometheus and always allowed; `le` on `_bucket`);
- the dashboard is malformed: a panel or target not on the `${datasource}`
  variable, duplicate panel ids;
- with `--promtool`, an expression does not parse (each is checked as a
  recording rule by `promtool check rules`, Grafana's `$__rate_interval` and
  friends replaced by `5m`).

`up` and the other series Prometheus synthesises per target need no scrape.

Usage:
  check-queries.py [--dashboard JSON] [--rules YAML] [--promtool PATH]
                   [--require-samples] SCRAPE.txt [SCRAPE.txt …]
  check-queries.py --self-test

The defaults for --dashboard and --rules are the files in ops/. Python 3
standard library only: the YAML reader understands what rules files use
(`expr:` as a plain, quoted, or `|`/`>` block scalar), not all of YAML.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

OPS = pathlib.Path(__file__).resolve().parent

# Series Prometheus adds to every target itself; no exporter prints them.
SYNTHETIC_SERIES = {
    "up", "scrape_duration_seconds", "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling", "scrape_series_added",
    "ALERTS", "ALERTS_FOR_STATE",
}
# Labels Prometheus attaches at scrape time (target labels).
TARGET_LABELS = {"job", "instance"}

AGGREGATORS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
    "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
# Reserved words of PromQL: never metric names.
KEYWORDS = AGGREGATORS | {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
    "group_right", "bool", "offset", "atan2",
}
# Keywords followed by a parenthesised list of label names.
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Functions whose output carries labels the input did not have.
LABEL_MAKING_FUNCTIONS = {"label_replace", "label_join", "count_values"}

GRAFANA_RANGE_MACROS = re.compile(r"\$(?:__rate_interval|__interval|__range)(?:_ms|_s)?\b"
                                  r"|\$\{(?:__rate_interval|__interval|__range)(?:_ms|_s)?\}")

TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]*\]\])
  | (?P<number>(?:0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)[a-zA-Z0-9]*)
  | (?P<identifier>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<operator>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){}\[\],@:])
""", re.VERBOSE)


class Token:
    __slots__ = ("kind", "text")

    def __init__(self, kind, text):
        self.kind, self.text = kind, text

    def __repr__(self):
        return f"{self.kind}:{self.text}"


def tokenize(expr):
    tokens, position = [], 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        if not match:
            raise ValueError(f"cannot read {expr[position:position + 20]!r}")
        position = match.end()
        if match.lastgroup != "space":
            tokens.append(Token(match.lastgroup, match.group()))
    return tokens


def matching(tokens, start):
    """Index of the bracket closing tokens[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    opener, closer, depth = tokens[start].text, pairs[tokens[start].text], 0
    for index in range(start, len(tokens)):
        if tokens[index].text == opener and tokens[index].kind == "operator":
            depth += 1
        elif tokens[index].text == closer and tokens[index].kind == "operator":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced {opener!r}")


def unquote(text):
    if text.startswith("`"):
        return text[1:-1]
    return re.sub(r"\\(.)", r"\1", text[1:-1])


class Selector:
    """One vector selector: a metric name and the labels it matches on."""

    def __init__(self, name, labels):
        self.name, self.labels = name, labels

    def __repr__(self):
        return f"{self.name}{sorted(self.labels)}"


class Grouping:
    """`by (labels)` of an aggregation, with the selectors it aggregates."""

    def __init__(self, labels, selectors, makes_labels):
        self.labels, self.selectors, self.makes_labels = labels, selectors, makes_labels


def label_list(tokens, start):
    """Label names of the `( … )` at tokens[start], and the index after it."""
    end = matching(tokens, start)
    names = [t.text for t in tokens[start + 1:end] if t.kind in ("identifier", "string")]
    return [unquote(n) if n[0] in "\"'`" else n for n in names], end + 1


def analyse(expr):
    """(selectors, groupings) of one PromQL expression."""
    tokens = tokenize(GRAFANA_RANGE_MACROS.sub("5m", expr))
    selectors, groupings = [], []
    spans = []  # (start, end) token span of each selector, for groupings

    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.kind == "operator" and token.text == "[":
            index = matching(tokens, index) + 1  # range or subquery: durations only
            continue
        if token.kind == "identifier" and token.text in LABEL_LIST_KEYWORDS:
            if following is not None and following.text == "(":
                _, index = label_list(tokens, index + 1)
            else:
                index += 1  # group_left without a list
            continue
        if token.kind == "identifier" and token.text == "offset":
            index += 2 if following is not None and following.text != "-" else 3
            continue
        selector_start = index
        name = None
        if token.kind == "identifier":
            lowered = token.text.lower()
            if (token.text in KEYWORDS or lowered in ("inf", "nan")
                    or (following is not None and following.text == "(")):
                index += 1
                continue
            name = token.text
            index += 1
        elif not (token.kind == "operator" and token.text == "{"):
            index += 1
            continue
        labels = set()
        if index < len(tokens) and tokens[index].text == "{":
            end = matching(tokens, index)
            inner = tokens[index + 1:end]
            for position, item in enumerate(inner):
                if (item.kind == "identifier" and position + 2 < len(inner)
                        and inner[position + 1].text in ("=", "!=", "=~", "!~")):
                    if item.text == "__name__" and inner[position + 1].text == "=":
                        name = unquote(inner[position + 2].text)
                    elif item.text != "__name__":
                        labels.add(item.text)
            index = end + 1
        if name is not None:
            selectors.append(Selector(name, labels))
            spans.append((selector_start, index))

    # Aggregations with `by`: which selectors does each aggregate?
    for index, token in enumerate(tokens):
        if token.kind != "identifier" or token.text not in AGGREGATORS:
            continue
        position, by_labels = index + 1, None
        if position < len(tokens) and tokens[position].text in ("by", "without"):
            keyword = tokens[position].text
            names, position = label_list(tokens, position + 1)
            by_labels = names if keyword == "by" else None
        if position >= len(tokens) or tokens[position].text != "(":
            continue
        end = matching(tokens, position)
        if end + 1 < len(tokens) and tokens[end + 1].text in ("by", "without"):
            names, _ = label_list(tokens, end + 2)
            by_labels = names if tokens[end + 1].text == "by" else None
        if not by_labels:
            continue
        inside = [selectors[n] for n, (start, stop) in enumerate(spans)
                  if start > position and stop <= end]
        makes = any(t.kind == "identifier" and t.text in LABEL_MAKING_FUNCTIONS
                    for t in tokens[position:end])
        groupings.append(Grouping(by_labels, inside, makes))
    return selectors, groupings


# ---------------------------------------------------------------- inputs

class Scrape:
    """What a set of /metrics texts offers: sample names, declared names,
    label names per sample name, and family types."""

    def __init__(self):
        self.sampled = set()
        self.declared = set()
        self.labels = {}
        self.types = {}

    def read(self, path):
        for line in pathlib.Path(path).read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 4 and parts[1] == "TYPE":
                    family, kind = parts[2], parts[3].strip()
                    self.types[family] = kind
                    self.declared.update(declared_names(family, kind))
                continue
            match = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s", line + " ")
            if not match:
                raise ValueError(f"{path}: cannot read sample line {line!r}")
            name = match.group(1)
            self.sampled.add(name)
            names = re.findall(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"', match.group(2) or "")
            self.labels.setdefault(name, set()).update(names)

    def has(self, name, require_samples):
        return name in self.sampled or (not require_samples and name in self.declared)

    def hint(self, name):
        """Why a missing name is missing, when the scrape suggests it."""
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and base in self.types and self.types[base] != "histogram":
                return f"{base} is exported as a {self.types[base]}, not a histogram"
        if self.types.get(name) == "histogram":
            return f"{name} is a histogram: query {name}_bucket, _sum or _count"
        if name + "_total" in self.sampled | self.declared:
            return f"did you mean {name}_total?"
        if name.endswith("_total") and name.removesuffix("_total") in self.sampled:
            return f"the scrape has {name.removesuffix('_total')} (no _total)"
        return None


def declared_names(family, kind):
    if kind == "histogram":
        return {family + "_bucket", family + "_sum", family + "_count"}
    if kind == "summary":
        return {family, family + "_sum", family + "_count"}
    if kind == "counter" and not family.endswith("_total"):
        return {family, family + "_total"}  # OpenMetrics names the family without _total
    return {family}


def rules_expressions(path):
    """[(where, expr)] from a Prometheus rules file (the YAML subset rules use)."""
    lines = pathlib.Path(path).read_text().splitlines()
    found, rule = [], None
    index = 0
    while index < len(lines):
        line = lines[index]
        named = re.match(r"^\s*(?:-\s+)?(alert|record):\s*(.+?)\s*$", line)
        if named:
            rule = f"rule {unquote(named.group(2)) if named.group(2)[0] in chr(34) + chr(39) else named.group(2)}"
        match = re.match(r"^(\s*(?:-\s+)?)expr:\s?(.*)$", line)
        index += 1
        if not match:
            continue
        indent = len(match.group(1))
        value = match.group(2).strip()
        if value[:1] in ("|", ">"):
            block = []
            while index < len(lines) and (not lines[index].strip()
                                          or len(lines[index]) - len(lines[index].lstrip()) > indent):
                block.append(lines[index].strip())
                index += 1
            value = "\n".join(block)
        elif value[:1] in ('"', "'"):
            quote = value[0]
            while not (len(value) > 1 and value.endswith(quote)) and index < len(lines):
                value += " " + lines[index].strip()
                index += 1
            value = value[1:-1].replace("''", "'") if quote == "'" else json.loads(value)
        else:
            # A plain scalar may continue on more-indented lines.
            while (index < len(lines) and lines[index].strip()
                   and len(lines[index]) - len(lines[index].lstrip()) > indent
                   and not re.match(r"^\s*[A-Za-z_]+:(\s|$)", lines[index])):
                value += " " + lines[index].strip()
                index += 1
        found.append((rule or f"{path}:{index}", value))
    return found


def dashboard_expressions(dashboard, problems):
    """[(where, expr)] from a Grafana dashboard, checking its wiring as it goes."""
    found, seen_ids = [], set()

    def datasource_ok(datasource):
        if datasource is None:
            return True  # inherits the panel's
        if isinstance(datasource, str):
            return datasource in ("${datasource}", "$datasource")
        return datasource.get("uid") in ("${datasource}", "$datasource")

    def walk(panels):
        for panel in panels:
            title = panel.get("title", "?")
            if panel.get("id") in seen_ids:
                problems.append(f"dashboard: panel id {panel.get('id')} used twice ({title!r})")
            seen_ids.add(panel.get("id"))
            if panel.get("type") != "row" and panel.get("targets"):
                if not datasource_ok(panel.get("datasource")) or panel.get("datasource") is None:
                    problems.append(f"dashboard: panel {title!r} does not use ${{datasource}}")
            for target in panel.get("targets", []):
                if not datasource_ok(target.get("datasource")):
                    problems.append(f"dashboard: panel {title!r} target {target.get('refId')} "
                                    "does not use ${datasource}")
                if target.get("expr"):
                    found.append((f"panel {title!r} ({target.get('refId', '?')})", target["expr"]))
                elif not target.get("hide"):
                    problems.append(f"dashboard: panel {title!r} target "
                                    f"{target.get('refId')} has no expr")
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    variables = dashboard.get("templating", {}).get("list", [])
    if not any(v.get("type") == "datasource" and v.get("name") == "datasource"
               and v.get("query") == "prometheus" for v in variables):
        problems.append("dashboard: no `datasource` variable of type prometheus")
    for variable in variables:
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        expr = grafana_variable_expression(query or "")
        if expr:
            found.append((f"variable ${variable.get('name')}", expr))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append((f"annotation {annotation.get('name')!r}", annotation["expr"]))
    return found


def grafana_variable_expression(query):
    """The PromQL inside a Prometheus query variable, if any."""
    query = query.strip()
    match = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query, re.S)
    if match:
        return match.group(1)
    match = re.fullmatch(r"query_result\((.*)\)", query, re.S)
    if match:
        return match.group(1)
    if re.fullmatch(r"(label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)|label_names\(.*\)|metrics\(.*\))",
                    query, re.S):
        return None
    return query or None


def promtool_parse(promtool, expressions):
    """Problems promtool finds parsing the expressions (as recording rules)."""
    rules = ["groups:", "  - name: check-queries", "    rules:"]
    for number, (_, expr) in enumerate(expressions):
        rules.append(f"      - record: check_queries_{number}")
        rules.append(f"        expr: {json.dumps(GRAFANA_RANGE_MACROS.sub('5m', expr))}")
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as handle:
        handle.write("\n".join(rules) + "\n")
    try:
        result = subprocess.run([promtool, "check", "rules", handle.name],
                                capture_output=True, text=True)
    finally:
        os.unlink(handle.name)
    if result.returncode == 0:
        return []
    problems = []
    output = result.stdout + result.stderr
    for number in sorted(set(int(n) for n in re.findall(r"check_queries_(\d+)", output))):
        problems.append(f"{expressions[number][0]}: promtool cannot parse "
                        f"{expressions[number][1]!r}")
    return problems or [f"promtool check rules failed:\n{output}"]


# ---------------------------------------------------------------- main

def check(expressions, scrape, require_samples):
    problems, users = [], {}
    for where, expr in expressions:
        try:
            selectors, groupings = analyse(expr)
        except ValueError as error:
            problems.append(f"{where}: cannot read {expr!r}: {error}")
            continue
        if not selectors:
            problems.append(f"{where}: selects no metric: {expr!r}")
        for selector in selectors:
            users.setdefault(selector.name, []).append(where)
            if selector.name in SYNTHETIC_SERIES or not scrape.has(selector.name, require_samples):
                continue
            known = scrape.labels.get(selector.name)
            if known is None:
                continue  # declared but no samples yet: nothing to compare
            for label in sorted(selector.labels - known - TARGET_LABELS):
                problems.append(f"{where}: label {label!r} is on no scraped "
                                f"{selector.name} sample (it has: {', '.join(sorted(known)) or 'none'})")
        for grouping in groupings:
            if grouping.makes_labels:
                continue
            sampled = [s for s in grouping.selectors if s.name in scrape.labels]
            if not sampled or len(sampled) != len(grouping.selectors):
                continue
            available = set(TARGET_LABELS)
            for selector in sampled:
                available |= scrape.labels[selector.name]
            for label in grouping.labels:
                if label not in available:
                    names = ", ".join(sorted({s.name for s in sampled}))
                    problems.append(f"{where}: by ({label}) but no scraped sample of "
                                    f"{names} has that label")
    for name in sorted(users):
        if name in SYNTHETIC_SERIES or scrape.has(name, require_samples):
            continue
        hint = scrape.hint(name)
        places = "; ".join(dict.fromkeys(users[name]))
        problems.append(f"{name}: not in any scrape{f' ({hint})' if hint else ''}; "
                        f"used by {places}")
    return problems, users


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scrapes", nargs="*", type=pathlib.Path, help="files of /metrics text")
    parser.add_argument("--dashboard", type=pathlib.Path,
                        default=OPS / "grafana" / "gitball-dashboard.json")
    parser.add_argument("--rules", type=pathlib.Path,
                        default=OPS / "prometheus" / "gitball-rules.yml")
    parser.add_argument("--promtool", help="also parse every expression with this promtool")
    parser.add_argument("--require-samples", action="store_true",
                        help="a name declared by # TYPE but without samples counts as missing")
    parser.add_argument("--self-test", action="store_true", help="run the built-in tests")
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test()
    if not args.scrapes:
        parser.error("give at least one scrape file")

    problems = []
    scrape = Scrape()
    for path in args.scrapes:
        scrape.read(path)
    expressions = [(f"dashboard {where}", expr) for where, expr in
                   dashboard_expressions(json.loads(args.dashboard.read_text()), problems)]
    expressions += rules_expressions(args.rules)
    if args.promtool:
        problems += promtool_parse(args.promtool, expressions)
    found, users = check(expressions, scrape, args.require_samples)
    problems = list(dict.fromkeys(problems + found))

    for problem in problems:
        print(f"check-queries: {problem}", file=sys.stderr)
    if problems:
        print(f"check-queries: {len(problems)} problem(s) in {len(expressions)} expressions",
              file=sys.stderr)
        return 1
    declared_only = sorted(n for n in users if n not in scrape.sampled and n not in SYNTHETIC_SERIES)
    print(f"check-queries: {len(expressions)} expressions select {len(users)} series names, "
          f"all present in {len(args.scrapes)} scrape file(s)")
    if declared_only:
        print(f"check-queries: declared without samples yet: {', '.join(declared_only)}")
    return 0


# ---------------------------------------------------------------- self-test

def self_test():
    def names(expr):
        return sorted({s.name for s in analyse(expr)[0]})

    cases = [
        ('up{job="gitball-archiver"} == 0', ["up"]),
        ('sum by (le, format) (rate(foo_bucket{instance=~"$archiver"}[$__rate_interval]))',
         ["foo_bucket"]),
        ('histogram_quantile(0.99, sum(rate(a_bucket[5m])) by (le))', ["a_bucket"]),
        ('a / on (job, instance) group_left b', ["a", "b"]),
        ('a / on (job) group_left (code) b > bool 0.5', ["a", "b"]),
        ('deriv(x[1h]) > 0 and min_over_time(x[1h:5m]) > 0 or y offset 5m unless z @ start()',
         ["x", "y", "z"]),
        ('count(max by (upstream) (e) > 0) or vector(0)', ["e"]),
        ('time() - process_start_time_seconds{job=~"a|b"}', ["process_start_time_seconds"]),
        ('{__name__="weird:name", code="200"}', ["weird:name"]),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', ["m"]),
        ('topk(5, sum without (instance) (n))', ["n"]),
        ('quantile(0.9, q) + Inf - NaN * 1e3 + 0x1f', ["q"]),
        ('a # a comment naming not_a_metric\n + b', ["a", "b"]),
        ('rate(x[${__rate_interval}]) / ignoring(code) y', ["x", "y"]),
    ]
    failures = 0
    for expr, want in cases:
        got = names(expr)
        if got != want:
            failures += 1
            print(f"self-test: {expr!r}: got {got}, want {want}", file=sys.stderr)

    selectors, groupings = analyse('sum by (code, cache) (rate(r_total{format="zip"}[5m]))')
    if (selectors[0].labels != {"format"} or groupings[0].labels != ["code", "cache"]
            or [s.name for s in groupings[0].selectors] != ["r_total"]):
        failures += 1
        print("self-test: labels of a grouped selector misread", file=sys.stderr)

    scrape = Scrape()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n"
                     "# TYPE s summary\ns{quantile=\"0.5\"} 1\ns_sum 1\ns_count 1\n"
                     "# TYPE c_total counter\nc_total{code=\"200\"} 1\n"
                     "# TYPE later counter\n")
    try:
        scrape.read(handle.name)
    finally:
        os.unlink(handle.name)
    checks = [
        ([("t", "rate(h_bucket[5m])")], 0),
        ([("t", "h")], 1),                     # histogram family name is not a series
        ([("t", "rate(s_bucket[5m])")], 1),    # a summary has no buckets
        ([("t", 'c_total{code="200"}')], 0),
        ([("t", 'c_total{status="200"}')], 1),  # wrong label name
        ([("t", 'sum by (status) (c_total)')], 1),
        ([("t", 'sum by (code, instance) (c_total)')], 0),
        ([("t", "c")], 1),                     # counter without _total
        ([("t", "later_total")], 0),           # declared, no samples yet
        ([("t", "up")], 0),
    ]
    for expressions, want in checks:
        got = len(check(expressions, scrape, False)[0])
        if got != want:
            failures += 1
            print(f"self-test: check({expressions[0][1]!r}) gave {got} problem(s), want {want}",
                  file=sys.stderr)
    if len(check([("t", "later_total")], scrape, True)[0]) != 1:
        failures += 1
        print("self-test: --require-samples ignored", file=sys.stderr)

    rules = ('groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n'
             '          sum(a)\n            / sum(b)\n        for: 5m\n'
             '      - record: r\n        expr: "c{x=\\"1\\"}"\n'
             "      - alert: B\n        expr: d > 0\n          and e\n        labels: {}\n")
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as handle:
        handle.write(rules)
    try:
        parsed = rules_expressions(handle.name)
    finally:
        os.unlink(handle.name)
    want = [("rule A", "sum(a)\n/ sum(b)"), ("rule r", 'c{x="1"}'), ("rule B", "d > 0 and e")]
    if parsed != want:
        failures += 1
        print(f"self-test: rules reader gave {parsed}, want {want}", file=sys.stderr)

    if grafana_variable_expression('label_values(up{job="a"}, instance)') != 'up{job="a"}' \
            or grafana_variable_expression("label_values(instance)") is not None:
        failures += 1
        print("self-test: label_values() misread", file=sys.stderr)

    total = len(cases) + len(checks) + 4
    if failures:
        print(f"self-test: {failures} of {total} failed", file=sys.stderr)
        return 1
    print(f"check-queries self-test: {total} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
