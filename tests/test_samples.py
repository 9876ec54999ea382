"""Samples from files, text and datasets, checked against the model; token labels."""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from qkcheck.errors import SamplesError
from qkcheck.runs import load_run
from qkcheck.runs.config import TaskConfig
from qkcheck.samples import (
    TokenLabels,
    check_tokens,
    dataset_samples,
    find_tokenizer,
    read_text_file,
    read_token_file,
    text_lines,
)
from tests.conftest import GENUINE_PRETRAIN_DIR, GENUINE_RUN_DIR, GENUINE_RUN_ID

TOKENIZER = GENUINE_PRETRAIN_DIR / "tokenizer.json"
LIMITS = {"vocab_size": 512, "n_ctx": 64}


def test_one_dimensional_ids_are_one_sample():
    tokens = check_tokens(torch.arange(5, dtype=torch.int32), **LIMITS)
    assert (tokens.shape, tokens.dtype) == ((1, 5), torch.int64)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (
            torch.zeros(2, 4),
            r"expected integer token ids of shape \(n, T\), got torch.float32 \(2, 4\)",
        ),
        (
            torch.zeros(2, 3, 4, dtype=torch.long),
            r"expected integer .* got torch.int64 \(2, 3, 4\)",
        ),
        (torch.zeros(0, 4, dtype=torch.long), r"no tokens \(shape \(0, 4\)\)"),
        ([1, 2, 3], "expected a tensor of token ids \\(n, T\\), got list"),
        (
            torch.zeros(3, 100, dtype=torch.long),
            "samples have 100 tokens, longer than the model's context n_ctx=64; "
            "cut them to at most 64 tokens",
        ),
        (
            torch.tensor([[1, 2], [3, -1]]),
            r"token id -1 at sample 1, position 1 is out of vocabulary: ids must lie in \[0, 512\) "
            r"\(1 such ids\)",
        ),
        (torch.tensor([[600, 513]]), r"token id 600 at sample 0, position 0 is .* \(2 such ids\)"),
    ],
    ids=["float", "3d", "empty", "list", "too-long", "negative", "too-large"],
)
def test_bad_tokens_name_the_source_and_the_rule(tokens, message):
    with pytest.raises(SamplesError, match=f"^my.pt: {message}"):
        check_tokens(tokens, source="my.pt", **LIMITS)


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write",
    [
        lambda p, t: torch.save(t, p.with_suffix(".pt")),
        lambda p, t: torch.save({"tokens": t}, p.with_suffix(".pt")),
        lambda p, t: torch.save({"input_ids": t}, p.with_suffix(".pt")),
        lambda p, t: np.save(p.with_suffix(".npy"), t.numpy().astype(np.int32)),
    ],
    ids=["pt-tensor", "pt-tokens", "pt-input-ids", "npy"],
)
def test_token_files_load(tmp_path, genuine_run, genuine_tokens, write):
    write(tmp_path / "samples", genuine_tokens[:3])
    path = next(tmp_path.iterdir())
    assert torch.equal(genuine_run.load_samples(path).tokens, genuine_tokens[:3])


def test_a_token_file_dict_without_tokens_is_refused(tmp_path, genuine_run):
    torch.save({"ids": torch.zeros(1, 2, dtype=torch.long)}, tmp_path / "s.pt")
    with pytest.raises(
        SamplesError,
        match=r"s.pt: a dict of samples needs a 'tokens' or 'input_ids' key, got keys \['ids'\]",
    ):
        genuine_run.load_samples(tmp_path / "s.pt")


def test_an_out_of_vocabulary_file_names_the_file(tmp_path, genuine_run):
    np.save(tmp_path / "s.npy", np.full((2, 8), 700))
    with pytest.raises(
        SamplesError, match=r"s.npy: token id 700 at sample 0, position 0 is out of vocabulary"
    ):
        genuine_run.load_samples(tmp_path / "s.npy")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("s.pt", b"garbage", "s.pt: unreadable samples file: "),
        ("s.npy", b"garbage", "s.npy: unreadable samples file: "),
        (
            "s.csv",
            b"1,2",
            r"s.csv: unknown samples format '.csv'; expected one of \['.pt', '.npy', '.txt'\]",
        ),
    ],
)
def test_unreadable_or_unknown_sample_files_are_refused(
    tmp_path, genuine_run, name, content, message
):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SamplesError, match=message):
        genuine_run.load_samples(tmp_path / name)


