"""Where downloaded files live, and the one rule for any path a client names: inside the cache roots.

Downloads go to `<MODEL_CACHE_DIR|SAE_CACHE_DIR>/<org>--<repo>/<revision>/` (the hub forbids "--" in
repo ids, so the folder name is unambiguous). Local registration accepts folders under those roots
or MILLM_ASSET_CACHE; deletion removes files only under the two download roots (the asset cache is
a build cache owned by `build_demo_assets`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path, PurePosixPath

from django.conf import settings

from millm_site.errors import ValidationFailed

_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
_REPO_PATH = re.compile(r"^[A-Za-z0-9_.\-/=]{1,300}$")


# Clients are told these names, never the server's absolute paths (which reveal its layout).
ROOT_SETTINGS = ("MODEL_CACHE_DIR", "SAE_CACHE_DIR", "MILLM_ASSET_CACHE")


def download_roots() -> tuple[Path, ...]:
    return (Path(settings.MODEL_CACHE_DIR).resolve(), Path(settings.SAE_CACHE_DIR).resolve())


def allowed_roots() -> tuple[Path, ...]:
    return (*download_roots(), Path(settings.DEMO_ASSETS_DIR).resolve())


def path_for_client(path: str | Path) -> str:
    """A server path as a client may see it: `<SETTING>/<relative>` inside a root, else its last part."""
    resolved = Path(path).resolve()
    for setting, root in zip(ROOT_SETTINGS, allowed_roots(), strict=True):
        if resolved.is_relative_to(root):
            relative = resolved.relative_to(root).as_posix()
            return setting if relative == "." else f"{setting}/{relative}"
    return resolved.name


def repo_dir(root: Path, repo_id: str, revision: str) -> Path:
    """The folder one repo at one revision is downloaded into."""
    return Path(root) / repo_id.replace("/", "--") / re.sub(r"[^A-Za-z0-9._-]", "_", revision)


def revision_validate(revision: str) -> str:
    if not _REVISION.match(revision) or ".." in revision:
        raise ValidationFailed(f"revision {revision!r} is not a branch, tag or commit name",
                               details={"field": "revision"})
    return revision


def repo_path_validate(path: str) -> str:
    """A folder inside a hub repo ("layer_12/width_16k"): relative, no "..", no odd characters."""
    path = path.strip().strip("/")
    if not path:
        return ""
    parts = PurePosixPath(path).parts
    if not _REPO_PATH.match(path) or any(part in ("..", ".") for part in parts):
        raise ValidationFailed(f"path {path!r} is not a folder inside the repo (no '..', no absolute paths)",
                               details={"field": "path"})
    return "/".join(parts)


def local_path_resolve(raw: str, *, default_root: Path) -> Path:
    """A client-named folder, resolved (symlinks too) and refused unless inside the allowed roots.

    Relative paths are taken from `default_root`. ".." is refused outright rather than normalised:
    a request that tries to climb out is a mistake or an attack, not something to guess at.
    """
    if not raw or "\x00" in raw:
        raise ValidationFailed("path is empty", details={"field": "path"})
    given = Path(raw).expanduser()
    if ".." in given.parts:
        raise ValidationFailed(f"path {raw!r} contains '..' (path traversal is refused)", details={"field": "path"})
    resolved = (given if given.is_absolute() else Path(default_root) / given).resolve()
    roots = allowed_roots()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ValidationFailed(
            f"path {raw!r} is outside the allowed folders ({', '.join(ROOT_SETTINGS)})",
            details={"field": "path", "allowed_roots": list(ROOT_SETTINGS)},
        )
    if not resolved.is_dir():
        raise ValidationFailed(f"path {raw!r} is not a folder", details={"field": "path"})
    return resolved


def tree_remove(folder: str | Path, *, keep: set[str] = frozenset()) -> bool:
    """Remove a downloaded folder if it lies strictly inside a download root and no other entry uses it.

    Empty parent folders up to the root go too, so `<org>--<repo>/` does not linger. Returns whether
    anything was removed. `keep` holds the local paths other catalog entries still point at.
    """
    if not folder:
        return False
    target = Path(folder).resolve()
    root = next((r for r in download_roots() if target.is_relative_to(r) and target != r), None)
    if root is None or not target.exists():
        return False
    kept = {Path(p).resolve() for p in keep if p}
    if any(k == target or k.is_relative_to(target) or target.is_relative_to(k) for k in kept):
        return False
    shutil.rmtree(target, ignore_errors=True)
    parent = target.parent
    while parent != root and parent.is_relative_to(root):
        # huggingface_hub's per-file metadata (`.cache/`) alone is no reason to keep a folder.
        if {child.name for child in parent.iterdir()} - {".cache"}:
            break
        shutil.rmtree(parent, ignore_errors=True)
        parent = parent.parent
    return True
