"""Corpora, text files, tokenizers and training blocks: offline, deterministic, clear errors."""

import gzip
import sys
import types
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from modeling_gptb import data
from modeling_gptb.data import (
    TokenBlockDataset,
    list_corpora,
    load_corpus,
    load_hf_dataset,
    load_text_files,
    split_of,
    tokenize_and_chunk,
)
from modeling_gptb.tokenization import EOS_TOKEN, PAD_TOKEN, byte_tokenizer, token_config_kwargs, train_tokenizer


@pytest.fixture(scope="module")
def docs():
    return load_corpus("stdlib-docs", split="train", max_chars=100_000)


@pytest.fixture(scope="module")
def bpe(docs):
    return train_tokenizer(docs, vocab_size=1024)


# ---------------------------------------------------------------------------------------------------------------
# Built-in corpora


def test_list_corpora():
    assert list_corpora() == ["python-code", "stdlib-docs", "system-docs"]


def test_stdlib_docs_is_real_text_and_deterministic(docs):
    assert sum(map(len, docs)) == 100_000  # the cap is exact: the last document is cut
    assert all(isinstance(text, str) and text.strip() for text in docs)
    words = " ".join(docs).split()
    assert len(words) > 10_000
    for common in ("the", "Return", "of"):
        assert common in words
    assert load_corpus("stdlib-docs", split="train", max_chars=100_000) == docs


def test_a_smaller_cap_takes_a_prefix_of_the_same_documents(docs):
    small = load_corpus("stdlib-docs", split="train", max_chars=30_000)
    assert small[:-1] == docs[: len(small) - 1]
    assert docs[len(small) - 1].startswith(small[-1])


def test_validation_is_disjoint_from_train(docs):
    validation = load_corpus("stdlib-docs", split="validation", max_chars=30_000)
    assert sum(map(len, validation)) == 30_000
    assert not set(validation) & set(docs)


def test_split_is_a_stable_hash_of_the_path():
    keys = [f"pkg{i}/module{i}.py" for i in range(4000)]
    share = sum(split_of(key) == "validation" for key in keys) / len(keys)
    assert 0.03 < share < 0.07
    # Pinned: changing the hash would move documents between splits, and leak old validation text into training.
    validation = [i for i in range(200) if split_of(f"m{i}.py") == "validation"]
    assert validation == [16, 21, 39, 116, 133, 153, 154, 155, 162]


def test_python_code_corpus():
    code = load_corpus("python-code", split="train", max_chars=50_000)
    joined = "\n".join(code)
    assert "def " in joined and "import " in joined and "#" in joined
    assert code == load_corpus("python-code", split="train", max_chars=50_000)


def test_unknown_corpus_split_and_bad_cap():
    with pytest.raises(ValueError, match="unknown corpus 'wikipedia'; available: python-code, stdlib-docs"):
        load_corpus("wikipedia")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_corpus("stdlib-docs", split="test")
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="max_chars"):
            load_corpus("stdlib-docs", max_chars=bad)


