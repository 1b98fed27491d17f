"""Every case of the bad-input table (bad_input_cases.py), run in a child process per device: a crash
fails its case; otherwise ours raises the expected error type and message where stock raises, and
returns what stock returns where stock does."""
import json
import os
import re
import subprocess
import sys

import pytest

import bad_input_cases
from helpers import DEVICES, child_env

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED = {name: case[2] for name, case in bad_input_cases.cases().items()}


@pytest.fixture(scope="module", params=DEVICES)
def results(request):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bad_input_cases.py"), request.param],
                          capture_output=True, text=True, timeout=300,
                          env=child_env())
    records, started = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("START "):
            started = line[len("START "):]
        elif line.startswith("{"):
            record = json.loads(line)
            records[record["case"]] = record
            started = None
    return dict(device=request.param, records=records, crashed_in=started, returncode=proc.returncode,
                stderr=proc.stderr[-3000:])


@pytest.mark.parametrize("case", list(EXPECTED))
def test_case(results, case):
    expected = EXPECTED[case]
    if results["device"] != "cpu" and expected is not None and expected[0] is IndexError:
        pytest.skip("on CUDA a bad class index is a device-side assert (tests/test_cuda.py checks it in a subprocess)")
    record = results["records"].get(case)
    if record is None:
        pytest.fail(f"the child process died (exit {results['returncode']}) while running {results['crashed_in']!r}; "
                    f"stderr:\n{results['stderr']}")
    if expected is bad_input_cases.OK:
        assert record["stock"] == "ok" and record["ours"] == "ok" and record["agree"], record
        return
    error, message = expected
    assert record["ours"].startswith(f"{error.__name__}: ") and re.search(message, record["ours"]), record
    stock_raised = record["stock"] != "ok"
    assert stock_raised == (case not in bad_input_cases.DEVIATIONS), record


def test_the_child_process_exits_cleanly(results):
    assert results["returncode"] == 0, results["stderr"]
