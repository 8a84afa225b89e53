"""Text for training GPTB without a network: corpora already on the machine, files, HF datasets.

The default corpus is the docstrings of the Python standard library, read with `ast` (nothing is imported).
Every corpus is deterministic: documents are keyed by a path relative to the corpus root, the held-out split is a
hash of that key (never random), and documents come in the order of another hash of the key, so a `max_chars`
cap takes a sample spread over the whole corpus rather than the modules whose names start with "a".

    >>> texts = load_corpus("stdlib-docs", split="train", max_chars=1_000_000)
    >>> blocks = tokenize_and_chunk(texts, tokenizer, block_size=128)  # (num_blocks, 128) LongTensor
    >>> dataset = TokenBlockDataset(blocks)  # for Trainer + DataCollatorForLanguageModeling(mlm=False)
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import os
import re
import sysconfig
import tokenize
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "validation", "all")
VALIDATION_PERCENT = 5  # share of documents (by hash of their path) held out for validation
TEXT_FILE_SUFFIXES = (".txt", ".md", ".rst", ".py")

# Folders of the standard library that are not its documentation or code: tests, the IDE, demos, installed
# packages, compiled extensions, bundled wheels, generated tables (codec charmaps, pydoc's topic dump).
_STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "__pycache__",
        "lib-dynload",
        "ensurepip",
        "__phello__",
        "pydoc_data",
        "encodings",
    }
)
_STDLIB_SKIP_PREFIXES = ("_sysconfigdata", "config-")  # build-time variables, the Makefile folder

# /usr/share/doc: README/NEWS/FAQ and text files; changelogs and copyright files are skipped, they are mostly
# boilerplate repeated across hundreds of packages.
SYSTEM_DOC_ROOT = Path("/usr/share/doc")
SYSTEM_MAN_ROOT = Path("/usr/share/man")
_DOC_STEMS = ("README", "NEWS", "FAQ")
_MAN_SECTIONS = tuple(f"man{n}" for n in range(1, 9))  # English pages only; translations live in xx/manN
_MAX_PAGES_PER_FAMILY = 64


@dataclass(frozen=True)
class Corpus:
    """A named corpus: how to list its documents and how to read one (None skips it)."""

    name: str
    description: str
    list_documents: Callable[[], list[tuple[str, Path]]]  # sorted (key relative to the root, path)
    read: Callable[[Path], str | None]


# ---------------------------------------------------------------------------------------------------------------
# Deterministic split and order


def _hash(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big")


def split_of(key: str) -> str:
    """The split ("train" or "validation") a document belongs to, from its path relative to the corpus root."""
    return "validation" if _hash("split", key) % 100 < VALIDATION_PERCENT else "train"


# ---------------------------------------------------------------------------------------------------------------
# Listing files


def _walk(root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool]) -> list[tuple[str, Path]]:
    """Regular files under `root` (symlinks skipped: they duplicate other files), as sorted (posix key, path)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if keep_dir(d)]  # prune in place so skipped trees are never walked
        for name in files:
            path = Path(folder, name)
            if keep_file(name) and not path.is_symlink():
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_stdlib() -> list[tuple[str, Path]]:
    def keep(name: str) -> bool:
        return name not in _STDLIB_SKIP_DIRS and not name.startswith(_STDLIB_SKIP_PREFIXES)

    return _walk(_stdlib_root(), keep, lambda name: name.endswith(".py") and keep(name))


def _list_system_docs() -> list[tuple[str, Path]]:
    def is_doc(name: str) -> bool:
        name = name.removesuffix(".gz")
        return name.endswith((".txt", ".md", ".rst")) or name.split(".")[0].upper() in _DOC_STEMS

    documents = []
    if SYSTEM_DOC_ROOT.is_dir():
        documents += [("doc/" + key, path) for key, path in _walk(SYSTEM_DOC_ROOT, lambda d: True, is_doc)]
    for section in _MAN_SECTIONS:
        if (SYSTEM_MAN_ROOT / section).is_dir():
            pages = _walk(SYSTEM_MAN_ROOT / section, lambda d: True, lambda name: True)
            documents += _cap_families([(f"man/{section}/{key}", path) for key, path in pages])
    return sorted(documents)


