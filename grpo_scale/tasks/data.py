"""User data sets: rows with a ``prompt`` column, from JSONL, JSON, Parquet or a ``datasets`` folder.

    {"prompt": "What is 7*8?", "answer": "56", "source": "quiz"}

Every row needs a ``prompt`` in one of TRL's two formats: *standard*, a non-empty string, tokenised as it
is (no chat template, no system prompt); or *conversational*, a list of ``{"role", "content"}`` messages
(roles system, user, assistant), rendered with the tokenizer's chat template. Every row of a data set
uses the same format. Other columns are kept and reach the reward functions as keyword lists (``answer=[...]``), so every row must
have the same columns. Errors name the file, the line or row (1-based) and the fix.

Formats: ``.jsonl`` (one JSON object per line, blank lines skipped), ``.json`` (a list of objects),
``.parquet`` (needs ``pyarrow``), or a directory written by ``datasets.Dataset.save_to_disk`` (needs
``datasets``).
"""
from __future__ import annotations

import json
import os

# Reward functions receive these as their own arguments, so a column may not use the names.
_RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
_ENCODING = "utf-8-sig"  # UTF-8, also when an editor wrote a byte-order mark first


def _columns(names) -> str:
    return ", ".join(names) or "none"


def _check_rows(rows: list, where: list[str], path: str) -> list[dict]:
    """Validate rows read from ``path``; ``where[i]`` locates row i in messages ("line 7", "row 3")."""
    if not rows:
        raise ValueError(f"{path}: no rows (the file is empty); add one object per problem with a 'prompt'")
    first_keys = None
    for row, loc in zip(rows, where):
        if not isinstance(row, dict):
            raise ValueError(f"{path} {loc}: expected a JSON object such as {{\"prompt\": \"...\"}}, "
                             f"got {type(row).__name__}")
        if "prompt" not in row:
            raise ValueError(f"{path} {loc}: missing 'prompt' column (columns: {_columns(row)}); "
                             "rename the column to 'prompt'")
        prompt = row["prompt"]
        kind = _prompt_kind(prompt, path, loc)
        if first_keys is None:
            first_kind = kind
        elif kind != first_kind:
            raise ValueError(f"{path} {loc}: 'prompt' is {kind} but {first_loc}'s is {first_kind}; use one "
                             "format for every row (a string, or a list of {\"role\", \"content\"} messages)")
        reserved = [c for c in _RESERVED if c in row]
        if reserved:
            raise ValueError(f"{path} {loc}: column {reserved[0]!r} is reserved (reward functions receive "
                             "the model's inputs and outputs under that name); rename it")
        if first_keys is None:
            first_keys, first_loc = list(row), loc
        elif set(row) != set(first_keys):
            extra, lacking = sorted(set(row) - set(first_keys)), sorted(set(first_keys) - set(row))
            detail = "; ".join(s for s in (extra and f"extra {extra}", lacking and f"lacks {lacking}") if s)
            raise ValueError(f"{path} {loc}: columns ({_columns(row)}) differ from {first_loc}'s "
                             f"({_columns(first_keys)}): {detail}; every row needs the same columns")
    return rows


