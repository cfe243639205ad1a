"""Every golden case passes through the parity runner, and the CLI reports as documented."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

from irg_engine.parity import Case, run_case

CASES = ["text", "vit", "vae", "t2i", "edit", "irg"]


@pytest.mark.parametrize("name", CASES)
def test_golden_case_passes(golden, golden_model, name):
    case = Case.load(golden / name)
    assert case.kind == name
    checks = run_case(case, golden_model, tolerance=1e-4)
    assert checks.failures == []
    assert checks.count >= 10
    assert checks.worst[0] < 1e-5  # float32 noise is ~1e-6; far below the 1e-4 tolerance


def test_cli_reports_and_fails_on_a_corrupted_case(golden, tmp_path):
    bad = tmp_path / "renamed_case"
    shutil.copytree(golden / "text", bad)
    (bad / "case.json").write_text(
        (golden / "text" / "case.json")
        .read_text()
        .replace('"../checkpoint"', f'"{golden}/checkpoint"')
    )
    data = load_file(str(bad / "expected.safetensors"))
    data["decode.logits"] = data["decode.logits"] * 1.001
    save_file(data, str(bad / "expected.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "irg_engine.parity", str(golden / "vit"), str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1
    assert lines[0].startswith("PASS vit")
    assert any(line.startswith("FAIL text") for line in lines)  # identified by its case field
    assert "decode.logits" in proc.stdout
    assert lines[-1] == "1 passed, 1 failed"
