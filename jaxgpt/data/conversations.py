"""Conversations: chat records -> token ids, with the assistant's turns marked for the loss;
the prompts of conversation records; conversational preference pairs.

    messages = as_messages(record["messages"], where)   # [{"role", "content"}]; ShareGPT's from/value too
    conv = encode_conversation(messages, tokenizer, where)
    conv.ids      # int32 [n]: the conversation as the model's chat template renders it
    conv.scored   # bool [n]: True on the tokens of the assistant's turns
    conv.turns    # [(start, end)]: each turn's token span, in order

Fine-tuning on a conversation trains what the assistant says, as TRL's `assistant_only_loss`
does: the loss covers each assistant turn (its content and the token that ends the turn: Llama
3's `<|eot_id|>`, Qwen's `<|im_end|>`, Gemma's `<end_of_turn>`), not the system and user
messages nor the template's headers. Where the template marks the assistant's text with `{%
generation %}` blocks (what transformers' `return_assistant_tokens_mask` reads), those blocks
are the turns. Otherwise each message's content is found in the rendered text in order (an
assistant's only after the message before it; templates may trim it, and Qwen3's leaves an
earlier answer's <think> block out and writes an empty one before the last), a turn takes in a
`<think>...</think>` block the template writes right before the answer, and it runs on to the
first special token after the answer when only whitespace comes between; when none does, the
last turn gets the tokenizer's eos (the model must learn to stop). The text is tokenized piece
by piece, cut where turns start and end, as a prompt is tokenized alone before the model writes
(`jaxgpt.data.instruct` does the same for a prompt and its response).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from jaxgpt.errors import UserError
from jaxgpt.text.prompts import ChatFormat, prompt_format

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's `from` names; others are kept


def as_messages(value, where: str, answered: bool = True) -> list[dict[str, str]]:
    """A record's conversation as `[{"role", "content"}]`: a non-empty list of messages with
    string `role` and `content` (or ShareGPT's `from` and `value`), with at least one of the
    assistant's when `answered` (a prompt's need none)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(f"{where}: a conversation must be a non-empty list of {{role, content}} messages, "
                        f"got {type(value).__name__}{'' if value else ' (empty)'}")
    messages = []
    for k, m in enumerate(value, 1):
        m = m if isinstance(m, Mapping) else {}
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if not isinstance(role, str) or not isinstance(content, str):
            raise UserError(f"{where}: message {k} needs a string role and content (or ShareGPT's from and "
                            f"value), got {sorted(map(str, m)) if m else type(value[k - 1]).__name__}")
        messages.append({"role": SHAREGPT_ROLES.get(role, role), "content": content})
    if answered and not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant message, so nothing to learn from "
                        f"(roles: {', '.join(sorted({m['role'] for m in messages}))})")
    return messages


@dataclass(frozen=True)
class EncodedConversation:
    ids: np.ndarray  # int32 [n]
    scored: np.ndarray  # bool [n]: the assistant's tokens
    turns: list[tuple[int, int]]  # token spans of the assistant's turns, in order
    assistant: list[int]  # index in the messages of the assistant message of each turn (by order)


def _content_spans(text: str, messages: Sequence[dict[str, str]], specials: Sequence[str],
                   where: str) -> tuple[list[tuple[int, int]], bool]:
    """Character spans of the assistant's turns found in `text` (see the module docstring), and
    whether the last one ends with a special token."""
    turn_end = re.compile(r"\s*(?:" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")") \
        if specials else None
    spans, cursor, ended = [], 0, False
    for k, m in enumerate(messages, 1):
        assistant = m["role"] == "assistant"
        content = m["content"].strip()
        if assistant and "</think>" in content and content not in text[cursor:]:
            content = content.split("</think>")[-1].strip()  # Qwen3 drops an earlier answer's reasoning
        previous, start = cursor, text.find(content, cursor) if content else -1
        if start < 0:
            if assistant:
                raise UserError(f"{where}: the chat template does not write assistant message {k} as it is "
                                f"({'empty' if not content else repr(content[:40])}), so its tokens cannot be "
                                "found; mark the assistant's text in the template with {% generation %} blocks")
            continue
        cursor = start + len(content)
        if assistant:
            before = text[previous:start].rstrip()  # a reasoning block written just before the answer is its own
            if before.endswith("</think>") and "<think>" in before:
                start = previous + before.rindex("<think>")
            end = turn_end.match(text, cursor) if turn_end else None
            ended = end is not None
            cursor = end.end() if end else cursor
            spans.append((start, cursor))
    return spans, ended


def chat_format(tokenizer, where: str) -> ChatFormat:
    """The model's chat template, which a conversation record needs (a one-line error without)."""
    fmt = prompt_format(tokenizer)
    if not isinstance(fmt, ChatFormat):
        raise UserError(f"{where} is a conversation, and the model's tokenizer ({tokenizer.name}) has no chat template "
                        "to write it with; fine-tune a model folder that has one (Llama 3, Qwen3, Gemma 3) or give "
                        "text records (instruction and output, or chosen and rejected)")
    return fmt


