"""``fedledger report RUN_DIR``: one self-contained HTML page of a run, and the same plots as PNG.

    <run folder>/report/
        report.html        every plot embedded (data: URIs), no script, no network needed to view it
        loss.png           held-out loss and perplexity (and accuracy, when recorded) per round
        traffic.png        MB down (server -> clients) / up (clients -> server, or peer to peer) per round
        clients.png        clients kept / rejected / distrusted per round
        trust.png          trust score per client per round (heat map, malicious clients marked)
        detection.png      detection precision / recall per round (when the run knew the attackers)
        audit.png          the audit verdict per round and client (OK / MISMATCH / MISSING / ...)
        serverless.png     consensus distance and simulated network time per round (serverless runs)

The page reads only what the run recorded: ``metrics.json`` (written when the run ended) and,
for an audited run, the audit's own report (:func:`fedledger.chain.audit.audit_run`, the same
JSON as ``fedledger audit --json``). A figure whose data the run does not hold is not drawn; what
is missing (a crashed run has no ``metrics.json``, a round without an evaluation...) is listed
on the page and in :attr:`Report.missing`. The audit section never says more than the audit
checked: a run whose audit could not be run is shown as not checked, never as passed.

    report = build_report("runs/20261201-184702-run7")   # -> Report(html, pngs, missing, verdict)
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import sys
from dataclasses import dataclass, field

from .logs import is_number

REPORT_FOLDER = "report"
#: Audit statuses, worst first: a grid cell with several rows shows the worst.
AUDIT_ORDER = ("MISMATCH", "MISSING", "BAD-SIGNATURE", "NO-AGGREGATE", "UNSIGNED", "NOT-RECOMPUTED", "REJECTED", "OK")
AUDIT_COLOURS = {"OK": "#2e7d32", "REJECTED": "#9e9e9e", "NOT-RECOMPUTED": "#f9a825", "UNSIGNED": "#fbc02d",
                 "NO-AGGREGATE": "#6a1b9a", "BAD-SIGNATURE": "#d84315", "MISSING": "#1565c0", "MISMATCH": "#c62828"}
#: The page's verdict from ``fedledger audit``'s exit code (0 / 1 / 3), or why there is none.
VERDICTS = {0: "passed", 1: "failed", 3: "incomplete"}


class ReportError(Exception):
    """The folder is not a run folder: nothing to report."""


@dataclass
class Figure:
    name: str           # file stem and the element id on the page (fig-<name>)
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Report:
    folder: str                       # where report.html and the PNGs are
    html: str                         # path of report.html
    pngs: list[str]
    missing: list[str]
    verdict: str                      # passed | failed | incomplete | not-checked | not-audited
    audit: dict | None = None         # the audit's JSON (fedledger audit --json), when it ran
    figures: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- reading the run
def read_run(run_dir: str) -> tuple[dict | None, list[str]]:
    """``metrics.json`` (or None) and what is missing from it. Raises :class:`ReportError` when the
    folder is neither a finished run (metrics.json) nor an audited one (audit/run.json)."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir} is not a folder; pass a run folder, e.g. runs/<time>-run<id> (see runs/LATEST)")
    path = os.path.join(run_dir, "metrics.json")
    has_audit = os.path.exists(os.path.join(run_dir, "audit", "run.json"))
    if not os.path.exists(path):
        if not has_audit:
            raise ReportError(f"{run_dir} holds no metrics.json and no audit/run.json: not a fedledger run folder; "
                              f"pass a folder from the run-dir, e.g. runs/<time>-run<id>")
        return None, ["metrics.json (the run did not finish: only the audit record is shown)"]
    try:
        with open(path) as fh:
            metrics = json.load(fh)
    except (OSError, ValueError) as exc:
        return None, [f"a readable metrics.json ({type(exc).__name__}: {exc})"]
    return metrics, _missing_rounds(metrics)


