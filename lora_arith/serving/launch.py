"""Starting ``serve`` from its options: the server's default weights, the checks made before the
base loads, and the mixer the server runs on (:func:`serve`)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from lora_arith._internal.errors import OptionError
from lora_arith.lora.specs import parse_weight
from lora_arith.serving.protocol import check_defaults

if TYPE_CHECKING:
    from lora_arith.lora.specs import AdapterSpec

__all__ = ["WEIGHTS_USAGE", "parse_default_weights", "default_weights", "serve", "serve_proxy"]

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
    check_defaults(weights, max_eta)  # before the base loads
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
    engine: str = "lora-arith",
    engine_url: str | None = None,
    adapter_dir: str | None = None,
    eta_step: float = 0.05,
    max_loras: int = 8,
    **server: Any,
) -> None:
    """Serve ``base`` with the adapters ``named`` (name → parsed spec) attached, at the default
    weights :func:`default_weights` makes of their specs and ``weights``, until SIGINT or SIGTERM.

    Everything the options can get wrong is refused before the base loads: int8 with 4-bit, an
    unknown name in ``weights``, a default weight above ``max_eta``, the access settings
    (:class:`~lora_arith.serving.app.AccessSettings`: ``api_key``, ``allowed_origins``,
    ``max_request_bytes``, ``request_timeout``). With ``int8``, the base's linear layers are then
    quantized (:meth:`~lora_arith.model.mixing.PreferenceMixer.quantize_int8`). ``server`` goes to
    :func:`~lora_arith.serving.app.run_server` (host, port, the bounds, ``announce``).

    With ``engine`` ``"vllm"`` or ``"llama.cpp"`` nothing is loaded here: the same front end
    forwards to the engine at ``engine_url`` (:func:`serve_proxy`, which takes ``adapter_dir``,
    ``eta_step`` and ``max_loras``)."""
    from lora_arith.serving.app import AccessSettings, check_listen, run_server

    access = AccessSettings(
        api_key=api_key,
        allowed_origins=allowed_origins,
        max_request_bytes=max_request_bytes,
        request_timeout=request_timeout,
    )
    check_listen(server.get("host", "127.0.0.1"), server.get("port", 8000), server.get("shutdown_timeout", 30.0))
    if engine != "lora-arith":
        local = {"base": base, "int8": int8, "quantize_4bit": quantize_4bit, "device": device}
        given = [name for name, value in local.items() if value]
        if given:
            verb = " is" if len(given) == 1 else " are"
            template = ", ".join(["{}"] * len(given)) + verb + " for {} lora-arith only ({engine} runs its own model)"
            raise OptionError((*given, "engine"), template, engine=engine)
        for batching in ("max_batch_size", "max_batch_tokens", "max_queue"):  # our engine's bounds
            server.pop(batching, None)
        proxied = dict(adapter_dir=adapter_dir, eta_step=eta_step, max_loras=max_loras, max_eta=max_eta)
        return serve_proxy(engine, engine_url, named, weights or {}, access=access, **proxied, **server)
    if engine_url is not None or adapter_dir is not None:
        raise OptionError(("engine_url", "adapter_dir", "engine"), "{} and {} are for {} vllm or llama.cpp")
    if int8 and quantize_4bit:
        raise OptionError(("int8", "quantize_4bit"), "{} and {} are two ways to quantize the base: choose one")
    from lora_arith.model.mixing import PreferenceMixer  # torch: only our own engine needs it

    defaults = default_weights(named, weights or {}, max_eta)
    at_defaults = {name: replace(spec, weight=defaults[name]) for name, spec in named.items()}
    mixer = PreferenceMixer.from_specs(base, at_defaults, quantize_4bit=quantize_4bit, device=device)
    if int8:
        mixer.quantize_int8()
    run_server(mixer, max_eta=max_eta, access=access, **server)


def serve_proxy(
    engine: str,
    engine_url: str | None,
    named: Mapping[str, "AdapterSpec"],
    weights: Mapping[str, float],
    *,
    adapter_dir: str | None = None,
    eta_step: float = 0.05,
    max_loras: int = 8,
    max_eta: float = 4.0,
    max_tokens: int = 512,
    model_id: str = "lora-arith",
    announce: Callable[[str], None] = print,
    **server: Any,
) -> None:
    """``serve``'s front end forwarding to ``engine`` (``"vllm"`` or ``"llama.cpp"``) at
    ``engine_url``, until SIGINT or SIGTERM (:mod:`lora_arith.serving.proxy`).

    vLLM: ``named`` are the PEFT vectors to mix, each rounded mix written into ``adapter_dir``
    (which vLLM must be able to read at the same path), at most ``max_loras`` loaded while idle.
    llama.cpp: ``named`` (optional) match ``llama-server``'s GGUF adapters by file name; without
    them its adapters are named by their file stems. Either way the default weights are the
    specs' (1.0 unless given), overridden by ``weights``. ``server`` goes to
    :func:`~lora_arith.serving.app.run_backend`."""
    from lora_arith.serving.app import run_backend
    from lora_arith.serving.protocol import ServerSettings
    from lora_arith.serving import ENGINES
    from lora_arith.serving.proxy import LlamaCppBackend, VllmBackend, check_step

    if engine not in ENGINES[1:]:
        raise OptionError("engine", "{} must be one of {choices}, not {engine!r}", choices=", ".join(ENGINES), engine=engine)
    if not engine_url:
        raise OptionError(("engine_url", "engine"), "{} is needed with {} {engine}: where its server listens", engine=engine)
    backend: Any
    if engine == "vllm":
        from lora_arith.sharing.export import serving_rank  # torch: vLLM's mixes are written here

        if adapter_dir is None:
            raise OptionError(("adapter_dir", "engine"), "{} is needed with {} vllm: a folder vLLM reads the mixes from")
        defaults = default_weights(named, weights, max_eta)
        check_step(eta_step, max_eta)
        backend = VllmBackend(
            engine_url, {name: spec.path for name, spec in named.items()}, adapter_dir, eta_step=eta_step, max_loras=max_loras
        )
        rank = backend.write(backend.mix_for(defaults))  # the default mix, now: it checks the vectors early
        announce(
            f"vLLM at {engine_url}: start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora "
            f"--max-lora-rank {serving_rank(rank)} --max-loras {max_loras}; mixes (weights rounded to multiples of "
            f"{eta_step:g}) are written into {backend.adapter_dir}, which vLLM must read at that same path"
        )
    else:
        if adapter_dir is not None:
            raise OptionError(("adapter_dir", "engine"), "{} is only for {} vllm: llama.cpp takes each scale per request")
        backend, named = LlamaCppBackend.connect(engine_url, named)
        defaults = default_weights(named, weights, max_eta)
        announce(f"llama.cpp at {engine_url}: LoRA ids {backend.ids}, of {backend.count} adapters")
    settings = ServerSettings(model_id, defaults, max_eta, max_tokens)
    run_backend(backend, settings, announce=announce, **server)
