"""Adapter specs, parsed once: the command line turns text into these types, and the library
functions (:func:`~lora_arith.lora.combine.combine`, :func:`~lora_arith.model.merge.merge_adapters`, the
mixer, …) take them parsed.

The forms:

* ``PATH[:WEIGHT]`` (:func:`parse_spec`, :class:`AdapterSpec`): the last colon splits the path
  from the weight;
* ``[NAME=]PATH[:WEIGHT]`` (:func:`named_specs`): unnamed adapters are named by their file or
  folder stem (:func:`adapter_names`);
* ``NAME=PATH`` (:func:`named_paths`), the sweep's vectors;
* ``NAME=WEIGHT`` (:func:`parse_weight`) and ``NAME=W1,W2,...`` (:func:`named_weights`), the one
  reading of a name with weights: the sweep's fixed weights (:func:`fixed_weights`), ``serve``'s
  default weights, ``chat``'s ``/set`` and ``export``'s mixes;
* one path or a sequence of them (:func:`path_list`), where a function takes several files;
* Hub references ``org/name[@revision][/subpath]`` (:func:`parse_reference`, resolved by
  :mod:`lora_arith.sharing.hub`).

Errors about an option's text are :class:`~lora_arith._internal.errors.OptionError`: they carry the
option's name, which the command line shows as its flag.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lora_arith._internal.errors import LoraArithError, OptionError
from lora_arith._internal.privacy import public_name as _public_name
from lora_arith.lora.numerics import finite_number, parse_finite

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHT_USAGE",
    "AdapterSpec",
    "parse_spec",
    "parse_specs",
    "require_specs",
    "adapter_names",
    "file_stem",
    "named_specs",
    "named_paths",
    "named_weights",
    "parse_weight",
    "fixed_weights",
    "MIX_NAME",
    "check_mixes",
    "check_named_weights",
    "check_adapter_name",
    "path_list",
    "HubReference",
    "parse_reference",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
"""The file names of a PEFT adapter folder."""


@dataclass(frozen=True, init=False)
class AdapterSpec:
    """An adapter reference with its weight, parsed from ``PATH[:WEIGHT]``, or made from Python
    with a path (text or ``os.PathLike``, kept as text) and a finite weight."""

    path: str
    weight: float = 1.0
    name: str | None = None
    """How the input is recorded in the recipe and training records (default: the path's basename)."""

    def __init__(self, path: str | os.PathLike[str], weight: float = 1.0, name: str | None = None) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise LoraArithError(f"an adapter path must be a non-empty path, not {path!r}")
        number = finite_number(weight)
        if number is None:
            raise LoraArithError(f"adapter {os.fspath(path)}: its weight {weight!r} is not a finite number")
        object.__setattr__(self, "path", os.fspath(path))
        object.__setattr__(self, "weight", number)
        object.__setattr__(self, "name", name)

    @property
    def public_name(self) -> str:
        """The name recorded for this input: ``name``, else the path reduced to its basename."""
        return self.name or _public_name(self.path)

    @property
    def weights_file(self) -> Path:
        """The weights file this spec names if it is local: ``PATH/adapter_model.safetensors`` for a
        folder, else ``PATH`` itself (for a Hub reference, a path that does not exist)."""
        path = Path(os.path.expanduser(self.path))
        return path / WEIGHTS_NAME if path.is_dir() else path

    def __str__(self) -> str:
        return f"{self.path}:{self.weight:g}"


def require_specs(specs: Iterable[AdapterSpec], function: str) -> list[AdapterSpec]:
    """``specs`` as a list, after checking they are :class:`AdapterSpec` objects (what ``function``
    takes; any iterable, a generator too, which is read once here); ``TypeError`` otherwise,
    saying how to make them from text."""
    if isinstance(specs, AdapterSpec):
        raise TypeError(f"{function}() takes a list of AdapterSpec objects: [{specs!r}]")
    wrong = TypeError(
        f"{function}() takes AdapterSpec objects, e.g. [AdapterSpec('adapters/helpful', 1.0)]; "
        "parse text with lora_arith.lora.specs.parse_specs"
    )
    if isinstance(specs, (str, bytes, os.PathLike)) or not isinstance(specs, Iterable):
        raise wrong
    listed = list(specs)
    if any(not isinstance(spec, AdapterSpec) for spec in listed):
        raise wrong
    return listed


def parse_spec(text: str | os.PathLike[str]) -> AdapterSpec:
    """Parse ``PATH[:WEIGHT]``; the last colon splits the path from the weight.

    A weight may be negative (``a.safetensors:-1``) and defaults to 1.0. If the text after
    the last colon is not a number, the whole text is taken as a path only when such a path
    exists; otherwise the weight is reported as unparsable. An ``os.PathLike`` is a path, of weight 1.
    """
    if isinstance(text, os.PathLike):
        return AdapterSpec(text)
    if not isinstance(text, str):
        raise TypeError(f"an adapter spec is PATH[:WEIGHT] text, not {text!r}")
    path, colon, weight_text = text.rpartition(":")
    if not colon:
        return AdapterSpec(text)
    try:
        weight = float(weight_text)
    except ValueError:
        if os.path.exists(text):
            return AdapterSpec(text)
        raise LoraArithError(f"cannot parse the weight {weight_text!r} in {text!r} (expected PATH[:WEIGHT])") from None
    if finite_number(weight) is None:
        raise LoraArithError(f"the weight in {text!r} must be a finite number")
    if not path:
        raise LoraArithError(f"{text!r} has a weight but no path")
    return AdapterSpec(path, weight)


def parse_specs(texts: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[AdapterSpec]:
    """:func:`parse_spec` of each text (or path): ``parse_specs(["a:0.8", "b:0.5"])``; one is a list of one."""
    if isinstance(texts, (str, os.PathLike)):
        texts = [texts]
    if not isinstance(texts, Iterable):
        raise TypeError(f"texts: expected PATH[:WEIGHT] texts or paths, not {texts!r}")
    return [parse_spec(text) for text in texts]


def file_stem(path: str | os.PathLike[str]) -> str:
    """What the adapter at ``path`` is called by default: its folder's or file's name without
    ``.safetensors`` or ``.gguf`` (llama.cpp's LoRAs), and a PEFT folder's
    ``adapter_model.safetensors`` by its folder."""
    location = Path(str(path).rstrip("/"))
    if location.name == WEIGHTS_NAME:
        location = location.parent
    return location.name.removesuffix(".safetensors").removesuffix(".gguf")


def adapter_names(specs: Sequence[AdapterSpec], taken: Iterable[str] = frozenset()) -> dict[str, AdapterSpec]:
    """Name each spec by its file or folder stem (``helpful``, ``harmless``…), adding ``-2``,
    ``-3`` to repeated stems (and to names in ``taken``). Returns name → spec."""
    taken = set(taken)
    named: dict[str, AdapterSpec] = {}
    for spec in specs:
        stem = file_stem(spec.path)
        # PEFT keeps adapters in torch ModuleDicts, whose keys cannot hold dots (runs/mix-0.5).
        stem = re.sub(r"[^\w-]", "_", stem) or "adapter"
        name, counter = stem, 2
        while name in named or name in taken:
            name, counter = f"{stem}-{counter}", counter + 1
        named[name] = spec
    return named


_NAME_PREFIX = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)=(.+)$")


def check_adapter_name(name: object) -> str:
    """``name`` if it can name an attached adapter: non-empty text without ``.`` (PEFT keeps
    adapters in torch ModuleDicts, whose keys cannot hold dots), else a :class:`LoraArithError`."""
    if not isinstance(name, str) or not name or "." in name:
        raise LoraArithError(f"an adapter's name must be text without '.', not {name!r}")
    return name


def named_specs(texts: Sequence[str]) -> dict[str, AdapterSpec]:
    """Parse ``[NAME=]PATH[:WEIGHT]`` specs (see :func:`parse_spec`) into name → spec, in the
    order given. Without ``NAME=`` an adapter is named by its file or folder stem, as
    :func:`adapter_names` does; a text that is an existing path is a path."""
    parsed: list[tuple[str | None, AdapterSpec]] = []
    for text in texts:
        match = _NAME_PREFIX.match(text)
        if match and not os.path.exists(text) and not os.path.exists(text.rpartition(":")[0]):
            if any(name == match.group(1) for name, _ in parsed):
                raise LoraArithError(f"two adapters are named {match.group(1)!r}")
            check_adapter_name(match.group(1))
            parsed.append((match.group(1), parse_spec(match.group(2))))
        else:
            parsed.append((None, parse_spec(text)))
    explicit = {name for name, _ in parsed if name is not None}
    stems = iter(adapter_names([spec for name, spec in parsed if name is None], taken=explicit))
    return {name if name is not None else next(stems): spec for name, spec in parsed}


def named_paths(items: Iterable[str], option: str = "vector") -> dict[str, str]:
    """Parse ``NAME=PATH`` items (the sweep's and tune's vectors) into name → path; ``option``
    names the option they came from, for errors."""
    named: dict[str, str] = {}
    for item in items:
        name, equals, path = item.partition("=")
        if not equals or not name or not path:
            raise OptionError(option, "cannot read {} {item!r}; use NAME=PATH", item=item)
        if name in named:
            raise OptionError(option, "{} {name} is given twice", name=name)
        named[name] = path
    return named


WEIGHT_USAGE = "cannot read {} {item!r}; use NAME=WEIGHT"
"""The error of a ``NAME=WEIGHT`` item that :func:`parse_weight` cannot read, unless its caller
gives its own: ``{}`` names the option (see :class:`OptionError`), ``{item}`` is the item."""


def named_weights(
    item: str, option: str | tuple[str, ...] = (), usage: str = WEIGHT_USAGE
) -> tuple[str, list[float]]:
    """Parse ``NAME=W1[,W2,...]`` into ``(NAME, [W1, W2, ...])``: the one reading of a name with
    weights on the command line (the sweep's ``--fix``, ``serve --weights``, chat's ``/set``,
    ``export --mix``).

    NAME is the text before the first ``=``, without surrounding spaces, and must not be empty;
    every weight must be a finite number. Anything else raises
    ``OptionError(option, usage, item=item)``, so that each caller keeps its own message (``usage``
    may name the option with ``{}``; ``option`` may be ``()`` when it does not)."""
    name, equals, values = item.partition("=")
    name = name.strip()
    weights = [parse_finite(text) for text in values.split(",")]
    if not equals or not name or None in weights:
        raise OptionError(option, usage, item=item)
    return name, weights


def parse_weight(item: str, option: str | tuple[str, ...] = (), usage: str = WEIGHT_USAGE) -> tuple[str, float]:
    """Parse ``NAME=WEIGHT`` into ``(NAME, WEIGHT)``: :func:`named_weights` with exactly one weight."""
    name, weights = named_weights(item, option, usage)
    if len(weights) != 1:
        raise OptionError(option, usage, item=item)
    return name, weights[0]


MIX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A mix's name (it names the mix's file or folder): ASCII letters, digits, ``.``, ``_`` and
``-``, starting with a letter or digit (``re.fullmatch``)."""


def check_mixes(mixes: Mapping[str, Sequence[float]], count: int) -> dict[str, list[float]]:
    """``mixes`` (name → one weight per adapter, ``count`` adapters) as name → floats, checked:
    at least one mix, each named by :data:`MIX_NAME`, each with ``count`` finite weights. The one
    check of the mixes that ``export`` writes (vLLM folders and GGUF files are named after them)."""
    if not isinstance(mixes, Mapping):
        raise OptionError("mixes", "{} maps each mix's name to its weights, e.g. {{'balanced': [1.0, 1.0]}}")
    if not mixes:
        raise OptionError("mixes", "{} is empty: give at least one NAME with one weight per adapter")
    checked: dict[str, list[float]] = {}
    for name, weights in mixes.items():
        if not isinstance(name, str) or not MIX_NAME.fullmatch(name):
            raise OptionError(
                "mixes", "{} {name!r}: name a mix with letters, digits, '.', '_', '-' (it names a file)", name=name
            )
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise OptionError("mixes", "{} {name}: give a list of weights, one per adapter, not {weights!r}", name=name, weights=weights)
        values = [finite_number(weight) for weight in weights]
        if len(values) != count:
            raise OptionError(
                "mixes", "{} {name}: {n} weights for {count} adapters; give one per adapter", name=name, n=len(values), count=count
            )
        if None in values:
            raise OptionError("mixes", "{} {name}: the weights must be finite numbers", name=name)
        checked[name] = values
    return checked


def path_list(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], option: str) -> list[str]:
    """``paths`` as a list of texts: one path (a text or ``os.PathLike``) is a list of one, not
    of its characters. Anything else is a :class:`TypeError` naming ``option``."""
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    if not isinstance(paths, Iterable):
        raise TypeError(f"{option}: expected a path or a list of paths, not {paths!r}")
    items = list(paths)
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"{option}: expected a path or a list of paths, not {item!r} in it")
    return [os.fspath(item) for item in items]


def check_named_weights(weights: Mapping[str, Any] | None, names: Sequence[str]) -> dict[str, float]:
    """One row's mix ``weights`` (name → η; ``None``: no change) as floats, each name one of the
    adapters ``names`` and each weight a finite number. The check of a mix given per prompt
    (``generate --prompts`` lines, :meth:`~lora_arith.model.mixing.PreferenceMixer.row_mix`)."""
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise LoraArithError(f"a mix maps adapter names to weights, e.g. {{'helpful': 1.0}}, not {weights!r}")
    checked: dict[str, float] = {}
    for name, value in weights.items():
        if name not in names:
            raise LoraArithError(f"no adapter named {name}; attached: {', '.join(names) or 'none'}")
        number = finite_number(value)
        if number is None:
            raise LoraArithError(f"the weight of {name} is not a finite number: {value!r}")
        checked[name] = number
    return checked


def fixed_weights(items: Iterable[str], names: Sequence[str], option: str = "fix") -> dict[str, float]:
    """Parse ``NAME=WEIGHT`` items (:func:`parse_weight`), each naming one of ``names``, into name → weight."""
    fixed: dict[str, float] = {}
    for item in items:
        name, weight = parse_weight(item, option)
        if name not in names:
            raise OptionError(option, "{} {item!r} names no swept vector; vectors: {names}", item=item, names=", ".join(names))
        fixed[name] = weight
    return fixed


# -- Hub references -----------------------------------------------------------------------------

_REFERENCE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>refs/pr/\d+|[\w./-]+?))?(?:/(?P<subpath>[\w./-]+))?$"
)


@dataclass(frozen=True)
class HubReference:
    """A parsed Hub reference ``org/name[@revision][/subpath]``."""

    repo_id: str
    revision: str | None = None
    subpath: str | None = None

    @property
    def is_single_file(self) -> bool:
        """Whether the reference names one ``.safetensors`` file rather than a folder."""
        return bool(self.subpath and self.subpath.endswith(".safetensors"))


def parse_reference(text: str) -> HubReference | None:
    """Parse ``org/name[@revision][/subpath]``; ``None`` if ``text`` is not of that form."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return None
    match = _REFERENCE.match(text)
    if not match:
        return None
    for part in filter(None, (match["repo"], match["revision"], match["subpath"])):
        if any(component in ("", ".", "..") for component in part.split("/")):
            raise LoraArithError(f"{text}: not a valid Hub reference ('.', '..' and empty path components are refused)")
    return HubReference(match["repo"], match["revision"], match["subpath"])