def _missing_rounds(metrics: dict) -> list[str]:
    rounds = metrics.get("rounds") or {}
    planned = (metrics.get("settings") or {}).get("num-rounds")
    missing = []
    if not rounds:
        missing.append("per-round results (metrics.json has no rounds)")
    if isinstance(planned, int):
        absent = [r for r in range(1, planned + 1) if str(r) not in rounds]
        if absent:
            missing.append(f"round(s) {_ranges(absent)} of {planned} (not in metrics.json)")
        no_eval = [r for r in range(0, planned + 1) if str(r) in rounds and "central" not in rounds[str(r)]]
        if no_eval:
            missing.append(f"held-out evaluation of round(s) {_ranges(no_eval)}")
    if _no_heldout_data(rounds):
        missing.append(NO_HELDOUT)
    return missing


NO_HELDOUT = ("no held-out data: the held-out split had no answer token to score, so no held-out loss, perplexity "
              "or accuracy was measured (raise max-length or heldout-fraction)")


def _no_heldout_data(rounds: dict) -> bool:
    """Every evaluated round scored nothing (``clients.train.evaluate`` gives NaN on no answer token;
    an older run recorded num-examples 0 with a perplexity of 1)."""
    central = [e["central"] for e in rounds.values() if isinstance(e, dict) and isinstance(e.get("central"), dict)]
    return bool(central) and all(c.get("num-examples") == 0 or _number(c.get("perplexity")) is None for c in central)


def _ranges(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers)


def _rounds(metrics: dict | None) -> list[tuple[int, dict]]:
    return sorted(((int(k), v) for k, v in ((metrics or {}).get("rounds") or {}).items()), key=lambda kv: kv[0])


def _number(value) -> float | None:
    return float(value) if is_number(value) else None


def _series(rounds, *path) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rnd, entry in rounds:
        value = entry
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if _number(value) is not None:
            xs.append(rnd)
            ys.append(float(value))
    return xs, ys


def partition_labels(metrics: dict | None) -> dict[str, int]:
    """Signer address (lower case) and identity key -> partition, from the run's identities."""
    labels: dict[str, int] = {}
    for ident in (((metrics or {}).get("identities") or {}).get("nodes") or {}).values():
        part = ident.get("partition")
        if part is None:
            continue
        if ident.get("signer"):
            labels[str(ident["signer"]).lower()] = int(part)
        labels[f"partition-{part}"] = int(part)
    return labels


# ---------------------------------------------------------------------------- the audit
def run_audit(run_dir: str) -> tuple[dict | None, str | None]:
    """The audit's JSON report (as ``fedledger audit --json`` prints it), or why it could not run."""
    if not os.path.exists(os.path.join(run_dir, "audit", "run.json")):
        return None, None
    try:
        from fedledger.chain.audit import audit_run

        return audit_run(run_dir).to_dict(), None
    except Exception as exc:  # unreachable chain, damaged record...: shown, never as passed
        return None, f"{type(exc).__name__}: {exc}"


def audit_verdict(audit: dict | None, error: str | None, audited: bool) -> str:
    if not audited:
        return "not-audited"
    if audit is None:
        return "not-checked"
    return VERDICTS.get(audit.get("exit-code"), "failed")


def transactions(run_dir: str) -> list[dict]:
    """The run's chain events with their transaction hashes, as exported while it ran
    (``audit/events.jsonl``); empty when the run did not export them."""
    path = os.path.join(run_dir, "audit", "events.jsonl")
    events = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
    return [e for e in events if isinstance(e, dict) and e.get("tx")]


