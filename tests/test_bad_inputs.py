"""Every bad-input case of bad_input_cases.py, run in a child process: a crash fails its case."""
import json
import os
import subprocess
import sys

import pytest

import bad_input_cases

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = list(bad_input_cases.cases())


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bad_input_cases.py")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
    records, started = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("START "):
            started = line[len("START "):]
        elif line.startswith("{"):
            record = json.loads(line)
            records[record["case"]] = record
            started = None
    return dict(records=records, crashed_in=started, returncode=proc.returncode, stderr=proc.stderr[-3000:])


@pytest.mark.parametrize("case", CASES)
def test_case(results, case):
    record = results["records"].get(case)
    if record is None:
        where = results["crashed_in"]
        pytest.fail(f"the child process died (exit {results['returncode']}) while running {where!r}; "
                    f"stderr:\n{results['stderr']}")
    stock_raised, ours_raised = record["stock"] != "ok", record["ours"] != "ok"
    if case in bad_input_cases.DEVIATIONS:
        assert ours_raised, record
        return
    assert ours_raised == stock_raised, record
    if not stock_raised:
        assert record["agree"], record


def test_the_child_process_exits_cleanly(results):
    assert results["returncode"] == 0, results["stderr"]
