"""The report in a real browser (headless Chromium): it renders, every figure decodes, and the
Content-Security-Policy that keeps it offline does not block any of its own content."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest
from PIL import Image, ImageStat

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 60
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
PROBE = """<script>
window.addEventListener("load", () => {
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({
    images: Array.from(document.images, (i) => i.naturalWidth),
    complete: Array.from(document.images, (i) => i.complete),
    tables: document.querySelectorAll("table").length,
    sections: document.querySelectorAll("section h2").length,
    overflow: document.documentElement.scrollWidth > window.innerWidth,
  });
  document.body.appendChild(pre);
});
</script>"""


def _find() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        check=False,
    )


def _apt_install() -> str:
    """Debian's chromium: install, and refresh the package lists only if the first try fails."""
    install = ("install", "-y", "--no-install-recommends", "chromium")
    done = _apt(*install)
    if done.returncode != 0:
        _apt("update")
        done = _apt(*install)
    return (done.stderr or done.stdout)[-500:]


@pytest.fixture(scope="session")
def chromium() -> str:
    found = _find()
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not on PATH and cannot be installed here (needs root and apt-get)")
    try:
        log = _apt_install()
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"installing chromium failed: {err}")
    found = _find()
    if not found:
        pytest.skip(f"installing chromium failed: {log}")
    return found


def _run(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("report", ["written_report", "seg_written_report"])
def test_report_renders_in_chromium(
    chromium: str, report: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Classification and segmentation reports alike (the latter with its overlay images)."""
    html_path = request.getfixturevalue(report)[1]
    html_text = html_path.read_text()

    # (a) A screenshot exists and is not a blank page.
    shot = tmp_path / "report.png"
    done = _run(
        chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", html_path.as_uri()
    )
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        assert max(ImageStat.Stat(im.convert("L")).var) > 0

    # (b) In the live DOM: every figure decoded, every table present. The probe needs a script,
    # which the report's CSP forbids; allow inline script only, so images stay limited to data:.
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    assert csp in html_text
    probed = html_text.replace(csp, csp + "; script-src 'unsafe-inline'", 1)
    probed = probed.replace("</body>", PROBE + "</body>", 1)
    page = tmp_path / "probe.html"
    page.write_text(probed)
    done = _run(
        chromium,
        tmp_path,
        "--dump-dom",
        "--virtual-time-budget=5000",
        "--window-size=1280,2000",
        page.as_uri(),
    )
    match = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"probe did not run: {done.stderr[-2000:]}"
    probe = json.loads(unescape(match.group(1)))

    n_img = html_text.count("<img ")
    # ROC (or overlays), learning, per-site per network
    assert len(probe["images"]) == n_img >= 3 * 2
    assert all(w > 0 for w in probe["images"]), probe["images"]
    assert all(probe["complete"])
    assert probe["tables"] == html_text.count("<table") >= 6
    assert probe["sections"] == 8
    assert not probe["overflow"], "the page scrolls sideways at 1280 px"