# ---------------------------------------------------------------------------- figures
def _subplots(*grid, **kwargs):
    """A matplotlib Figure and its axes without pyplot: no backend is chosen and no global figure
    state is touched, so the report can be built inside a notebook or an application."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=kwargs.pop("figsize"))
    return fig, fig.subplots(*grid, **kwargs)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def loss_figure(rounds) -> Figure | None:
    rounds = [(r, e) for r, e in rounds if (e.get("central") or {}).get("num-examples") != 0]  # nothing scored
    loss, ppl = _series(rounds, "central", "eval-loss"), _series(rounds, "central", "perplexity")
    acc = _series(rounds, "central", "accuracy")
    if not loss[0] and not ppl[0]:
        return None
    panels = [p for p in ((loss, "held-out loss"), (ppl, "perplexity"), (acc, "accuracy")) if p[0][0]]
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, ((xs, ys), label) in zip(axes[0], panels):
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.suptitle("Held-out evaluation of the global adapter (round 0 = before training)")
    return Figure("loss", "Held-out loss and perplexity", _png(fig))


def traffic_figure(rounds) -> Figure | None:
    down, up = _series(rounds, "traffic", "bytes-sent"), _series(rounds, "traffic", "bytes-received")
    caption = "down: server to clients; up: clients to server (Flower messages)"
    if not down[0] and not up[0]:  # serverless: what the peers sent each other (simulated links)
        down, up = _series(rounds, "exchange", "total-peer-bytes"), _series(rounds, "exchange", "relay-bytes")
        caption = "peer-to-peer: bytes on the simulated links; relay: bytes through the Flower relay"
        labels = ("peer-to-peer", "relay")
    else:
        labels = ("down", "up")
    if not down[0] and not up[0]:
        return None
    fig, ax = _subplots(figsize=(6, 3.2))
    width = 0.38
    for offset, (xs, ys), label in ((-width / 2, down, labels[0]), (width / 2, up, labels[1])):
        ax.bar([x + offset for x in xs], [y / 1e6 for y in ys], width, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.set_xticks(sorted(set(down[0]) | set(up[0])))
    ax.legend()
    ax.set_title("Traffic per round")
    return Figure("traffic", "MB per round", _png(fig), caption)


def client_counts(rounds) -> dict[int, dict[str, int]]:
    """Per training round: clients kept, rejected, distrusted (hub report or serverless exchange)."""
    counts = {}
    for rnd, entry in rounds:
        report, exchange = entry.get("report"), entry.get("exchange")
        if isinstance(report, dict) and isinstance(report.get("kept"), list):
            distrusted = len(report.get("distrusted") or [])
            counts[rnd] = {"kept": len(report["kept"]) - distrusted, "rejected": len(report.get("rejected") or []),
                           "distrusted": distrusted}
        elif isinstance(exchange, dict) and isinstance(exchange.get("participants"), list):
            distrusted = len(exchange.get("distrusted") or [])
            counts[rnd] = {"kept": len(exchange["participants"]) - distrusted,
                           "rejected": len(exchange.get("dropped") or []), "distrusted": distrusted}
    return counts


def clients_figure(rounds) -> Figure | None:
    counts = client_counts(rounds)
    if not counts:
        return None
    fig, ax = _subplots(figsize=(6, 3.2))
    xs, bottom = sorted(counts), [0] * len(counts)
    for key, colour in (("kept", "#2e7d32"), ("rejected", "#9e9e9e"), ("distrusted", "#c62828")):
        ys = [counts[x][key] for x in xs]
        ax.bar(xs, ys, bottom=bottom, label=key, color=colour)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_xlabel("round")
    ax.set_ylabel("clients")
    ax.set_xticks(xs)
    ax.legend()
    ax.set_title("Clients kept / rejected / distrusted")
    return Figure("clients", "Clients per round", _png(fig),
                  "kept: aggregated; rejected: refused before trust (bad reply, unknown node, dropped); "
                  "distrusted: excluded by trust")


def trust_matrix(rounds, labels: dict[str, int]) -> tuple[list[int], list[int], list[list[float]], str] | None:
    """(rounds, partitions, values[partition][round], what the values are) for the heat map."""
    scores = {rnd: e["trust"]["scores"] for rnd, e in rounds
              if isinstance(e.get("trust"), dict) and isinstance(e["trust"].get("scores"), dict)}
    what = "trust score (client mean = 1)"
    if not scores:  # serverless trust: how many peers distrusted each peer's model
        scores = {rnd: e["exchange"]["distrusted-votes"] for rnd, e in rounds
                  if isinstance(e.get("exchange"), dict) and isinstance(e["exchange"].get("distrusted-votes"), dict)}
        what = "peers that distrusted its model"
        labels = {**labels, **{str(p): p for s in scores.values() for p in map(int, s)}}
    if not scores:
        return None
    parts = sorted({labels[k] for s in scores.values() for k in s if k in labels})
    xs = sorted(scores)
    absent = float("nan") if what.startswith("trust") else 0.0  # a peer nobody distrusted has no vote entry
    values = [[float(scores[r].get(_key_of(p, scores[r], labels), absent)) for r in xs] for p in parts]
    return xs, parts, values, what


def _key_of(partition: int, score: dict, labels: dict[str, int]) -> str:
    return next((k for k in score if labels.get(k) == partition), "")


def trust_figure(rounds, labels, malicious: list[int]) -> Figure | None:
    matrix = trust_matrix(rounds, labels)
    if matrix is None:
        return None
    xs, parts, values, what = matrix
    fig, ax = _subplots(figsize=(max(4.5, 0.8 * len(xs) + 2.5), max(2.5, 0.45 * len(parts) + 1.2)))
    image = ax.imshow(values, aspect="auto", cmap="RdYlGn" if what.startswith("trust") else "Reds")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(parts)), [f"client {p}" + (" (malicious)" if p in malicious else "") for p in parts])
    for tick, p in zip(ax.get_yticklabels(), parts):
        if p in malicious:
            tick.set_color("#c62828")
            tick.set_fontweight("bold")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.2f}" if what.startswith("trust") else f"{v:.0f}", ha="center", va="center",
                        fontsize=8)
    ax.set_xlabel("round")
    fig.colorbar(image, ax=ax, label=what)
    ax.set_title("Trust per client per round")
    caption = f"{what}; malicious clients (ground truth: run-config malicious) in red" if malicious else what
    return Figure("trust", "Trust per client per round", _png(fig), caption)


def detection_figure(rounds) -> Figure | None:
    precision, recall = _series(rounds, "detection", "precision"), _series(rounds, "detection", "recall")
    if not precision[0] and not recall[0]:
        return None
    fig, ax = _subplots(figsize=(6, 3.2))
    ax.plot(*precision, marker="o", label="precision")
    ax.plot(*recall, marker="s", linestyle="--", label="recall")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(sorted(set(precision[0]) | set(recall[0])))
    ax.set_xlabel("round")
    ax.legend()
    ax.set_title("Detection of the malicious clients")
    return Figure("detection", "Detection precision / recall", _png(fig),
                  "excluded (rejected or distrusted) clients against the run's malicious ids")


def audit_grid(audit: dict, labels: dict[str, int]) -> tuple[list[int], list[str], dict[tuple[str, int], str]]:
    """(rounds, row names, worst status per (row, round)) from the audit's rows."""
    cells: dict[tuple[str, int], str] = {}
    for row in audit.get("rows") or []:
        name = _client_name(str(row.get("client", "?")), row.get("kind"), labels)
        key, status = (name, int(row.get("round", 0))), str(row.get("status"))
        if key not in cells or _rank(status) < _rank(cells[key]):
            cells[key] = status
    xs = sorted({r for _, r in cells})
    names = sorted({n for n, _ in cells}, key=lambda n: (not n.startswith("client"), n))
    return xs, names, cells


