"""`node-supervisor pull REPO[:QUANT|FILE]`: a GGUF model from the Hugging Face Hub into the data directory.

Through ``huggingface_hub`` (imported only here, only by this command): the
repository's file list, then one file downloaded into ``<data_dir>/models/``
(an interrupted download resumes where it stopped), its SHA-256 checked
against the one the Hub lists, a progress bar on a terminal.  ``HF_TOKEN``
(or a stored login) reaches gated and private repositories; ``HF_ENDPOINT``
names a mirror; ``HF_HUB_OFFLINE=1`` refuses at once with a clear message.
The daemon itself never downloads anything.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings

PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0")  # when none is named: the usual default first
_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<choice>[^\s:]+))?$")


class PullError(Exception):
    """One line for the user; ``code`` is the exit code (sysexits)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Pulled:
    path: Path
    repo: str
    filename: str
    size: int
    sha256: str | None  # None: the Hub listed no SHA-256 (not an LFS file), so none was checked


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``REPO`` or ``REPO:QUANT`` or ``REPO:FILE.gguf`` as (repo, choice)."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise PullError(f"{spec!r} is not REPO[:QUANT|FILE], e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", 64)
    return match["repo"], match["choice"]


def choose_file(repo: str, files: dict[str, Any], choice: str | None) -> str:
    """The GGUF file ``choice`` names (a file, or a quantization such as Q4_K_M), else the usual default."""
    ggufs = sorted(name for name in files if name.lower().endswith(".gguf") and "mmproj" not in name.lower())
    if not ggufs:
        raise PullError(f"{repo} has no GGUF file (node-supervisor serves GGUF models with llama.cpp)", 66)
    if choice is not None and choice.lower().endswith(".gguf"):
        if choice not in files:
            raise PullError(f"{repo} has no file {choice}; its GGUF files: {', '.join(ggufs)}", 66)
        return choice
    wanted = [choice] if choice else list(PREFERRED_QUANTS)
    for quant in wanted:
        pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9])", re.IGNORECASE)
        found = [name for name in ggufs if pattern.search(Path(name).name)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise PullError(f"{repo}: {quant} matches several files ({', '.join(found)}); name one", 64)
    if choice is None and len(ggufs) == 1:
        return ggufs[0]
    named = f"no {choice} file" if choice else "several GGUF files"
    raise PullError(f"{repo} has {named}; choose one with {repo}:QUANT or {repo}:FILE from: {', '.join(ggufs)}", 66)


def pull(settings: Settings, spec: str, progress: bool = True) -> Pulled:
    """Download the chosen GGUF into ``settings.models_home``; PullError says what went wrong."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import disable_progress_bars

    if not progress:
        disable_progress_bars()

    repo, choice = parse_spec(spec)
    try:
        listing = {
            entry.path: entry
            for entry in HfApi().list_repo_tree(repo, recursive=True)
            if type(entry).__name__ == "RepoFile"
        }
        filename = choose_file(repo, listing, choice)
        entry = listing[filename]
        settings.models_home.mkdir(parents=True, exist_ok=True)
        downloaded = Path(hf_hub_download(repo, filename, local_dir=settings.models_home))
    except PullError:
        raise
    except (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError):
        raise PullError("offline mode is on (HF_HUB_OFFLINE=1): nothing can be downloaded; unset it to pull", 69)
    except hub_errors.GatedRepoError:
        raise PullError(f"{repo} is gated: accept its terms on the Hub, then set HF_TOKEN to a token of yours", 77)
    except hub_errors.RepositoryNotFoundError:
        raise PullError(
            f"no repository {repo} (or it is private: set HF_TOKEN to a token that may read it)", 66
        ) from None
    except hub_errors.EntryNotFoundError as exc:
        raise PullError(f"{repo}: {exc}", 66) from None
    except hub_errors.HfHubHTTPError as exc:
        raise PullError(f"{repo}: the Hub answered: {_first_line(exc)}", 69) from None
    except (OSError, ValueError) as exc:  # no network, a dropped connection (resumed on the next pull), disk full
        raise PullError(
            f"{repo}: download failed: {_first_line(exc)} (run the same pull again to resume)", 69
        ) from None
    target = settings.models_home / Path(filename).name
    if downloaded != target:  # a file in a folder of the repository: models/ holds files, by their own names
        shutil.move(downloaded, target)
    expected = entry.lfs.sha256 if entry.lfs is not None else None
    if expected is not None:
        actual = _sha256(target)
        if actual != expected:
            target.unlink()
            raise PullError(f"{filename}: SHA-256 {actual} is not the {expected} the Hub lists; removed it", 65)
    return Pulled(target, repo, filename, target.stat().st_size, expected)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
