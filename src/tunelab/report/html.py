"""Self-contained HTML run report: `write_report(run_dir)` writes `run_dir/report.html`.

Every input is optional and read defensively: a missing or malformed file turns its section into a short
note, never into a crash (a run may be half-written while training). All text taken from files goes
through `html.escape` - completions are untrusted model output. Plots are inline PNG data URIs, CSS is
inline, and there is no JavaScript, so the file can be mailed or archived on its own.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import tunelab
from tunelab.errors import UserError
from tunelab.report._plots import is_number, training_plots

CLIP = 4000  # characters kept of a completion / reason / prompt / generic value

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:16px 24px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 18px;margin:14px 0}
h1{font-size:22px;margin:8px 0} h2{font-size:18px;margin:4px 0 10px} h3{font-size:16px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;max-width:100%}
th,td{border:1px solid #dde1e7;padding:3px 9px;text-align:left;overflow-wrap:anywhere;vertical-align:top}
thead th{background:#eef1f5} tbody th{font-weight:600;background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f3f4f6;padding:8px;border-radius:6px;overflow-x:auto;white-space:pre-wrap;word-break:break-word}
details{margin:3px 0;border-left:3px solid #c8ced8;padding-left:8px} summary{cursor:pointer}
.pair{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:10px} .muted{color:#6b7280}
.error{color:#b42318} img{max-width:100%;display:block;margin:6px 0}
footer{color:#6b7280;text-align:center;padding:12px 0 24px;font-size:12px}
"""


