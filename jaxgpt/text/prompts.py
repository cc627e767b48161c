"""The Alpaca prompt format, in one place: instruction tuning, preference tuning, RL and
generation all build prompts here, so a model is always asked the way it was trained.

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
