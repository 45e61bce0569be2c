"""Every Python example in the README and docs/ runs against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Server

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
EXAMPLES = [
    pytest.param(page, i, code, id=f"{page.name}-{i}")
    for page in PAGES
    for i, code in enumerate(BLOCK.findall(page.read_text()))
    if code.startswith(("from ", "import "))  # fragments without imports are not standalone programs
]


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize(("page", "index", "code"), EXAMPLES)
def test_example_runs(
    server: Server, tmp_path: Path, page: Path, index: int, code: str, request: pytest.FixtureRequest
) -> None:
    if "run_code" in code or "contexts" in code:
        request.getfixturevalue("kernel_ready")  # code contexts need the kernel environment built
    (tmp_path / "model.bin").write_bytes(b"\0" * 4096)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        # docs/e2b.md tells users to set these three variables; nothing else configures the e2b SDK.
        env={
            **server.env,
            "E2B_API_URL": server.url,
            "E2B_SANDBOX_URL": server.url,
            "E2B_API_KEY": server.api_key,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{page.name} example {index} failed:\n{done.stderr[-3000:]}"
