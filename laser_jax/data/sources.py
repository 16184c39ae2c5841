"""Inputs by address: the local files behind a model, tokenizer or data address.

A model or tokenizer address (`model.hf_path`, `model.tokenizer_path`, `laser.ref_hf_path`) is
- a local directory (an existing local path always wins over the readings below),
- `gs://bucket/path`: its top-level model files are copied once into a local cache directory,
- a Hugging Face hub id `org/name` or `org/name@revision`, fetched with
  `huggingface_hub.snapshot_download` (only the files a model needs) into the hub cache.
A data entry (`data.train_files`, comma-separated) is a local path or glob, a `gs://` path or glob
(copied once into the cache), or `hf://datasets/ORG/NAME[@REV]/GLOB` (the matching files of a hub
dataset); each entry's files are read in sorted order.

`model_dir` and `data_files` return local paths; every problem is a one-line ConfigError naming the
key and the value. On a multi-host run process 0 fetches first and the others after it (from a
shared cache, or their own copy), so that a slice never downloads one model N times at once into
one cache. All gs:// access goes through `remote_filesystem` (fsspec; gcsfs provides `gs`).
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import os
import re
from typing import Callable, TypeVar
from urllib.parse import unquote

from laser_jax.config_check import ConfigError

T = TypeVar("T")

# The files `model_dir` fetches, by what the caller reads: a model's shape, its tokenizer, or all.
CONFIG_FILES = ("config.json", "generation_config.json", "laser_jax.json")  # + hf.LASER_METADATA_FILE
TOKENIZER_FILES = CONFIG_FILES + (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
MODEL_FILES = TOKENIZER_FILES + ("*.safetensors", "model.safetensors.index.json")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_HUB_DATASET = re.compile(r"hf://datasets/([\w.-]+/[\w.-]+)(?:@([^/]+))?/(.+)")
_CREDENTIALS_HINT = ("check the credentials: `gcloud auth application-default login`, or the VM's "
                     "service account scopes")


def is_gs(address: str) -> bool:
  return address.startswith("gs://")


def cache_root() -> str:
  """Where gs:// inputs are copied: $XDG_CACHE_HOME/laser_jax, by default ~/.cache/laser_jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "laser_jax")


# ----------------------------------------------------------------------------------------------
# Models and tokenizers.


def model_dir(address: str, key: str, files: tuple[str, ...] = MODEL_FILES) -> str:
  """The local directory holding `files` of the model named by `address` (`key`: the config key,
  e.g. "config.model.hf_path", named in errors). "" stays ""."""
  if not address or os.path.isdir(address):
    return address
  if os.path.exists(address):
    raise ConfigError(f"{key}: {address!r} is a file, not a model directory")
  if not (is_gs(address) or _HUB_ID.fullmatch(address)):
    raise ConfigError(f"{key}: no such directory {address!r} (nor a gs:// path or a Hugging Face hub "
                      "id org/name[@revision])")
  return _fetch_model(address, key, files)


@functools.lru_cache(maxsize=None)  # One fetch (and one barrier) per address and process.
def _fetch_model(address: str, key: str, files: tuple[str, ...]) -> str:
  if is_gs(address):
    return process_zero_first(lambda: _copy_gs_dir(address, key, files), f"copy {address}")
  repo_id, _, revision = address.partition("@")
  return process_zero_first(
      lambda: hub_snapshot(repo_id, revision or None, "model", list(files), key, address,
                           ignore_patterns=["*/*"]),  # model files live at the top level
      f"download {address}")


def _copy_gs_dir(url: str, key: str, patterns: tuple[str, ...]) -> str:
  fs, root = remote_filesystem(url, key)
  entries = _remote(lambda: fs.ls(root, detail=True), key, url)
  files = {os.path.basename(e["name"].rstrip("/")): e for e in entries if e.get("type") == "file"}
  wanted = sorted(name for name in files if any(fnmatch.fnmatch(name, p) for p in patterns))
  if not wanted:
    raise ConfigError(f"{key}: {url!r} holds none of the files {', '.join(patterns[:3])}, ... "
                      f"(has {sorted(files)[:5]})")
  dest = _local_copy_path(url)
  for name in wanted:
    _download(fs, files[name], os.path.join(dest, name), key, url)
  return dest


