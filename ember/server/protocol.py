"""Request bodies of every endpoint: known fields are type- and range-checked (strictly: "1" is not a number),
unknown fields are accepted and ignored, as OpenAI and Ollama do. Sampling ranges are checked again, with the
same messages, by SamplingParams."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


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
    include_usage: bool = False


class ResponseFormat(_Body):
    type: str
    json_schema: dict[str, Any] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama.cpp's, beside the type


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(SamplingFields):
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
    prompt: PromptInput
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None


class EmbeddingRequest(_Body):
    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


class ResponsesRequest(_Body):
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
    store: bool | None = None
    metadata: dict[str, Any] | None = None


# --- Ollama -------------------------------------------------------------------------------------------------
class OllamaMessage(_Body):
    role: str
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
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: TokenIds | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaChatRequest(_OllamaBody):
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
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: TokenIds


class ApplyTemplateRequest(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


ResponseFormat.model_rebuild()
SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
