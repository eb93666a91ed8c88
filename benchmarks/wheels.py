"""The Python packages the GPU machine lacks, carried to it as wheels: downloaded on a networked machine into
`.whl/` (CPython 3.12, manylinux x86_64, no dependencies: the machine has the rest), and installed there
with this project without any network, into a folder of their own that the suite puts on PYTHONPATH.

    python -m benchmarks.wheels download [--dest .whl]           # on a machine with network, before the slot
    python -m benchmarks.wheels check [--wheels .whl]            # the folder holds each wheel once, for the GPU
    python -m benchmarks.wheels install [--wheels .whl] [--site /tmp/wuerstchen-site] [--json FILE]

`install` is the GPU suite's first step: it checks the folder, builds this project from a copy of the
working tree (so the build leaves nothing in it) and installs both with one offline pip command, then reads
every installed version back in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from engine.errors import WuerstchenError
from engine.files import write_atomically

REPOSITORY = Path(__file__).resolve().parents[1]

# What the GPU image (Python 3.12, torch 2.11, transformers, huggingface-hub, zipp ...) lacks for the suite:
# diffusers, the tests' oracle and the end-to-end baseline, and its importlib_metadata. importlib_metadata 8.x
# needs only zipp, which the image has; 9 and later also need lazy-importer, which it has not.
WHEELS = {"diffusers": "0.42.1", "importlib_metadata": "8.7.1"}
PROJECT = "wuerstchen-engine"
DEFAULT_FOLDER = REPOSITORY / ".whl"
DEFAULT_SITE = Path(tempfile.gettempdir()) / "wuerstchen-site"

# pip matches manylinux tags exactly, so every tag the GPU machine's glibc accepts is named.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
PYTHON_TAGS = ("py3", "py2.py3", "cp312")
ABI_TAGS = ("none", "abi3", "cp312")


def requirement(text: str) -> tuple[str, str]:
    """'NAME==VERSION' as (NAME, VERSION)."""
    name, separator, version = text.partition("==")
    if not separator or not name or not version:
        raise WuerstchenError(f"--require {text!r}: expected NAME==VERSION, such as diffusers==0.42.1")
    return name, version


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): importlib_metadata and importlib-metadata match."""
    return re.sub(r"[-_.]+", "-", name).lower()


def download_command(dest: Path, name: str, version: str) -> list[str]:
    """The pip command that saves one wheel for the GPU machine's Python and platform into `dest`."""
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", *platforms, "-d", str(dest), f"{name}=={version}"]


def install_command(wheels: list[Path], project: Path, site: Path) -> list[str]:
    """The one offline pip command that installs the wheels and the project (a source folder) into `site`."""
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
            "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels), str(project)]


def wheel_tags(path: Path) -> tuple[str, str, str, str, str]:
    """(name, version, python tag, ABI tag, platform tag) of a wheel, from its file name."""
    parts = path.name.removesuffix(".whl").split("-")
    if not path.name.endswith(".whl") or len(parts) not in (5, 6):
        raise WuerstchenError(f"{path.name}: expected a wheel named NAME-VERSION-PYTHON-ABI-PLATFORM.whl")
    return parts[0], parts[1], parts[-3], parts[-2], parts[-1]


def check_wheel_folder(folder: Path, required: dict[str, str]) -> list[Path]:
    """The folder's wheels, once it is certain that pip can install them on the GPU machine: each required
    distribution exactly once and at its version (two versions of one stop the whole install), and every
    wheel built for CPython 3.12 on manylinux x86_64 or for any platform."""
    if not folder.is_dir():
        raise WuerstchenError(f"--wheels {folder}: no such folder; prepare it on a networked machine with "
                              f"`python -m benchmarks.wheels download --dest {folder}`")
    wheels = sorted(folder.glob("*.whl"))
    found: dict[str, list[tuple[str, Path]]] = {}
    for wheel in wheels:
        name, version, python, abi, platform = wheel_tags(wheel)
        pythons = python.split(".")
        runs_on_312 = (bool(set(pythons) & set(PYTHON_TAGS)) and abi in ABI_TAGS) \
            or (abi == "abi3" and any(tag.startswith("cp3") for tag in pythons))  # the stable ABI: any later 3.x
        if not runs_on_312 or not (platform == "any" or ("manylinux" in platform and platform.endswith("x86_64"))):
            raise WuerstchenError(f"{wheel.name}: built for {python}-{abi}-{platform}; expected CPython 3.12 on "
                                  "manylinux x86_64 (or py3-none-any)")
        found.setdefault(canonical(name), []).append((version, wheel))
    for name, versions in found.items():
        if len(versions) > 1:
            raise WuerstchenError(f"--wheels {folder}: {name} is there {len(versions)} times "
                                  f"({', '.join(v for v, _ in versions)}); expected one version")
    for name, version in required.items():
        have = found.get(canonical(name))
        if not have:
            raise WuerstchenError(f"--wheels {folder}: no {name} wheel; expected {name}=={version} "
                                  f"(`python -m benchmarks.wheels download --dest {folder}`)")
        if have[0][0] != version:
            raise WuerstchenError(f"--wheels {folder}: {name} is {have[0][0]}; expected {version}")
    return wheels


