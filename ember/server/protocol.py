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
# A chat role: templates branch on it (custom ones too, e.g. Llama 3.1's "ipython"), so any name but an empty one
Role = Annotated[str, Field(min_length=1, max_length=64)]
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
                  "spaces_between_special_tokens": (True,)}
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
    # llama.cpp's /completion: its samplers and options ember lacks, accepted at the value that turns them off
    # (what a client sending every field sends). Their settings (dynatemp_exponent, dry_base, mirostat_tau,
    # xtc_threshold, ...) are not listed: they do nothing while these are off. Nor is n_keep: it only matters
    # when a context overflows and is shifted, which ember never does (it refuses such prompts).
    "llamacpp_completion": {
        "dynatemp_range": (0, 0.0), "typical_p": (1, 1.0), "dry_multiplier": (0, 0.0), "xtc_probability": (0, 0.0),
        "mirostat": (0,), "top_n_sigma": (-1, -1.0), "tfs_z": (1, 1.0), "penalize_nl": (False,), "n_indent": (0,),
        "n_cmpl": (1,), "n_cache_reuse": (0,), "min_keep": (0,), "t_max_predict_ms": (0,), "id_slot": (-1,),
        "timings_per_token": (False,), "return_progress": (False,), "post_sampling_probs": (False,), "lora": ([],),
        "samplers": (), "response_fields": (), "sse_ping_interval": ()},
    # Anthropic's Messages API: what ember cannot honour. (metadata, service_tier, cache_control - prefixes
    # are cached automatically - workspace_id and user_profile_id have no effect on the text there either.)
    "anthropic": {"tools": (), "tool_choice": (), "thinking": ({"type": "disabled"},), "output_config": (),
                  "output_format": (), "mcp_servers": (), "container": (), "diagnostics": (),
                  "inference_geo": (), "speed": ("standard",)},
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

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler) -> dict:
        """The published schema (ember.server.openapi) lists the unsupported fields with the values accepted."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        for name, harmless in cls.unsupported.items():
            accepted: list = []
            for value in (*harmless, None):
                if all(value != a or isinstance(value, bool) != isinstance(a, bool) for a in accepted):
                    accepted.append(value)
            schema.setdefault("properties", {})[name] = {
                "enum": accepted, "description": "not supported by ember: any other value is answered 400"}
        return schema


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
    speculative: bool = True  # ember's extension: false opts this request out of speculative decoding
    cache_prompt: bool = True  # llama.cpp's: false computes the prompt again even where the prefix cache holds it
    # Structured output (ember.server.constraints): OpenAI's, vLLM's and llama.cpp's fields.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage of the whole request
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class ResponseFormat(_Body):
    type: str
    json_schema: dict[str, Any] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama.cpp's, beside the type


class ChatMessage(_Body):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingFields):
    unsupported = UNSUPPORTED_FIELDS["chat"]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class CompletionRequest(SamplingFields):
    unsupported = UNSUPPORTED_FIELDS["completion"]
    prompt: PromptInput
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] | None = None  # 0 with echo: score the prompt
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None


class EmbeddingRequest(_Body):
    unsupported = UNSUPPORTED_FIELDS["embedding"]
    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


MAX_DOCUMENTS = 1024  # documents in one rerank request, pairs in one score request


class RerankDocument(_Body):
    text: str


class RerankRequest(_Body):
    """Jina's and Cohere's rerank body, as llama.cpp and vLLM accept it."""

    model: str | None = None
    query: str
    documents: Annotated[list[str | RerankDocument], Field(min_length=1, max_length=MAX_DOCUMENTS)]
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool = True


ScoreTexts = str | Annotated[list[str], Field(min_length=1, max_length=MAX_DOCUMENTS)]


class ScoreRequest(_Body):
    """vLLM's /v1/score body: text_1 against each text_2 (one to many), or pairwise (lists of equal length)."""

    model: str | None = None
    text_1: ScoreTexts
    text_2: ScoreTexts


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
    tools: list[Any] | None = None  # flat function tools (ember.server.responses_items.chat_tools)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


# --- Ollama -------------------------------------------------------------------------------------------------
class OllamaMessage(_Body):
    role: Role
    content: str | None = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


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
    think: bool | Literal["high", "medium", "low"] | None = None


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


class LlamaCompletionRequest(_Body):
    """llama.cpp's POST /completion, with its names and defaults."""

    unsupported = UNSUPPORTED_FIELDS["llamacpp_completion"]
    model: str | None = None
    prompt: str | Annotated[list[Annotated[int, Field(ge=0)] | str], Field(min_length=1)]
    n_predict: Annotated[int, Field(ge=-1, le=MAX_TOKENS_LIMIT)] = -1
    temperature: Annotated[float, Field(le=2.0)] = 0.8  # <= 0: greedy
    top_k: Annotated[int, Field(ge=0)] = 40
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    repeat_last_n: Annotated[int, Field(ge=-1, le=MAX_TOKENS_LIMIT)] = 64  # -1: the whole context, 0: no penalties
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    seed: Annotated[int, Field(ge=-1, lt=SEED_LIMIT)] = -1
    stop: Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] = Field(default_factory=list)
    n_probs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] = 0
    stream: bool = False
    cache_prompt: bool = True
    ignore_eos: bool = False
    logit_bias: list[list[Any]] | dict[str, Any] | None = None
    return_tokens: bool = False
    grammar: str | None = None  # GBNF; structured output (ember.server.constraints)
    json_schema: dict[str, Any] | None = None


class ApplyTemplateRequest(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# --- Anthropic ----------------------------------------------------------------------------------------------
class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicCountRequest(_Body):
    unsupported = UNSUPPORTED_FIELDS["anthropic"]
    model: str | None = None
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[dict[str, Any]] | None = None


class AnthropicRequest(AnthropicCountRequest):
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)]  # 0: evaluate (and cache) the prompt only
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


ResponseFormat.model_rebuild()
SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


class LoadLoraRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body, plus ember's `scale`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: Annotated[str, Field(min_length=1, max_length=128)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]
    scale: Annotated[float, Field(allow_inf_nan=False, ge=-100.0, le=100.0)] = 1.0


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: Annotated[str, Field(min_length=1, max_length=128)]
