"""How the page writes a number, a model's name and a markdown table."""

from __future__ import annotations


def short_model(m):
    return m.replace("esm2-", "ESM-2 ")


def k(x, digits=1):
    return f"{x / 1000:,.{digits}f} k"


def fmt_int(x):
    return f"{x:,.0f}".replace(",", " ")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