# ----------------------------------------------------------------------------------------------
# Data files.


def data_files(entries: str, key: str) -> list[str]:
  """Local paths of the files that comma-separated `entries` name, entry by entry, each entry's
  files in sorted order (module docstring). A name or glob matching nothing is an error."""
  paths = []
  for entry in (e.strip() for e in entries.split(",")):
    if entry:
      paths += _entry_files(entry, key)
  if not paths:
    raise ConfigError(f"{key}: names no file (got {entries!r})")
  return paths


def _entry_files(entry: str, key: str) -> list[str]:
  if entry.startswith("hf://"):
    match = _HUB_DATASET.fullmatch(entry)
    if not match:
      raise ConfigError(f"{key}: {entry!r} is not hf://datasets/ORG/NAME[@REVISION]/GLOB")
    repo_id, revision, pattern = match.group(1), match.group(2), match.group(3)
    revision = unquote(revision) if revision else None  # refs/pr/1 is written refs%2Fpr%2F1
    return process_zero_first(lambda: hub_files(repo_id, revision, pattern, key, entry),
                              f"download {entry}")
  if is_gs(entry):
    return process_zero_first(lambda: _copy_gs_files(entry, key), f"copy {entry}")
  if os.path.isfile(entry):
    return [entry]
  if glob.has_magic(entry):
    matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
    if not matches:
      raise ConfigError(f"{key}: {entry!r} matches no file")
    return matches
  if os.path.isdir(entry):
    raise ConfigError(f"{key}: {entry!r} is a directory; name its files, e.g. {entry}/*.parquet")
  raise ConfigError(f"{key}: no such file {entry!r}")


def _copy_gs_files(url: str, key: str) -> list[str]:
  fs, path = remote_filesystem(url, key)
  if glob.has_magic(path):
    infos = _remote(lambda: fs.glob(path, detail=True), key, url)
  else:
    infos = _remote(lambda: {path: fs.info(path)} if fs.exists(path) else {}, key, url)
  if not glob.has_magic(path) and infos and infos[path].get("type") != "file":
    raise ConfigError(f"{key}: {url!r} is a directory; name its files, e.g. {url.rstrip('/')}/*.parquet")
  infos = {name: info for name, info in infos.items() if info.get("type") == "file"}
  if not infos:
    raise ConfigError(f"{key}: {url!r} " + ("matches no file" if glob.has_magic(path) else "does not exist"))
  local = []
  for name in sorted(infos):
    local.append(_local_copy_path(fs.unstrip_protocol(name)))
    _download(fs, infos[name], local[-1], key, url)
  return local


def fetch_file(url: str, key: str) -> str | None:
  """A local copy of one gs:// file, or None when it does not exist."""
  fs, path = remote_filesystem(url, key)
  if not _remote(lambda: fs.exists(path), key, url):
    return None
  local = _local_copy_path(url)
  _download(fs, _remote(lambda: fs.info(path), key, url), local, key, url)
  return local


def write_text(path: str, text: str, key: str) -> None:
  """Writes a local or gs:// file whole (a local file appears complete or not at all)."""
  if is_gs(path):
    fs, remote_path = remote_filesystem(path, key)
    _remote(lambda: fs.pipe_file(remote_path, text.encode("utf-8")), key, path)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def check_reachable(url: str, key: str) -> None:
  """Raises the ConfigError of a gs:// location that cannot be read (no gcsfs, no credentials)."""
  fs, path = remote_filesystem(url, key)
  _remote(lambda: fs.exists(path), key, url)


# ----------------------------------------------------------------------------------------------
# The hub.


