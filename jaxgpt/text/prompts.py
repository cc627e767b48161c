"""Prompt formats, in one place: instruction tuning, preference tuning, RL and generation all
build prompts here (`prompt_format(tokenizer).prompt(instruction, input)`), so a model is
always asked the way it was trained: its tokenizer's chat template when it has one
(`ChatFormat`: Llama 3, Qwen3 and Gemma 3 instruct models), else the Alpaca format (`AlpacaFormat`,
GPT-2's):

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:          <- only when the record has a non-empty input
    {input}

    ### Response:
    {response}

`format_prompt` returns everything up to and including "### Response:\\n"; a training
example is `format_prompt(...) + response` followed by `<|endoftext|>`, and the response is
what a model generates after the prompt (`extract_response` recovers it from decoded text).
This is Raschka's ch. 7 `format_input` plus "\\n\\n### Response:\\n".
"""
from __future__ import annotations

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "### Response:\n"


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt for one record, ending with the response header (the model writes next)."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input and input.strip():
        text += f"\n\n### Input:\n{input}"
    return text + "\n\n" + RESPONSE_HEADER


def format_example(instruction: str, input: str, response: str) -> tuple[str, str]:
    """`(prompt, response)` text of a training example; tokenize them separately so the
    prompt/response boundary is exact, then append `<|endoftext|>` after the response."""
    return format_prompt(instruction, input), response


def extract_response(text: str) -> str:
    """The response part of decoded `prompt + response` text (all of `text` when it has no
    response header), stripped of surrounding whitespace."""
    i = text.rfind(RESPONSE_HEADER)
    return (text[i + len(RESPONSE_HEADER):] if i >= 0 else text).strip()


# ---------------------------------------------------------------------------------------
# The format a model is asked in: Alpaca, or its own chat template


class AlpacaFormat:
    """The Alpaca prompt above (GPT-2 and every tokenizer without a chat template)."""

    name = "alpaca"

    def prompt(self, instruction: str, input: str = "") -> str:
        return format_prompt(instruction, input)


class ChatFormat:
    """A tokenizer's chat template (`jaxgpt.text.chat`): the instruction (and its input, after a
    blank line) as the user's message, rendered with the generation prompt, so the model writes
    the assistant's turn next. A training example is this prompt, the response and the
    tokenizer's eos (what ends the assistant's turn: Qwen's `<|im_end|>`, Llama's `<|eot_id|>`);
    the loss covers the response and that eos only."""

    name = "chat"

    def __init__(self, tokenizer, **template_kwargs):
        self.template = tokenizer.chat_template
        self.specials = {"eos_token": tokenizer.eos_token, "bos_token": getattr(tokenizer, "bos_token", None) or "",
                         **template_kwargs}

    def messages(self, instruction: str, input: str = "") -> list[dict[str, str]]:
        content = f"{instruction}\n\n{input}" if input and input.strip() else instruction
        return [{"role": "user", "content": content}]

    def prompt(self, instruction: str, input: str = "") -> str:
        return self.conversation(self.messages(instruction, input))

    def conversation(self, messages: list[dict[str, str]]) -> str:
        """A whole conversation (`{"role", "content"}` dicts, oldest first) with the generation
        prompt: what the model sees before its next turn (`python -m jaxgpt chat`)."""
        from jaxgpt.text.chat import render_chat

        return render_chat(self.template, messages, add_generation_prompt=True, **self.specials)

    def rendered(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]] | None]:
        """A whole conversation as trained on (no generation prompt) and the character spans of
        its template's `{% generation %}` blocks (None without them; `jaxgpt.text.chat`)."""
        from jaxgpt.text.chat import render_chat_spans

        return render_chat_spans(self.template, messages, **self.specials)


def prompt_format(tokenizer=None):
    """How a model with `tokenizer` is asked: its chat template when it has one, else Alpaca."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return ChatFormat(tokenizer)
    return AlpacaFormat()
