"""The dependency locks: pyproject.toml, requirements/*.lock and the installed venv agree,
and a dependency changed without re-locking is caught (scripts/check_lock.py, run by setup.sh)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(root: Path, *args):
    return subprocess.run([sys.executable, str(root / "scripts" / "check_lock.py"), *args],
                          capture_output=True, text=True)


def copy_project(tmp: Path) -> Path:
    for rel in ("pyproject.toml", "scripts/check_lock.py", "requirements/cpu.lock", "requirements/gpu.lock"):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp / rel)
    return tmp


def test_the_committed_locks_fit_pyproject_and_this_venv():
    p = check(ROOT, "--installed")
    assert p.returncode == 0, p.stderr


def test_a_dependency_changed_without_relocking_fails(tmp_path):
    root = copy_project(tmp_path)
    py = root / "pyproject.toml"
    py.write_text(py.read_text().replace('"pyyaml>=6"', '"pyyaml>=6", "humanize>=4"'))
    p = check(root)
    assert p.returncode == 1
    assert "requirements/cpu.lock was made from other pyproject.toml dependencies" in p.stderr
    assert "has no pin for humanize>=4" in p.stderr and "bash scripts/lock.sh" in p.stderr


def test_a_pin_outside_pyproject_range_fails(tmp_path):
    root = copy_project(tmp_path)
    lock = root / "requirements" / "cpu.lock"
    text = lock.read_text()
    assert "\nray==2.60.0\n" in text
    lock.write_text(text.replace("\nray==2.60.0\n", "\nray==2.59.0\n"))
    p = check(root)
    assert p.returncode == 1 and "pins ray==2.59.0, outside pyproject's" in p.stderr


def test_setup_installs_from_the_lock():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c requirements/cpu.lock -e" in setup and "check_lock.py --installed" in setup
    assert "-c requirements/gpu.lock" in (ROOT / "cluster" / "Dockerfile").read_text()
