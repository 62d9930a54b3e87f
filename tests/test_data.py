"""Loading user data sets: every format, and every error message naming the file, line and fix."""
import json
import re
import sys

import pytest

from grpo_scale.tasks.data import load_rows

ROWS = [{"prompt": "What is 7*8?", "answer": "56", "level": 1},
        {"prompt": "Expand (x+1)^2", "answer": "x^2+2x+1", "level": 2}]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(tmp_path, lines: list[str], name="data.jsonl"):
    return write(tmp_path / name, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- formats
def test_jsonl_skips_blank_lines_and_keeps_columns(tmp_path):
    path = jsonl(tmp_path, ["", json.dumps(ROWS[0]), "   ", json.dumps(ROWS[1]), ""])
    assert load_rows(path) == ROWS


def test_jsonl_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode())
    assert load_rows(path) == ROWS[:1]


def test_json_list(tmp_path):
    assert load_rows(write(tmp_path / "data.json", json.dumps(ROWS, indent=2))) == ROWS


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = str(tmp_path / "data.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_rows(path) == ROWS


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = str(tmp_path / "saved")
    datasets.Dataset.from_list(ROWS).save_to_disk(path)
    assert load_rows(path) == ROWS


def test_saved_dataset_dict_asks_for_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = str(tmp_path / "dd")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(path)
    with pytest.raises(ValueError, match=r"dd: holds several splits \(train\); pass one split's folder"):
        load_rows(path)
    assert load_rows(path + "/train") == ROWS


def test_missing_optional_library_says_what_to_install(tmp_path, monkeypatch):
    path = write(tmp_path / "data.parquet", "not parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(ValueError, match=r"data.parquet: reading Parquet needs pyarrow: pip install pyarrow"):
        load_rows(path)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=r"saved: reading a saved data set needs the datasets library"):
        load_rows(str(saved))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a"}'] * 6 + ['{"prompt": "b" "answer": 1}'],
     r"data.jsonl line 7: not valid JSON \(Expecting ',' delimiter, column 16\); write one JSON object per line"),
    (['{"question": "a", "answer": "1"}'],
     r"data.jsonl line 1: missing 'prompt' column \(columns: question, answer\); rename the column to 'prompt'"),
    (['{"prompt": "a", "answer": "1"}', "", '{"question": "b", "answer": "2"}'],
     r"data.jsonl line 3: missing 'prompt' column \(columns: question, answer\); rename the column to 'prompt'"),
    (['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'],
     r"data.jsonl line 2: columns \(prompt\) differ from line 1's \(prompt, answer\): lacks \['answer'\]; "
     r"every row needs the same columns"),
    (['', '{"prompt": "a"}', '{"prompt": "b", "hint": "c"}'],
     r"data.jsonl line 3: columns \(prompt, hint\) differ from line 2's \(prompt\): extra \['hint'\]"),
    (['{"prompt": "a"}', '["prompt", "b"]'], r"data.jsonl line 2: expected a JSON object .* got list"),
    (['{"prompt": ""}'], r"data.jsonl line 1: 'prompt' is empty; every row needs a question"),
    (['{"prompt": "  \\n "}'], r"data.jsonl line 1: 'prompt' is empty"),
    (['{"prompt": 7}'], r"data.jsonl line 1: 'prompt' must be a string or a list of .* messages, got int 7"),
    (['{"prompt": null}'], r"data.jsonl line 1: 'prompt' must be a string or a list of .* messages, got NoneType None"),
    (['{"prompt": "a", "completions": "b"}'], r"data.jsonl line 1: column 'completions' is reserved"),
    ([], r"data.jsonl: no rows \(the file is empty\)"),
    (["", "  ", ""], r"data.jsonl: no rows \(the file is empty\)"),
])
def test_jsonl_errors(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        load_rows(jsonl(tmp_path, lines))


@pytest.mark.parametrize("text,message", [
    ('[{"prompt": "a"}, {"prompt": "b",}]', r"data.json: not valid JSON \(Expecting property name .*line 1 column 34\)"),
    ('{"prompt": "a"}', r"data.json: expected a JSON list of objects .* got dict; for one object per line, name the file .jsonl"),
    ('[{"prompt": "a"}, {"question": "b"}]', r"data.json row 2: missing 'prompt' column \(columns: question\)"),
    ('[{"prompt": "a"}, 3]', r"data.json row 2: expected a JSON object"),
    ("[]", r"data.json: no rows"),
    ("", r"data.json: no rows \(the file is empty\)"),
])
def test_json_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_rows(write(tmp_path / "data.json", text))


def test_parquet_row_errors_and_damaged_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = str(tmp_path / "data.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": None}]), path)
    with pytest.raises(ValueError, match=r"data.parquet row 2: 'prompt' must be a string or a list of .* messages, got NoneType"):
        load_rows(path)
    pq.write_table(pa.Table.from_pylist([{"question": "a"}]), path)
    with pytest.raises(ValueError, match=r"data.parquet row 1: missing 'prompt' column \(columns: question\)"):
        load_rows(path)
    bad = write(tmp_path / "bad.parquet", "this is not parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: not a readable Parquet file"):
        load_rows(bad)


def test_path_errors(tmp_path):
    with pytest.raises(ValueError, match=r"nope.jsonl: no such file; check dataset_path"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"data.csv: unknown format '.csv'; use .jsonl, .json, .parquet"):
        load_rows(write(tmp_path / "data.csv", "prompt\na\n"))
    with pytest.raises(ValueError, match=r"not one written by datasets.Dataset.save_to_disk"):
        load_rows(str(tmp_path))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.jsonl: not UTF-8 text .*save the file as UTF-8"):
        load_rows(str(latin))


def test_messages_use_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "sub", ['{"q": 1}'])
    with pytest.raises(ValueError, match=re.escape("sub/data.jsonl line 1: missing 'prompt'")):
        load_rows("sub/data.jsonl")
