#!/usr/bin/env python3
"""Checks, without Docker, that the image the Dockerfile builds can load its
binaries: every shared library the binaries need, recursively, and every
library the runtime stage copies (torch and CUDA load some with dlopen) must
resolve inside the image.

The image's file system is reconstructed from the runtime stage's
`COPY --from=builder SRC DEST` lines, with each builder path mapped to its
counterpart on this machine (the bootstrap's venv has the same wheel as the
builder's, and the local binaries are linked the same way). A needed library
resolves when a file of that name is in one of the object's RPATH/RUNPATH
directories ($ORIGIN expanded) or in the image's LD_LIBRARY_PATH, or when it
is listed below as part of the runtime base image, or as provided by the
host (the NVIDIA driver). Dynamic sections are read with `readelf -d`.

Usage: check_shared_libs.py --dockerfile Dockerfile --bin-dir target/debug
           --site-packages VENV/lib/python3.11/site-packages
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# Builder paths the runtime stage copies from, and where the same files are on
# this machine ("site-packages" and "bin" are filled from the arguments).
BUILDER_ROOTS = {
    "/opt/venv/lib/python3.11/site-packages": "site-packages",
    "/build/target/release": "bin",
}

# The binaries the image must carry, on PATH.
BINARIES = ("weightgen-server", "weightgen-worker", "weightgen")
IMAGE_BIN_DIR = "/usr/local/bin"

# The runtime base image this list was made for; another base needs a review.
RUNTIME_BASE = "debian:12.11-slim"

# Libraries the runtime base image provides, with their Debian package.
# glibc (libc6), libgcc-s1, libstdc++6 and zlib1g are in debian:12-slim
# (apt and dpkg need them); a package outside PACKAGES_IN_BASE must be
# installed by the runtime stage's apt-get.
BASE_LIBS = {
    "libc.so.6": "libc6",
    "libm.so.6": "libc6",
    "libdl.so.2": "libc6",
    "libpthread.so.0": "libc6",
    "librt.so.1": "libc6",
    "libutil.so.1": "libc6",
    "ld-linux-x86-64.so.2": "libc6",
    "libgcc_s.so.1": "libgcc-s1",
    "libstdc++.so.6": "libstdc++6",
    "libz.so.1": "zlib1g",
}
PACKAGES_IN_BASE = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}

# Provided by the host at run time, never in the image: the NVIDIA driver's
# user-space library, mounted by the NVIDIA Container Toolkit (docker --gpus,
# the Kubernetes device plugin). Without it CUDA reports no device and the
# binaries run on CPU.
HOST_LIBS = {"libcuda.so.1": "NVIDIA driver, mounted by the NVIDIA Container Toolkit"}

# Copied libraries that are never loaded by weightgen and whose dependencies
# the image deliberately lacks (patterns on the image path).
OPTIONAL_LIBS = {
    "*/nvidia/nvshmem/lib/nvshmem_transport_*.so*": "NVSHMEM multi-node transports "
    "(UCX, libfabric, InfiniBand); loaded only by NVSHMEM jobs across nodes",
    "*/nvidia/nvshmem/lib/nvshmem_bootstrap_*.so*": "NVSHMEM bootstraps (MPI, PMI, "
    "PMIx, OpenSHMEM); loaded only when NVSHMEM starts under those launchers",
    "*/nvidia/cu13/lib/libcufile_rdma.so*": "GPUDirect Storage over RDMA "
    "(libibverbs, libmlx5); weightgen reads blobs over the network",
}


@dataclass
class RuntimeStage:
    """What the checker needs from the Dockerfile's last stage."""

    base: str
    copies: list[tuple[list[str], list[str], str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    apt_packages: set[str] = field(default_factory=set)


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and
    comments dropped."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    return result


def parse_env(args: str) -> dict[str, str]:
    """ENV key=value pairs (the legacy `ENV key value` form too)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def runtime_stage(dockerfile: Path) -> RuntimeStage:
    stages: list[RuntimeStage] = []
    for keyword, args in instructions(dockerfile.read_text()):
        if keyword == "FROM":
            words = args.split()
            image = next(w for w in words if not w.startswith("--"))
            stages.append(RuntimeStage(base=image))
            continue
        if not stages:
            continue
        stage = stages[-1]
        if keyword == "COPY":
            words = shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            stage.copies.append((flags, paths[:-1], paths[-1]))
        elif keyword == "ENV":
            stage.env.update(parse_env(args))
        elif keyword == "RUN" and "apt-get install" in args:
            tail = args.split("apt-get install", 1)[1].split("&&")[0]
            stage.apt_packages |= {w for w in tail.split() if not w.startswith("-")}
    if not stages:
        sys.exit(f"{dockerfile}: no FROM")
    runtime = stages[-1]
    for flags, sources, dest in runtime.copies:
        if "--from=builder" not in flags:
            sys.exit(f"runtime stage: COPY {' '.join(sources)} {dest} is not from the builder stage")
    return runtime


def local_path(builder_path: str, roots: dict[str, Path]) -> Path:
    for prefix, name in BUILDER_ROOTS.items():
        if builder_path == prefix or builder_path.startswith(prefix + "/"):
            return roots[name] / builder_path[len(prefix) :].lstrip("/")
    sys.exit(
        f"COPY source {builder_path} is under no known builder path "
        f"({', '.join(BUILDER_ROOTS)}): map it in {Path(__file__).name}"
    )


def image_files(stage: RuntimeStage, roots: dict[str, Path]) -> dict[str, Path]:
    """Image path -> local file, for everything the runtime stage copies."""
    files: dict[str, Path] = {}
    for _flags, sources, dest in stage.copies:
        for source in sources:
            local = local_path(source, roots)
            if not local.exists():
                sys.exit(f"COPY source {source}: {local} does not exist here")
            if local.is_dir():
                # COPY DIR DEST copies the directory's contents into DEST.
                for path in local.rglob("*"):
                    if path.is_file():
                        files[str(PurePosixPath(dest) / path.relative_to(local))] = path
            elif dest.endswith("/") or len(sources) > 1:
                files[str(PurePosixPath(dest) / local.name)] = local
            else:
                files[dest] = local
    return files


def dynamic_section(path: Path) -> tuple[list[str], list[str]]:
    """(NEEDED sonames, RPATH + RUNPATH entries) of an ELF file."""
    out = subprocess.run(
        ["readelf", "-d", str(path)], capture_output=True, text=True, check=True
    ).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    paths = []
    for entry in re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]", out):
        paths += [p for p in entry.split(":") if p]
    return needed, paths


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def check_base_packages(stage: RuntimeStage) -> list[str]:
    problems = []
    if stage.base != RUNTIME_BASE:
        problems.append(
            f"runtime base is {stage.base}, but BASE_LIBS in {Path(__file__).name} "
            f"was made for {RUNTIME_BASE}: review it and update RUNTIME_BASE"
        )
    for soname, package in sorted(BASE_LIBS.items()):
        if package not in PACKAGES_IN_BASE and package not in stage.apt_packages:
            problems.append(f"{soname} needs package {package}: apt-get install it in the runtime stage")
    # On a Debian 12 machine (the base image's release), confirm each
    # listed library really belongs to the package named for it.
    if shutil.which("dpkg") and Path("/etc/debian_version").read_text().startswith("12."):
        for soname, package in sorted(BASE_LIBS.items()):
            owner = subprocess.run(
                ["dpkg", "-S", f"*/{soname}"], capture_output=True, text=True
            ).stdout
            # "pkg:arch, pkg2:arch: /path" per line.
            owners = {
                name.strip().split(":")[0]
                for line in owner.splitlines()
                for name in line.split(": /")[0].split(",")
            }
            if package not in owners:
                problems.append(f"{soname}: dpkg says {sorted(owners) or 'no package'}, not {package}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", type=Path, required=True)
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--site-packages", type=Path, required=True)
    args = parser.parse_args()

    stage = runtime_stage(args.dockerfile)
    roots = {"site-packages": args.site_packages, "bin": args.bin_dir}
    files = image_files(stage, roots)
    by_dir: dict[str, set[str]] = {}
    for image_path in files:
        parent = PurePosixPath(image_path)
        by_dir.setdefault(str(parent.parent), set()).add(parent.name)
    ld_library_path = [p for p in stage.env.get("LD_LIBRARY_PATH", "").split(":") if p]

    problems = check_base_packages(stage)
    roots_to_check: list[str] = []
    for name in BINARIES:
        image_path = f"{IMAGE_BIN_DIR}/{name}"
        if image_path not in files:
            problems.append(f"{image_path} is not copied into the runtime stage")
        else:
            roots_to_check.append(image_path)
    optional: dict[str, list[str]] = {pattern: [] for pattern in OPTIONAL_LIBS}
    for image_path, local in sorted(files.items()):
        if ".so" not in PurePosixPath(image_path).name or not is_elf(local):
            continue
        pattern = next((p for p in OPTIONAL_LIBS if fnmatch.fnmatch(image_path, p)), None)
        if pattern:
            optional[pattern].append(PurePosixPath(image_path).name)
        else:
            roots_to_check.append(image_path)
    for pattern, matched in optional.items():
        if not matched:
            problems.append(f"OPTIONAL_LIBS pattern {pattern} matches nothing copied: drop it")

    resolved: dict[str, str] = {}
    system, host = {}, {}
    missing: dict[str, list[str]] = {}
    seen: set[str] = set()
    queue = [(p, "image") for p in roots_to_check]
    while queue:
        image_path, via = queue.pop()
        if image_path in seen:
            continue
        seen.add(image_path)
        needed, rpaths = dynamic_section(files[image_path])
        origin = str(PurePosixPath(image_path).parent)
        search = [os.path.normpath(p.replace("$ORIGIN", origin)) for p in rpaths] + ld_library_path
        for soname in needed:
            found = next((d for d in search if soname in by_dir.get(d, ())), None)
            if found is not None:
                target = f"{found}/{soname}"
                resolved[soname] = target
                queue.append((target, image_path))
            elif soname in BASE_LIBS:
                system.setdefault(soname, image_path)
            elif soname in HOST_LIBS:
                host.setdefault(soname, image_path)
            else:
                missing.setdefault(soname, []).append(image_path)

    for soname, needers in sorted(missing.items()):
        problems.append(
            f"{soname} is needed by {', '.join(sorted(needers))}, but no directory of their "
            f"rpath or of the image's LD_LIBRARY_PATH ({stage.env.get('LD_LIBRARY_PATH', 'unset')}) "
            f"has it, and the base image does not provide it"
        )
    print(
        f"[shared-libs] {len(seen)} ELF objects of the image checked "
        f"({len(BINARIES)} binaries, {len(seen) - len(BINARIES)} libraries copied from "
        f"torch/lib and nvidia/*/lib); {len(resolved)} sonames resolve inside the image"
    )
    print(f"[shared-libs] from the base image {RUNTIME_BASE}: {', '.join(sorted(system))}")
    for soname, needer in sorted(host.items()):
        print(f"[shared-libs] from the host: {soname} (needed by {needer}): {HOST_LIBS[soname]}")
    for pattern, matched in optional.items():
        print(f"[shared-libs] not checked ({OPTIONAL_LIBS[pattern]}): {', '.join(matched)}")
    if problems:
        for problem in problems:
            print(f"[shared-libs] FAIL: {problem}", file=sys.stderr)
        return 1
    print("[shared-libs] every needed library is in the image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
