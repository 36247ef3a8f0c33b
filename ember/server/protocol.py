"""Request bodies of every endpoint: known fields are type- and range-checked (strictly: "1" is not a number).
Fields that OpenAI, Ollama or llama.cpp define but ember does not honour are refused with 400 naming them
(UNSUPPORTED_FIELDS, checked when the body is parsed); fields no API defines are ignored, as Ollama does.
Sampling ranges are checked again, with the same messages, by SamplingParams."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ember.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, MAX_TOKENS_LIMIT, SEED_LIMIT

MAX_PROMPTS = 256  # prompts (or embedding inputs) in one request

TokenIds = list[Annotated[int, Field(ge=0)]]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)] | None
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)] | None
# A prompt: text, token ids, a list of texts, or a list of token-id lists.
PromptInput = (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
               | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])


# Defined by an API, not honoured by ember: field -> the values that ask for nothing (accepted; null always is).
# Whoever implements a field deletes it here. Per endpoint family:
_LLAMACPP_SAMPLING = {name: () for name in (
    "typical_p", "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z", "repeat_last_n", "penalize_nl",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers",
    "xtc_probability", "xtc_threshold", "top_n_sigma", "dynatemp_range", "dynatemp_exponent", "n_probs", "n_keep",
    "samplers", "id_slot", "lora", "t_max_predict_ms", "post_sampling_probs", "n_indent")}
_VLLM_SAMPLING = {name: () for name in (
    "use_beam_search", "length_penalty", "prompt_logprobs", "truncate_prompt_tokens", "allowed_token_ids",
    "bad_words", "priority")}
_OPENAI_COMMON = {"service_tier": ("auto", "default"), "store": (False,), "metadata": ({},), "prediction": (),
                  "cache_prompt": (True,), "spaces_between_special_tokens": (True,)}
UNSUPPORTED_FIELDS: dict[str, dict[str, tuple]] = {
    "chat": {**_LLAMACPP_SAMPLING, **_VLLM_SAMPLING, **_OPENAI_COMMON, "audio": (), "modalities": (["text"],),
             "reasoning_effort": (), "web_search_options": (), "functions": (), "function_call": (),
             "verbosity": ()},
    "completion": {**_LLAMACPP_SAMPLING, **_VLLM_SAMPLING, **_OPENAI_COMMON},
    "responses": {"reasoning": (), "include": ([],), "background": (False,), "conversation": (), "prompt": (),
                  "max_tool_calls": (), "service_tier": ("auto", "default"), "top_logprobs": (0,),
                  "truncation": ("disabled",), "stream_options": ()},
    "embedding": {},
    "ollama_generate": {"template": ("",), "logprobs": (False,), "top_logprobs": (0,), "width": (), "height": (),
                        "steps": ()},
    "ollama_chat": {"logprobs": (False,), "top_logprobs": (0,)},
    "tokenize": {"parse_special": (True,)},
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    unsupported: ClassVar[dict[str, tuple]] = {}  # one of UNSUPPORTED_FIELDS

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, harmless in cls.unsupported.items():
                value = data.get(name)
                if value is not None and not any(type(value) is type(h) and value == h for h in harmless):
                    raise PydanticCustomError("unsupported_field", "{field} is not supported", {"field": name})
        return data


class SamplingFields(_Body):
    """Sampling fields shared by the OpenAI endpoints (vLLM's extensions included)."""

    model: str | None = None
    max_tokens: MaxTokens = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: Stop = None
    seed: Seed = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: str


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    unsupported = UNSUPPORTED_FIELDS["chat"]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class CompletionRequest(SamplingFields):
    unsupported = UNSUPPORTED_FIELDS["completion"]
    prompt: PromptInput
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    response_format: ResponseFormat | None = None


class EmbeddingRequest(_Body):
    unsupported = UNSUPPORTED_FIELDS["embedding"]
    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


class ResponsesRequest(_Body):
    unsupported = UNSUPPORTED_FIELDS["responses"]
    model: str | None = None
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: MaxTokens = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stream: bool = False
    seed: Seed = None
    text: dict[str, Any] | None = None
    user: str | None = None
    store: bool | None = None  # default true, as OpenAI's: kept for previous_response_id (ember.server.response_store)
    previous_response_id: Annotated[str, Field(max_length=200)] | None = None
    metadata: dict[str, Any] | None = None


# --- Ollama -------------------------------------------------------------------------------------------------
class OllamaMessage(_Body):
    role: str
    content: str | None = ""
    images: list[str] | None = None


class _OllamaBody(_Body):
    model: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    format: str | dict[str, Any] | None = None
    stream: bool = True


class OllamaGenerateRequest(_OllamaBody):
    unsupported = UNSUPPORTED_FIELDS["ollama_generate"]
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    context: TokenIds | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaChatRequest(_OllamaBody):
    unsupported = UNSUPPORTED_FIELDS["ollama_chat"]
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaEmbedRequest(_Body):
    model: str | None = None
    input: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)]
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None


class OllamaEmbeddingsRequest(_Body):
    model: str | None = None
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


class OllamaShowRequest(_Body):
    model: str | None = None
    name: str | None = None
    verbose: bool = False


# --- llama.cpp ----------------------------------------------------------------------------------------------
class TokenizeRequest(_Body):
    unsupported = UNSUPPORTED_FIELDS["tokenize"]
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: TokenIds


class ApplyTemplateRequest(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[dict[str, Any]] | None = None


SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
