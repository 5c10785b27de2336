"""Knowledge retrieval: chunk documents, store their embeddings in pgvector, search and rerank.

Search is two-stage. The HNSW index returns the `candidates` nearest chunks
by cosine distance (`<=>`); those are reranked by

    score = 0.7 * cosine + 0.3 * lexical_overlap

where lexical_overlap is the fraction of the query's terms that occur in the
chunk's heading or content. Terms are lower-cased Latin words and digits,
without a few English stop words, plus overlapping pairs of Chinese
characters, because Chinese has no spaces between words. The embedding
carries the meaning across wording and language, and the overlap lifts
chunks that share the query's exact names, numbers and Chinese terms.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import structlog
from pgvector.psycopg import register_vector

log = structlog.get_logger(__name__)

SUPPORTED_SUFFIXES = (".md", ".markdown", ".txt")
MARKDOWN_SUFFIXES = (".md", ".markdown")
COSINE_WEIGHT = 0.7
LEXICAL_WEIGHT = 0.3


@dataclass
class Chunk:
    heading: str | None  # the heading path, such as "Guide > Descaling"; None in plain text
    content: str


@dataclass
class Passage:
    source: str
    chunk_index: int
    heading: str | None
    content: str
    score: float  # the rerank score; see the module docstring


# ---- chunking ------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
# A sentence with its ending punctuation (English or Chinese) and the whitespace after it.
_SENTENCE = re.compile(r".+?(?:[.!?。！？；;]+\s*|$)", re.DOTALL)


def chunk_text(text: str, max_chars: int = 800, *, is_markdown: bool = True) -> list[Chunk]:
    """Split Markdown by headings, then paragraphs, into chunks of at most max_chars.

    Plain text (is_markdown=False) and Markdown without headings are split
    by paragraphs alone. Paragraphs of one
    section are packed together while they fit; a paragraph longer than
    max_chars is split at sentence ends, and a sentence longer than that at
    max_chars. Headings inside fenced code blocks are not headings.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars={max_chars} is invalid; it must be at least 1")
    chunks: list[Chunk] = []
    sections = _sections(text) if is_markdown else [(None, text)]
    for heading, body in sections:
        pieces = [piece for paragraph in _paragraphs(body) for piece in _split_long(paragraph, max_chars)]
        for content in _pack(pieces, max_chars):
            chunks.append(Chunk(heading, content))
    return chunks


def _sections(text: str) -> list[tuple[str | None, str]]:
    """Return (heading path, body) pairs in document order."""
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    path: list[tuple[int, str]] = []  # (level, title) of the enclosing headings
    is_in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            is_in_fence = not is_in_fence
        match = None if is_in_fence else _HEADING.match(line)
        if match is None:
            sections[-1][1].append(line)
            continue
        level = len(match.group(1))
        path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, match.group(2))]
        sections.append((" > ".join(title for _, title in path), []))
    return [(heading, "\n".join(lines)) for heading, lines in sections]


def _paragraphs(body: str) -> list[str]:
    return [paragraph.strip() for paragraph in re.split(r"\n\s*\n", body) if paragraph.strip()]


def _split_long(paragraph: str, max_chars: int) -> list[str]:
    if len(paragraph) <= max_chars:
        return [paragraph]
    pieces: list[str] = []
    for sentence in _SENTENCE.findall(paragraph):
        for start in range(0, len(sentence), max_chars):
            pieces.append(sentence[start:start + max_chars])
    # Each sentence keeps its own trailing space, so Chinese gets none added.
    packed = _pack(pieces, max_chars, separator="")
    return [piece.strip() for piece in packed if piece.strip()]


def _pack(pieces: list[str], max_chars: int, separator: str = "\n\n") -> list[str]:
    """Join consecutive pieces while the result stays within max_chars."""
    packed: list[str] = []
    for piece in pieces:
        if packed and len(packed[-1]) + len(separator) + len(piece) <= max_chars:
            packed[-1] = packed[-1] + separator + piece
        else:
            packed.append(piece)
    return packed


# ---- ingestion -----------------------------------------------------------


@dataclass
class _Document:
    source: str  # the resolved absolute path, which identifies the document
    text: str
    sha256: str
    is_markdown: bool


def ingest_paths(conn: psycopg.Connection, embedder, paths: list[Path]) -> dict:
    """Chunk, embed and store files and folders; return {"documents", "chunks", "skipped"} counts.

    Folders are searched recursively for SUPPORTED_SUFFIXES. Every path is
    read and checked before anything is written, so a bad path stores
    nothing. A file whose sha256 is unchanged is skipped; a changed file has
    its chunks replaced.
    """
    documents = [_read_document(file) for file in _expand_paths(paths)]
    register_vector(conn)

    counts = {"documents": 0, "chunks": 0, "skipped": 0}
    for document in documents:
        num_chunks = _store_document(conn, embedder, document)
        if num_chunks is None:
            counts["skipped"] += 1
        else:
            counts["documents"] += 1
            counts["chunks"] += num_chunks
    log.info("knowledge_ingested", **counts)
    return counts


def _expand_paths(paths: list[Path]) -> list[Path]:
    supported = ", ".join(SUPPORTED_SUFFIXES)
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise ValueError(f"folder {str(path)!r} contains no files with a supported suffix ({supported})")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise ValueError(f"file {str(path)!r} has an unsupported suffix; supported suffixes: {supported}")
            files.append(path)
        else:
            raise ValueError(f"path {str(path)!r} is not a readable file or folder; "
                             f"pass files or folders with the suffixes {supported}")
    return list(dict.fromkeys(file.resolve() for file in files))


