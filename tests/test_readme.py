"""The README's quick start runs as written (CPU, the reference backend)."""

from __future__ import annotations

import pathlib
import re


def test_quick_start_runs(tmp_path, monkeypatch):
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)     # it writes a plot
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "longformer.png").exists()