def _rank(status: str) -> int:
    return AUDIT_ORDER.index(status) if status in AUDIT_ORDER else -1


def _client_name(client: str, kind, labels: dict[str, int]) -> str:
    if kind in ("update", "rejected"):
        part = labels.get(client.lower())
        return f"client {part}" if part is not None else client[:10] + "…"
    return client


def audit_figure(audit: dict, labels) -> Figure | None:
    xs, names, cells = audit_grid(audit, labels)
    if not cells:
        return None
    from matplotlib.patches import Patch, Rectangle

    fig, ax = _subplots(figsize=(max(5.0, 0.9 * len(xs) + 3.5), max(2.5, 0.45 * len(names) + 1.4)))
    for i, name in enumerate(names):
        for j, rnd in enumerate(xs):
            status = cells.get((name, rnd))
            if status is None:
                continue
            ax.add_patch(Rectangle((j - 0.45, i - 0.4), 0.9, 0.8, color=AUDIT_COLOURS.get(status, "#000")))
            ax.text(j, i, status, ha="center", va="center", fontsize=7, color="white")
    ax.set_xlim(-0.6, len(xs) - 0.4)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("round")
    seen = [s for s in AUDIT_ORDER if s in cells.values()]
    ax.legend(handles=[Patch(color=AUDIT_COLOURS[s], label=s) for s in seen], loc="upper left",
              bbox_to_anchor=(1.01, 1))
    ax.set_title("Audit verdict per round and client")
    return Figure("audit", "Audit verdict per round and client", _png(fig), audit.get("verdict", ""))


