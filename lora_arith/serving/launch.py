"""Starting ``serve`` from its options: the server's default weights, the checks made before the
base loads, and the mixer the server runs on (:func:`serve`)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from lora_arith._internal.errors import OptionError
from lora_arith.lora.specs import parse_weight

if TYPE_CHECKING:
    from lora_arith.lora.specs import AdapterSpec

__all__ = ["WEIGHTS_USAGE", "parse_default_weights", "default_weights", "serve"]

WEIGHTS_USAGE = "cannot read {item!r} in {}; use NAME=WEIGHT,NAME=WEIGHT"
"""The error of a ``weights`` item that :func:`~lora_arith.lora.specs.parse_weight` cannot read."""


def parse_default_weights(text: str) -> dict[str, float]:
    """``helpful=1,harmless=0.5`` (the ``weights`` option) → {name: weight}: comma-separated
    ``NAME=WEIGHT`` items (:func:`~lora_arith.lora.specs.parse_weight`), empty ones skipped."""
    items = filter(None, (part.strip() for part in text.split(",")))
    return dict(parse_weight(item, "weights", WEIGHTS_USAGE) for item in items)


def default_weights(
    named: Mapping[str, "AdapterSpec"], overrides: Mapping[str, float], max_eta: float
) -> dict[str, float]:
    """The server's weight of each adapter of ``named``: its spec's weight, unless ``overrides``
    gives it another. Every name in ``overrides`` must be an adapter's, and no weight may be above
    ``max_eta`` in size (a request could not ask for it either)."""
    unknown = sorted(set(overrides) - set(named))
    if unknown:
        raise OptionError(("weights", "adapters"), "{} names {unknown}, which no {} is named", unknown=", ".join(unknown))
    weights = {name: spec.weight for name, spec in named.items()}
    weights.update(overrides)
    for name, weight in weights.items():
        if abs(weight) > max_eta:
            raise OptionError(
                "max_eta",
                "the default weight of {name} ({weight:g}) is above {} {max_eta:g}",
                name=name,
                weight=weight,
                max_eta=max_eta,
            )
    return weights


def serve(
    base: str | None,
    named: Mapping[str, "AdapterSpec"],
    weights: Mapping[str, float] | None = None,
    *,
    quantize_4bit: bool = False,
    int8: bool = False,
    device: str | None = None,
    max_eta: float = 4.0,
    api_key: str | None = None,
    allowed_origins: Sequence[str] = (),
    max_request_bytes: int = 4 * 2**20,
    request_timeout: float = 30.0,
    **server: Any,
) -> None:
    """Serve ``base`` with the adapters ``named`` (name → parsed spec) attached, at the default
    weights :func:`default_weights` makes of their specs and ``weights``, until SIGINT or SIGTERM.

    Everything the options can get wrong is refused before the base loads: int8 with 4-bit, an
    unknown name in ``weights``, a default weight above ``max_eta``, the access settings
    (:class:`~lora_arith.serving.app.AccessSettings`: ``api_key``, ``allowed_origins``,
    ``max_request_bytes``, ``request_timeout``). With ``int8``, the base's linear layers are then
    quantized (:meth:`~lora_arith.model.mixing.PreferenceMixer.quantize_int8`). ``server`` goes to
    :func:`~lora_arith.serving.app.run_server` (host, port, the bounds, ``announce``)."""
    from lora_arith.model.mixing import PreferenceMixer
    from lora_arith.serving.app import AccessSettings, run_server

    if int8 and quantize_4bit:
        raise OptionError(("int8", "quantize_4bit"), "{} and {} are two ways to quantize the base: choose one")
    defaults = default_weights(named, weights or {}, max_eta)
    access = AccessSettings(
        api_key=api_key,
        allowed_origins=allowed_origins,
        max_request_bytes=max_request_bytes,
        request_timeout=request_timeout,
    )
    at_defaults = {name: replace(spec, weight=defaults[name]) for name, spec in named.items()}
    mixer = PreferenceMixer.from_specs(base, at_defaults, quantize_4bit=quantize_4bit, device=device)
    if int8:
        mixer.quantize_int8()
    run_server(mixer, max_eta=max_eta, access=access, **server)
