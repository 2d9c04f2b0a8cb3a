"""What a site's message pays before its compute: imports, and how it is timed.

Every deployed message runs in a fresh process, so what ``client.app`` imports is paid
per message. The figures (cold and prestarted starts, per message type) are measured
by ``benchmarks/deploy_round.py``; these tests hold the promises behind them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from client.startup import TIMES_FILE, MessageClock, process_age

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("monai", "scipy", "matplotlib", "pydicom", "opacus", "sympy")


def _modules_after(code: str) -> list[str]:
    """The heavy top-level packages a fresh process holds after running ``code``."""
    probe = f"import json, sys\n{code}\n" \
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    result = subprocess.run([sys.executable, "-P", "-c", probe], cwd=ROOT, check=True,
                            capture_output=True, text=True)
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_client_app_and_classification_task_import_no_heavy_library() -> None:
    # MONAI's package init (its transforms, scipy, matplotlib) cost ~1.5 s per message,
    # pydicom ~0.2 s, Opacus ~1.5 s: an evaluate message needs none of them.
    loaded = _modules_after("import client.app, client.app_runner\n"
                            "from client.tasks import get_task; get_task('classification')")
    assert loaded == []


def test_a_train_message_under_dp_loads_opacus_in_its_start_up() -> None:
    loaded = _modules_after("from medmeta_common.privacy.dp_sgd import load_dp_library\n"
                            "load_dp_library()")
    assert "opacus" in loaded and "monai" not in loaded


def test_process_age_counts_from_the_process_start() -> None:
    code = "import time; time.sleep(0.6); from client.startup import process_age; " \
           "print(process_age())"
    age = float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout)
    assert 0.6 <= age < 5.0
    assert (process_age() or 0) > 0


def test_each_message_appends_its_times_at_the_site(tmp_path: Path) -> None:
    for kind in ("train", "evaluate"):
        clock = MessageClock(kind)
        clock.ready()
        clock.record(tmp_path, server_round=3)
    lines = [json.loads(line) for line in (tmp_path / TIMES_FILE).read_text().splitlines()]
    assert [(line["type"], line["round"]) for line in lines] == [("train", 3), ("evaluate", 3)]
    for line in lines:
        assert 0 < line["spawn_to_handler_s"] <= line["spawn_to_ready_s"]
        assert line["compute_s"] >= 0
