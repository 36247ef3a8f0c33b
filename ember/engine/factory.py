"""The engine a model needs: the batching generation engine for decoders, the embedding engine for encoders."""

from __future__ import annotations

from ember.engine.embedding_engine import EmbeddingEngine
from ember.engine.engine import EngineArgs, LLMEngine
from ember.loader.model import LoadedModel, load_model


def create_engine(model: str | None, args: EngineArgs | None = None,
                  loaded: LoadedModel | None = None) -> LLMEngine | EmbeddingEngine:
    args = args or EngineArgs()
    loaded = loaded or load_model(model, dtype=args.dtype, device=args.device)
    if loaded.is_encoder:
        return EmbeddingEngine(loaded.name, args, loaded=loaded)
    return LLMEngine(loaded.name, args, loaded=loaded)
