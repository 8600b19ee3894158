"""A report written once as GitHub markdown and as one self-contained HTML page.

The λ studies (:mod:`hybridflow.reports.study`) and the recipes' own reports (e.g. the parity
report) share it: tables with the best value marked, figures inlined as PNG data URIs, inline
CSS, and the provenance helpers every report prints at its top.
"""

from __future__ import annotations

import base64
import html
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = [
    "Document",
    "Table",
    "git_commit",
    "html_table",
    "inline",
    "md_table",
    "package_versions",
]


@dataclass
class Table:
    """Rows of cell texts; ``bold`` marks (row, column) cells as the best."""

    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    text: bool = False  # sentences in cells: let them wrap


def md_table(t: Table) -> str:
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    for i, row in enumerate(t.rows):
        cells = [f"**{c}**" if (i, j) in t.bold else c for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = []
    for i, row in enumerate(t.rows):
        cells = "".join(
            f'<td class="best">{html.escape(c)}</td>'
            if (i, j) in t.bold
            else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    cls = ' class="text"' if t.text else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1400px;color:#1b1f24;line-height:1.45;padding:0 1em}
h1{font-size:1.7em;border-bottom:2px solid #d0d7de;padding-bottom:.3em}
h2{font-size:1.3em;border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.86em;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:.3em .55em;text-align:right;white-space:nowrap}
th{background:#f6f8fa}
table.text td,table.text th{white-space:normal;text-align:left;min-width:9em}
td:first-child,th:first-child,td:nth-child(2){text-align:left}
tbody tr:nth-child(even){background:#fafbfc}td.best{font-weight:700;background:#dafbe1}
img{max-width:100%;border:1px solid #eaeef2;margin:.4em 0}
code,pre{background:#f6f8fa;border-radius:4px;font-size:.88em}
pre{padding:.7em;overflow-x:auto}code{padding:.1em .3em}
.prov{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:.4em 1em}
.ok{color:#1a7f37;font-weight:600}.no{color:#cf222e;font-weight:600}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
"""


class Document:
    """A report written once, rendered as GitHub markdown and as self-contained HTML."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md += ["#" * level + " " + text, ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, md: str, html_text: str | None = None) -> None:
        self.md += [md, ""]
        self.html.append(f"<p>{html_text if html_text is not None else inline(md)}</p>")

    def bullets(self, items: Sequence[str]) -> None:
        self.md += [f"- {i}" for i in items] + [""]
        self.html.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")

    def table(self, t: Table) -> None:
        self.md += [md_table(t), ""]
        self.html.append(html_table(t))

    def code(self, text: str, lang: str = "") -> None:
        self.md += [f"```{lang}", text, "```", ""]
        self.html.append(f"<pre>{html.escape(text)}</pre>")

    def figure(self, file: str, alt: str) -> None:
        data = base64.b64encode((self.out / file).read_bytes()).decode()
        self.md += [f"![{alt}]({file})", ""]
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')

    def details_start(self, summary: str) -> None:
        self.md += ["<details>", f"<summary>{html.escape(summary)}</summary>", ""]
        self.html.append(f"<details><summary>{html.escape(summary)}</summary>")

    def details_end(self) -> None:
        self.md += ["</details>", ""]
        self.html.append("</details>")

    def write(self, title: str) -> None:
        (self.out / "report.md").write_text("\n".join(self.md).rstrip() + "\n")
        page = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(self.html)
            + "\n</body></html>\n"
        )
        (self.out / "report.html").write_text(page)


def inline(md: str) -> str:
    """The markdown subset used in sentences here (code, bold) as HTML."""
    text = html.escape(md)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a report's numbers depend on (provenance)."""
    out = {"python": platform.python_version()}
    for pkg in (
        "hybridflow",
        "torch",
        "torchvision",
        "timm",
        "scikit-learn",
        "numpy",
        "matplotlib",
        "captum",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def cpu_description() -> str:
    """The CPU model with the instruction sets that decide training speed (machines of one
    model name differ in them: AMX and AVX-512 bf16 make bf16 and some float32 kernels faster)
    and the cores, e.g. ``Intel(R) Xeon(R) Processor [amx_bf16 avx512_bf16 avx512f avx2], 2
    cores``: what every timing must name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "")
    flags = set(next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), []))
    shown = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{name or platform.machine()} [{' '.join(shown)}], {os.cpu_count()} cores"


def git_commit() -> str:
    """The package checkout's commit, marked when tracked files differ from it (call it before
    writing into a tracked report folder, or the report's own files mark it)."""
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return commit + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