def write_report(run_dir: Path) -> Path:
    """Render every available input of `run_dir` into `run_dir/report.html` and return that path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir} (pass the directory a training run wrote)")
    config, config_text = _read_config(run_dir / "config.yaml")
    body = "\n".join(
        [
            _safe("Run", _header, run_dir, config),
            _safe("Verdict", _verdict_section, _read_json(run_dir / "summary.json")),
            _safe("Summary", _summary_section, _read_json(run_dir / "summary.json")),
            _safe("Training curves", _training_section, _read_jsonl(run_dir / "metrics.jsonl")),
            _safe("Evaluation", _eval_section, run_dir / "eval"),
            _safe("Config", _config_section, config_text, config),
        ]
    )
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>tunelab report - {_e(run_dir.name)}</title><style>{_CSS}</style></head>\n"
        f"<body><main>\n{body}\n</main>\n"
        f"<footer>Generated {_e(now)} by tunelab {_e(tunelab.__version__)}</footer>\n</body></html>\n"
    )
    out = run_dir / "report.html"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)  # atomic: a reader never sees a half-written report
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of `path`; blank, broken (e.g. half-written last line) or non-object lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            obj = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def _read_config(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None, text
    return (data if isinstance(data, dict) else None), text


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _clip(text: Any, limit: int = CLIP) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else f"{text[:limit]}\n... [truncated, {len(text) - limit} more chars]"


def _fmt(value: Any, spec: str = ",.4f") -> str:
    """Format a number with `spec` (ints keep ','), anything else as text; None -> '-'."""
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if is_number(value):
        return format(value, spec)
    if isinstance(value, (dict, list)):
        return _clip(json.dumps(value, ensure_ascii=False, default=str))
    return _clip(value)


def _section(title: str, content: str) -> str:
    return f"<section><h2>{_e(title)}</h2>\n{content}\n</section>"


def _note(text: str) -> str:
    return f'<p class="muted">{_e(text)}</p>'


def _safe(title: str, render: Callable[..., str], *args: Any) -> str:
    """`render(*args)`; a bug or an input shape nobody foresaw costs one section, not the whole report."""
    try:
        return render(*args)
    except Exception as exc:  # noqa: BLE001 - the report must always be written
        msg = f"{title}: could not render ({type(exc).__name__}: {exc})"
        return f'<section><p class="error">{_e(_clip(msg, 500))}</p></section>'


def _table(head: list[str] | None, rows: list[list[str]]) -> str:
    """Plain-text cells (escaped here); the first cell of a row is its header, numbers right-aligned."""
    out = ["<table>"]
    if head:
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = [f'<th scope="row">{_e(row[0])}</th>'] if row else []
        for cell in row[1:]:
            cls = ' class="num"' if re.fullmatch(r"[-+]?[\d,.]+%?", cell) else ""
            cells.append(f"<td{cls}>{_e(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join([*out, "</tbody></table>"])


def _name_of(config: dict[str, Any], *path: str) -> str | None:
    node: Any = config
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node = node.get("name")
    return None if node is None else str(node)


def _header(run_dir: Path, config: dict[str, Any] | None) -> str:
    cfg = config or {}
    objective = _name_of(cfg, "objective") or _name_of(cfg, "method", "objective")
    rows = [
        ["run", str(run_dir.name)],
        ["model", _name_of(cfg, "model") or "-"],
        ["method", _name_of(cfg, "method") or "-"],
        ["objective", objective or "-"],
    ]
    return f"<section><h1>tunelab run report</h1>\n{_table(None, rows)}</section>"


def _duration(seconds: Any) -> str:
    if not is_number(seconds) or seconds != seconds:
        return _fmt(seconds)
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    human = f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"
    return f"{human} ({seconds:,.1f} s)" if h or m else human


def _params(trainable: Any, total: Any) -> str:
    if is_number(trainable) and is_number(total) and total > 0:
        return f"{_fmt(trainable)} ({100 * trainable / total:.2f}% of {_fmt(total)})"
    return _fmt(trainable)


def _val_change(before: Any, after: Any) -> str:
    text = f"{_fmt(before)} -> {_fmt(after)}"
    if is_number(before) and is_number(after):
        text += f" (delta {after - before:+.4f})"
    return text


_KEY_FIGURES = {
    "trainable params": lambda s: _params(s.get("trainable_params"), s.get("total_params")),
    "steps": lambda s: _fmt(s.get("steps")),
    "train tokens": lambda s: _fmt(s.get("train_tokens")),
    "wall time": lambda s: _duration(s.get("wall_s")),
    "tokens/s": lambda s: _fmt(s.get("tokens_per_s"), ",.1f"),
    "val loss before -> after": lambda s: _val_change(s.get("val_loss_before"), s.get("val_loss_after")),
    "peak RSS": lambda s: f"{_fmt(s.get('peak_rss_mb'), ',.0f')} MB",
}
_KNOWN = {"trainable_params", "total_params", "steps", "train_tokens", "wall_s", "tokens_per_s"}
_KNOWN |= {"val_loss_before", "val_loss_after", "peak_rss_mb", "val_samples_before", "val_samples_after", "verdicts", "data"}


def _verdict_section(summary: Any) -> str:
    """The first screen's answer: did it get better, by how much, how sure (tunelab.evaluate.verdict)."""
    verdicts = summary.get("verdicts") if isinstance(summary, dict) else None
    if not verdicts:
        return _section("Verdict", _note("No before/after comparison in this run (no validation set and no eval tasks run before and after)."))
    rows = []
    for v in verdicts:
        before, after = v.get("before", v.get("rate_a")), v.get("after", v.get("rate_b"))
        rows.append([str(v.get("what")), _fmt(before), _fmt(after), str(v.get("verdict"))])
    return _section("Verdict", _table(["compared", "before", "after", "verdict"], rows))


def _data_table(summary: Any) -> str:
    data = summary.get("data") if isinstance(summary, dict) else None
    if not isinstance(data, dict):
        return ""
    return "<h3>Data</h3>" + _table(None, [[str(k).replace("_", " "), _fmt(v, ",")] for k, v in data.items()])


def _summary_section(summary: Any) -> str:
    if not isinstance(summary, dict):
        return _section("Summary", _note("No summary.json yet (training not finished, or it failed)."))
    key_rows = [[name, render(summary)] for name, render in _KEY_FIGURES.items()]
    other = [[str(k), _fmt(v, ".6g")] for k, v in summary.items() if k not in _KNOWN]
    parts = [_table(None, key_rows), _data_table(summary)]
    if other:
        parts += ["<h3>Other values</h3>", _table(None, other)]
    return _section("Summary", "\n".join(parts))


