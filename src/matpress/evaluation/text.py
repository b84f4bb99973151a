"""Real text for calibration and evaluation, from what is installed or from a user's file.

The built-in corpus is CPython's own documentation topics (``pydoc_data.topics``), which every Python
ships. Topics are split deterministically into a calibration part (about a quarter) and an evaluation
part, so calibrated methods are never scored on the text they saw.

A user's file is plain UTF-8 text, or JSON Lines (a ``.jsonl`` name): one JSON object a line, with a
``text`` string or a ``messages`` list of ``{"role": ..., "content": ...}`` objects (a conversation);
other keys are ignored, blank lines skipped, and a bad line is refused with its file and line number.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any, Optional, Union

from matpress.errors import CalibrationError
from matpress.inputs import check_text, decode_text, read_file

MAX_TEXT_BYTES = 64 << 20  # far more text than calibration or evaluation uses
CALIBRATION = "calibration"
EVALUATION = "evaluation"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
JSONL_SUFFIX = ".jsonl"

Messages = list[dict[str, str]]  # a conversation: {"role": ..., "content": ...} dicts
Record = Union[str, Messages]  # one item of a JSON Lines file: a text or a conversation


def _topic_split(key: str) -> str:
    return CALIBRATION if zlib.crc32(key.encode()) % 4 == 0 else EVALUATION


def builtin_documents(split: str = EVALUATION) -> list[str]:
    """The documentation topics of the given split, each as one string."""
    if split not in (CALIBRATION, EVALUATION):
        raise ValueError(f"split must be {CALIBRATION!r} or {EVALUATION!r}, got {split!r}")
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics) if _topic_split(k) == split]


def prose_sentences(text: str, min_words: int = 6, max_chars: int = 400) -> list[str]:
    """Sentences of running prose in ``text``: code blocks, grammar rules and headings are skipped."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # indented: code or grammar
        if len(lines) == 2 and set(lines[1].strip()) <= set("*=-^~"):
            continue  # a heading with its underline
        flat = " ".join(line.strip() for line in lines)
        for s in _SENTENCE_END.split(flat):
            s = s.strip()
            if len(s.split()) >= min_words and len(s) <= max_chars and s[-1] in ".!?:":
                sentences.append(s)
    return list(dict.fromkeys(sentences))  # dedupe, keep order


def read_text_file(path: Union[str, Path]) -> str:
    """The UTF-8 text of a user's file (at most :data:`MAX_TEXT_BYTES`); binary files, other encodings
    and empty files are refused (rules in :mod:`matpress.inputs`)."""
    path = Path(path)
    text = decode_text(read_file(path, "text file", MAX_TEXT_BYTES, CalibrationError), f"text file {path}", CalibrationError)
    if not text.strip():
        raise CalibrationError(f"text file {path} is empty")
    return text


def is_jsonl(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() == JSONL_SUFFIX


def read_jsonl_file(path: Union[str, Path]) -> list[Record]:
    """The records of a user's JSON Lines file: each line's ``text`` string, or its ``messages`` as a
    list of ``{role, content}`` dicts. Anything else is a :class:`CalibrationError` naming file and line."""
    path = Path(path)
    text = read_text_file(path)
    records: list[Record] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            problem = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise CalibrationError(f"{where}: not valid JSON ({problem}); each line must be one JSON object") from None
        records.append(_record(item, where))
    if not records:
        raise CalibrationError(f"text file {path} holds no JSON lines")
    return records


def _record(item: object, where: str) -> Record:
    expected = 'an object with a "text" string or a "messages" list of {"role", "content"} objects'
    if not isinstance(item, dict):
        raise CalibrationError(f"{where}: expected {expected}, found a {type(item).__name__}")
    if ("text" in item) == ("messages" in item):
        raise CalibrationError(f"{where}: expected {expected}, found {'both' if 'text' in item else 'neither'}")
    if "text" in item:
        return _record_text(item["text"], f'{where}, "text"')
    messages = item["messages"]
    if not isinstance(messages, list) or not messages:
        raise CalibrationError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"].strip():
            raise CalibrationError(f'{where}: "messages"[{i}] must be an object with a "role" string')
        _record_text(message.get("content"), f'{where}, "messages"[{i}] "content"')
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _record_text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CalibrationError(f"{where} must be a non-empty string")
    check_text(value, where, CalibrationError)
    return value


def sentences(
    n: Optional[int] = None, split: str = EVALUATION, text_file: Union[str, Path, None] = None
) -> list[str]:
    """Up to ``n`` sentences: from ``text_file`` if given, else the built-in corpus's ``split``."""
    if text_file is not None:
        text = read_text_file(text_file)
        found = prose_sentences(text)
        if not found:  # a file of one sentence per line, without paragraph structure
            found = [line.strip() for line in text.splitlines() if line.strip()]
        source = str(text_file)
    else:
        found = _split_sentences(split)
        source = f"pydoc_data.topics ({split} split)"
    if not found:
        raise CalibrationError(f"no sentences found in {source}")
    if n is not None:
        if n <= 0:
            raise CalibrationError(f"number of sentences must be positive, got {n}")
        if len(found) < n:
            raise CalibrationError(f"{source} has {len(found)} sentences, fewer than the {n} asked for")
        found = found[:n]
    return found


def _split_sentences(split: str) -> list[str]:
    found = [s for doc in builtin_documents(split) for s in prose_sentences(doc)]
    if split == EVALUATION:  # some topics repeat sentences of others: never score on calibration text
        seen = set(_split_sentences(CALIBRATION))
        found = [s for s in found if s not in seen]
    return found


def corpus(split: str = EVALUATION, text_file: Union[str, Path, None] = None) -> str:
    """Running text for language-model perplexity: a user's file, or the built-in split."""
    if text_file is not None:
        return read_text_file(text_file)
    return "\n\n".join(builtin_documents(split))


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` formats conversations (an instruct model's tokenizer does)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """``messages`` (``{role, content}`` dicts) as the text ``tokenizer``'s chat template makes of them,
    special tokens written out; ``generation_prompt`` appends the start of the assistant's turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
