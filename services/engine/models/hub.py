"""Models named as users name them: a local directory, or a Hugging Face Hub id fetched into the Hub's cache.

    resolve_model(model, revision, settings)     -> ResolvedModel: the local directory, the commit it pins
    resolve_tokenizer(tokenizer, revision, ...)  -> a local directory with the tokenizer files only
    local_model_dir(config), local_tokenizer_dir(config, model_dir)    an EngineConfig's, as directories
    with_local_files(config)                     the EngineConfig with both replaced by their directories

A Hub id is fetched through huggingface_hub (`snapshot_download`, its cache layout
`<cache>/models--org--name/snapshots/<commit>/`, its progress bar) in three steps, each fetching only what the
next one needs:

    1. config.json           the architecture is checked before anything large is fetched
    2. METADATA_FILES        tokenizer, processor, chat template, generation config, the safetensors index
    3. the weights           the shards the index names, else model.safetensors (none for load_format "dummy")

Pickle checkpoints (`*.bin`, `*.pt`, ...) are never fetched; a repo that has only those is refused. Of a
checkpoint, only the files the loader reads are fetched (a repo with `consolidated.safetensors` beside its
shards, as Mistral's, costs one copy of the weights, not two).

Once per node: online, each resolution holds a file lock in the cache (`.locks/tristage/`, one per repo id and
revision) while it fetches, so the workers of a node that start together download once; the others wait, then
find every file in the cache and fetch nothing. Offline nothing is written and no lock is taken (a read-only
shared cache works). The serve process resolves first and hands workers the id at the commit it got
(`ResolvedModel.revision`), so a worker on another node fetches the same files, never a newer `main`.

Environment: huggingface_hub's own variables, read in one place (`HubSettings.from_environ`):
    HF_HUB_OFFLINE=1    the cache only: what it lacks is an error, nothing is fetched
    HF_HUB_CACHE        the cache; else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
                        ~/.cache/huggingface/hub (huggingface_hub.constants' order); --download-dir overrides all
    HF_TOKEN            the token for gated and private repos (else huggingface_hub's stored login)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from services.common.errors import ModelLoadError
from services.engine.models.loader import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
    read_model_config,
)

if TYPE_CHECKING:
    from services.engine.config import EngineConfig

logger = logging.getLogger(__name__)

DEFAULT_REVISION = "main"  # the Hub's default branch
# Tokenizer files of every format transformers reads (fast tokenizer.json, sentencepiece tokenizer.model,
# BPE vocab/merges, tiktoken), and the chat template where it lives beside them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
# Everything but the weights: config, tokenizer, image processor, generation config, the shard index. Top-level
# names only: fnmatch's `*` matches "/", so no pattern may start with one unless it means every folder.
METADATA_FILES = (
    CONFIG_FILE,
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    SAFETENSORS_INDEX_FILE,
    *TOKENIZER_FILES,
)
LOCK_DIR = Path(".locks") / "tristage"  # under the cache directory


class ModelResolutionError(ModelLoadError):
    """A model that cannot be had on this node: names the model, the revision, the host and the cause."""

    def __init__(self, model: str, revision: str | None, cause: str) -> None:
        self.model = model
        self.revision = revision or DEFAULT_REVISION
        self.cause = cause
        super().__init__(f"cannot get model {model!r} at revision {self.revision!r} on {socket.gethostname()}: {cause}")


@dataclass(frozen=True)
class HubSettings:
    cache_dir: Path  # huggingface_hub's cache layout: models--org--name/{blobs,refs,snapshots}
    offline: bool = False  # the cache only (HF_HUB_OFFLINE)
    token: str | None = None  # None: huggingface_hub's stored login, if any

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], download_dir: str | None = None) -> HubSettings:
        """The Hub's settings as huggingface_hub reads them from the environment, `download_dir` first."""
        if download_dir:
            cache_dir = Path(download_dir)
        elif environ.get("HF_HUB_CACHE"):
            cache_dir = Path(environ["HF_HUB_CACHE"])
        else:
            xdg_cache = environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
            cache_dir = Path(environ.get("HF_HOME") or os.path.join(xdg_cache, "huggingface")) / "hub"
        offline = environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
        return cls(cache_dir.expanduser(), offline, environ.get("HF_TOKEN") or None)


class HubClient(Protocol):
    """What resolution needs of the Hub. `fetch` may block for as long as a download takes."""

    def fetch(self, repo_id: str, revision: str | None, allow_patterns: Sequence[str]) -> Path:
        """The snapshot directory of `repo_id` at `revision`, holding whichever of the files matching
        `allow_patterns` the repo has (fetched into the cache unless there already)."""
        ...

    def list_files(self, repo_id: str, commit: str) -> list[str] | None:
        """Every file of the repo at `commit` as far as known without a download; None: unknown."""
        ...