def _training_section(rows: list[dict[str, Any]]) -> str:
    plots = training_plots(rows)
    if not plots:
        return _section("Training curves", _note("No plottable metrics in metrics.jsonl yet."))
    images = [f'<img src="{uri}" alt="{_e(title)} plot" title="{_e(title)}">' for title, uri in plots]
    return _section("Training curves", "\n".join(images))


def _config_section(text: str | None, config: dict[str, Any] | None) -> str:
    if text is None:
        return _section("Config", _note("No config.yaml in this run directory."))
    warn = "" if config is not None else _note("config.yaml is not a YAML mapping; shown as is.")
    return _section("Config", f"{warn}<pre>{_e(text)}</pre>")


@dataclass
class _EvalRun:
    summary: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


def _label_key(label: str) -> tuple[int, int, str]:
    """before, step-N ascending, after, then anything else alphabetically."""
    step = re.fullmatch(r"step-(\d+)", label)
    if label == "before":
        return (0, 0, "")
    if step:
        return (1, int(step.group(1)), "")
    return (2, 0, "") if label == "after" else (3, 0, label)


def _load_task(task_dir: Path) -> dict[str, _EvalRun]:
    runs = {}
    for label_dir in sorted(p for p in task_dir.iterdir() if p.is_dir()):
        summary = _read_json(label_dir / "summary.json")
        samples = _read_jsonl(label_dir / "samples.jsonl")
        runs[label_dir.name] = _EvalRun(summary if isinstance(summary, dict) else {}, samples)
    return dict(sorted(runs.items(), key=lambda kv: _label_key(kv[0])))


def _eval_section(eval_dir: Path) -> str:
    tasks = sorted(p for p in eval_dir.iterdir() if p.is_dir()) if eval_dir.is_dir() else []
    if not tasks:
        return _section("Evaluation", _note("No evaluation results (eval/) in this run."))
    blocks = [_safe(f"task {t.name}", lambda d: _task_block(d.name, _load_task(d)), t) for t in tasks]
    return _section("Evaluation", "\n".join(blocks))


def _task_block(task: str, runs: dict[str, _EvalRun]) -> str:
    labels = list(runs)
    if not labels:
        return f"<h3>{_e(task)}</h3>" + _note("No evaluation labels in this task directory.")
    parts = [
        f"<h3>{_e(task)}</h3>",
        _metrics_table(runs),
        "<h4>Sample status counts</h4>",
        _status_table(runs),
    ]
    if "before" in runs and "after" in runs:
        parts.append(_changes(runs["before"], runs["after"]))
    return "\n".join(parts)


def _metrics_table(runs: dict[str, _EvalRun]) -> str:
    metrics = {label: r.summary.get("metrics") for label, r in runs.items()}
    metrics = {label: m if isinstance(m, dict) else {} for label, m in metrics.items()}
    names = list(dict.fromkeys(str(k) for m in metrics.values() for k in m))
    rows = [[n, *(_fmt(metrics[label].get(n)) for label in runs)] for n in names]
    rows += [[k, *(_fmt(r.summary.get(k)) for r in runs.values())] for k in ("n_problems", "n_samples")]
    if any("isolation" in r.summary for r in runs.values()):
        rows.append(["isolation", *(_isolation_summary(r.summary.get("isolation")) for r in runs.values())])
    return _table(["metric", *runs], rows)


def _status_table(runs: dict[str, _EvalRun]) -> str:
    counts = {label: Counter(str(s.get("status", "?")) for s in r.samples) for label, r in runs.items()}
    statuses = sorted(
        set().union(*counts.values()), key=lambda st: (-sum(c[st] for c in counts.values()), st)
    )
    if not statuses:
        return _note("No samples.jsonl recorded.")
    return _table(["status", *runs], [[st, *(str(counts[label][st]) for label in runs)] for st in statuses])


def _isolation_summary(text: Any) -> str:
    """One evaluation's sandbox isolation, once: the mode and its flags, per-run uids folded together (fallback
    modes give each program run its own uid, which would otherwise list one string per run)."""
    if not text:
        return "-"
    groups: dict[str, set[str]] = {}
    for part in str(text).split(", "):
        groups.setdefault(re.sub(r"uid=\d+", "uid=*", part), set()).add(part)
    return " | ".join(next(iter(parts)) if len(parts) == 1 else f"{tpl.replace('uid=*', 'uid=per-run')} ({len(parts)} runs)"
                      for tpl, parts in groups.items())


