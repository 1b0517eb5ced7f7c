"""The toy-world cache: one build per (seed, size, code version), shared by processes through a file lock."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator


from ...tuner.io import default_dir_mode
from .build import build_world
from .spec import CODE_VERSION, DEFAULT_N_ENTITIES, WorldSpec
from .world import ToyWorld

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    """``$LDKE_CACHE/toy_world`` if set, else ``~/.cache/ldke_peft/toy_world``."""
    env = os.environ.get("LDKE_CACHE")
    if env:
        return Path(env).expanduser() / "toy_world"
    return Path.home() / ".cache" / "ldke_peft" / "toy_world"


def cache_key(seed: int, n_entities: int) -> str:
    return f"v{CODE_VERSION}-seed{seed}-n{n_entities}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent processes build a world once (others wait, then load it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: rely on the atomic rename alone
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save_world(world: ToyWorld, directory: Path) -> None:
    """Write ``world`` to ``directory`` atomically (temp dir + rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        os.chmod(tmp, default_dir_mode())  # mkdtemp makes it private; the cache is meant to be shared
        world.model.save_pretrained(tmp / "model", safe_serialization=True)
        world.processor.save_pretrained(tmp / "processor")
        (tmp / "world.json").write_text(json.dumps(world.spec.to_json(), indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    world.path = directory


def load_world(directory: Path) -> ToyWorld:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    directory = Path(directory)
    spec = WorldSpec.from_json(json.loads((directory / "world.json").read_text()))
    if spec.code_version != CODE_VERSION:
        raise ValueError(f"cached world {directory} has code version {spec.code_version}, expected {CODE_VERSION}")
    model = LlavaForConditionalGeneration.from_pretrained(directory / "model")
    model.eval()
    processor = LlavaProcessor.from_pretrained(directory / "processor")
    return ToyWorld(model=model, processor=processor, spec=spec, path=directory)


def toy_world(
    seed: int = 0, n_entities: int | None = None, cache_dir: str | os.PathLike | None = None, *, force_rebuild: bool = False
) -> ToyWorld:
    """The toy world for ``(seed, n_entities)``: loaded from the cache, or built and cached.

    Args:
        seed: generates the names, facts, emblems and the model initialisation.
        n_entities: number of countries (default :data:`DEFAULT_N_ENTITIES`; >= 2).
        cache_dir: root of the cache (default :func:`default_cache_root`); the world lives in
            ``<cache_dir>/<cache_key(seed, n_entities)>``.
        force_rebuild: ignore (and replace) a cached copy.
    """
    n = DEFAULT_N_ENTITIES if n_entities is None else int(n_entities)
    if n < 2:
        raise ValueError(f"n_entities must be >= 2, got {n}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    key = cache_key(seed, n)
    directory = root / key
    with _file_lock(root / f".{key}.lock"):
        if directory.exists() and not force_rebuild:
            try:
                t0 = time.perf_counter()
                world = load_world(directory)
                logger.info("toy world loaded from %s in %.2fs", directory, time.perf_counter() - t0)
                return world
            except Exception as exc:  # noqa: BLE001 - a broken cache entry is rebuilt, not fatal
                logger.warning("cached toy world at %s is unreadable (%s); rebuilding", directory, exc)
        world = build_world(seed, n)
        save_world(world, directory)
        return world
