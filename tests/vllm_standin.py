"""A stand-in for vLLM's OpenAI server, for testing ``lora-arith serve --engine vllm`` where no GPU
(and so no vLLM) is at hand.

It implements exactly the endpoints, fields and status codes of vLLM's server that the front end
uses, as vLLM 0.33.0 has them (the PyPI wheel ``vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64``,
``vllm/_version.py``: commit ``4ba787ec9``):

* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path", "load_inplace"=false}`` and
  ``POST /v1/unload_lora_adapter`` ``{"lora_name", "lora_int_id"=null}``, registered only when
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is true (``vllm/entrypoints/serve/lora/api_router.py``,
  ``vllm/entrypoints/serve/lora/protocol.py``). 200 with a plain-text ``Success: LoRA adapter
  'NAME' added successfully.`` / ``... removed successfully.``; the errors of
  ``OpenAIServingModels`` (``vllm/entrypoints/openai/models/serving.py``): 400 ``InvalidUserInput``
  for an empty name or path, a name that is the base model's, or a name already loaded
  (``The lora adapter 'NAME' has already been loaded. If you want to load the adapter in place,
  set 'load_inplace' to True.``); 404 ``NotFoundError`` for a path with no adapter (vLLM's
  ``LoRAAdapterNotFoundError``: ``Loading lora NAME failed: No adapter found for <path>``, the
  path hidden as ``sanitize_message`` does) and for unloading an unknown name (``The lora adapter
  'NAME' cannot be found.``); 500 ``InternalServerError`` when the adapter does not load, e.g.
  ``LoRA rank R is greater than max_lora_rank M.`` (``vllm/lora/peft_helper.py``,
  ``validate_legal``). A body that is not ``application/json``, or misses a field, is a 400.
* ``POST /v1/chat/completions``: ``model`` the base's served name (or none) generates with the
  base, a loaded adapter's name with that adapter at weight 1; any other model is 404
  ``NotFoundError`` ``The model `NAME` does not exist. Valid aliases: BASE.``, param ``model``
  (``vllm/entrypoints/serve/engine/serving.py``, ``_check_model``). A prompt longer than
  ``--max-model-len`` tokens is 400 ``BadRequestError`` (``vllm/renderers/params.py``,
  ``_token_len_check``); ``max_tokens`` is cut to the context left
  (``vllm/entrypoints/serve/utils/api_utils.py``, ``get_max_tokens``). Replies are
  ``chat.completion`` objects with ``usage``; streams are ``chat.completion.chunk`` events (the
  first with the role, then the text, then ``finish_reason``, then a usage chunk with
  ``"choices": []`` when ``stream_options.include_usage``), and ``data: [DONE]``
  (``vllm/entrypoints/openai/chat_completion/serving.py``).
* ``GET /v1/models`` (the base and the loaded adapters, ``root`` their path, ``parent`` the base)
  and ``GET /health`` (200, empty).

Cross-checked against GitHub's ``vllm-project/vllm`` (copies read through the project's code
search, since ``fetch`` of the whole 1.1 GB repository exceeds its limit):
``vllm/entrypoints/serve/lora/api_router.py`` at commit ``27873cab`` and
``vllm/entrypoints/serve/lora/protocol.py`` at ``7fd1b438`` have the same routes, the same bodies
(``lora_name``, ``lora_path``; ``lora_int_id`` optional; ``load_inplace`` not yet there, and the
front end never sends it) and the same replies (200 with the handler's text; an ``ErrorResponse``
as JSON with ``error.code`` as the HTTP status).

Errors are vLLM's ``ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}`` with
``code`` the status (``vllm/entrypoints/serve/engine/protocol.py``,
``vllm/entrypoints/serve/exception_handling/error_response.py``).

Generation is ours: the base (``--model``, a local model folder) with the adapter attached, greedy
or sampled on our :class:`~lora_arith.serving.engine.Engine`, so a test can compare replies with
``PreferenceMixer`` at the same weights. A stream is generated whole, then sent in pieces.

Test-only endpoints, not vLLM's: ``GET /standin/log`` (every load, unload and chat call, in
order), ``POST /standin/restart`` (forget every adapter, as a restarted vLLM would),
``POST /standin/hold`` and ``POST /standin/release`` (streams send their first event, then wait
for the release, up to 60 s).

Usage::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python tests/vllm_standin.py --model BASE --port 0
"""


import argparse
import json
import os
import re
import secrets
import sys
import threading
import time
from http import HTTPStatus
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RUNTIME_LORA = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true")
"""As vLLM's ``envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING``."""


def error_response(message: str, err_type: str, status: int, param: str | None = None):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def sanitize(message: str) -> str:
    """vLLM's ``sanitize_message``: paths become ``<path>``."""
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    return re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message).strip()


class StandIn:
    def __init__(self, model: str, served_name: str, max_lora_rank: int, max_model_len: int | None) -> None:
        from lora_arith.model.mixing import PreferenceMixer
        from lora_arith.serving.engine import Engine

        self.model, self.served_name, self.max_lora_rank = model, served_name, max_lora_rank
        base = PreferenceMixer(model, {}, device="cpu")
        self.engines = {served_name: Engine(base).start()}
        self.max_model_len = max_model_len or self.engines[served_name].context_length
        self.loras: dict[str, dict] = {}  # name -> {"path", "id"}
        self.next_id = 0
        self.lock = threading.Lock()
        self.log: list[list[str]] = []
        self.released = threading.Event()
        self.released.set()

    def record(self, *entry: str) -> None:
        with self.lock:
            self.log.append(list(entry))

    def attach(self, name: str, path: str) -> None:
        from lora_arith.model.mixing import PreferenceMixer
        from lora_arith.serving.engine import Engine

        mixer = PreferenceMixer(self.model, {"lora": path}, device="cpu")
        mixer.set(lora=1.0)
        self.engines[name] = Engine(mixer).start()

    def drop(self, name: str) -> None:
        engine = self.engines.pop(name, None)
        if engine is not None:
            engine.close(timeout=0)