class HuggingFaceHub:
    """HubClient over huggingface_hub's snapshot_download and its cache."""

    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings

    def fetch(self, repo_id: str, revision: str | None, allow_patterns: Sequence[str]) -> Path:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=self.settings.cache_dir,
            local_files_only=self.settings.offline,
            token=self.settings.token,
            allow_patterns=list(allow_patterns),
        )
        return Path(str(path))

    def list_files(self, repo_id: str, commit: str) -> list[str] | None:
        """From the tree listing snapshot_download cached when it last fetched online (no network call)."""
        from huggingface_hub import get_cached_repo_tree

        try:
            return [f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=self.settings.cache_dir)]
        except Exception:  # no cached listing (never fetched online) or an unreadable one
            return None


@dataclass(frozen=True)
class ResolvedModel:
    model: str  # as given: a directory or a Hub id
    model_dir: Path  # the local directory that holds its files
    revision: str | None = None  # a Hub model's commit (pin it on other nodes); None: a local directory

    @property
    def is_hub(self) -> bool:
        return self.revision is not None

    @property
    def served_name(self) -> str:
        """The API's default model name: a Hub id as given (as vLLM does), a directory's own name."""
        return self.model if self.is_hub else os.path.basename(os.path.normpath(self.model))


def resolve_model(
    model: str,
    revision: str | None = None,
    settings: HubSettings | None = None,
    *,
    need_weights: bool = True,
    hub: HubClient | None = None,
) -> ResolvedModel:
    """`model` as a local directory: the directory itself, else a Hub id fetched into the cache (the module's
    docstring has the steps). `need_weights=False` (load_format "dummy") fetches no weights. Raises
    ModelResolutionError naming the model, the revision and the cause; nothing is fetched for a refused
    architecture."""
    if os.path.isdir(model):
        if revision is not None:
            logger.warning("%s is a local directory: --revision %s does not apply to it", model, revision)
        return ResolvedModel(model, Path(model))
    settings = settings or HubSettings.from_environ(os.environ)
    hub = hub or HuggingFaceHub(settings)
    _check_repo_id(model, revision)
    with _fetch_lock(settings, model, revision):
        snapshot_dir = _fetch(hub, model, revision, [CONFIG_FILE])
        _check_config(snapshot_dir, model, revision)
        _fetch(hub, model, revision, METADATA_FILES)
        if need_weights:
            _fetch_weights(hub, snapshot_dir, model, revision)
    logger.info("model %s at revision %s: %s", model, revision or DEFAULT_REVISION, snapshot_dir)
    return ResolvedModel(model, snapshot_dir, revision=snapshot_dir.name)


