"""The README's run command in demo mode, as a bounded smoke test of the whole mission."""
import os
import subprocess

from tests.processes import BIN
from workers.devstack import REPO_ROOT, free_port


def test_demo_day_ends_with_the_expected_downstream_state(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LOCATE2U_", "REDIS_URL", "RELAY_", "STOREPOINT_", "B2B_", "LOCATE_",
                                  "DELIVERYCOM_", "FORWARD_", "FLOWER_", "PORT"))}
    result = subprocess.run([str(BIN / "l2u-relay"), "run", "--port", str(free_port()), "--data-dir",
                             str(tmp_path / "data"), "--demo-then-exit"], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "DEMO MODE" in output
    assert "demo: Locate2u delivered 17 events: 16 accepted, 1 recognised as duplicates" in output
    for name in ("storepoint", "b2b active", "locate", "deliverycom", "dead letters"):
        assert any(line.lstrip().startswith(name) and line.endswith("✓") for line in output.splitlines()), name
    assert "demo: all downstream state as expected" in output
    assert "stale" in output  # the out-of-order pair
