"""How a benchmark publishes its table: printed, and written to --out (bench/results/) when given."""

from __future__ import annotations


def publish(lines: list[str], out: str | None) -> str:
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text
