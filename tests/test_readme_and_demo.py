"""The README's quickstart and demo command work as written."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```\n<!-- /{marker} -->", README.read_text(), re.S)
    assert match, f"README has no {marker} block"
    return match.group(1)


def test_readme_commands_install_cpu_torch_first():
    for marker in ("demo-command", "test-command"):
        command = readme_block(marker)
        assert command.count("\n") == 1, "one copy-paste line"
        assert command.index("pip install torch==2.13.0") < command.index("pip install -e")


def test_quickstart_runs_and_reloads_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_block("quickstart"), "README quickstart", "exec"), namespace)
    ids = namespace["batches"][0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(namespace["reloaded"](ids).logits, namespace["model"](ids).logits)
    assert (tmp_path / "my-controller" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_demo_command(tmp_path):
    """The README's demo command ends in ``peft-ext demo``: run that installed console script."""
    assert readme_block("demo-command").strip().endswith("&& peft-ext demo")
    script = Path(sys.executable).parent / "peft-ext"
    result = subprocess.run(
        [str(script), "demo", "--out-dir", str(tmp_path), "--out", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exact match" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert report["reload_exact"] is True
    written = [json.loads(line) for line in Path(report["data"]["train"]).read_text().splitlines()]
    assert len(written) == 300 and set(written[0]) == {"prompt", "completion"}
    assert rows["64 gradient gates"]["nll"] < rows["base"]["nll"]
    assert rows["64 gradient gates"]["exact_match"] > rows["base"]["exact_match"]
    assert rows["64 gradient gates"]["exact_match"] > rows["64 random gates"]["exact_match"]  # the control
    assert rows["64 gradient gates, 4-bit base"]["exact_match"] > rows["base, 4-bit"]["exact_match"]


def test_demo_words_are_the_same_in_every_process():
    """Set iteration order follows each process's string hashing; the demo's train/held-out split must not."""
    code = "from peft_ext.demo import make_words; print(','.join(make_words(360, 0)))"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1 and len(outputs.pop().split(",")) == 360