def _prompt_kind(prompt, path: str, loc: str) -> str:
    """'standard' (a string) or 'conversational' (messages); ValueError naming what is wrong otherwise."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{path} {loc}: 'prompt' is empty; every row needs a question")
        return "standard"
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError(f"{path} {loc}: 'prompt' is an empty list of messages; give at least a user message")
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{path} {loc}: message {i} of 'prompt' must be {{\"role\": ..., \"content\": "
                                 f"\"...\"}} with string values, got {m!r}")
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"{path} {loc}: message {i} has role {m['role']!r}; use system, user or assistant")
        return "conversational"
    raise ValueError(f"{path} {loc}: 'prompt' must be a string or a list of {{\"role\", \"content\"}} messages, "
                     f"got {type(prompt).__name__} {prompt!r}")


def _read_jsonl(path: str) -> list[dict]:
    rows, where = [], []
    with open(path, encoding=_ENCODING) as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {number}: not valid JSON ({e.msg}, column {e.colno}); "
                                     "write one JSON object per line") from None
                where.append(f"line {number}")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    return _check_rows(rows, where, path)


def _read_json(path: str) -> list[dict]:
    try:
        with open(path, encoding=_ENCODING) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path}: no rows (the file is empty); write a JSON list of objects with a 'prompt'")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects ([{{\"prompt\": ...}}, ...]), got "
                         f"{type(data).__name__}; for one object per line, name the file .jsonl")
    return _check_rows(data, [f"row {i}" for i in range(1, len(data) + 1)], path)


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow "
                         "(or convert the file to .jsonl)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return _check_rows(rows, [f"row {i}" for i in range(1, len(rows) + 1)], path)


def _read_saved_dataset(path: str) -> list[dict]:
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise ValueError(f"{path}: holds several splits ({', '.join(splits)}); pass one split's folder, "
                         f"for example {os.path.join(path, splits[0] if splits else 'train')}")
    if not os.path.exists(os.path.join(path, "state.json")):
        raise ValueError(f"{path}: a folder, but not one written by datasets.Dataset.save_to_disk (no "
                         "state.json); pass a .jsonl, .json or .parquet file or such a folder")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: reading a saved data set needs the datasets library: pip install datasets") from None
    try:
        rows = datasets.load_from_disk(path).to_list()
    except Exception as e:  # a damaged or incompatible folder: say which and why
        raise ValueError(f"{path}: datasets could not load this folder ({type(e).__name__}: {e})") from None
    return _check_rows(rows, [f"row {i}" for i in range(1, len(rows) + 1)], path)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def load_rows(path: str) -> list[dict]:
    """All rows of a user data set as dicts, each with a non-empty string ``prompt``.

    path: a ``.jsonl``, ``.json`` or ``.parquet`` file, or a ``datasets.Dataset.save_to_disk`` folder.
    Raises ValueError naming the file, the line or row, and what to change.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_saved_dataset(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file; check dataset_path")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _READERS:
        raise ValueError(f"{path}: unknown format {suffix or '(no extension)'!r}; use .jsonl, .json, .parquet "
                         "or a folder written by datasets.Dataset.save_to_disk")
    return _READERS[suffix](path)


def rows_from(data, what: str) -> list[dict]:
    """Rows of a data set given in any of the forms the Python API takes: a path (see ``load_rows``), a
    list of dicts, or a ``datasets.Dataset``; validated like a file (errors name ``what`` and the row)."""
    if isinstance(data, (str, os.PathLike)):
        return load_rows(os.fspath(data))
    if hasattr(data, "to_list") and callable(data.to_list):  # datasets.Dataset
        rows = data.to_list()
    elif isinstance(data, (list, tuple)):
        rows = list(data)
    else:
        raise ValueError(f"{what}: expected a datasets.Dataset, an IterableDataset, a list of dicts or a path, got "
                         f"{type(data).__name__}")
    return _check_rows(rows, [f"row {i + 1}" for i in range(len(rows))], what)


class IterableRows:
    """A ``datasets.IterableDataset`` (or any re-iterable of dicts) as a prompt stream: rows are read as
    they are needed, validated one by one, and the data set is iterated again at its end; resumable by
    the number of rows consumed."""

    def __init__(self, data, what: str = "train_dataset"):
        self.data, self.what, self.consumed = data, what, 0
        self._it, self._first = None, None
        self._first = self._peek()

    def _peek(self) -> dict:
        row = next(iter(self.data), None)
        if row is None:
            raise ValueError(f"{self.what}: the data set yields no rows")
        return _check_rows([dict(row)], ["row 1"], self.what)[0]

    def columns(self) -> list[str]:
        return [k for k in self._first if k != "prompt"]

    def _next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.data)
            row = next(self._it, None)
            if row is not None:
                self.consumed += 1
                row = dict(row)
                _check_rows([self._first, row], ["row 1", f"row {self.consumed}"], self.what)
                return row
            self._it = None  # the end of a pass: start the next one
        raise ValueError(f"{self.what}: the data set yields no rows")

    def take(self, n: int) -> list[dict]:
        return [self._next() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        target, self.consumed, self._it = int(state["consumed"]), 0, None
        while self.consumed < target:
            self._next()
