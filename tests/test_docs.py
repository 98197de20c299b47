"""The reference pages generated from the code match it; the README links the pages it moved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_config_reference_is_generated_from_the_config():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py"),
                           "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_links_the_reference_pages_and_stays_short():
    readme = (REPO / "README.md").read_text()
    for page in ("config", "running", "distributed", "exactness", "porting-from-trl",
                 "trackers", "install", "benchmarks"):
        assert f"(docs/{page}.md)" in readme, page
        assert (REPO / "docs" / f"{page}.md").is_file(), page
    assert len(readme.splitlines()) <= 220