def _read_document(file: Path) -> _Document:
    try:
        data = file.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        raise ValueError(f"file {str(file)!r} cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"file {str(file)!r} is not UTF-8 text; convert it to UTF-8 and ingest it again") from exc
    return _Document(str(file), text, hashlib.sha256(data).hexdigest(), file.suffix.lower() in MARKDOWN_SUFFIXES)


def _store_document(conn: psycopg.Connection, embedder, document: _Document) -> int | None:
    """Store one document's chunks; return their number, or None when the stored copy is unchanged."""
    row = conn.execute("SELECT sha256 FROM documents WHERE source = %s", (document.source,)).fetchone()
    if row is not None and row[0] == document.sha256:
        return None

    chunks = chunk_text(document.text, is_markdown=document.is_markdown)
    vectors = embedder.embed([_embedding_text(chunk) for chunk in chunks])  # [num_chunks, 512]

    with conn.transaction():
        document_id = conn.execute(
            "INSERT INTO documents (source, sha256) VALUES (%s, %s) "
            "ON CONFLICT (source) DO UPDATE SET sha256 = EXCLUDED.sha256, ingested_at = now() RETURNING id",
            (document.source, document.sha256),
        ).fetchone()[0]
        conn.execute("DELETE FROM chunks WHERE document_id = %s", (document_id,))
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO chunks (document_id, chunk_index, heading, content, embedding) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(document_id, index, chunk.heading, chunk.content, vectors[index])
                 for index, chunk in enumerate(chunks)],
            )
    log.info("document_ingested", source=document.source, num_chunks=len(chunks), is_update=row is not None)
    return len(chunks)


def _embedding_text(chunk: Chunk) -> str:
    return f"{chunk.heading}\n{chunk.content}" if chunk.heading else chunk.content


# ---- search --------------------------------------------------------------

_SEARCH_SQL = """
SELECT d.source, c.chunk_index, c.heading, c.content, 1 - (c.embedding <=> %(query)s) AS cosine
FROM chunks c JOIN documents d ON d.id = c.document_id
ORDER BY c.embedding <=> %(query)s
LIMIT %(limit)s
"""


def search(conn: psycopg.Connection, embedder, query: str, top_k: int = 3, candidates: int = 20) -> list[Passage]:
    """Return the top_k passages for a query: HNSW nearest candidates, reranked as the module docstring states."""
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid; it must be at least 1")
    if not query.strip():
        return []
    candidates = max(candidates, top_k)
    register_vector(conn)
    query_vector = embedder.embed([query])[0]  # [512]

    with conn.transaction():
        # HNSW returns at most ef_search rows (default 40), so raise it for larger candidate sets.
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(max(40, candidates)),))
        rows = conn.execute(_SEARCH_SQL, {"query": query_vector, "limit": candidates}).fetchall()

    query_terms = _terms(query)
    passages = [
        Passage(source, chunk_index, heading, content,
                _rerank_score(float(cosine), query_terms, f"{heading or ''}\n{content}"))
        for source, chunk_index, heading, content, cosine in rows
    ]
    passages.sort(key=lambda passage: passage.score, reverse=True)
    return passages[:top_k]


_STOP_WORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it my of on or the to what when where which who "
    "why with you your".split()
)
_LATIN_TERM = re.compile(r"[a-z0-9]+")
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def _terms(text: str) -> set[str]:
    lowered = text.lower()
    terms = {word for word in _LATIN_TERM.findall(lowered) if word not in _STOP_WORDS}
    for run in _CJK_RUN.findall(lowered):
        if len(run) == 1:
            terms.add(run)
        terms.update(run[i:i + 2] for i in range(len(run) - 1))
    return terms


def _rerank_score(cosine: float, query_terms: set[str], text: str) -> float:
    if not query_terms:
        return round(COSINE_WEIGHT * cosine, 4)
    overlap = len(query_terms & _terms(text)) / len(query_terms)
    return round(COSINE_WEIGHT * cosine + LEXICAL_WEIGHT * overlap, 4)


# ---- prompt injection of passages ------------------------------------------

PASSAGE_INSTRUCTION = (
    "Answer the user's question using the numbered passages below. Cite the passages you use as [n]. "
    "If the passages do not contain the answer, say that the knowledge base does not cover it."
)


def inject_passages(messages: list[dict], passages: list[Passage]) -> list[dict]:
    """Return a new message list whose system prompt carries the numbered passages and a citation instruction.

    The passages join the first system message, or a new one at the start
    when there is none. Without passages the messages are returned unchanged
    (as a new list).
    """
    if not passages:
        return [dict(message) for message in messages]

    blocks = [PASSAGE_INSTRUCTION]
    for number, passage in enumerate(passages, start=1):
        label = f"[{number}] {Path(passage.source).name}"
        if passage.heading:
            label += f" — {passage.heading}"
        blocks.append(f"{label}\n{passage.content}")
    knowledge = "\n\n".join(blocks)

    result = [dict(message) for message in messages]
    for message in result:
        if message.get("role") == "system":
            message["content"] = f"{message.get('content') or ''}\n\n{knowledge}".lstrip()
            return result
    return [{"role": "system", "content": knowledge}, *result]