def hub_snapshot(repo_id: str, revision: str | None, repo_type: str, allow_patterns: list[str],
                 key: str, value: str, ignore_patterns: list[str] | None = None) -> str:
  """`snapshot_download` of the matching files; the local snapshot directory."""
  from huggingface_hub import constants, errors, snapshot_download
  where = f"{key}: {value!r}"
  try:
    return snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                             allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
  except errors.LocalEntryNotFoundError:
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    raise ConfigError(f"{where} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and the hub "
                      f"cannot be reached{offline}; fetch it once with network access") from None
  except errors.GatedRepoError:
    raise ConfigError(f"{where} is a gated repository: accept its terms on huggingface.co and log in "
                      "(`hf auth login` or $HF_TOKEN)") from None
  except errors.RepositoryNotFoundError:
    raise ConfigError(f"{where}: no such {repo_type} repository on the Hugging Face hub (or it is "
                      "private: log in with `hf auth login` or set $HF_TOKEN)") from None
  except errors.RevisionNotFoundError:
    raise ConfigError(f"{where}: {repo_id} has no revision {revision!r}") from None
  except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as e:
    raise ConfigError(f"{where}: {_one_line(e)}") from None


def hub_files(repo_id: str, revision: str | None, pattern: str, key: str, value: str,
              repo_type: str = "dataset") -> list[str]:
  """The local paths of a hub repository's files matching `pattern` (fnmatch on the path in the
  repository, as `allow_patterns` matches), in sorted order; none is an error."""
  root = hub_snapshot(repo_id, revision, repo_type, [pattern], key, value)
  found = []
  for folder, _, names in os.walk(root):
    for name in names:
      relative = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
      if fnmatch.fnmatch(relative, pattern):
        found.append(relative)
  if not found:
    raise ConfigError(f"{key}: {value!r}: no file of {repo_type} {repo_id} matches {pattern!r}")
  return [os.path.join(root, relative) for relative in sorted(found)]


# ----------------------------------------------------------------------------------------------
# gs:// through fsspec.


def remote_filesystem(url: str, key: str):
  """(fsspec filesystem, path) of a gs:// URL: the one place gs:// is opened. fsspec resolves the
  `gs` protocol to gcsfs (or to whatever implementation is registered for it)."""
  import fsspec
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError:
    raise ConfigError(f"{key}: reading {url!r} needs gcsfs: pip install gcsfs (or install "
                      "laser_jax with its [tpu] or [gpu] extra)") from None


def _remote(fn: Callable[[], T], key: str, url: str) -> T:
  """fn(), with a storage failure (missing object, no credentials, no network) as a ConfigError."""
  try:
    return fn()
  except FileNotFoundError:
    raise ConfigError(f"{key}: {url!r} does not exist") from None
  except Exception as e:  # gcsfs raises HttpError, OSError, google.auth errors, ...
    raise ConfigError(f"{key}: cannot read {url!r}: {_one_line(e)}; {_CREDENTIALS_HINT}") from None


def _local_copy_path(url: str) -> str:
  return os.path.join(cache_root(), "gs", url[len("gs://"):].strip("/"))


def _download(fs, info: dict, local: str, key: str, url: str) -> None:
  """Copies a remote file unless a local copy of the same size exists (copied once). The copy
  appears under its name only when complete."""
  size = info.get("size")
  if os.path.isfile(local) and (size is None or os.path.getsize(local) == size):
    return
  os.makedirs(os.path.dirname(local), exist_ok=True)
  partial = f"{local}.partial{os.getpid()}"
  _remote(lambda: fs.get_file(info["name"], partial), key, url)
  os.replace(partial, local)


def _one_line(e: Exception) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


# ----------------------------------------------------------------------------------------------
# Multi-host.


def process_zero_first(fetch: Callable[[], T], what: str) -> T:
  """`fetch()` on process 0, then, after a barrier, on the others: they find what process 0 put
  in a shared cache, or fetch their own copy, without N hosts writing one cache at once."""
  import jax
  if jax.process_count() == 1:
    return fetch()
  from jax.experimental import multihost_utils
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fetch()
    except Exception as e:  # pylint: disable=broad-except  # reach the barrier, then raise
      error = e
  multihost_utils.sync_global_devices(f"laser_jax.sources: {what}")
  if error is not None:
    raise error
  return result if jax.process_index() == 0 else fetch()
