"""Files a user hands over: text that is not text, recipes that expand, values too long to quote."""

from __future__ import annotations

import json
import os
import random

import pytest

from matpress.walk import CalibrationData
from matpress.errors import QUOTE_LIMIT, CalibrationError, RecipeError, quote
from matpress.evaluation.text import MAX_TEXT_BYTES, corpus, read_text_file, sentences
from matpress.recipe import MAX_RECIPE_BYTES, MAX_RECIPE_DEPTH, Recipe

PROSE = "The quick brown fox jumps over the lazy dog near the river bank. " * 50


def random_bytes(n: int = 4096) -> bytes:
    return random.Random(0).randbytes(n)


PNG_LIKE = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + random_bytes(2000)


@pytest.mark.parametrize(
    "content,match",
    [
        (random_bytes(), "NUL bytes"),
        (random_bytes().replace(b"\x00", b"\x01"), "not UTF-8 text"),  # no NUL: caught as undecodable
        (PNG_LIKE, "NUL bytes"),
        (PROSE.encode("utf-16-le"), "UTF-16"),  # UTF-16 without a BOM: refused, convert it to UTF-8
        (PROSE.encode("utf-16"), "UTF-16"),  # with a BOM: refused the same way
        ("\x1b[31m\x07".join(["ab"] * 200).encode(), "control characters"),
        (b"", "is empty"),
        (b" \n\n\t ", "is empty"),
    ],
    ids=["random", "random-without-nul", "png", "utf16-le", "utf16-bom", "control", "empty", "blank"],
)
def test_binary_or_empty_text_is_refused_naming_the_file(tmp_path, content, match):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    for read in (read_text_file, lambda p: sentences(text_file=p), lambda p: corpus(text_file=p)):
        with pytest.raises(CalibrationError, match=match) as caught:
            read(path)
        assert str(path) in str(caught.value)


def test_a_few_bad_bytes_in_utf8_text_are_replaced(tmp_path):
    data = PROSE.encode()
    # 3 bad bytes in ~3200 (under 1 %), each replaced by U+FFFD; a genuine U+FFFD and a BOM are text
    path = tmp_path / "mostly.txt"
    path.write_bytes(b"\xef\xbb\xbf" + data[:100] + b"\xff\xfe" + data[100:2000] + b"\x80" + "\ufffd".encode() + data[2000:])
    text = read_text_file(path)
    assert text.count("\ufffd") == 3 + 1 and text.startswith("The quick")
    assert len(sentences(text_file=path)) == 3  # the repeated sentence, and the two with replacements


def test_text_file_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr("matpress.evaluation.text.MAX_TEXT_BYTES", 1000)
    path = tmp_path / "big.txt"
    path.write_text(PROSE)
    with pytest.raises(CalibrationError, match=f"{path} holds .* bytes, more than the 1,000 bytes"):
        read_text_file(path)
    assert MAX_TEXT_BYTES == 64 << 20  # the documented limit


def test_a_directory_or_unreadable_file_as_text_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match="is a directory"):
        read_text_file(tmp_path)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")


def test_a_fifo_as_text_is_refused_instead_of_blocking(tmp_path):
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)  # opening it for reading without O_NONBLOCK would wait for a writer forever
    with pytest.raises(CalibrationError, match=f"text file {fifo} is not a regular file"):
        read_text_file(fifo)


def test_calibration_strings_with_control_characters_are_refused():
    with pytest.raises(CalibrationError, match=r"calibration text \[1\] is not text"):
        CalibrationData.from_text(object(), ["fine prose here", "bad\x00text"], 1, 8, unit="sentence")


def test_quote_bounds_what_an_error_message_repeats():
    assert quote("short") == "'short'"
    assert len(quote("x" * 10**6)) <= QUOTE_LIMIT
    bomb = ["lol"] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # 9**10 strings if written out
    assert len(quote(bomb)) <= QUOTE_LIMIT
    assert len(quote("y" * 500, limit=50)) == 50


ALIAS_BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
)


@pytest.mark.parametrize("key", ["bits", "budget", "method", "exclude"])
def test_yaml_alias_bomb_is_refused_with_a_short_message(tmp_path, key):
    path = tmp_path / "bomb.yaml"
    default = f"default: {{{key}: *i}}" if key in ("bits", "method") else f"{key}: *i"
    path.write_text(ALIAS_BOMB + "\n" + default + "\n")
    assert path.stat().st_size < 1000  # a few hundred bytes that expand to 9**9 strings
    with pytest.raises(RecipeError, match="more than 100,000 values") as caught:
        Recipe.load(path)
    assert len(str(caught.value)) < 400 and str(path) in str(caught.value)


def test_a_self_referencing_yaml_value_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("exclude: &x [*x]\n")
    with pytest.raises(RecipeError, match="nested more than"):
        Recipe.load(path)


def test_recipe_nesting_is_bounded():
    deep: list = ["*"]
    for _ in range(MAX_RECIPE_DEPTH):
        deep = [deep]
    with pytest.raises(RecipeError, match=f"nested more than {MAX_RECIPE_DEPTH} levels"):
        Recipe.from_dict({"exclude": deep})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_deeply_nested_recipe_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"exclude": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RecipeError, match=str(path)):
        Recipe.load(path)


def test_recipe_file_size_is_bounded(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"exclude": ["x" * 100] * (MAX_RECIPE_BYTES // 100)}))
    with pytest.raises(RecipeError, match=f"{path} holds .* bytes, more than the {MAX_RECIPE_BYTES:,} bytes"):
        Recipe.load(path)


def test_long_recipe_values_are_quoted_briefly():
    with pytest.raises(RecipeError) as caught:
        Recipe.from_dict({"default": {"bits": "9" * 100_000}})
    assert len(str(caught.value)) < 400
    with pytest.raises(RecipeError) as caught:
        Recipe.from_dict({"default": {"method": "m" * 100_000}})
    assert len(str(caught.value)) < 800


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("latin1.yaml", "default: {method: rtn}  # caf\xe9\n".encode("latin-1"), r"not UTF-8 text \(bad byte at offset 29\)"),
        ("keys.yaml", b"default: {1: 2, foo: 3}\n", r"unknown parameter\(s\) \[1, 'foo'\]"),
        ("method.yaml", b"default: {method: [rtn]}\n", "unknown method"),
    ],
)
def test_malformed_recipe_files_are_recipe_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=match):
        Recipe.load(path)


def test_a_directory_or_unreadable_recipe_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="is a directory"):
        Recipe.load(tmp_path)
    parent = tmp_path / "a-file.yaml"
    parent.write_text("default: {bits: 4}\n")
    with pytest.raises(RecipeError, match="cannot be read"):  # the OSError of a path through a file
        Recipe.load(parent / "recipe.yaml")
