"""The GPU run's resume rule (scripts/bench.py `--gpu-targets --resume`): a lent GPU gives
minutes, so a second run must measure exactly what the first did not, and never mix machines."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.helpers import REPO_ROOT

_SPEC = importlib.util.spec_from_file_location("bench", REPO_ROOT / "scripts" / "bench.py")
assert _SPEC is not None and _SPEC.loader is not None
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench"] = bench  # its dataclasses look their module up there
_SPEC.loader.exec_module(bench)

MACHINE = {
    "machine": "NVIDIA H200, 16 CPU cores, torch 2.11.0",
    "server_cpus": list(range(12)),
    "client_cpus": [12, 13, 14, 15],
    "confined_cpus": [0, 1, 2, 3],
}


def first_run() -> dict:
    """A run whose 4-core server failed and which was cut short before the fidelity stage."""
    return {
        **MACHINE,
        "date": "2026-12-01",
        "bare_image": {"batched_limit_images_per_s": 6000.0},
        "rows": [
            {"server": "all server cores", "name": "seed c64", "images_per_s": 2100.0},
            {"server": "server on 4 cores", "name": "seed c64", "images_per_s": 12.0},
        ],
        "stage_seconds": {"bare encoders": 30.0, "all server cores": 80.0, "server on 4 cores": 9},
        "stage_errors": {"server on 4 cores": "Traceback ... RuntimeError"},
        "server_logs": {"all server cores": "...", "server on 4 cores": "..."},
        "targets": {">= 2000 images/s at 64 clients": "2100.0"},
    }


def test_a_resume_keeps_finished_stages_and_reruns_failed_and_missing_ones():
    payload, done = bench.resumed_payload(first_run(), {**MACHINE, "date": "2026-12-02"})

    assert done == {"bare encoders", "all server cores"}  # the failed one runs again
    assert payload["rows"] == [first_run()["rows"][0]]  # the failed server's partial row goes
    assert "stage_errors" not in payload and "targets" not in payload  # both made anew
    assert payload["bare_image"] == first_run()["bare_image"]
    assert payload["resumed_on"] == ["2026-12-02"]
    again, _ = bench.resumed_payload(payload, {**MACHINE, "date": "2026-12-03"})
    assert again["resumed_on"] == ["2026-12-02", "2026-12-03"]


@pytest.mark.parametrize(
    ("key", "other"),
    [
        ("machine", "NVIDIA A10G, 4 CPU cores, torch 2.11.0"),
        ("machine", "NVIDIA H200, 16 CPU cores, torch 2.13.0"),
        ("server_cpus", list(range(8))),
    ],
)
def test_a_resume_refuses_results_from_another_kind_of_machine(key, other):
    with pytest.raises(SystemExit, match=f"--resume: .*{key}"):
        bench.resumed_payload(first_run(), {**MACHINE, key: other, "date": "2026-12-02"})


def test_the_target_checks_read_a_run_that_lost_its_bare_encoders():
    """A failed first stage must not cost the summary of every stage after it."""
    payload = first_run()
    del payload["bare_image"]
    checks = bench.gpu_target_checks(payload)
    assert checks[">= 2000 images/s at 64 clients"] == "2100.0"
    assert checks[">= 0.3 x the bare fp16 image encoder's best batch"] == "None"
    assert bench.gpu_target_checks(first_run())[
        ">= 0.3 x the bare fp16 image encoder's best batch"
    ] == str(round(2100 / 6000, 3))