def serverless_figure(rounds) -> Figure | None:
    consensus = _series(rounds, "exchange", "consensus-mean")
    network = _series(rounds, "exchange", "sim-network-seconds")
    if not consensus[0]:  # hub rounds also carry simulated network time: this figure is for serverless runs
        return None
    fig, (left, right) = _subplots(1, 2, figsize=(9, 3.2))
    left.plot(*consensus, marker="o", label="mean")
    left.plot(*_series(rounds, "exchange", "consensus-max"), marker="s", linestyle="--", label="max")
    left.set_title("Consensus distance (peer to mean model)")
    left.set_xlabel("round")
    left.legend()
    right.bar(*network)
    right.set_title("Simulated network time")
    right.set_xlabel("round")
    right.set_ylabel("s")
    for ax, xs in ((left, consensus[0]), (right, network[0])):
        ax.set_xticks(xs)
    return Figure("serverless", "Consensus distance and simulated network time", _png(fig),
                  "L2 distance of each peer's model to the peers' mean after the round; network time from the "
                  "latency/bandwidth model (link-latency, link-bandwidth)")


def figures(metrics: dict | None, audit: dict | None) -> list[Figure]:
    rounds, labels = _rounds(metrics), partition_labels(metrics)
    malicious = [int(m) for m in (metrics or {}).get("malicious") or []]
    drawn = [loss_figure(rounds), traffic_figure(rounds), clients_figure(rounds),
             trust_figure(rounds, labels, malicious), detection_figure(rounds),
             audit_figure(audit, labels) if audit else None, serverless_figure(rounds)]
    return [f for f in drawn if f is not None]