def test_stdlib_corpus_skips_tests_packages_and_noise(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module doc."""\n\nclass A:\n    """Class doc."""\n\n    def f(self):\n        """Method doc."""\n\n'
        'def g():\n    """Function doc."""\n'
    )
    for noise in ("test/test_x.py", "site-packages/lib/x.py", "idlelib/x.py", "_sysconfigdata_x.py"):
        (tmp_path / noise).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / noise).write_text('"""NOISE"""\n')
    (tmp_path / "broken.py").write_text('"""Never read."""\ndef (:\n')  # a syntax error is skipped, not fatal
    monkeypatch.setattr(data, "_stdlib_root", lambda: tmp_path)

    assert load_corpus("stdlib-docs", split="all") == ["Module doc.\n\nClass doc.\n\nMethod doc.\n\nFunction doc."]
    sources = load_corpus("python-code", split="all")
    assert len(sources) == 2 and not any("NOISE" in text for text in sources)


def test_system_docs_reads_text_gzip_and_man_pages(tmp_path, monkeypatch):
    doc, man = tmp_path / "doc", tmp_path / "man"
    (doc / "tool").mkdir(parents=True)
    (doc / "tool" / "README").write_text("The tool README.\n")
    (doc / "tool" / "NEWS.gz").write_bytes(gzip.compress(b"Version 2: faster.\n"))
    (doc / "tool" / "changelog.gz").write_bytes(gzip.compress(b"* boilerplate\n"))
    (doc / "tool" / "copyright").write_text("boilerplate\n")
    (doc / "tool" / "README.link").symlink_to(doc / "tool" / "README")
    roff = "\n".join(
        ['.\\" a comment', ".TH TOOL 1", ".SH NAME", "tool \\- do", "things", ".SH OPTIONS", ".TP", ".BR \\-v (1)"]
        + ["be \\fBloud\\fR \\e."]
    )
    (man / "man1").mkdir(parents=True)
    (man / "man1" / "tool.1.gz").write_bytes(gzip.compress(roff.encode()))
    (man / "man1" / "bad.1.gz").write_bytes(b"not gzip")  # damaged: skipped
    monkeypatch.setattr(data, "SYSTEM_DOC_ROOT", doc)
    monkeypatch.setattr(data, "SYSTEM_MAN_ROOT", man)

    texts = load_corpus("system-docs", split="all")
    assert sorted(texts) == sorted(
        ["The tool README.", "Version 2: faster.", "NAME\n\ntool - do things\n\nOPTIONS\n\n-v(1) be loud \\."]
    )


def test_an_empty_corpus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DOC_ROOT", tmp_path / "absent")
    monkeypatch.setattr(data, "SYSTEM_MAN_ROOT", tmp_path / "absent")
    with pytest.raises(ValueError, match="corpus 'system-docs' .* is empty on this machine.*load_text_files"):
        load_corpus("system-docs")


# ---------------------------------------------------------------------------------------------------------------
# Text files and HF datasets


def test_load_text_files_folder_recursive_sorted_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.md").write_text("zed")
    (tmp_path / "a.txt").write_text("\ufeffalpha")  # a byte-order mark is dropped
    (tmp_path / "c.py").write_text("x = 1")
    (tmp_path / "d.rst").write_text("   \n")  # empty: skipped
    (tmp_path / "e.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".git" / "notes.txt").write_text("hidden")
    assert load_text_files(tmp_path) == ["alpha", "zed", "x = 1"]  # a.txt, b/z.md, c.py
    assert load_text_files(str(tmp_path / "b" / "z.md")) == ["zed"]


def test_load_text_files_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*expected a UTF-8 text file or a folder"):
        load_text_files(missing)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt' is empty"):
        load_text_files(tmp_path / "empty.txt")
    (tmp_path / "blob.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="blob.txt' is not UTF-8 text"):
        load_text_files(tmp_path / "blob.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder' holds no matching files"):
        load_text_files(tmp_path / "folder")
    (tmp_path / "folder" / "a.md").write_text("\n\n")
    with pytest.raises(ValueError, match="holds 1 matching file\\(s\\), all empty"):
        load_text_files(tmp_path / "folder")


def test_load_hf_dataset_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets.*network"):
        load_hf_dataset("wikitext", split="train")


def test_load_hf_dataset_reads_the_text_column(monkeypatch):
    class FakeDataset(dict):
        column_names = property(lambda self: list(self))

    calls = []

    def load_dataset(name, config_name, split):
        calls.append((name, config_name, split))
        return FakeDataset(text=["first", "", "  ", "second"], label=[0, 1, 2, 3])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_hf_dataset("wikitext", "validation", config_name="wikitext-2-raw-v1") == ["first", "second"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation")]
    with pytest.raises(ValueError, match="no column 'content'; columns: text, label"):
        load_hf_dataset("wikitext", text_column="content")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_trained_tokenizer_is_deterministic_and_gpt2_style(docs, bpe):
    again = train_tokenizer(docs, vocab_size=1024)
    assert again.backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()
    assert len(bpe) == 1024
    assert (bpe.eos_token, bpe.bos_token, bpe.unk_token, bpe.pad_token) == (EOS_TOKEN, EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (bpe.eos_token_id, bpe.pad_token_id) == (0, 1)  # the ids gptb-tiny's preset expects
    assert bpe.model_max_length > 10**18 and bpe.padding_side == "left"
    # BPE learned the corpus: far fewer tokens than bytes.
    text = docs[0][:2000]
    assert len(bpe(text)["input_ids"]) < 0.5 * len(text.encode())


def test_vocab_size_too_small_for_the_bytes():
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 258"):
        train_tokenizer(["abc"], vocab_size=100)


def test_byte_tokenizer_maps_byte_b_to_id_b_plus_2():
    tok = byte_tokenizer()
    assert len(tok) == 258
    text = "héllo 🌍"
    assert tok(text)["input_ids"] == [b + 2 for b in text.encode()]
    assert token_config_kwargs(tok) == {"vocab_size": 258, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


TRICKY = [
    "",
    " leading and trailing spaces  ",
    "tabs\tand\r\nnewlines\n\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語, 한국어, עברית, العربية",
    "emoji 🌍👩‍👩‍👧 and combining e\u0301 and zero\u200bwidth and \x00 nul",
    f"special tokens as text: {EOS_TOKEN} x{PAD_TOKEN}y {EOS_TOKEN}{EOS_TOKEN}",
    "    def f(x):\n        return x  # code keeps its indentation",
    "spaces before punctuation , . ! ? and don 't , it 's",  # what clean_up_tokenization_spaces would eat
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_text(bpe, text):
    for tok in (bpe, byte_tokenizer()):
        assert tok.decode(tok(text)["input_ids"]) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe(text)["input_ids"]) == text
    assert byte_tokenizer().decode(byte_tokenizer()(text)["input_ids"]) == text


def test_save_and_reload_with_auto_tokenizer(bpe, docs, tmp_path):
    bpe.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [docs[1][:3000], TRICKY[4], TRICKY[5]]
    assert reloaded(texts)["input_ids"] == bpe(texts)["input_ids"]
    assert [reloaded.decode(ids) for ids in reloaded(texts)["input_ids"]] == texts
    assert (reloaded.eos_token_id, reloaded.pad_token_id, reloaded.padding_side) == (0, 1, "left")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "sequence length is longer than the maximum" warning: no limit
        assert len(reloaded("word " * 5000)["input_ids"]) > 1024


# ---------------------------------------------------------------------------------------------------------------
# Training blocks


def test_tokenize_and_chunk_joins_documents_with_eos_and_drops_the_tail():
    tok = byte_tokenizer()
    blocks = tokenize_and_chunk(["abc", "de"], tok, block_size=3)
    stream = [*(b + 2 for b in b"abc"), 0, *(b + 2 for b in b"de"), 0]  # 7 tokens -> 2 blocks, 1 dropped
    assert blocks.dtype == torch.long and blocks.shape == (2, 3)
    assert blocks.flatten().tolist() == stream[:6]


def test_tokenize_and_chunk_on_a_corpus(docs, bpe):
    blocks = tokenize_and_chunk(docs, bpe, block_size=64)
    total = sum(len(ids) + 1 for ids in bpe(docs, add_special_tokens=False)["input_ids"])
    assert blocks.shape == (total // 64, 64)
    assert (blocks == bpe.eos_token_id).sum() >= len(docs) - 1
    assert torch.equal(blocks, tokenize_and_chunk(docs, bpe, block_size=64))


def test_tokenize_and_chunk_errors():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="fewer than one block of 100"):
        tokenize_and_chunk(["short"], tok, block_size=100)
    for bad in (1, 0, 2.0, None):
        with pytest.raises(ValueError, match="block_size must be an integer >= 2"):
            tokenize_and_chunk(["text"], tok, block_size=bad)


def test_dataset_with_the_lm_collator(docs, bpe):
    dataset = TokenBlockDataset.from_texts(docs, bpe, block_size=32)
    assert len(dataset) == dataset.blocks.shape[0] > 8
    example = dataset[3]
    assert set(example) == {"input_ids", "attention_mask"} and example["attention_mask"].sum() == 32

    collator = DataCollatorForLanguageModeling(bpe, mlm=False)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collator)))
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 32)
    # Full blocks and pad != eos: every label is the input, eos included (pad = eos would turn eos into -100).
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert (dataset.blocks == bpe.eos_token_id).any()


def test_collator_masks_left_padding_in_the_labels(bpe):
    collator = DataCollatorForLanguageModeling(bpe, mlm=False)
    features = [{"input_ids": ids} for ids in bpe(["a short one", "a much longer line of text here"])["input_ids"]]
    batch = collator(features)
    short = len(features[0]["input_ids"])
    pad = batch["input_ids"].shape[1] - short
    assert batch["input_ids"][0, :pad].tolist() == [bpe.pad_token_id] * pad
    assert batch["labels"][0, :pad].tolist() == [-100] * pad
    assert batch["labels"][0, pad:].tolist() == features[0]["input_ids"]
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * short


def test_dataset_rejects_non_blocks():
    with pytest.raises(ValueError, match="2-D LongTensor"):
        TokenBlockDataset(torch.zeros(4, 3))


def test_hold_out_never_shares_text_with_training():
    one_file = "".join(f"line {i} of the only file\n" for i in range(200))
    train, held_out = data.hold_out([one_file])
    assert train[0] + held_out[0] == one_file  # a cut, not a copy
    assert held_out[0].startswith("line 190") and len(held_out[0]) < len(one_file) // 10  # the last 5%, at a line
    no_line_breaks = "x" * 1000
    train, held_out = data.hold_out([no_line_breaks])
    assert (len(train[0]), len(held_out[0])) == (950, 50)
    many = [f"document {i}" for i in range(45)]
    train, held_out = data.hold_out(many)
    assert held_out == ["document 19", "document 39"] and len(train) == 43 and not set(train) & set(held_out)
