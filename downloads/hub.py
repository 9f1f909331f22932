"""The HuggingFace hub, through huggingface_hub's own code: list a repo, fetch one file, name failures.

No Django here. huggingface_hub is imported lazily (it is only needed where a download runs) and is
always given `endpoint=` explicitly: it reads HF_ENDPOINT once, when first imported.

Resume, as huggingface_hub 2.4 does it (read in `file_download.http_get`): a transfer cut mid-file
is retried in the same call with `Range: bytes=N-` (up to 5 times, the count reset whenever data
arrives). N advances in 10 MiB steps (`DOWNLOAD_CHUNK_SIZE`), so a small file restarts from 0. The
partial `.incomplete` file is process-unique and deleted on failure (huggingface_hub PR #4228), so a
new run does not resume inside a file; it resumes at file granularity: files already complete in
`local_dir` (checked against the commit in `.cache/huggingface/download/*.metadata`) are skipped.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from millm_site.errors import DownloadFailed, ValidationFailed

LIBRARY_NAME = "millm"


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int


@dataclass(frozen=True)
class RepoListing:
    repo_id: str
    revision: str
    commit: str
    files: tuple[RepoFile, ...]


def repo_id_validate(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = (repo_id or "").strip()
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValidationFailed(f"repo_id {repo_id!r} is not a hub repo id ('namespace/name'): {exc}",
                               details={"field": "repo_id"}) from None
    if not repo_id:
        raise ValidationFailed("repo_id is empty", details={"field": "repo_id"})
    return repo_id


def repo_listing(*, repo_id: str, revision: str, endpoint: str, token: str | None) -> RepoListing:
    """The repo's files with their sizes at `revision`, and the commit it resolves to (one API call)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME)
    with hub_errors(repo_id=repo_id, revision=revision, endpoint=endpoint):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    files = tuple(RepoFile(path=s.rfilename, size=int(s.size or 0)) for s in (info.siblings or []))
    return RepoListing(repo_id=repo_id, revision=revision, commit=info.sha or revision, files=files)


def file_download(
    *, repo_id: str, filename: str, commit: str, local_dir: Path, endpoint: str, token: str | None,
    progress_class: type[Any] | None,
) -> Path:
    """Fetch one file into local_dir (kept under its repo path); a complete file is not fetched again."""
    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id=repo_id, revision=commit, endpoint=endpoint, filename=filename):
        path = hf_hub_download(
            repo_id, filename, revision=commit, local_dir=local_dir, endpoint=endpoint, token=token,
            library_name=LIBRARY_NAME, tqdm_class=progress_class,
        )
    return Path(path)


@contextmanager
def hub_errors(*, repo_id: str, revision: str, endpoint: str, filename: str = "") -> Iterator[None]:
    """huggingface_hub's exceptions as DOWNLOAD_FAILED with a reason; messages are ours (no headers, no token)."""
    import httpx2
    from huggingface_hub import errors as hf

    where = f"{filename} in {repo_id}" if filename else repo_id

    def failed(reason: str, message: str, **details: Any) -> DownloadFailed:
        return DownloadFailed(message, details={"reason": reason, "repo_id": repo_id, "revision": revision,
                                                **({"file": filename} if filename else {}), **details})

    try:
        yield
    except hf.HFValidationError as exc:
        raise ValidationFailed(f"invalid hub argument: {exc}", details={"field": "repo_id"}) from None
    except hf.GatedRepoError:
        raise failed("gated_repo", f"{repo_id} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except hf.RepositoryNotFoundError:
        raise failed("repo_not_found", f"Repository {repo_id!r} was not found on {endpoint} "
                     "(or it is private and no valid HF_TOKEN was given)") from None
    except hf.RevisionNotFoundError:
        raise failed("revision_not_found", f"Revision {revision!r} was not found in {repo_id}") from None
    except hf.RemoteEntryNotFoundError:
        raise failed("file_not_found", f"{where} was not found at revision {revision!r}") from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise failed("hub_http_error", f"The hub answered HTTP {status} for {where}", status=status) from None
    except (httpx2.ConnectError, httpx2.TimeoutException, hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError):
        raise failed("hub_unreachable", f"Cannot reach the hub at {endpoint} (is HF_HUB_OFFLINE set, or the "
                     "network down?)") from None
    except hf.FileMetadataError:
        raise failed("hub_bad_response", f"{endpoint} answered without the hub's file headers for {where} "
                     "(is HF_ENDPOINT a hub?)") from None
    except (httpx2.TransportError, httpx2.StreamError):
        raise failed("transfer_interrupted", f"The transfer of {where} was interrupted; run it again to resume") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise failed("disk_full", f"The disk filled up while writing {where}") from None
        if "Consistency check failed" in str(exc):  # http_get: fewer bytes than announced
            raise failed("transfer_interrupted", f"{where} arrived incomplete; run it again to resume") from None
        raise