def test_a_missing_samples_file_is_named(tmp_path, genuine_run):
    with pytest.raises(SamplesError, match=r"nope.pt: no such samples file"):
        genuine_run.load_samples(tmp_path / "nope.pt")


# --- text ------------------------------------------------------------------------------------


def test_text_lines_are_tokenized_and_cut_to_the_shortest(tmp_path, genuine_run):
    (tmp_path / "s.txt").write_text("t5 t7 t9 t11\n\nt2 t3 nonsense\n")
    tokens = genuine_run.load_samples(tmp_path / "s.txt").tokens
    assert tokens.tolist() == [[5, 7, 9], [2, 3, 0]]  # unknown words are [UNK] = 0


def test_a_text_line_longer_than_the_context_is_named(tmp_path):
    (tmp_path / "s.txt").write_text("t5 t6\n" + " ".join(["t9"] * 65) + "\n")
    with pytest.raises(
        SamplesError, match=r"s.txt: line 2 has 65 tokens, longer than the model's context n_ctx=64"
    ):
        read_text_file(tmp_path / "s.txt", TOKENIZER, **LIMITS)


def test_text_needs_a_tokenizer(tmp_path):
    pre = tmp_path / "pre"
    shutil.copytree(GENUINE_PRETRAIN_DIR, pre)
    (pre / "tokenizer.json").unlink()
    run = load_run(GENUINE_RUN_DIR, pretrain=pre)
    assert run.files.tokenizer is None
    assert run.token_labels([3, 4]) == ["3", "4"]
    (tmp_path / "s.txt").write_text("t1 t2\n")
    with pytest.raises(
        SamplesError,
        match=r"s.txt: tokenizing text needs the run's tokenizer.json, and none was found",
    ):
        run.load_samples(tmp_path / "s.txt")


# --- the run's samples and dataset -----------------------------------------------------------


def test_a_run_ships_its_samples_as_samples_pt(tmp_path, genuine_tokens):
    run_dir = tmp_path / "spd" / GENUINE_RUN_ID
    shutil.copytree(GENUINE_RUN_DIR, run_dir)
    torch.save(genuine_tokens[:4].clone(), run_dir / "samples.pt")
    run = load_run(run_dir, pretrain=GENUINE_PRETRAIN_DIR)
    assert run.files.samples == run_dir / "samples.pt"
    assert torch.equal(run.load_samples().tokens, genuine_tokens[:4])


def test_the_dataset_needs_the_datasets_package(monkeypatch, genuine_run):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(
        SamplesError,
        match=r"reading the run's dataset needs the `datasets` package: "
        r"pip install 'qkcheck\[datasets\]'",
    ):
        genuine_run.load_samples("dataset")


def test_the_dataset_is_read_from_a_local_dataset_directory(tmp_path):
    pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    rows = [[2 + (i + j) % 500 for j in range(70)] for i in range(5)]
    rows.insert(1, [7, 8])  # too short: skipped
    (tmp_path / "ds").mkdir()
    lines = [json.dumps({"input_ids": row, "text": "t2 t3"}) for row in rows]
    (tmp_path / "ds" / "train.jsonl").write_text("\n".join(lines) + "\n")
    task = TaskConfig(dataset_name=str(tmp_path / "ds"), column_name="input_ids", is_tokenized=True)
    tokens = dataset_samples(task, n=3, seq_len=64, tokenizer=None, split="train", **LIMITS)
    assert tokens.tolist() == [rows[0][:64], rows[2][:64], rows[3][:64]]

    text = TaskConfig(dataset_name=str(tmp_path / "ds"), column_name="text")
    tokens = dataset_samples(text, n=2, seq_len=2, tokenizer=TOKENIZER, split="train", **LIMITS)
    assert tokens.tolist() == [[2, 3], [2, 3]]
    with pytest.raises(SamplesError, match=r"no column 'story' \(task_config.column_name\)"):
        dataset_samples(
            TaskConfig(dataset_name=str(tmp_path / "ds")),
            n=1,
            seq_len=2,
            tokenizer=TOKENIZER,
            split="train",
            **LIMITS,
        )


# --- token labels ----------------------------------------------------------------------------


def _tokenizer_json(path: Path, model: dict, **extra: object) -> Path:
    path.write_text(json.dumps({"model": model, "added_tokens": [], **extra}))
    return path


