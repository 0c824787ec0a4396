"""The report of a real run, opened in headless Chromium at 1280 px: the verdict is on the first screen, the page
is no wider than the viewport, and no table cell overflows. Chromium comes from Debian's `chromium` package
(installed by .ci/run); without it this test fails rather than skips."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.train.loop import train

REPO = Path(__file__).resolve().parents[2]
# appended to a copy of the report: measures the laid-out page and writes the numbers into the DOM
MEASURE = """<script>
window.addEventListener('load', () => {
  const cells = [...document.querySelectorAll('td, th')];
  const over = cells.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.textContent.slice(0, 80));
  const verdict = [...document.querySelectorAll('h2')].find(h => h.textContent === 'Verdict');
  const out = {page: document.documentElement.scrollWidth, view: window.innerWidth, overflowing: over,
               verdict_top: verdict ? verdict.getBoundingClientRect().top : null, errors: document.querySelectorAll('.error').length};
  const pre = document.createElement('pre'); pre.id = 'measured'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return exe


def test_report_fits_1280px_and_leads_with_the_verdict(tmp_path: Path) -> None:
    tasks = "[{name: humaneval, limit: 3, max_new_tokens: 24}, " \
            "{name: codetasks, path: 'builtin:code_instructions', skip: 197, max_new_tokens: 24}]"
    cfg = load_config(REPO / "configs" / "tiny" / "sft_lora.yaml",
                      ["train.max_steps=4", "train.save_every=0", "data.valid_size=0.3", f"eval.tasks={tasks}",
                       f"out={tmp_path / 'run'}"])
    train(cfg, quiet=True)
    page = tmp_path / "run" / "report.html"
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert m, f"chromium did not lay the page out: {dom[-500:]}"
    got = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert got["view"] == 1280
    assert got["page"] <= got["view"], f"page is {got['page']} px wide in a {got['view']} px window"
    assert got["overflowing"] == [], f"table cells overflow: {got['overflowing'][:3]}"
    assert got["errors"] == 0  # no section failed to render
    assert got["verdict_top"] is not None and got["verdict_top"] < 900  # on the first screen
    html = page.read_text()
    assert "humaneval pass@1" in html and "codetasks pass@1" in html and "validation loss" in html
