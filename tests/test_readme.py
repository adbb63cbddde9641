"""The README's commands and configuration table match the code."""

from __future__ import annotations

import re
from pathlib import Path

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(IMGSERVE_\w+)`[^|]*\| `([^`]*)` \|", readme, re.M))
    for name, field in Settings.model_fields.items():
        key = f"IMGSERVE_{name.upper()}"
        assert key in rows, f"{key} is missing from the README's configuration table"
        default = field.default
        shown = (str(default.relative_to(ROOT)) if isinstance(default, Path)
                 and default.is_relative_to(ROOT) else str(default))
        assert rows[key] == shown, f"{key}: README says {rows[key]}, the code {shown}"
    assert set(rows) == {f"IMGSERVE_{n.upper()}" for n in Settings.model_fields}


def test_the_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme.split("## ")[0]
    assert "make serve" in readme.split("## ")[0]
    assert re.search(r"^make test$", ci, re.M)