# ---------------------------------------------------------------------------- the page
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
.verdict{padding:.7em 1em;border-radius:6px;font-weight:600;color:#fff}
.passed{background:#2e7d32}.failed{background:#c62828}.incomplete,.not-checked{background:#f9a825;color:#222}
.not-audited{background:#757575}table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:left}figure{margin:1.5em 0}img{max-width:100%}code{font-size:.9em}
.missing{background:#fff3e0;border-left:4px solid #ef6c00;padding:.5em 1em}"""

VERDICT_TEXT = {"passed": "Audit PASSED", "failed": "Audit FAILED", "incomplete": "Audit INCOMPLETE",
                "not-checked": "Audit NOT CHECKED", "not-audited": "Not audited"}


def render_html(run_dir: str, metrics: dict | None, audit: dict | None, audit_error: str | None, verdict: str,
                figs: list[Figure], missing: list[str], txs: list[dict]) -> str:
    e = html.escape
    settings = (metrics or {}).get("settings") or {}
    title = f"fedledger run {(metrics or {}).get('run-id', (audit or {}).get('run-id', '?'))}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{e(title)}</h1><p><code>{e(os.path.abspath(run_dir))}</code></p>"]
    detail = (audit or {}).get("verdict") or audit_error or ("the run was not audited (audit=\"none\")"
                                                             if verdict == "not-audited" else "")
    parts.append(f"<p id='verdict' class='verdict {verdict}' data-verdict='{verdict}'>{VERDICT_TEXT[verdict]}: "
                 f"{e(detail)}</p>")
    if missing:
        items = "".join(f"<li>{e(m)}</li>" for m in missing)
        parts.append(f"<div id='missing' class='missing'><b>Missing from this run:</b><ul>{items}</ul></div>")
    parts.append(_summary_table(metrics, settings))
    if audit is not None or txs:
        parts.append(_ledger_table(metrics, audit, txs))
    for f in figs:
        data = base64.b64encode(f.png).decode()
        parts.append(f"<figure id='fig-{f.name}' data-figure='{f.name}'><h2>{e(f.title)}</h2>"
                     f"<img alt='{e(f.title)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(f.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_table(metrics: dict | None, settings: dict) -> str:
    if not metrics:
        return ""
    rows = [("strategy", settings.get("strategy")), ("trust", settings.get("trust")),
            ("rounds", settings.get("num-rounds")), ("nodes", metrics.get("num-nodes")),
            ("model", settings.get("model")), ("dataset", settings.get("dataset")),
            ("attack", f"{settings.get('attack')} by clients {settings.get('malicious') or '-'}"),
            ("wall time", f"{metrics['wall-seconds']:.1f} s" if _number(metrics.get("wall-seconds")) else None)]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v is not None)
    return f"<h2>Run</h2><table id='summary'>{body}</table>"


def _ledger_table(metrics, audit, txs) -> str:
    ledger = (metrics or {}).get("ledger") or {}
    registry = (audit or {}).get("registry-address") or ledger.get("registry-address")
    chain_id = (audit or {}).get("chain-id") or ledger.get("chain-id")
    rows = [("registry", registry), ("chain id", chain_id), ("checked against", (audit or {}).get("source")),
            ("transactions", ledger.get("transactions")), ("gas used", ledger.get("gas-used"))]
    body = "".join(f"<tr><th>{k}</th><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in rows if v is not None)
    by_tx: dict[str, list[str]] = {}
    for ev in txs:
        what = f"{ev.get('event')} round {ev.get('round')}" if ev.get("round") is not None else str(ev.get("event"))
        by_tx.setdefault(ev["tx"], [])
        if what not in by_tx[ev["tx"]]:
            by_tx[ev["tx"]].append(what)
    tx_rows = "".join(f"<tr><td><code>{html.escape(tx)}</code></td><td>{html.escape(', '.join(w))}</td></tr>"
                      for tx, w in by_tx.items())
    tx_table = (f"<h3>Transactions</h3><table id='transactions'><tr><th>hash</th><th>events</th></tr>{tx_rows}</table>"
                if tx_rows else "<p>Transaction hashes: not exported by this run (read them from the chain with "
                                "<code>fedledger audit</code>).</p>")
    return f"<h2>Ledger</h2><table id='ledger'>{body}</table>{tx_table}"


# ---------------------------------------------------------------------------- the whole report
def build_report(run_dir: str, out_dir: str | None = None, audit: bool = True,
                 audit_result: tuple[dict | None, str | None] | None = None) -> Report:
    """Write ``report.html`` and the PNGs (default: ``<run_dir>/report/``). Raises
    :class:`ReportError` when ``run_dir`` is not a run folder. ``audit_result``: the audit already
    run on this folder, as (its JSON, or None with why it could not run); it is shown as it is,
    not run again (``fedledger run`` prints the audit, then reports that same result)."""
    metrics, missing = read_run(run_dir)
    audited = os.path.exists(os.path.join(run_dir, "audit", "run.json"))
    if not audit:
        audit_json, audit_error = None, "not run: --no-audit"
    else:
        audit_json, audit_error = audit_result if audit_result is not None else run_audit(run_dir)
    if audited and audit_json is None:
        missing.append(f"the audit's verdict ({audit_error})" if not audit else
                       f"the audit's verdict (the audit could not run: {audit_error})")
    verdict = audit_verdict(audit_json, audit_error, audited)
    figs = figures(metrics, audit_json)
    out = out_dir or os.path.join(run_dir, REPORT_FOLDER)
    os.makedirs(out, exist_ok=True)
    pngs = []
    for f in figs:
        pngs.append(os.path.join(out, f"{f.name}.png"))
        with open(pngs[-1], "wb") as fh:
            fh.write(f.png)
    page = os.path.join(out, "report.html")
    with open(page, "w") as fh:
        fh.write(render_html(run_dir, metrics, audit_json, audit_error, verdict, figs, missing,
                             transactions(run_dir) if audited else []))
    return Report(out, page, pngs, missing, verdict, audit_json, [f.name for f in figs])


def cmd_report(args) -> int:
    """``fedledger report RUN_DIR``: 0 written, 1 not a run folder; a line for what is missing."""
    try:
        report = build_report(args.run_dir, args.out, audit=not args.no_audit)
    except ReportError as exc:
        print(f"fedledger: error: {exc}", file=sys.stderr)
        return 1
    if report.missing:
        print(f"fedledger: report incomplete, missing: {'; '.join(report.missing)}", file=sys.stderr)
    print(f"fedledger: report {report.html} ({len(report.pngs)} plots, audit {report.verdict})")
    return 0


def add_report_command(subparsers) -> None:
    rep = subparsers.add_parser("report", help="HTML page + PNG plots of a run (loss, traffic, clients, trust, audit)")
    rep.add_argument("run_dir", help="a run folder, e.g. runs/<time>-run<id>")
    rep.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    rep.add_argument("--no-audit", action="store_true", help="do not run the audit (the page then says not checked)")
    rep.set_defaults(func=cmd_report)
