"""The engine a model needs: the batching generation engine for decoders, the embedding engine for encoders."""

from __future__ import annotations

from ember.engine.embedding_engine import EmbeddingEngine
from ember.engine.engine import EngineArgs, LLMEngine, load_named_model
from ember.loader.model import LoadedModel


def create_engine(model: str | None, args: EngineArgs | None = None,
                  loaded: LoadedModel | None = None) -> LLMEngine | EmbeddingEngine:
    args = args or EngineArgs()
    loaded = loaded or load_named_model(model, args)
    if loaded.is_encoder:
        return EmbeddingEngine(loaded.name, args, loaded=loaded)
    return LLMEngine(loaded.name, args, loaded=loaded)
