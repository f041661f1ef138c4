"""The HTML report in a real headless browser (Debian's chromium): it renders, and the screenshot shows
the similarity histogram's bars and both answers of the worst case."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from keel.evals import report
from keel.evals.metrics import compare, summary
from keel.evals.suite import Case
from keel.evals.targets import Answer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags a closed network needs (no background connections), as root (no sandbox).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
BAR = (0x3B, 0x6E, 0xA8)  # the histogram's fill colour in report.histogram_svg


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh --test installs it where apt can)")
def test_the_report_renders_with_its_plot(tmp_path):
    from PIL import Image
    cases = [Case(f"c{i}", [{"role": "user", "content": "x"}]) for i in range(12)]
    a = {(c.id, 0): Answer(f"answer {i % 3}", [], "stop", 0.1, 5, 3) for i, c in enumerate(cases)}
    b = {(c.id, 0): Answer(f"answer {i % 4}", [], "stop", 0.1, 5, 3) for i, c in enumerate(cases)}

    def embed(texts):
        keys = sorted(set(texts))
        return torch.nn.functional.normalize(torch.eye(len(keys))[[keys.index(t) for t in texts]] + 0.3, dim=-1)
    results = compare(cases, a, b, embed)
    page = tmp_path / "report.html"
    page.write_text(report.html("keel eval: browser check", "A model", "B model", summary(results), results, []))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,1400", page.as_uri()], check=True, timeout=120, capture_output=True)
    assert os.path.getsize(shot) > 0
    img = Image.open(shot).convert("RGB")
    bars = sum(1 for px in img.getdata() if all(abs(p - q) <= 8 for p, q in zip(px, BAR)))
    assert bars > 2000, f"only {bars} pixels of the histogram's colour: the plot did not render"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", page.as_uri()],
                         check=True, timeout=120, capture_output=True, text=True).stdout
    assert "Lowest similarity, side by side" in dom and "answer 3" in dom and "<svg" in dom
