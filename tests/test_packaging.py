"""The installed package is complete: what Heroku builds runs without the checkout.

The app's files (what ``git push`` would ship) are copied to a temporary build
folder and installed there as Heroku's Python buildpack does
(``pip install -r requirements.txt``: the pins, then the app itself, not
editable) into a fresh virtualenv; ``l2u-relay run --demo-then-exit`` then runs
from an unrelated folder.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import assert_demo_summary, demo_env
from workers.ops.devstack import REPO_ROOT, free_port, procfile_commands
from workers.dyno import PROCESSES


def shipped_files():
    """Paths ``git push`` would ship once everything in the working tree is committed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO_ROOT / name).is_file()]


def heroku_build(build_dir, venv):
    """Copy the app to ``build_dir`` and install it into a new virtualenv ``venv`` as the buildpack does."""
    for name in shipped_files():
        (build_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, build_dir / name)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-compile", "-r",
                              "requirements.txt"], cwd=build_dir, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]


@pytest.mark.timeout(1200)  # a fresh virtualenv's install plus the demo day, on a loaded CI machine
def test_the_installed_package_runs_the_demo_outside_the_checkout(tmp_path):
    build_dir, venv, elsewhere, data_dir = (tmp_path / name for name in ("build", "venv", "elsewhere", "data"))
    build_dir.mkdir()
    elsewhere.mkdir()
    heroku_build(build_dir, venv)
    env = {**demo_env(), "RELAY_DATA_DIR": str(data_dir), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                            "print(*(u.find_spec(name).origin for name in ('workers', 'receiver')))"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    assert all(Path(path).is_relative_to(site_packages) for path in where.stdout.split()), where.stdout

    result = subprocess.run([str(venv / "bin" / "l2u-relay"), "run", "--port", str(free_port()), "--demo-then-exit"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert_demo_summary(result, data_dir)
    assert not (site_packages / ".l2u-relay").exists() and not (elsewhere / ".l2u-relay").exists()


def test_the_root_procfile_is_the_packaged_process_table():
    """Heroku reads the root Procfile; ``l2u-relay run`` reads the packaged table: the same commands."""
    assert procfile_commands(REPO_ROOT / "Procfile") == PROCESSES