def test_byte_level_pieces_are_shown_as_text(tmp_path):
    path = _tokenizer_json(
        tmp_path / "tokenizer.json",
        {"type": "BPE", "vocab": {"Ġthe": 0, "Ċ": 1, "caf": 2, "Ã©": 3, "<|endoftext|>": 4}},
        pre_tokenizer={"type": "ByteLevel"},
    )
    assert TokenLabels.from_tokenizer_json(path)([0, 1, 2, 3, 4, 5]) == [
        " the",
        "\n",
        "caf",
        "é",
        "<|endoftext|>",
        "5",
    ]


def test_unigram_and_metaspace_vocabularies_are_read(tmp_path):
    path = _tokenizer_json(
        tmp_path / "tokenizer.json",
        {"type": "Unigram", "vocab": [["<unk>", 0.0], ["▁hello", -1.0]]},
        pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Metaspace"}]},
    )
    assert TokenLabels.from_tokenizer_json(path)([1, 0]) == [" hello", "<unk>"]


def test_an_unreadable_tokenizer_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(SamplesError, match=r"tokenizer.json: cannot read tokenizer vocabulary"):
        TokenLabels.from_tokenizer_json(tmp_path / "tokenizer.json")


def test_tokenizer_name_finds_a_local_folder_or_the_hub_cache(monkeypatch, tmp_path):
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.json")
    assert (
        find_tokenizer([None, tmp_path / "absent.json"], str(tmp_path))
        == tmp_path / "tokenizer.json"
    )
    snapshot = tmp_path / "hf" / "hub" / "models--org--tok" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(TOKENIZER, snapshot / "tokenizer.json")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert find_tokenizer([], "org/tok") == snapshot / "tokenizer.json"
    assert find_tokenizer([], "org/absent") is None


# --- every integer dtype, refused the rest in one line ---------------------------------------

IDS = np.array([[3, 250, 0, 17], [255, 1, 2, 9]])


@pytest.mark.parametrize(
    "dtype", ["uint8", "uint16", "uint32", "uint64", "int8", "int16", ">i4", ">u2", ">i8", "<u4"]
)
@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_every_integer_dtype_whose_values_fit_is_read_as_int64(tmp_path, dtype, suffix):
    values = IDS if dtype not in ("int8",) else IDS % 100
    arr = values.astype(dtype)
    path = tmp_path / f"s{suffix}"
    if suffix == ".npy":
        np.save(path, arr)
    else:
        torch.save(torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="))), path)
    tokens = read_token_file(path, vocab_size=256, n_ctx=64)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == values.tolist()


def test_uint8_ids_out_of_vocabulary_are_named_with_their_true_value(tmp_path):
    np.save(tmp_path / "s.npy", np.array([[3, 200]], dtype=np.uint8))
    with pytest.raises(SamplesError, match=r"token id 200 at sample 0, position 1 .* \[0, 100\)"):
        read_token_file(tmp_path / "s.npy", vocab_size=100, n_ctx=64)


def test_a_uint64_id_beyond_int64_is_refused_not_wrapped(tmp_path):
    np.save(tmp_path / "s.npy", np.array([[1, 2**63 + 5]], dtype=np.uint64))
    with pytest.raises(SamplesError, match=rf"token id {2**63 + 5} at index \(0, 1\) does not fit"):
        read_token_file(tmp_path / "s.npy", vocab_size=100, n_ctx=64)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.array([["a", "b"]]), r"got a numpy array of dtype str32 \(1, 2\); token ids may be"),
        (np.array([[b"a"]]), r"got a numpy array of dtype bytes8 \(1, 1\)"),
        (np.array([[1.0, 2.0]]), r"got a numpy array of dtype float64 \(1, 2\)"),
        (np.array([[True]]), r"got a numpy array of dtype bool \(1, 1\)"),
        (np.zeros((1, 2), dtype=[("a", "i4")]), r"got a numpy array of dtype void"),
        (torch.tensor([[1, 0, 3]]).to_sparse(), r"got a torch.sparse_coo tensor; .* dense"),
        (torch.zeros(1, 2, dtype=torch.bfloat16), r"got torch.bfloat16 \(1, 2\); token ids may"),
        (torch.zeros(1, 2, dtype=torch.complex64), r"got torch.complex64"),
        (torch.zeros(1, 2, dtype=torch.bool), r"got torch.bool \(1, 2\)"),
        ("1 2 3", r"expected a tensor of token ids \(n, T\), got str"),
        (torch.tensor(5), r"shape \(n, T\), got torch.int64 \(\)"),
    ],
    ids=[
        "str",
        "bytes",
        "float",
        "bool",
        "struct",
        "coo",
        "bf16",
        "complex",
        "tbool",
        "text",
        "0d",
    ],
)
def test_what_is_not_integer_ids_is_refused_in_one_line(data, message):
    with pytest.raises(SamplesError, match=f"^my.pt: .*{message}") as info:
        check_tokens(data, source="my.pt", **LIMITS)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("s.npy", b"garbage!", r"s.npy: unreadable samples file: not a .npy file \(not a file "),
        ("s.pt", b"", r"s.pt: unreadable samples file: the file is empty"),
        ("s.pt", b"PK\x03\x04broken", r"s.pt: unreadable samples file: a damaged torch.save"),
    ],
)
def test_broken_token_files_say_what_their_bytes_are(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SamplesError, match=message):
        read_token_file(tmp_path / name, **LIMITS)