def record_prompt(record: Mapping, tokenizer) -> str:
    """What a record asks the model: its conversation (`messages`) in the chat template with the
    generation prompt, else its instruction and input in the model's format."""
    if "messages" in record:
        return chat_format(tokenizer, record.get("where", "a record")).conversation(list(record["messages"]))
    return prompt_format(tokenizer).prompt(record["instruction"], record.get("input", ""))


def preference_pair(row: Mapping, where: str) -> dict:
    """A conversational preference pair (TRL's layouts) as `{"messages", "instruction", "input",
    "chosen", "rejected"}`: `chosen` and `rejected` are conversations ending with the assistant's
    answer and sharing the messages before it; the pair's prompt is those messages, after the
    record's prompt (`data.instruction_field`) when that is a list of messages, or the prompt
    text as the user's message when they share none. `chosen` / `rejected` become the answers'
    text, `instruction` the last user message (for display)."""
    if not all(isinstance(row[k], list) for k in ("chosen", "rejected")):
        raise UserError(f"{where}: chosen and rejected must both be texts or both conversations")
    answers = {}
    for name in ("chosen", "rejected"):
        conv = as_messages(row[name], f"{where} {name}")
        if conv[-1]["role"] != "assistant":
            raise UserError(f"{where}: the {name} conversation must end with the assistant's answer, "
                            f"not a {conv[-1]['role']} message")
        answers[name] = conv
    shared = answers["chosen"][:-1]
    if answers["rejected"][:-1] != shared:
        raise UserError(f"{where}: chosen and rejected must share every message before their last answer")
    prompt = row.get("instruction") or []
    if isinstance(prompt, list):
        messages = (as_messages(prompt, f"{where} prompt", answered=False) if prompt else []) + shared
    else:
        text = f"{prompt}\n\n{row['input']}" if row.get("input", "").strip() else prompt
        messages = shared or [{"role": "user", "content": text}]
    if not messages:
        raise UserError(f"{where}: chosen and rejected hold only the answers and the record has no prompt; "
                        "set data.instruction_field")
    users = [m["content"] for m in messages if m["role"] == "user"]
    return {"messages": messages, "instruction": users[-1] if users else "", "input": "",
            "chosen": answers["chosen"][-1]["content"], "rejected": answers["rejected"][-1]["content"]}


def _pieces(messages: Sequence[dict[str, str]], tokenizer, where: str) -> tuple[list[str], list, int, bool]:
    """The rendered conversation cut at its turns' edges: `(texts, turn of each piece (None
    outside the turns), number of turns, whether the last turn gets an eos)`."""
    text, spans = chat_format(tokenizer, where).rendered(list(messages))
    add_eos = False
    if spans is None:
        spans, ended = _content_spans(text, messages, list(tokenizer.special_tokens), where)
        add_eos = not ended
    if not spans:
        raise UserError(f"{where}: the chat template's {{% generation %}} blocks hold no text; nothing to learn from")
    cuts = sorted({0, len(text), *(i for span in spans for i in span)})
    turn_of = [next((j for j, (start, end) in enumerate(spans) if start <= a < end), None) for a in cuts[:-1]]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])], turn_of, len(spans), add_eos


def encode_conversations(conversations: Sequence[Sequence[dict[str, str]]], tokenizer,
                         wheres: Sequence[str]) -> list[EncodedConversation]:
    """Token ids of each conversation and which of them the loss covers (see the module
    docstring); every piece of every conversation is tokenized in one batch."""
    cut = [_pieces(messages, tokenizer, where) for messages, where in zip(conversations, wheres)]
    tokens = iter(tokenizer.encode_batch([t for texts, *_ in cut for t in texts]))
    out = []
    for messages, (texts, turn_of, n_turns, add_eos) in zip(conversations, cut):
        ids, scored, turns = [], [], [[None, None] for _ in range(n_turns)]
        for j in turn_of:
            piece = next(tokens)
            if j is not None and turns[j][0] is None:
                turns[j][0] = len(ids)
            ids += piece
            scored += [j is not None] * len(piece)
            if j is not None:
                turns[j][1] = len(ids)
        if add_eos:
            ids.append(tokenizer.eos_id)
            scored.append(True)
            turns[-1][1] = len(ids)
        order = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        assistant = [order[min(j, len(order) - 1)] for j in range(n_turns)]
        out.append(EncodedConversation(np.asarray(ids, np.int32), np.asarray(scored, bool),
                                       [tuple(t) for t in turns], assistant))
    return out


def encode_conversation(messages: Sequence[dict[str, str]], tokenizer, where: str) -> EncodedConversation:
    """`encode_conversations` of one conversation."""
    return encode_conversations([messages], tokenizer, [where])[0]


__all__ = ["EncodedConversation", "SHAREGPT_ROLES", "as_messages", "chat_format", "encode_conversation",
           "encode_conversations", "preference_pair", "record_prompt"]