def _cap_families(pages: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Keep at most `_MAX_PAGES_PER_FAMILY` man pages per program (the part of the name before - _ or .).

    One cloud SDK can install thousands of near-identical pages (gcloud-*); uncapped, they would be the corpus.
    """
    by_family: dict[str, list[tuple[str, Path]]] = {}
    for key, path in pages:
        by_family.setdefault(re.split(r"[-_.]", key.rsplit("/", 1)[-1])[0], []).append((key, path))
    kept = []
    for family in by_family.values():
        kept += sorted(family, key=lambda item: _hash("family", item[0]))[:_MAX_PAGES_PER_FAMILY]
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Reading documents


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def _read_stdlib_docstrings(path: Path) -> str | None:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))  # bytes: ast honours the coding cookie
    except (SyntaxError, ValueError, OSError):
        return None
    return "\n\n".join(_docstrings(tree)) or None


def _read_python_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as f:  # PEP 263 encoding detection, universal newlines
            return f.read()
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None


_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes \fB \fI \fR \f(CW \f[B]
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\[hvwlLDxZbkoN]'[^']*'"), ""),  # motions, widths, drawing
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # user-defined strings
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\(\(..|\[[^\]]*\])"), ""),  # any other special character
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\[~0 ]"), " "),
    (re.compile(r"\\[&|^%c{}/,]"), ""),  # zero-width and italic corrections
    (re.compile(r"\\e"), r"\\"),  # a printed backslash: last, so no rule above reads it as an escape
]
# Requests whose arguments are text worth keeping; the rest are dropped. Alternating-font requests join their
# arguments without spaces (".BR ls (1)" reads "ls(1)"); .IP keeps only its tag, not the indent after it.
_ROFF_SPACED = frozenset({"SH", "SS", "B", "I", "SM", "SB"})
_ROFF_ALTERNATING = frozenset({"BR", "RB", "BI", "IB", "IR", "RI"})
# Requests that end a paragraph.
_ROFF_BREAKS = frozenset({"SH", "SS", "PP", "LP", "P", "TP", "IP", "HP", "TQ", "sp", "br", "nf", "fi", "RS", "RE"})


def _roff_to_text(source: str) -> str:
    """Crude man page -> plain text: words kept and filled into paragraphs; requests, comments, escapes dropped."""
    paragraphs: list[str] = []
    words: list[str] = []  # lines of the paragraph being filled
    fill = True

    def end_paragraph():
        if words:
            paragraphs.append((" " if fill else "\n").join(words))
            words.clear()

    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):  # comments
            continue
        heading = False
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro in _ROFF_BREAKS:
                end_paragraph()
                fill = {"nf": False, "fi": True}.get(macro, fill)
            args = [quoted or bare for quoted, bare in re.findall(r'"([^"]*)"|(\S+)', args)]
            if macro in _ROFF_SPACED:
                line = " ".join(args)
            elif macro in _ROFF_ALTERNATING:
                line = "".join(args)
            elif macro == "IP":
                line = args[0] if args else ""
            else:
                continue
            heading = macro in ("SH", "SS")
        for pattern, replacement in _ROFF_ESCAPES:
            line = pattern.sub(replacement, line)
        if line.strip():
            words.append(line.strip() if fill else line)
        if heading or not line.strip():
            end_paragraph()
    end_paragraph()
    return "\n\n".join(paragraphs)


def _read_system_doc(path: Path) -> str | None:
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError):
        return None  # unreadable, damaged or not UTF-8: not text we want
    if "\0" in text:
        return None
    if SYSTEM_MAN_ROOT in path.parents:
        text = _roff_to_text(text)
    return text.strip() or None


CORPORA: dict[str, Corpus] = {
    corpus.name: corpus
    for corpus in (
        Corpus(
            "stdlib-docs",
            "docstrings of the Python standard library (modules, classes, functions), one document per module",
            _list_stdlib,
            _read_stdlib_docstrings,
        ),
        Corpus(
            "python-code",
            "source code of the Python standard library, comments included, one document per module",
            _list_stdlib,
            _read_python_source,
        ),
        Corpus(
            "system-docs",
            "plain-text documentation under /usr/share/doc (README, NEWS, *.txt/md/rst) and English man pages",
            _list_system_docs,
            _read_system_doc,
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------------
# Public loaders


def list_corpora() -> list[str]:
    """Names of the built-in corpora, for `load_corpus`. Descriptions: `CORPORA[name].description`."""
    return sorted(CORPORA)


def load_corpus(name: str = "stdlib-docs", split: str = "train", max_chars: int | None = None) -> list[str]:
    """Documents of a built-in corpus gathered from this machine, deterministically.

    Args:
        name: one of `list_corpora()`.
        split: "train", "validation" (about `VALIDATION_PERCENT`% of the documents, chosen by a hash of each
            document's path) or "all".
        max_chars: stop once this many characters are gathered (the last document is cut to fit). Documents come
            in a fixed pseudo-random order, so a capped corpus is a spread-out sample, the same on every call.

    Raises:
        ValueError: an unknown corpus or split, a bad `max_chars`, or a corpus that is empty on this machine.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(list_corpora())}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive integer or None, got {max_chars!r}")

    corpus = CORPORA[name]
    documents = corpus.list_documents()
    documents = [(key, path) for key, path in documents if split == "all" or split_of(key) == split]
    documents.sort(key=lambda item: (_hash("order", item[0]), item[0]))

    texts: list[str] = []
    total = 0
    for _, path in documents:
        text = corpus.read(path)
        if not text:
            continue
        if max_chars is not None:
            text = text[: max_chars - total]
        texts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    if not texts:
        raise ValueError(
            f"corpus {name!r} (split {split!r}) is empty on this machine: {corpus.description}. "
            f"Pick another corpus ({', '.join(list_corpora())}) or pass text files with load_text_files(path)."
        )
    return texts


def load_text_files(path: str | os.PathLike) -> list[str]:
    """Read a text file, or every *.txt, *.md, *.rst and *.py file under a folder (recursively, sorted).

    One document per file. In a folder, hidden files and folders are skipped, and so are empty files.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is empty, not UTF-8 text or unreadable, or the folder holds no non-empty text file.
    """
    path = Path(path)
    expected = f"a UTF-8 text file or a folder of {'/'.join('*' + s for s in TEXT_FILE_SUFFIXES)} files"
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist; expected {expected}")
    if path.is_file():
        text = _read_text_file(path)
        if not text.strip():
            raise ValueError(f"data file {str(path)!r} is empty; expected {expected}")
        return [text]

    files = sorted(
        p
        for p in path.rglob("*")
        if p.suffix in TEXT_FILE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    texts = [text for text in map(_read_text_file, files) if text.strip()]
    if not texts:
        found = f"{len(files)} matching file(s), all empty" if files else "no matching files"
        raise ValueError(f"data folder {str(path)!r} holds {found}; expected {expected}")
    return texts


# What `hold_out` keeps for evaluation, in words
HOLD_OUT_RULE = f"every {100 // VALIDATION_PERCENT}th file, or the last {VALIDATION_PERCENT}% of each when fewer"


def hold_out(texts: list[str], percent: int = VALIDATION_PERCENT) -> tuple[list[str], list[str]]:
    """Split documents into training and held-out texts that share nothing.

    With enough documents, every (100 / percent)-th one is held out whole. With fewer (a single file, say), the last
    `percent`% of each document is held out instead, cut at a line break where there is one, so the held-out loss is
    never measured on training text.
    """
    every = 100 // percent
    if len(texts) >= every:
        return [t for i, t in enumerate(texts) if i % every != every - 1], texts[every - 1 :: every]
    train, held_out = [], []
    for text in texts:
        cut = len(text) - max(1, len(text) * percent // 100)
        line_break = text.rfind("\n", 0, cut + 1)
        if line_break > 0:
            cut = line_break + 1
        train.append(text[:cut])
        held_out.append(text[cut:])
    return [t for t in train if t.strip()], [t for t in held_out if t.strip()]


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark rather than train on it
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"data file {str(path)!r} cannot be read: {err.strerror or err}") from None


def load_hf_dataset(
    name: str, split: str = "train", text_column: str = "text", config_name: str | None = None, **kwargs
) -> list[str]:
    """Texts of a HuggingFace dataset via the `datasets` library (needs it installed and, unless cached, network).

    Empty and whitespace-only rows are dropped (wikitext is full of them). `kwargs` go to `datasets.load_dataset`.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"loading the dataset {name!r} needs the `datasets` library: pip install datasets "
            "(and network access to the Hugging Face Hub, unless the dataset is already in the local cache). "
            "Without network, use a built-in corpus (load_corpus) or your own files (load_text_files)."
        ) from None
    dataset = datasets.load_dataset(name, config_name, split=split, **kwargs)
    if text_column not in dataset.column_names:
        raise ValueError(
            f"dataset {name!r} split {split!r} has no column {text_column!r}; "
            f"columns: {', '.join(dataset.column_names)} (pick one with text_column=...)"
        )
    texts = [text for text in dataset[text_column] if isinstance(text, str) and text.strip()]
    if not texts:
        raise ValueError(f"dataset {name!r} split {split!r} has no non-empty text in column {text_column!r}")
    return texts


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing into training blocks


def tokenize_and_chunk(texts: Iterable[str], tokenizer, block_size: int) -> torch.LongTensor:
    """Tokenize documents, join them into one stream and cut it into blocks of `block_size` tokens.

    Each document is followed by the tokenizer's eos token, so the model sees where documents end. The tail that
    does not fill a whole block is dropped. Returns a LongTensor of shape (num_blocks, block_size).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2 (one input and one target), got {block_size!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; documents could not be separated")
    texts = list(texts)
    pieces = [torch.zeros(0, dtype=torch.long)]
    for start in range(0, len(texts), 1000):  # in batches: a big corpus never exists as one list of Python ints
        batch = tokenizer(texts[start : start + 1000], add_special_tokens=False, return_attention_mask=False)
        pieces += [torch.tensor([*doc_ids, eos], dtype=torch.long) for doc_ids in batch["input_ids"]]
    stream = torch.cat(pieces)
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise ValueError(
            f"the texts give {len(stream)} tokens, fewer than one block of {block_size}; "
            "give more text or a smaller block_size"
        )
    return stream[: num_blocks * block_size].view(num_blocks, block_size)


class TokenBlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks as `{"input_ids", "attention_mask"}` examples.

    Made for `Trainer` with `DataCollatorForLanguageModeling(tokenizer, mlm=False)`, which copies `input_ids` to
    `labels`; the model shifts them. Every block is full, so the attention mask is all ones.
    """

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2 or blocks.dtype != torch.long:
            raise ValueError(
                f"blocks must be a 2-D LongTensor (num_blocks, block_size), got {blocks.dtype} {blocks.shape}"
            )
        self.blocks = blocks

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer, block_size: int) -> TokenBlockDataset:
        """Tokenize and chunk `texts` (see `tokenize_and_chunk`)."""
        return cls(tokenize_and_chunk(texts, tokenizer, block_size))

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.blocks[index]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