def _pass_counts(run: _EvalRun) -> dict[str, tuple[int, int]]:
    """problem id -> (samples passed, samples), from summary.per_problem or else from the samples."""
    per = run.summary.get("per_problem")
    if isinstance(per, dict) and per:
        out = {str(pid): (v.get("passed"), v.get("n")) for pid, v in per.items() if isinstance(v, dict)}
        return {
            pid: (p, n) for pid, (p, n) in out.items() if isinstance(p, int) and isinstance(n, int) and n > 0
        }
    counts: dict[str, list[int]] = {}
    for s in run.samples:
        c = counts.setdefault(str(s.get("problem_id")), [0, 0])
        c[0], c[1] = c[0] + bool(s.get("passed") is True), c[1] + 1
    return {pid: (p, n) for pid, (p, n) in counts.items()}


def _changes(before: _EvalRun, after: _EvalRun) -> str:
    b, a = _pass_counts(before), _pass_counts(after)
    delta = {pid: a[pid][0] / a[pid][1] - b[pid][0] / b[pid][1] for pid in a if pid in b}
    fixed = sorted((p for p, d in delta.items() if d > 0), key=lambda p: (-delta[p], p))
    broken = sorted((p for p, d in delta.items() if d < 0), key=lambda p: (delta[p], p))
    by_b, by_a = _by_problem(before.samples), _by_problem(after.samples)
    parts = [
        _note(
            f"{len(fixed)} fixed, {len(broken)} broken, {len(delta) - len(fixed) - len(broken)} "
            f"unchanged of {len(delta)} problems scored both before and after (per-problem pass rate)."
        )
    ]
    for title, ids, went_up in (("Fixed", fixed, True), ("Broken", broken, False)):
        parts.append(f"<h4>{title} ({len(ids)})</h4>")
        entries = [_change_entry(p, b[p], a[p], by_b.get(p, []), by_a.get(p, []), went_up) for p in ids]
        parts.append("\n".join(entries) or _note("none"))
    return "\n".join(parts)


def _by_problem(samples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        out.setdefault(str(s.get("problem_id")), []).append(s)
    return out


def _pick(samples: list[dict[str, Any]], passed: bool) -> dict[str, Any] | None:
    """The first sample whose outcome is `passed` (the telling one), else the first sample."""
    return next((s for s in samples if (s.get("passed") is True) == passed), samples[0] if samples else None)


def _change_entry(
    pid: str,
    b: tuple[int, int],
    a: tuple[int, int],
    sb: list[dict[str, Any]],
    sa: list[dict[str, Any]],
    went_up: bool,
) -> str:
    before, after = _pick(sb, passed=not went_up), _pick(sa, passed=went_up)
    prompt = (before or after or {}).get("prompt")
    head = f"<summary><code>{_e(pid)}</code> {b[0]}/{b[1]} -&gt; {a[0]}/{a[1]} passed</summary>"
    prompt_html = (
        f"<details><summary>prompt</summary><pre>{_e(_clip(prompt))}</pre></details>" if prompt else ""
    )
    pair = f'<div class="pair">{_sample_html("before", before)}{_sample_html("after", after)}</div>'
    return f"<details>{head}{prompt_html}{pair}</details>"


def _sample_html(label: str, sample: dict[str, Any] | None) -> str:
    if sample is None:
        return f"<div><strong>{_e(label)}</strong>{_note('no sample recorded')}</div>"
    meta = f"status {sample.get('status', '?')}, sample {sample.get('sample', '?')}"
    parts = [f'<strong>{_e(label)}</strong> <span class="muted">{_e(meta)}</span>']
    if sample.get("reason"):
        parts.append(f'<div class="muted">reason</div><pre>{_e(_clip(sample["reason"]))}</pre>')
    parts.append(f'<div class="muted">completion</div><pre>{_e(_clip(sample.get("completion")))}</pre>')
    return f"<div>{''.join(parts)}</div>"