def test_an_object_npy_is_refused_without_numpys_advice_to_unpickle(tmp_path):
    np.save(tmp_path / "s.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    with pytest.raises(SamplesError, match="holds Python objects") as info:
        read_token_file(tmp_path / "s.npy", **LIMITS)
    assert "allow_pickle" not in str(info.value)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_code_executing_samples_pickle_is_refused_without_torchs_advice(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save(
        {"tokens": torch.zeros(1, 2, dtype=torch.long), "x": _RunsCode(marker)}, tmp_path / "s.pt"
    )
    with pytest.raises(
        SamplesError, match=r"s.pt: refused to load: .* code execution \(it references [\w.]*open"
    ) as info:
        read_token_file(tmp_path / "s.pt", **LIMITS)
    shown = "".join(traceback.format_exception(info.value))  # what a traceback would print
    assert "weights_only=True" in shown
    assert "False" not in shown
    assert not marker.exists()


def test_a_directory_given_as_samples_file_is_named(tmp_path):
    with pytest.raises(SamplesError, match=r"s.npy: is a directory; expected a samples file"):
        read_token_file(tmp_path.joinpath("s.npy").mkdir() or tmp_path / "s.npy", **LIMITS)


# --- text samples ----------------------------------------------------------------------------


def test_text_lines_split_on_newline_only_and_drop_a_bom_and_crlf():
    text = "\ufeffa\x0cb\r\nc\u2028d\n\n  \ne\x1cf\x85g\n"
    assert text_lines(text) == ["a\x0cb", "c\u2028d", "e\x1cf\x85g"]


def test_a_bom_does_not_become_a_token(tmp_path):
    (tmp_path / "s.txt").write_text("\ufefft5 t7\nt2 t3\n", encoding="utf-8")
    samples = read_text_file(tmp_path / "s.txt", TOKENIZER, **LIMITS)
    assert samples.tokens.tolist() == [[5, 7], [2, 3]]
    assert samples.note is None  # nothing was cut


def test_a_form_feed_or_line_separator_does_not_split_a_sample(tmp_path):
    (tmp_path / "s.txt").write_text("t5\x0ct7 t9\nt2\u2028t3 t4\n", encoding="utf-8")
    samples = read_text_file(tmp_path / "s.txt", TOKENIZER, **LIMITS)
    assert samples.tokens.shape[0] == 2


def test_cutting_lines_to_one_length_is_said(tmp_path):
    (tmp_path / "s.txt").write_text("t5 t7 t9 t11\nt2 t3\nt4 t6 t8\n")
    samples = read_text_file(tmp_path / "s.txt", TOKENIZER, **LIMITS)
    assert samples.tokens.tolist() == [[5, 7], [2, 3], [4, 6]]
    assert samples.note == (
        f"{tmp_path / 's.txt'}: 2 of 3 lines cut to 2 tokens, the shortest line's length "
        "(the longest had 4)"
    )


def test_text_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "s.txt").write_bytes(b"t5 \xff\xfe t7\n")
    with pytest.raises(SamplesError, match=r"s.txt: cannot read samples text \(UTF-8 expected\)"):
        read_text_file(tmp_path / "s.txt", TOKENIZER, **LIMITS)


def test_samples_do_not_import_runs():
    import ast

    source = Path(__import__("qkcheck.samples").samples.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not {m for m in imported if m.startswith("qkcheck.runs.run")}
    assert "Run" not in {
        a.name
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    }