def copy_project(source: Path, dest: Path) -> Path:
    """The files that build the project (its setup files and top-level packages), copied into `dest`: pip
    builds in the folder it is given, and the working tree should not get its build/ and egg-info."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    packages = [path for path in sorted(source.iterdir()) if (path / "__init__.py").is_file()]
    if not (source / "setup.py").is_file() or not packages:
        raise WuerstchenError(f"--source {source}: expected the project's root, with setup.py and its packages")
    for package in packages:
        shutil.copytree(package, dest / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def installed_versions(site: Path, names: list[str]) -> dict[str, str | None]:
    """The version of each distribution as a fresh interpreter with `site` first on its path sees it."""
    probe = ("import importlib.metadata as m, json, sys\n"
             "def version(name):\n"
             "    try:\n"
             "        return m.version(name)\n"
             "    except m.PackageNotFoundError:\n"
             "        return None\n"
             "print(json.dumps({name: version(name) for name in sys.argv[1:]}))")
    environment = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    found = subprocess.run([sys.executable, "-c", probe, *names], capture_output=True, text=True, check=True,
                           env=environment, timeout=60)
    return json.loads(found.stdout)


def install(folder: Path, site: Path, required: dict[str, str], source: Path = REPOSITORY) -> dict:
    """Check the wheel folder, install its wheels and the project into `site` offline, and read every version
    back: what was installed, or a `WuerstchenError` naming what is missing."""
    wheels = check_wheel_folder(folder, required)
    with tempfile.TemporaryDirectory(prefix="wuerstchen-build-") as build:
        project = copy_project(source, Path(build) / "project")
        command = install_command(wheels, project, site)
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    names = [wheel_tags(wheel)[0] for wheel in wheels] + [PROJECT]
    versions = installed_versions(site, names)
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        raise WuerstchenError(f"--site {site}: {', '.join(missing)} not importable after the install")
    found = {canonical(name): version for name, version in versions.items()}
    for name, version in required.items():
        if found[canonical(name)] != version:
            raise WuerstchenError(f"--site {site}: {name} is {found[canonical(name)]} after the install; "
                                  f"expected {version}")
    script = site / "bin" / "wuerstchen"
    if not script.is_file():
        raise WuerstchenError(f"--site {site}: the install made no {script}")
    return {"site": str(site), "wheels": [wheel.name for wheel in wheels], "versions": versions,
            "console_script": str(script)}


def write_probe_wheel(folder: Path, name: str = "wuerstchen_probe", version: str = "0.0.0") -> Path:
    """A tiny valid wheel of one module, `name`, for checking the install without the real wheels (the dry
    run, the tests): a stand-in must not shadow a package that the machine has."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'VERSION = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: benchmarks.wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={_digest(text.encode())},{len(text.encode())}" for path, text in files.items()]
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with tempfile.SpooledTemporaryFile() as buffer:
        with zipfile.ZipFile(buffer, "w") as archive:
            for member, text in files.items():
                archive.writestr(member, text)
        buffer.seek(0)
        write_atomically(path, buffer.read())
    return path


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="on a networked machine: save the wheels into --dest")
    download.add_argument("--dest", type=Path, default=DEFAULT_FOLDER, help="folder (default .whl in the repository)")
    check = commands.add_parser("check", help="check that --wheels holds each wheel once, for the GPU machine")
    setup = commands.add_parser("install", help="offline: install the wheels and this project into --site")
    for command in (check, setup):
        command.add_argument("--wheels", type=Path, default=DEFAULT_FOLDER, help="folder (default .whl)")
        command.add_argument("--require", action="append", metavar="NAME==VERSION",
                             help="a wheel the folder must hold (default: " +
                                  ", ".join(f"{n}=={v}" for n, v in WHEELS.items()) + "); repeatable")
    setup.add_argument("--site", type=Path, default=DEFAULT_SITE, help=f"install folder (default {DEFAULT_SITE})")
    setup.add_argument("--source", type=Path, default=REPOSITORY, help="the project's root (default this one)")
    setup.add_argument("--json", type=Path, metavar="FILE", help="also write what was installed as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            args.dest.mkdir(parents=True, exist_ok=True)
            for name, version in WHEELS.items():
                subprocess.run(download_command(args.dest, name, version), check=True)
            wheels = check_wheel_folder(args.dest, WHEELS)
            print(f"{args.dest}: {', '.join(wheel.name for wheel in wheels)}; carry it with the working tree")
            return 0
        required = dict(map(requirement, args.require)) if args.require else WHEELS
        if args.command == "check":
            wheels = check_wheel_folder(args.wheels, required)
            print(f"{args.wheels}: {', '.join(wheel.name for wheel in wheels)}")
            return 0
        installed = install(args.wheels, args.site, required, args.source)
        print(f"installed into {installed['site']}: "
              + ", ".join(f"{name} {version}" for name, version in installed["versions"].items()))
        if args.json:
            write_atomically(args.json, (json.dumps(installed, indent=1) + "\n").encode())
        return 0
    except WuerstchenError as error:
        print(f"benchmarks.wheels {args.command}: error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"benchmarks.wheels {args.command}: error: {' '.join(map(str, error.cmd[:6]))} … exited with "
              f"{error.returncode}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
