"""Calibration text for instruct models: JSON Lines files (a ``text`` or ``messages`` a line), their
errors with file and line number, and formatting with the tokenizer's chat template."""

from __future__ import annotations

import copy
import json

import pytest

from matpress.recipe.calibration import SENTENCE, CalibrationSettings
from matpress.walk.data import PASSAGE_CHARS, CalibrationData, calibration_data
from matpress.cli import main
from matpress.errors import CalibrationError
from matpress.evaluation.text import read_jsonl_file

# A tiny chat template: each message between role markers, as instruct models' templates do
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}>\n{% endfor %}"
PROSE = "The interpreter reads each statement in turn and executes it before moving on to the next one."


@pytest.fixture(scope="module")
def chat_tokenizer(minilm):
    tokenizer = copy.deepcopy(minilm.tokenizer)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_jsonl_records_are_texts_and_conversations(tmp_path):
    path = write_lines(tmp_path / "calib.jsonl", [
        json.dumps({"text": PROSE, "id": 7}),  # other keys are ignored
        "",
        json.dumps({"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": PROSE, "x": 1}]}),
    ])
    assert read_jsonl_file(path) == [PROSE, [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": PROSE}]]


@pytest.mark.parametrize("line, problem", [
    ('{"text": "unterminated', "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('["a list"]', "found a list"),
    ('{"title": "x"}', "found neither"),
    ('{"text": "x", "messages": []}', "found both"),
    ('{"text": "   "}', '"text" must be a non-empty string'),
    ('{"text": 3}', '"text" must be a non-empty string'),
    ('{"messages": "hello"}', '"messages" must be a non-empty list'),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": [{"content": "hi"}]}', r'"messages"\[0\] must be an object with a "role" string'),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}', r'"messages"\[0\] "content" must be a non-empty string'),
    ('{"text": "bad \\u0000 byte"}', "is not text"),
])
def test_a_bad_jsonl_line_is_refused_with_file_and_line(tmp_path, line, problem):
    path = write_lines(tmp_path / "calib.jsonl", [json.dumps({"text": PROSE}), line])
    with pytest.raises(CalibrationError, match=rf"{path}, line 2.*{problem}"):
        read_jsonl_file(path)


def test_a_jsonl_file_of_blank_lines_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match="empty"):
        read_jsonl_file(write_lines(tmp_path / "calib.jsonl", ["", "  "]))


def test_windows_are_the_text_as_the_chat_template_formats_it(chat_tokenizer, minilm, tmp_path):
    path = write_lines(tmp_path / "calib.jsonl", [
        json.dumps({"text": PROSE}),
        json.dumps({"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": PROSE}]}),
    ])
    templated = f"<user> {PROSE} </user>\n\n\n<user> Why? </user>\n<assistant> {PROSE} </assistant>\n"
    plain = f"{PROSE}\n\nWhy?\n\n{PROSE}"
    for tokenizer, chat_template, expected in [
        (chat_tokenizer, True, templated),
        (chat_tokenizer, False, plain),  # the setting turned off
        (minilm.tokenizer, True, plain),  # a tokenizer without a template
    ]:
        want = ids(tokenizer, expected)
        data = CalibrationData.from_text(tokenizer, str(path), n_samples=1, seq_len=len(want), chat_template=chat_template)
        assert data.batches[0]["input_ids"][0].tolist() == want
        assert ("chat template" in data.source) == (expected == templated)


def test_running_text_meets_the_template_in_passages_cut_at_paragraphs(chat_tokenizer, tmp_path):
    paragraphs = [f"Paragraph {i}. {PROSE}" for i in range(60)]
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(paragraphs))
    per_passage = -(-PASSAGE_CHARS // (len(paragraphs[0]) + 2))  # paragraphs until a passage is long enough
    passages = ["\n\n".join(paragraphs[i : i + per_passage]) for i in range(0, len(paragraphs), per_passage)]
    assert len(passages) > 2 and len(passages[-1]) < PASSAGE_CHARS <= len(passages[0])
    want = ids(chat_tokenizer, "\n\n".join(f"<user> {p} </user>\n" for p in passages))
    data = CalibrationData.from_text(chat_tokenizer, str(path), n_samples=1, seq_len=len(want))
    assert data.batches[0]["input_ids"][0].tolist() == want


def test_sentence_samples_are_jsonl_records_formatted_one_each(chat_tokenizer, tmp_path):
    path = write_lines(tmp_path / "calib.jsonl", [json.dumps({"text": f"Sentence {i} is here."}) for i in range(6)])
    data = CalibrationData.from_text(chat_tokenizer, str(path), n_samples=3, seq_len=64, batch_size=8, unit=SENTENCE)
    got = [row[mask.bool()].tolist() for row, mask in zip(data.batches[0]["input_ids"], data.batches[0]["attention_mask"])]
    assert got == [ids(chat_tokenizer, f"<user> Sentence {i} is here. </user>\n") for i in (0, 2, 5)]


def test_the_chat_template_setting_is_a_boolean_of_the_recipe(chat_tokenizer):
    settings = CalibrationSettings.from_dict({"text": [PROSE * 4], "seq_len": 8, "chat_template": False})
    assert settings.to_dict()["chat_template"] is False
    assert CalibrationSettings.from_dict(settings.to_dict()) == settings
    plain = calibration_data(settings, chat_tokenizer).batches[0]["input_ids"][0].tolist()
    assert plain == ids(chat_tokenizer, PROSE * 4)[:8]
    with pytest.raises(CalibrationError, match="chat_template must be true or false, got 'yes'"):
        CalibrationSettings.from_dict({"chat_template": "yes"})


def test_the_cli_refuses_a_bad_jsonl_line_in_one_line(tiny_causal_dir, tmp_path, capsys):
    path = write_lines(tmp_path / "calib.jsonl", [json.dumps({"text": PROSE}), '{"messages": [{"role": "user"}]}'])
    code = main(["compress", str(tiny_causal_dir), "--method", "gptq", "--bits", "4", "--calib", str(path),
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{path}, line 2" in err
    assert not (tmp_path / "out").exists()
