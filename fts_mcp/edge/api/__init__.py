"""`fts-mcp edge serve`: the engine behind an OpenAI-compatible HTTP API, with vLLM's LoRA admin calls.

    GET  /health                     GET /metrics (Prometheus text)
    GET  /v1/models                  POST /v1/completions         POST /v1/chat/completions
    POST /v1/load_lora_adapter {lora_name, lora_path}            POST /v1/unload_lora_adapter {lora_name}

`model` in a request is an adapter (`name`, `name@v3`, `name:prod`, or a name given to load_lora_adapter), a
stack of adapters (`a+b`, `0.7*a+0.3*b`) or the base model itself. An unknown model gets a 404 listing what is
available; a corrupt adapter a 502 — and the runtime goes on serving the others.

The request surface is what OpenAI's client libraries send: `prompt` as a string or a list, `messages`, `n`,
`stop`, `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stream` (server-sent events,
`data: [DONE]` last) with `stream_options.include_usage`, and `usage` in every answer. A field this runtime does
not implement gets a 400 that names it, never silent ignoring.

Every request is bounded: a body over `MAX_BODY_BYTES` gets 413; prompt + completion must fit the model's
context (400 naming the argument); at most `max_queue` sequences (prompts x n) wait or run at once (429 with
Retry-After beyond); each has a deadline (504 past it); and generation stops when the client disconnects.

    config.py      RuntimeConfig: everything `edge serve` and the managed `runtime` job are told
    protocol.py    request and response bodies, as pydantic models
    errors.py      ApiError (an error answer in OpenAI's shape) and how domain errors map to it
    access.py      the opening every handler shares: API key, body, tenant check; the queue bound
    generation.py  a completion or chat request through the engine, answered whole or streamed
    routes.py      one handler per endpoint, and `build_app`
    server.py      `serve(config)`: load the engine, guard the app, listen
"""