def resolve_tokenizer(
    tokenizer: str, revision: str | None = None, settings: HubSettings | None = None, *, hub: HubClient | None = None
) -> Path:
    """A tokenizer's directory: a local one as it is, else a Hub id's tokenizer files (no config or weights)."""
    if os.path.isdir(tokenizer):
        return Path(tokenizer)
    settings = settings or HubSettings.from_environ(os.environ)
    hub = hub or HuggingFaceHub(settings)
    _check_repo_id(tokenizer, revision)
    with _fetch_lock(settings, tokenizer, revision):
        snapshot_dir = _fetch(hub, tokenizer, revision, TOKENIZER_FILES)
    if not any((snapshot_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelResolutionError(tokenizer, revision, "the repo has no tokenizer.json or tokenizer_config.json")
    return snapshot_dir


def local_model_dir(config: EngineConfig) -> str:
    """The directory of `config.model`: the embedded default model when None, a directory as it is, a Hub id
    fetched at `config.revision` into `config.download_dir` (else the Hub's cache)."""
    if config.model is None:
        from services.engine.default_model import default_model_path

        return str(default_model_path())
    settings = HubSettings.from_environ(os.environ, config.download_dir)
    resolved = resolve_model(config.model, config.revision, settings, need_weights=config.load_format != "dummy")
    return str(resolved.model_dir)


def local_tokenizer_dir(config: EngineConfig, model_dir: str) -> str:
    """The directory of `config.tokenizer`, `model_dir` when it is None. It shares the model's revision only
    when it names the same repo."""
    if config.tokenizer is None:
        return model_dir
    revision = config.revision if config.tokenizer == config.model else None
    settings = HubSettings.from_environ(os.environ, config.download_dir)
    return str(resolve_tokenizer(config.tokenizer, revision, settings))


def model_source(config: EngineConfig) -> str:
    """The model as `config` names it, the same on every node: a directory, or `id@revision` for a Hub id
    (WorkerInfo.model_dir: the serve process checks that the pools it attaches to serve its model)."""
    if config.model is None:
        return local_model_dir(config)
    if config.revision is None or os.path.isdir(config.model):
        return config.model
    return f"{config.model}@{config.revision}"


def with_local_files(config: EngineConfig) -> EngineConfig:
    """`config` with its model and tokenizer as local directories, fetched once for a process that builds
    several things from them (the offline LLM: its vision side and its engine)."""
    model_dir = local_model_dir(config)
    tokenizer_dir = local_tokenizer_dir(config, model_dir) if config.tokenizer is not None else None
    return replace(config, model=model_dir, tokenizer=tokenizer_dir, revision=None)


def _check_repo_id(model: str, revision: str | None) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except ValueError as e:  # HFValidationError
        cause = f"no such directory exists, and it is not a Hub id either ({e})"
        raise ModelResolutionError(model, revision, cause) from e


def _fetch_lock(settings: HubSettings, repo_id: str, revision: str | None):
    """The node's lock on fetching `repo_id` at `revision` (a file in the cache, so every process that shares
    the cache shares it); offline, no lock: nothing is written, and the cache may be read-only."""
    if settings.offline:
        return contextlib.nullcontext()
    from filelock import FileLock

    name = f"models--{repo_id.replace('/', '--')}@{(revision or DEFAULT_REVISION).replace('/', '--')}.lock"
    path = settings.cache_dir / LOCK_DIR / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelResolutionError(repo_id, revision, f"the cache {settings.cache_dir} is not writable: {e}") from e
    return FileLock(str(path))


def _fetch(hub: HubClient, model: str, revision: str | None, allow_patterns: Sequence[str]) -> Path:
    from huggingface_hub import errors

    try:
        return hub.fetch(model, revision, allow_patterns)
    except errors.GatedRepoError as e:
        cause = f"a gated repo: accept its terms on the Hub and set HF_TOKEN ({e})"
    except errors.RepositoryNotFoundError as e:
        cause = f"no such repo on the Hub, or a private one and no valid HF_TOKEN ({e})"
    except errors.RevisionNotFoundError as e:
        cause = f"no such revision in the repo ({e})"
    except errors.LocalEntryNotFoundError as e:
        cause = f"not in the cache, and the Hub cannot be reached (HF_HUB_OFFLINE, or the network): {e}"
    except (OSError, ValueError) as e:  # HTTP, connection and cache errors; a bad revision name
        cause = f"{type(e).__name__}: {e}"
    raise ModelResolutionError(model, revision, cause)


def _check_config(snapshot_dir: Path, model: str, revision: str | None) -> None:
    """config.json is there and names an architecture the engine runs (services.engine.models.loader)."""
    if not (snapshot_dir / CONFIG_FILE).is_file():
        raise ModelResolutionError(model, revision, f"the repo has no {CONFIG_FILE} (not an HF-format model)")
    try:
        read_model_config(snapshot_dir)
    except ModelLoadError as e:
        raise ModelResolutionError(model, revision, str(e)) from e


def _fetch_weights(hub: HubClient, snapshot_dir: Path, model: str, revision: str | None) -> None:
    """The shards the index names (the loader reads those only), else model.safetensors; refuse a repo whose
    weights are pickle checkpoints only."""
    index_path = snapshot_dir / SAFETENSORS_INDEX_FILE
    shard_names = _index_shards(index_path, model, revision) if index_path.is_file() else [SAFETENSORS_FILE]
    _fetch(hub, model, revision, shard_names)
    missing = [name for name in shard_names if not (snapshot_dir / name).is_file()]
    if not missing:
        return
    if index_path.is_file():
        raise ModelResolutionError(model, revision, f"{SAFETENSORS_INDEX_FILE} names shards not there: {missing[:3]}")
    known = hub.list_files(model, snapshot_dir.name) or [p.name for p in snapshot_dir.iterdir()]
    pickled = sorted(name for name in known if name.endswith(PICKLE_SUFFIXES))
    found = f"only pickle checkpoints ({', '.join(pickled)}), " if pickled else ""
    raise ModelResolutionError(
        model,
        revision,
        f"no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE}); {found}and tristage never "
        'unpickles weights: use a revision or repo with safetensors, or load_format "dummy" for random weights',
    )


def _index_shards(index_path: Path, model: str, revision: str | None) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelResolutionError(model, revision, f"{SAFETENSORS_INDEX_FILE} is unreadable: {e}") from e
    names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not names or any(not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors") for n in names):
        raise ModelResolutionError(model, revision, f"{SAFETENSORS_INDEX_FILE}: 'weight_map' names no shard files")
    return names