def rank_of(path: Path) -> int:
    config = json.loads((path / "adapter_config.json").read_text())
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def create_app(state: StandIn):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from lora_arith.serving.protocol import RowRequest

    app = FastAPI()

    async def json_body(request: Request, *required: str):
        """vLLM's ``validate_json_request`` and the pydantic model's required fields: a 400 otherwise."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return None, error_response("Unsupported Media Type: Only 'application/json' is allowed", "BadRequestError", 400)
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            return None, error_response(f"JSON decode error: {error}", "BadRequestError", 400)
        missing = [field for field in required if not isinstance(body, dict) or not isinstance(body.get(field), str)]
        if missing:
            return None, error_response(f"Field required: {missing[0]}", "BadRequestError", 400, missing[0])
        return body, None

    @app.get("/health")
    def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    def models():
        cards = [{"id": state.served_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                  "root": state.model, "parent": None, "max_model_len": state.max_model_len}]  # fmt: skip
        for name, lora in state.loras.items():
            cards.append({"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                          "root": lora["path"], "parent": state.served_name, "max_model_len": None})  # fmt: skip
        return {"object": "list", "data": cards}

    if RUNTIME_LORA:

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request):
            body, error = await json_body(request, "lora_name", "lora_path")
            if error is not None:
                return error
            name, path = body["lora_name"], body["lora_path"]
            state.record("load", name)
            if not name or not path:
                return error_response("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
            if name == state.served_name:
                return error_response(f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput", 400)
            if not body.get("load_inplace") and name in state.loras:
                message = (
                    f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                    "set 'load_inplace' to True."
                )
                return error_response(message, "InvalidUserInput", 400)
            folder = Path(path)
            if not (folder / "adapter_config.json").is_file():
                return error_response(sanitize(f"Loading lora {name} failed: No adapter found for {path}"), "NotFoundError", 404)
            rank = rank_of(folder)
            if rank > state.max_lora_rank:
                message = f"LoRA rank {rank} is greater than max_lora_rank {state.max_lora_rank}."
                return error_response(message, "InternalServerError", 500)
            import asyncio

            await asyncio.to_thread(state.attach, name, path)
            with state.lock:
                state.next_id += 1
                state.loras[name] = {"path": path, "id": state.next_id}
            return Response(status_code=200, content=f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request):
            body, error = await json_body(request, "lora_name")
            if error is not None:
                return error
            name = body["lora_name"]
            state.record("unload", name)
            if not name:
                return error_response("'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput", 400)
            if name not in state.loras:
                return error_response(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
            del state.loras[name]
            state.drop(name)
            return Response(status_code=200, content=f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        import asyncio

        body, error = await json_body(request)
        if error is not None:
            return error
        model = body.get("model") or state.served_name
        state.record("chat", model)
        engine = state.engines.get(model)
        if engine is None:
            message = f"The model `{model}` does not exist. Valid aliases: {state.served_name}."
            return error_response(message, "NotFoundError", HTTPStatus.NOT_FOUND, "model")
        prompt_ids = engine.encode(body["messages"])
        if len(prompt_ids) > state.max_model_len:
            message = (
                f"This model's maximum context length is {state.max_model_len} tokens. However, your prompt contains "
                f"{len(prompt_ids)} input tokens, which exceeds this limit even without any output tokens. "
                f"Please reduce the length of the input prompt. (parameter=input_tokens, value={len(prompt_ids)})"
            )
            return error_response(message, "BadRequestError", 400)
        stop = body.get("stop") or []
        row = RowRequest(
            prompt_ids,
            {},
            max_tokens=min(int(body.get("max_tokens") or 16), state.max_model_len - len(prompt_ids)),
            temperature=float(body.get("temperature") or 0.0),
            top_p=float(body.get("top_p") or 1.0),
            seed=body.get("seed"),
            stop=[stop] if isinstance(stop, str) else list(stop),
        )
        (result,) = await asyncio.to_thread(engine.generate, [row])
        head = {"id": f"chatcmpl-{secrets.token_hex(16)}", "created": int(time.time()), "model": model}
        finish = "length" if result.finish_reason == "length" else "stop"
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "completion_tokens": result.completion_tokens,
            "prompt_tokens_details": None,
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": result.text, "refusal": None, "tool_calls": [], "reasoning": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": None}
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"

        held = not state.released.is_set()

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            if held:
                await asyncio.to_thread(state.released.wait, 60)
            text = result.text
            for start in range(0, len(text), 3):
                yield chunk({"content": text[start : start + 3]})
            yield chunk({"content": ""}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/standin/log")
    def log():
        with state.lock:
            return {"log": list(state.log), "loaded": list(state.loras)}

    @app.post("/standin/restart")
    def restart():
        for name in list(state.loras):
            del state.loras[name]
            state.drop(name)
        return {"ok": True}

    @app.post("/standin/hold")
    def hold():
        state.released.clear()
        return {"ok": True}

    @app.post("/standin/release")
    def release():
        state.released.set()
        return {"ok": True}

    return app


def main() -> None:
    import socket

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    state = StandIn(args.model, args.served_model_name or args.model, args.max_lora_rank, args.max_model_len)
    sock = socket.socket()
    sock.bind((args.host, args.port))
    sock.listen(128)
    print(f"vLLM stand-in on http://{args.host}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", lifespan="off")).run(sockets=[sock])


if __name__ == "__main__":
    main()
