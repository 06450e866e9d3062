"""Planning from the caller's side: advice and estimates, plus reading a model's config.json (never its weights).
Pure: no torch, no jobs."""

from __future__ import annotations

from fts_mcp.config import Settings
from fts_mcp.errors import InvalidArgument, ModelUnavailable
from fts_mcp.models.architecture import TIED_SHARE, Architecture, from_config, likely_tied, read_config
from fts_mcp.models.gguf import is_gguf
from fts_mcp.models.refs import hub_offline, resolve_model_argument
from fts_mcp.planning.advice import Advice, Criteria, recommend
from fts_mcp.planning.estimate import METHODS, MethodChoice, ResourceEstimate, RunSettings, estimate, shape_for_params
from fts_mcp.planning.families import known_family
from fts_mcp.planning.gpus import find_gpu, nearest_gpu

DEFAULT_TOKENS_PER_EXAMPLE = 512


class Planning:
    """Planning answers: pure arithmetic and advice, plus reading a model's config.json (never its weights)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def recommend_ft_vs_rag(self, criteria: Criteria) -> Advice:
        return recommend(criteria)

    def estimate_resources(self, *, base_model: str | None = None, params: int | None = None,
                           shape: dict[str, int | None] | None = None, tied_embeddings: bool | None = None,
                           method: MethodChoice = "all",
                           settings: RunSettings, dataset_examples: int | None = None,
                           tokens_per_example: int | None = None, dataset_tokens: int | None = None,
                           epochs: float = 3.0, gpu: str | None = None, gpu_memory_gb: float | None = None,
                           price_per_gpu_hour: float | None = None, utilization: float | None = None
                           ) -> ResourceEstimate:
        shape = {k: v for k, v in (shape or {}).items() if v is not None}
        given = [name for name, present in (("base_model", base_model), ("params", params), ("layers...", shape))
                 if present]
        if len(given) != 1:
            raise InvalidArgument("give exactly one of base_model (folder or hub id), params (a parameter count) or "
                                  "the architecture numbers (layers, hidden, intermediate, heads, kv_heads, vocab); "
                                  f"got {', '.join(given) or 'none'}", param="base_model")
        if base_model is not None:
            try:
                local = resolve_model_argument(base_model, self.settings) if is_gguf(base_model) else base_model
                config, source = read_config(local, self.settings.roots, hub_offline(self.settings.env))
                arch = from_config(config, source=source)
            except ModelUnavailable:
                if (known := known_family(base_model)) is None:
                    raise
                entry, arch = known  # not downloaded and offline: the family's published shape
                source = f"built-in table: {entry} (the published config of that family; not read from the model)"
            model = base_model
        elif params is not None:
            arch, name = shape_for_params(params)
            model, source = f"{params / 1e9:.1f}B parameters", f"assumed: {name} shape (nearest parameter count)"
        else:
            needed = ("layers", "hidden", "intermediate", "heads", "vocab")
            missing = [k for k in needed if k not in shape]
            if missing:
                raise InvalidArgument(f"explicit architecture needs {', '.join(needed)} (kv_heads defaults to heads); "
                                      f"missing {', '.join(missing)}", param=missing[0])
            shape.setdefault("kv_heads", shape["heads"])
            arch, model, source = Architecture(**shape), "explicit architecture", "explicit"
            if tied_embeddings is None:  # numbers alone do not say; small models with big vocabularies tie
                guess = likely_tied(arch)
                arch = arch.model_copy(update={"tied_embeddings": guess})
                source += (f"; embeddings assumed {'tied' if guess else 'untied'} (vocab x hidden is "
                           f"{'at least' if guess else 'under'} {TIED_SHARE:.0%} of the parameters; pass "
                           "tied_embeddings to say)")
        if tied_embeddings is not None and tied_embeddings != arch.tied_embeddings:
            arch = arch.model_copy(update={"tied_embeddings": tied_embeddings})
            if source != "explicit":
                source += f"; tied_embeddings={str(tied_embeddings).lower()} as given"
        if gpu is not None and gpu_memory_gb is not None:
            raise InvalidArgument("give gpu (a known card) or gpu_memory_gb (any card), not both", param="gpu")
        card = find_gpu(gpu) if gpu is not None else None
        if dataset_tokens is not None and dataset_examples is not None:
            raise InvalidArgument("give dataset_examples (with tokens_per_example) or dataset_tokens, not both",
                                  param="dataset_tokens")
        tokens, mean = dataset_tokens, None
        if dataset_examples is not None:  # longer examples are truncated to seq_len
            mean = min(settings.seq_len, tokens_per_example or DEFAULT_TOKENS_PER_EXAMPLE)
            tokens = dataset_examples * mean
        training_tokens = int(tokens * epochs) if tokens is not None else None
        methods = METHODS if method == "all" else (method,)
        assumed = None
        if card is None and gpu_memory_gb is not None:  # a card known only by its memory: time it like its peer
            assumed = card = nearest_gpu(gpu_memory_gb)
        result = estimate(arch, model=model, shape_source=source, methods=methods, settings=settings, gpu=card,
                          gpu_memory_gb=gpu_memory_gb, price_per_gpu_hour=price_per_gpu_hour,
                          training_tokens=training_tokens, utilization=utilization, tokens_per_example=mean)
        if training_tokens is None and (card is not None):
            result.notes.insert(0, "time and cost need the amount of training: give dataset_examples (with "
                                   "tokens_per_example) or dataset_tokens")
        if assumed is not None:
            result.gpu = None
        if assumed is not None and training_tokens is not None:
            what = "speed" if price_per_gpu_hour is not None else "speed and price"
            result.notes.insert(0, f"time and cost assume the {what} of an {assumed.name} ({assumed.memory_gb:g} GB, "
                                   f"{assumed.tflops_bf16:g} bf16 TFLOP/s), the known card nearest "
                                   f"{gpu_memory_gb:g} GB; pass gpu for your card's own figures")
        return result
