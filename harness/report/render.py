"""One list of blocks -> markdown and self-contained HTML (the report's two pages).

A block is a tuple: ``("h1" | "h2" | "p", text)``, ``("ul", items)``, ``("table", DataFrame of strings)``,
``("figure", png file name, caption)`` or ``("code", language, summary, text)``. Text may use markdown's
``**bold**`` and `` `code` ``.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path


def render_markdown(blocks: list[tuple]) -> str:
    """Markdown: figures as image links to the PNGs beside the page."""
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(f"{block[1]}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]) + "\n")
        elif kind == "table":
            t = block[1]
            cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"  # noqa: E731
            out.append(
                "\n".join(
                    [
                        cells(t.columns),
                        "|" + "---|" * len(t.columns),
                        *(cells(r) for r in t.itertuples(index=False)),
                    ]
                )
                + "\n"
            )
        elif kind == "figure":
            out.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*\n")
        elif kind == "code":
            out.append(f"{block[2]}:\n\n```{block[1]}\n{block[3].rstrip()}\n```\n")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f4f4f4}
td:first-child,td:nth-child(2){text-align:left}figure{margin:1.5em 0}img{max-width:100%}
figcaption{font-size:13px;color:#555}code{background:#f4f4f4;padding:0 3px}"""


def render_html(blocks: list[tuple], image_dir: Path) -> str:
    """Self-contained HTML: every figure embedded as a base64 data URI."""
    title = next((b[1] for b in blocks if b[0] == "h1"), "capsbench report")
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            body.append(block[1].to_html(index=False, border=0, escape=True))
        elif kind == "figure":
            data = base64.b64encode((image_dir / block[1]).read_bytes()).decode("ascii")
            img = f'<img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
            body.append(f"<figure>{img}<figcaption>{_inline(block[2])}</figcaption></figure>")
        elif kind == "code":
            summary = f"<summary>{_inline(block[2])}</summary>"
            body.append(f"<details>{summary}<pre><code>{html.escape(block[3])}</code></pre></details>")
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style>'
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head>\n<body>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    """Escape, then render markdown's **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
