"""requirements.txt is the one package-manager file Heroku installs: it must match setup.cfg.

Offline and fast: the pins are checked against setup.cfg's ``install_requires``,
against the dependency closure computed from the installed packages' metadata,
and against the installed versions (``make test`` installs ``-r requirements.txt``,
so the suite runs what dynos run). ``make lock`` regenerates the file.
"""
import importlib.metadata
import subprocess

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from setuptools.config.setupcfg import read_configuration

from workers.ops.devstack import REPO_ROOT

LOCK_FILE = REPO_ROOT / "requirements.txt"
# Heroku's Python buildpack refuses an app with files of more than one package manager.
OTHER_PACKAGE_MANAGER_FILES = ("uv.lock", "poetry.lock", "Pipfile", "Pipfile.lock")
FIX = "run `make lock` (and commit requirements.txt)"


def read_lock(path=LOCK_FILE):
    """``({name: version}, [other requirement lines])`` from a pip-compile output."""
    if not path.exists():
        pytest.fail(f"{path.name} is missing: Heroku refuses an app without a package-manager file; {FIX}")
    pins, others = {}, []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            others.append(line)
            continue
        try:
            requirement = Requirement(line)
        except ValueError:
            others.append(line)
            continue
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{line!r} is not pinned with =="
        pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins, others


def install_requires():
    return [Requirement(line) for line in read_configuration(REPO_ROOT / "setup.cfg")["options"]["install_requires"]]


def dependency_closure(requirements):
    """Canonical names of ``requirements`` and everything they need here, from installed metadata."""
    seen, todo = {}, list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} (needed by setup.cfg) is not installed: run `make` (it installs requirements.txt)")
        for line in dist.requires or ():
            dependency = Requirement(line)
            if dependency.marker is None or any(
                    dependency.marker.evaluate({**default_environment(), "extra": extra})
                    for extra in ("", *seen[name])):
                todo.append(dependency)
    return set(seen)


def test_every_install_requires_entry_is_pinned_within_its_range():
    pins, _ = read_lock()
    for requirement in install_requires():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"setup.cfg requires {requirement} but requirements.txt does not pin it; {FIX}"
        assert SpecifierSet(str(requirement.specifier)).contains(pins[name], prereleases=True), (
            f"requirements.txt pins {name}=={pins[name]}, outside setup.cfg's {requirement}; {FIX}")


def test_pins_are_exactly_the_dependency_closure_of_setup_cfg():
    pins, _ = read_lock()
    closure = dependency_closure(install_requires())
    assert not closure - set(pins), f"needed but not pinned: {sorted(closure - set(pins))}; {FIX}"
    assert not set(pins) - closure, f"pinned but not needed by setup.cfg: {sorted(set(pins) - closure)}; {FIX}"


def test_pins_are_the_installed_versions():
    pins, _ = read_lock()
    installed = {name: importlib.metadata.version(name) for name in pins}
    differ = {name: (pin, installed[name]) for name, pin in pins.items() if installed[name] != pin}
    assert not differ, (f"pinned vs installed: {differ}; install the pins "
                        "(make, or pip install -r requirements.txt -e '.[test]')")


def test_kombu_is_pinned_in_a_tight_range():
    """The receiver writes kombu's message envelope by hand: no kombu minor it was not tested with."""
    kombu = next(requirement for requirement in install_requires() if canonicalize_name(requirement.name) == "kombu")
    assert not kombu.specifier.contains("5.99.0") and not kombu.specifier.contains("6.0.0"), kombu
    assert "kombu" in read_lock()[0]


def test_the_lock_installs_the_app_itself_and_no_index_of_this_machine():
    _, others = read_lock()
    assert others == ["."], f"besides pins requirements.txt should only say '.' (the app): {others}"


def test_heroku_build_rules():
    """One package-manager file, a Python version Heroku reads, no virtualenv in git."""
    present = [name for name in OTHER_PACKAGE_MANAGER_FILES if (REPO_ROOT / name).exists()]
    assert not present, f"Heroku refuses a second package-manager file next to requirements.txt: {present}"
    version = (REPO_ROOT / ".python-version").read_text().strip()
    assert version.count(".") == 1 and all(part.isdigit() for part in version.split(".")), (
        f".python-version says {version!r}: Heroku wants a major version such as 3.11")
    python_requires = SpecifierSet(str(read_configuration(REPO_ROOT / "setup.cfg")["options"]["python_requires"]))
    assert python_requires.contains(f"{version}.0"), f".python-version {version} is outside {python_requires}"
    for folder in (".venv/", "venv/"):
        ignored = subprocess.run(["git", "check-ignore", "-q", folder], cwd=REPO_ROOT)
        assert ignored.returncode == 0, f"{folder} is not git-ignored: Heroku's build fails on a committed virtualenv"
