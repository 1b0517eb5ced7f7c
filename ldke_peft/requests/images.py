"""Images of requests: checks (exists, decodes, not too large), loading, fingerprints and paths.

Owns: what an acceptable image is. Imports nothing of the library but its errors.

Layer: data (README "Architecture"): imports only other data modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Iterator, Union

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError


ImageLike = Union[Image.Image, str, os.PathLike]

#: Largest image side we accept (pixels). Larger inputs are almost always a mistake (a raw scan, a
#: decompression bomb) and would only be downscaled by the processor anyway.
MAX_IMAGE_SIDE = 8192


def _image_ref(image: ImageLike | None, image_root: str | None) -> Any:
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        return _relative(os.fspath(image), image_root)
    fn = getattr(image, "filename", "")
    if fn:
        return _relative(fn, image_root)
    return f"<PIL {image.size[0]}x{image.size[1]} sha={image_fingerprint(image)}>"


def _relative(path: str, image_root: str | None) -> str:
    if image_root is None:
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(image_root))


def image_fingerprint(image: Image.Image) -> str:
    """sha256 (first 12 hex chars) of the RGB pixels: identifies an image independent of its file."""
    memo = _MEMO[-1] if _MEMO else None
    if memo is not None:
        hit = memo.get(id(image))
        if hit is not None and hit[0] is image:
            return hit[1]
    img = image.convert("RGB")
    h = hashlib.sha256()
    h.update(f"{img.size}".encode())
    h.update(img.tobytes())
    fp = h.hexdigest()[:12]
    if memo is not None:
        memo[id(image)] = (image, fp)  # the image is held, so its id cannot be reused meanwhile
    return fp


#: the fingerprint memos of the :func:`fingerprints_memoized` blocks in progress (innermost last)
_MEMO: list[dict[int, tuple[Image.Image, str]]] = []


@contextlib.contextmanager
def fingerprints_memoized() -> Iterator[None]:
    """Within this block each image object is fingerprinted once. An edit asks for the fingerprints of the
    same images at several steps (validation, positives, negatives, the pack guard); the images cannot
    change during one edit, but may between calls, so the memo ends with the block."""
    _MEMO.append({})
    try:
        yield
    finally:
        _MEMO.pop()


def load_image(image: Any, field: str = "image") -> Image.Image:
    """Open/convert an image to RGB, with a clear :class:`ImageError` for every way it can be wrong."""
    if isinstance(image, (str, os.PathLike)):
        path = _check_path(image, field)
        try:
            with Image.open(path) as im:
                _check_size(im, field, path)
                im.load()
                out = im.convert("RGB")
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{field}: cannot read image {path}: {exc}", field=field) from None
        out.filename = path  # keep the reference for reports
        return out
    if isinstance(image, Image.Image):
        _check_size(image, field, "<PIL image>")
        if image.mode == "RGB":
            return image
        try:
            out = image.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for odd modes
            raise ImageError(f"{field}: cannot convert image of mode {image.mode} to RGB: {exc}", field=field) from None
        if getattr(image, "filename", ""):
            out.filename = image.filename
        return out
    if image is None:
        raise ImageError(f"{field}: image is missing (None)", field=field)
    raise ImageError(
        f"{field}: expected a PIL image or a file path, got {type(image).__name__}", field=field
    )


def check_image_file(path: str | os.PathLike, field: str = "image") -> str:
    """Check that ``path`` is a readable image of a sane size without decoding its pixels.

    Reads only the header (cheap), so a loader can check thousands of records up front. Returns the
    path as a string; raises :class:`ImageError` naming ``field`` otherwise. A file whose header is
    fine but whose pixel data is truncated is caught later, by :func:`load_image`.
    """
    path = _check_path(path, field)
    try:
        with Image.open(path) as im:
            _check_size(im, field, path)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{field}: cannot read image {path}: {exc}", field=field) from None
    return path


def _check_image(image: Any, field: str = "image") -> ImageLike:
    """``open_images=False`` variant of :func:`load_image`: paths are checked and kept as paths."""
    if isinstance(image, (str, os.PathLike)):
        return check_image_file(image, field)
    return load_image(image, field)


def _check_path(image: str | os.PathLike, field: str) -> str:
    try:
        path = os.fspath(image)
    except TypeError:
        raise ImageError(f"{field}: expected a PIL image or a file path, got {type(image).__name__}", field=field) from None
    if not isinstance(path, str):
        path = os.fsdecode(path)
    if not path or not os.path.exists(path):
        raise ImageError(f"{field}: image file not found: {path!r}", field=field)
    if os.path.isdir(path):
        raise ImageError(f"{field}: expected an image file, got a directory: {path}", field=field)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ImageError(f"{field}: cannot stat image {path}: {exc}", field=field) from None
    if size == 0:
        raise ImageError(f"{field}: image file is empty (0 bytes): {path}", field=field)
    return path


def _check_size(im: Image.Image, field: str, where: str) -> None:
    w, h = im.size
    if w == 0 or h == 0:
        raise ImageError(f"{field}: image {where} has zero size {w}x{h}", field=field)
    if max(w, h) > MAX_IMAGE_SIDE:
        raise ImageError(
            f"{field}: image {where} is {w}x{h}, larger than the {MAX_IMAGE_SIDE}px limit; downscale it first",
            field=field,
        )
